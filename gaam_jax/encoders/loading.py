"""Loading a Hugging Face model folder (or hub id) as an :class:`~gaam_jax.encoders.Encoder`.

:func:`from_pretrained` reads ``config.json``, builds the architecture's module
(:func:`configure`), checks every tensor's name and shape against the module's (from
``jax.eval_shape``, before anything is read) and streams each memory-mapped tensor to its
devices (into its shards, with a mesh), so the host never holds two copies of the weights.
:func:`check_checkpoint` runs the checks alone; :func:`abstract_from_pretrained` is
:func:`from_pretrained` with shapes, dtypes and shardings instead of weights (nothing read);
:func:`open_host_params` maps the weights without placing them.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gaam_jax.adapters import Adapters
from gaam_jax.encoders import heads, registry, stack
from gaam_jax.encoders.architecture import Architecture
from gaam_jax.encoders.checkpoint import open_tensors, read_config, resolve
from gaam_jax.encoders.encoder import Encoder, init_adapters
from gaam_jax.sharding import (
    DEFAULT_RULES,
    Rules,
    abstract_params,
    param_shardings,
    validate_rules,
)

__all__ = [
    "abstract_from_pretrained",
    "check_checkpoint",
    "configure",
    "from_pretrained",
    "open_host_params",
]


def configure(
    raw: Mapping[str, Any],
    dtype: Any = jnp.float32,
    options: stack.EncoderOptions | None = None,
    adapters: Adapters | None = None,
) -> tuple[Architecture, Any, nn.Module]:
    """The architecture, config and Flax module of a parsed ``config.json`` (no weights read).

    Args:
      raw: the parsed ``config.json``; its ``model_type`` picks the architecture.
      dtype: the module's compute dtype.
      options: how the module runs (:class:`~gaam_jax.encoders.stack.EncoderOptions`).
      adapters: what the module adapts (default nothing).

    Returns:
      ``(architecture, config, module)``: the :class:`Architecture`, its config dataclass
      (``architecture.config_cls.from_hf(raw)``) and the unbound encoder module.

    Raises:
      ValueError: one line, for an unsupported ``model_type`` or config value.
    """
    arch = registry.get(raw["model_type"])
    config = arch.config_cls.from_hf(raw)
    module = arch.encoder_cls(
        config,
        dtype=dtype,
        options=options or stack.EncoderOptions(),
        adapters=adapters or Adapters(),
    )
    return arch, config, module


def _mapped(path: pathlib.Path, raw: dict, arch: Architecture, config: Any, module: nn.Module):
    """``(tensors, host params, boxed abstract params)``: names and shapes checked, nothing read.

    The tensors are memory-mapped views; the module's shapes come from ``jax.eval_shape``.

    Raises:
      ValueError: a tensor is missing or its shape is not the one ``config.json`` implies.
    """
    tensors = open_tensors(path)
    host = arch.params_from_hf(config, tensors)
    # The example inputs are the module's leading positional inputs, in order.
    abstract = abstract_params(module, *arch.example_inputs(raw).values())
    _check_tree(host, abstract, raw["model_type"])
    return tensors, host, abstract


def check_checkpoint(path: str | pathlib.Path, *, revision: str | None = None) -> None:
    """Checks a checkpoint's tensor names and shapes against its ``config.json``, reading none.

    The safetensors headers give the shapes; the module's come from ``jax.eval_shape``.
    ``path`` and ``revision`` are as :func:`from_pretrained`'s.

    Raises:
      FileNotFoundError: no config or weights (as :func:`from_pretrained`).
      ValueError: one line: an unsupported config value (as :func:`from_pretrained`), or
        weights that do not match the config.
    """
    path = resolve(path, revision)
    raw = read_config(path)
    arch, config, module = configure(raw)
    try:
        _mapped(path, raw, arch, config, module)
    except ValueError as err:
        detail = " ".join(str(err).split()).rstrip(".")
        raise ValueError(
            f"{path}: the weights do not match config.json ({detail}); copy config.json and "
            "the weights from the same snapshot."
        ) from None


def _check_tree(host: dict, abstract: Any, model_type: str) -> None:
    got = {k: tuple(v.shape) for k, v in flatten_dict(host).items()}
    want = {k: tuple(v.shape) for k, v in flatten_dict(nn.unbox(abstract)).items()}
    for key in sorted(set(got) | set(want)):
        if got.get(key) != want.get(key):
            raise ValueError(
                f"{model_type}.params_from_hf: {'/'.join(key)} is {got.get(key)}, the module "
                f"expects {want.get(key)}."
            )


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What loading a folder decides before reading any weight (names and shapes checked)."""

    path: pathlib.Path
    raw: dict
    model_type: str
    dtype: Any
    config: Any
    module: nn.Module
    rules: Rules
    tensors: Any  # the memory-mapped checkpoint (views: nothing read)
    host: dict  # flat: param path -> its memory-mapped view or StackedTensor
    shardings: dict  # flat: param path -> the sharding it is placed with


def _plan(
    path: str | pathlib.Path,
    dtype: Any,
    mesh: Mesh | None,
    rules: Rules | None,
    revision: str | None,
    attention: str,
    block_size: int,
    remat: str,
) -> _Plan:
    """:func:`from_pretrained` up to placing the weights: config, module, checks, shardings."""
    options = stack.EncoderOptions(attention=attention, block_size=block_size, remat=remat)
    path = resolve(path, revision)
    raw = read_config(path)
    dtype = jnp.dtype(dtype)
    arch, config, module = configure(raw, dtype, options)  # the base: adapters come last
    rules = DEFAULT_RULES if rules is None else tuple(tuple(r) for r in rules)
    validate_rules(rules)
    if mesh is not None and set(mesh.axis_names) != {"data", "model"}:
        raise ValueError(f"mesh axes must be ('data', 'model'), got {tuple(mesh.axis_names)}.")

    tensors, host, abstract = _mapped(path, raw, arch, config, module)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, nn.unbox(abstract))
    else:
        shardings = param_shardings(abstract, mesh, rules)
    return _Plan(
        path=path,
        raw=raw,
        model_type=raw["model_type"],
        dtype=dtype,
        config=config,
        module=module,
        rules=rules,
        tensors=tensors,
        host=flatten_dict(host),
        shardings=flatten_dict(shardings),
    )


def _placed_dtype(stored: Any, dtype: Any) -> np.dtype:
    """The dtype :func:`_place` gives a tensor stored as ``stored``: floating ones ``dtype``."""
    stored = jax.dtypes.canonicalize_dtype(stored)  # as jax holds it (no 64-bit without x64)
    return jnp.dtype(dtype) if jnp.issubdtype(stored, jnp.floating) else stored


def _abstract_leaf(host: Any, sharding: jax.sharding.Sharding, dtype: Any) -> jax.ShapeDtypeStruct:
    """What :func:`_place` would make of ``host``, as shape, dtype and sharding only."""
    return jax.ShapeDtypeStruct(
        tuple(host.shape), _placed_dtype(host.dtype, dtype), sharding=sharding
    )


def _place(host: Any, sharding: jax.sharding.Sharding, dtype: Any, release: Any):
    """One tensor from (memory-mapped) host memory to its devices, cast to ``dtype`` there.

    ``host`` is a numpy view (each device reads only its slice of it) or a
    :class:`~gaam_jax.encoders.stack.StackedTensor`, written layer by layer into the stacked
    array on the devices: the host never holds more than one layer's slice of one tensor.
    """
    if isinstance(host, stack.StackedTensor):
        return _place_stacked(host, sharding, dtype, release)
    array = jax.make_array_from_callback(
        tuple(host.shape), sharding, lambda index: np.ascontiguousarray(host[index])
    )
    if jnp.issubdtype(array.dtype, jnp.floating) and array.dtype != dtype:
        array = array.astype(dtype)  # on device; keeps the sharding
    jax.block_until_ready(array)
    release(host)  # the file pages behind it may go: they are on the devices now
    return array


@functools.cache
def _stacking_programs(sharding: jax.sharding.Sharding, shape: tuple, dtype: Any):
    """``zeros() -> [L, ...]`` and ``update(stacked, layer, i)`` (in place), on ``sharding``."""
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    update = jax.jit(
        lambda stacked, layer, i: jax.lax.dynamic_update_index_in_dim(
            stacked, layer.astype(dtype), i, 0
        ),
        donate_argnums=0,
        out_shardings=sharding,
    )
    return zeros, update


def _place_stacked(
    host: stack.StackedTensor, sharding: jax.sharding.Sharding, dtype: Any, release: Any
):
    target = dtype if jnp.issubdtype(host.dtype, jnp.floating) else host.dtype
    if isinstance(sharding, NamedSharding):  # one layer shards like the stack, less its axis
        layer_sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
    else:
        layer_sharding = sharding
    zeros, update = _stacking_programs(sharding, tuple(host.shape), jnp.dtype(target))
    stacked = zeros()
    for i, part in enumerate(host.parts):
        layer = jax.make_array_from_callback(
            tuple(part.shape), layer_sharding, lambda index, p=part: np.ascontiguousarray(p[index])
        )
        stacked = update(stacked, layer, i)
        jax.block_until_ready(stacked)
        release(part)
    return stacked


def from_pretrained(
    path: str | pathlib.Path,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    *,
    revision: str | None = None,
    attention: str = "auto",
    block_size: int = stack.BLOCK_SIZE,
    remat: str = "none",
    adapters: Adapters | None = None,
    adapter: str | pathlib.Path | None = None,
    adapter_seed: int = 0,
) -> Encoder:
    """Loads a Hugging Face model folder, or a hub id, as a JAX encoder.

    Args:
      path: folder with ``config.json`` and safetensors weights (single file or sharded), or a
        hub id ``org/name`` that is no local folder (:func:`checkpoint.resolve`: its snapshot in
        the hub cache; online, only config, safetensors, tokenizer and preprocessor files are
        fetched; ``HF_HUB_OFFLINE=1``: the cache only).
      dtype: compute dtype; floating parameters are cast to it on device (the output is always
        float32; norms and softmax run in float32).
      mesh: optional ``Mesh`` with axes ``data`` and ``model``: parameters are sharded by
        ``rules`` and the batch over ``data``. None: one device (the default device).
      rules: ``(logical_axis, mesh_axis_or_None)`` pairs; default
        ``gaam_jax.sharding.DEFAULT_RULES``.
      revision: for a hub id, a branch, tag or commit hash (default ``main``).
      attention: ``"auto"``, ``"xla"``, ``"blockwise"`` or ``"cudnn"`` (see
        :class:`~gaam_jax.encoders.stack.EncoderOptions`).
      block_size: the blockwise attention's block length.
      remat: per-layer rematerialisation when differentiating through the encoder
        (``"none"``, ``"full"``, ``"dots"``).
      adapters: LoRA and/or DAAM adapters to attach (:mod:`gaam_jax.adapters`), fresh (seeded
        by ``adapter_seed``) unless ``adapter`` gives the LoRA.
      adapter: a folder holding a LoRA adapter that Hugging Face peft wrote
        (``adapter_config.json``, ``adapter_model.safetensors``), as
        :func:`gaam_jax.adapters.peft.read` reads it (ranks, alphas and their patterns,
        ``layers_to_transform``, rsLoRA, DoRA); a head saved through ``modules_to_save`` is
        ignored here (:func:`classifier_from_pretrained` uses it); other PEFT types are
        refused.
      adapter_seed: seeds fresh adapters.

    Returns:
      The :class:`Encoder`.

    Raises:
      FileNotFoundError: missing folder, ``config.json`` or weights (PyTorch-only folders get
        the conversion command), or a hub id not in the cache offline or not fetchable (one
        line with the ``hf download`` command).
      ValueError: unsupported ``model_type`` or config value, missing or misshapen tensors, a
        mesh without ``data`` and ``model`` axes, a bad option, or a revision the repository
        does not have (or given with a local folder).
    """
    plan = _plan(path, dtype, mesh, rules, revision, attention, block_size, remat)
    model_type, config, raw = plan.model_type, plan.config, plan.raw
    release = getattr(plan.tensors, "release", lambda _: None)
    params = unflatten_dict(
        {k: _place(v, plan.shardings[k], plan.dtype, release) for k, v in plan.host.items()}
    )
    encoder = Encoder(
        model_type, config, plan.module, params, plan.dtype, mesh, plan.rules, config_json=raw
    )
    if adapter is not None:
        # Imported when used: peft reads this package's registry, so importing it at the top
        # would run it half-initialised whenever peft is imported first.
        from gaam_jax.adapters import peft  # noqa: PLC0415

        read = peft.read(adapter, model_type, config, params=encoder.params)
        # A saved head (a SEQ_CLS adapter's) is no part of the encoder; other saved modules are.
        heads.head_params_from_saved(model_type, raw, read.saved)
        lora_cfg, variables = read.lora, read.variables
        if adapters is not None and adapters.lora is not None:
            raise ValueError("from_pretrained: give adapters.lora or adapter, not both.")
        # DAAM gates: the folder's (peft.DAAM_FILE), else fresh ones when adapters asks.
        adapters = Adapters(lora=lora_cfg, daam=read.daam or bool(adapters and adapters.daam))
        return encoder.with_adapters(adapters, variables=_with_daam(adapters, variables, encoder))
    if adapters is not None and adapters.any:
        return encoder.with_adapters(adapters, seed=adapter_seed)
    return encoder


def abstract_from_pretrained(
    path: str | pathlib.Path,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    *,
    revision: str | None = None,
    attention: str = "auto",
    block_size: int = stack.BLOCK_SIZE,
    remat: str = "none",
    adapters: Adapters | None = None,
    adapter_seed: int = 0,
) -> Encoder:
    """:func:`from_pretrained` without reading a weight: an :class:`Encoder` of shapes only.

    Everything :func:`from_pretrained` does before placing the weights is done the same way
    (``config.json``, the module, the tensors' names and shapes against the module's from the
    safetensors headers, the rules and mesh checks, the shardings), so it raises the same errors;
    no tensor byte is read and nothing is allocated on a device. The encoder's ``params`` are
    ``jax.ShapeDtypeStruct`` s: the shapes, the dtypes :func:`from_pretrained` would place
    (floating parameters in ``dtype``) and the shardings (by ``rules`` over ``mesh``, else the
    default device), ready for ``jax.eval_shape`` or ``jax.jit(...).lower``. With ``adapters``,
    ``encoder.adapters`` are shapes only as well (:meth:`Encoder.with_adapters`). Such an
    encoder does not run (:attr:`Encoder.is_abstract`); :meth:`Encoder.bytes_per_device` works.

    Arguments are :func:`from_pretrained`'s (there is no ``adapter``: a peft folder's LoRA is
    read data).

    Raises:
      FileNotFoundError, ValueError: as :func:`from_pretrained` (one line for weights that do
        not match ``config.json``).
    """
    plan = _plan(path, dtype, mesh, rules, revision, attention, block_size, remat)
    params = unflatten_dict(
        {k: _abstract_leaf(v, plan.shardings[k], plan.dtype) for k, v in plan.host.items()}
    )
    encoder = Encoder(
        plan.model_type,
        plan.config,
        plan.module,
        params,
        plan.dtype,
        mesh,
        plan.rules,
        config_json=plan.raw,
    )
    if adapters is not None and adapters.any:
        return encoder.with_adapters(adapters, seed=adapter_seed)
    return encoder


def _with_daam(adapters: Adapters, lora_variables: Any, encoder: Encoder) -> Any:
    """The LoRA variables peft wrote, plus fresh DAAM gates when ``adapters.daam``."""
    if not adapters.daam:
        return lora_variables
    fresh = init_adapters(encoder.module.clone(adapters=adapters), encoder.example_inputs())
    flat = dict(flatten_dict(fresh))
    flat.update(flatten_dict(lora_variables))
    return unflatten_dict(flat)


def open_host_params(
    path: str | pathlib.Path, *, revision: str | None = None
) -> tuple[Any, Any, Mapping[str, np.ndarray]]:
    """``(config, host params, tensors)`` of a folder without placing anything on devices.

    The params are the memory-mapped views :func:`from_pretrained` streams to devices
    (benchmarks and tests use them to compare against other frameworks on the same weights).
    ``path`` and ``revision`` are as :func:`from_pretrained`'s (a folder or a hub id).
    """
    path = resolve(path, revision)
    raw = read_config(path)
    arch, config, _ = configure(raw)
    tensors = open_tensors(path)
    return config, arch.params_from_hf(config, tensors), tensors
