"""Frozen pretrained encoders whose per-layer hidden states become GAAM decoder inputs.

One entry point loads a Hugging Face model folder (``config.json`` plus ``model.safetensors``
or sharded ``model-0000x-of-0000y.safetensors`` with ``model.safetensors.index.json``), local or
a hub id resolved through the Hugging Face cache (:func:`checkpoint.resolve`)::

    from gaam_jax.encoders import from_pretrained
    enc = from_pretrained(path, dtype=jnp.float32)          # or jnp.bfloat16 compute
    hs = enc.hidden_states(input_ids=ids, attention_mask=mask)  # float32 [B, L+1, T, hidden]

The architecture comes from ``config.json``'s ``model_type``: ``bert``, ``llama``, ``beit`` or
``wavlm`` (modules imported on first use). With ``mesh`` (a ``jax.sharding.Mesh`` with axes
``data`` and ``model``) parameters are placed by logical-axis rules
(``gaam_jax.sharding.DEFAULT_RULES``, the project's one table):
every parameter is created with logical axis names (``vocab``, ``embed``, ``heads``, ...), the
rules map them to mesh axes, and each tensor is streamed from the memory-mapped checkpoint
straight to its shards, each device reading only its slice.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import pathlib
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gaam_jax.adapters import COLLECTION as ADAPTERS
from gaam_jax.adapters import Adapters, merge
from gaam_jax.encoders import pooling as poolings
from gaam_jax.encoders import stack
from gaam_jax.encoders.checkpoint import SUPPORTED, open_tensors, read_config, resolve
from gaam_jax.sharding import (
    DEFAULT_RULES,
    Rules,
    abstract_params,
    param_shardings,
    validate_rules,
)

__all__ = ["Encoder", "EncoderOptions", "check_checkpoint", "from_pretrained"]

EncoderOptions = stack.EncoderOptions

# model_type -> (config class, encoder class) in gaam_jax.encoders.<model_type>.
_CLASSES = {
    "bert": ("BertConfig", "BertEncoder"),
    "llama": ("LlamaConfig", "LlamaEncoder"),
    "beit": ("BeitConfig", "BeitEncoder"),
    "wavlm": ("WavLMConfig", "WavLMEncoder"),
}
assert set(_CLASSES) == set(SUPPORTED)


def _arch_module(model_type: str) -> ModuleType:
    try:
        module = importlib.import_module(f"gaam_jax.encoders.{model_type}")
    except ModuleNotFoundError as err:
        if err.name != f"gaam_jax.encoders.{model_type}":
            raise
        raise ValueError(
            f"model_type={model_type!r}: gaam_jax/encoders/{model_type}.py is missing."
        ) from None
    if getattr(module, "MODEL_TYPE", None) != model_type:
        raise ValueError(f"gaam_jax.encoders.{model_type}.MODEL_TYPE is not {model_type!r}.")
    return module


def _example_inputs(model_type: str, raw: dict) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract inputs for ``jax.eval_shape(module.init, ...)`` (shapes only, nothing runs)."""
    if model_type in ("bert", "llama"):
        return {"input_ids": jax.ShapeDtypeStruct((1, 8), jnp.int32)}
    if model_type == "beit":
        size = raw.get("image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return {
            "pixel_values": jax.ShapeDtypeStruct((1, raw.get("num_channels", 3), h, w), jnp.float32)
        }  # noqa: E501
    return {"input_values": jax.ShapeDtypeStruct((1, 16000), jnp.float32)}


def _configured(
    raw: dict, dtype: Any = jnp.float32, options: Any = None, adapters: Adapters | None = None
) -> tuple[Any, Any, Any]:
    """``(architecture module, config, Flax module)`` of a parsed ``config.json``."""
    arch = _arch_module(raw["model_type"])
    config_cls, encoder_cls = (getattr(arch, name) for name in _CLASSES[raw["model_type"]])
    config = config_cls.from_hf(raw)
    module = encoder_cls(
        config,
        dtype=dtype,
        options=options or stack.EncoderOptions(),
        adapters=adapters or Adapters(),
    )
    return arch, config, module


def _mapped(path: pathlib.Path, raw: dict, arch: Any, config: Any, module: Any):
    """``(tensors, host params, boxed abstract params)``: names and shapes checked, nothing read.

    The tensors are memory-mapped views; the module's shapes come from ``jax.eval_shape``.

    Raises:
      ValueError: a tensor is missing or its shape is not the one ``config.json`` implies.
    """
    tensors = open_tensors(path)
    host = arch.params_from_hf(config, tensors)
    # The example inputs are the module's leading positional inputs, in order.
    abstract = abstract_params(module, *_example_inputs(raw["model_type"], raw).values())
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
    arch, config, module = _configured(raw)
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


@dataclasses.dataclass(eq=False)
class Encoder:
    """A loaded encoder: config, Flax module and its parameters on device(s).

    Attributes:
      model_type: ``config.json``'s ``model_type``.
      config: the architecture's config dataclass.
      module: the Flax module (``module.apply({'params': params}, **inputs)``).
      params: the params tree on device, floating leaves in the compute dtype; the layers'
        parameters are stacked ``[layers, ...]`` under ``params['layers']``.
      dtype: the compute dtype.
      mesh: the mesh the params are placed on, or None (one device).
      rules: the logical-axis rules used with ``mesh``.
      adapters: the adapter collection (float32 LoRA / DAAM variables,
        :mod:`gaam_jax.adapters`) when ``module.adapters`` adapts anything, else None.
      config_json: the parsed ``config.json`` (for example inputs of the right size).
    """

    model_type: str
    config: Any
    module: nn.Module
    params: Any
    dtype: Any
    mesh: Mesh | None = None
    rules: Rules = DEFAULT_RULES
    adapters: Any = None
    config_json: dict | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        signature = inspect.signature(type(self.module).__call__)
        # The model inputs; keyword-only arguments (collect, pool_mask) are not inputs.
        params = [
            p
            for n, p in signature.parameters.items()
            if n != "self" and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        ]
        self.input_names = tuple(p.name for p in params)
        self.required_inputs = tuple(p.name for p in params if p.default is p.empty)
        out = None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec("data"))

        if self.module.adapters.any and self.adapters is None:
            raise ValueError(
                f"{self.model_type} encoder: the module is adapted ({self.module.adapters}) but "
                "no adapter variables were given; use Encoder.with_adapters."
            )

        def apply(params, adapters, inputs, pool_mask, pooling_name):
            collect = poolings.identity if pooling_name is None else poolings.pooling(pooling_name)
            variables = {"params": params}
            if adapters is not None:
                variables[ADAPTERS] = adapters
            with nn.logical_axis_rules(list(self.rules)):
                out = self.module.apply(variables, **inputs, collect=collect, pool_mask=pool_mask)
            return out.astype(jnp.float32)

        # jit caches one compilation per input shape, set of input names and pooling; layers
        # are picked from its (small) output, so a new selection compiles nothing large.
        jitted = jax.jit(apply, static_argnums=4, out_shardings=out)
        self._apply = lambda params, inputs, mask, pooling_name: jitted(
            params, self.adapters, inputs, mask, pooling_name
        )

    def example_inputs(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Abstract inputs of batch 1 (shapes only), for ``init`` and ``jax.eval_shape``."""
        return _example_inputs(self.model_type, self.config_json or {})

    def with_adapters(self, adapters: Adapters, seed: int = 0, variables: Any = None) -> Encoder:
        """This encoder (same base parameters, not copied) adapted by ``adapters``.

        Args:
          adapters: what to adapt (:class:`gaam_jax.adapters.Adapters`).
          seed: seeds the fresh adapters (LoRA's ``A``; ``B`` and the DAAM gates start at the
            identity), unless ``variables`` is given.
          variables: the adapter collection to use instead of fresh ones.

        Returns:
          An :class:`Encoder` whose ``adapters`` are float32 and replicated over the mesh.
        """
        module = self.module.clone(adapters=adapters)
        if not adapters.any:
            return dataclasses.replace(self, module=module, adapters=None)
        if variables is None:
            variables = init_adapters(module, self.example_inputs(), seed)
        if self.mesh is not None:
            replicated = NamedSharding(self.mesh, PartitionSpec())
            variables = jax.device_put(variables, replicated)
        return dataclasses.replace(self, module=module, adapters=variables)

    def merged(self) -> Encoder:
        """LoRA folded into the base kernels (jitted, same shardings); DAAM adapters kept."""
        lora_cfg = self.module.adapters.lora
        if lora_cfg is None:
            return self
        shardings = jax.tree.map(lambda a: a.sharding, self.params)
        params = jax.jit(merge, static_argnums=2, out_shardings=shardings)(
            self.params, self.adapters, lora_cfg
        )
        rest = Adapters(daam=self.module.adapters.daam)
        kept = None
        if rest.daam:
            kept = _without_lora(self.adapters)
        return dataclasses.replace(
            self, module=self.module.clone(adapters=rest), params=params, adapters=kept
        )

    @property
    def num_states(self) -> int:
        """``num_hidden_layers + 1``: the embedding output and every layer's."""
        return self.config.num_hidden_layers + 1

    def _check_inputs(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], int]:
        unknown = [n for n in inputs if n not in self.input_names]
        missing = [n for n in self.required_inputs if n not in inputs]
        if unknown or missing:
            problem = (
                f"unknown input {unknown[0]!r}" if unknown else f"missing input {missing[0]!r}"
            )
            raise ValueError(
                f"{self.model_type} encoder: {problem} (it takes {', '.join(self.input_names)})."
            )
        inputs = {k: v for k, v in inputs.items() if v is not None}
        batch = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in inputs.items()}
        if None in batch.values() or len(set(batch.values())) != 1:
            raise ValueError(f"{self.model_type} encoder: inputs need one batch size, got {batch}.")
        return inputs, next(iter(batch.values()))

    def _layers(self, layers: Any) -> tuple[int, ...] | None:
        if layers is None:
            return None
        n = self.num_states
        picked = range(n)[layers] if isinstance(layers, slice) else list(layers)
        out = []
        for i in picked:
            if not isinstance(i, (int, np.integer)) or not -n <= i < n:
                raise ValueError(
                    f"{self.model_type} encoder: layer {i!r} is not a hidden-state index "
                    f"(there are {n}: the embedding output and {n - 1} layers)."
                )
            out.append(int(i) % n)
        if not out:
            raise ValueError(f"{self.model_type} encoder: layers={layers!r} selects no layer.")
        return tuple(out)

    def _run(self, inputs: dict, pool_mask: Any, pooling_name: str | None, layers: Any):
        inputs, n = self._check_inputs(inputs)
        selected = self._layers(layers)
        if pool_mask is not None:
            inputs["__pool_mask__"] = pool_mask
        if self.mesh is None:
            placed = inputs
        else:
            pad = -n % self.mesh.shape["data"]
            placed = {}
            for k, v in inputs.items():
                v = jnp.asarray(v)
                if pad:  # repeat a real example: padding rows must be valid (no all-masked NaN)
                    v = jnp.concatenate([v, jnp.repeat(v[-1:], pad, axis=0)])
                spec = PartitionSpec("data", *([None] * (v.ndim - 1)))
                placed[k] = jax.device_put(v, NamedSharding(self.mesh, spec))
        mask = placed.pop("__pool_mask__", None)
        out = self._apply(self.params, placed, mask, pooling_name)
        out = out[:n] if out.shape[0] != n else out
        return out if selected is None else out[:, np.asarray(selected)]

    def hidden_states(self, **inputs: Any) -> jax.Array:
        """Every layer's hidden states, as ``output_hidden_states=True`` gives them.

        Args:
          **inputs: the transformers model's keyword inputs as numpy or jax arrays, batch first
            (bert/llama: ``input_ids``, ``attention_mask`` ``[B, T]``; beit: ``pixel_values``
            ``[B, 3, H, W]``; wavlm: ``input_values`` ``[B, T]``, ``attention_mask``).

        Returns:
          float32 ``[B, num_hidden_layers + 1, T, hidden]`` (T: tokens, patches + 1 or frames).
          With a mesh, any B: the batch is padded to a multiple of the ``data`` axis size
          (repeating the last example) and cut back.

        Raises:
          ValueError: on an unknown or missing input name, or inputs of different batch sizes.
        """
        return self._run(inputs, None, None, None)

    def pooled_states(
        self,
        pooling: str = "mean",
        layers: slice | Sequence[int] | None = None,
        pool_mask: Any = None,
        **inputs: Any,
    ) -> jax.Array:
        """Every layer's states pooled over the positions, each as soon as its layer has run.

        Memory is that of one layer's ``[B, T, hidden]`` states whatever the depth: the
        ``[B, L + 1, T, hidden]`` stack is never built.

        Args:
          pooling: one of :data:`gaam_jax.encoders.pooling.POOLINGS` (``mean`` over the
            positions ``pool_mask`` marks, ``mean_with_padding``, ``first``, ``last``).
          layers: which of the ``num_hidden_layers + 1`` states to return (a slice or indices,
            0 being the embedding output); default all.
          pool_mask: bool ``[B, T]`` over the output positions; default the model's own mask
            (text: ``attention_mask``; audio: the frames of the real samples; images: all).
          **inputs: as for :meth:`hidden_states`.

        Returns:
          float32 ``[B, len(layers), hidden]``.

        Raises:
          ValueError: as :meth:`hidden_states`, or for an unknown pooling or layer index.
        """
        poolings.pooling(pooling)  # the name is checked before any work
        return self._run(inputs, pool_mask, pooling, layers)

    def hidden_states_of(self, inputs: Mapping[str, Any]) -> jax.Array:
        """:meth:`hidden_states` of a dict of inputs."""
        return self.hidden_states(**inputs)

    def bytes_per_device(self) -> dict[Any, int]:
        """Bytes of parameters each device holds."""
        held: dict[Any, int] = {}
        for leaf in jax.tree.leaves(self.params):
            for shard in leaf.addressable_shards:
                held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
        return held


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
        (``adapter_config.json``, ``adapter_model.safetensors``): its targets, ``r``,
        ``lora_alpha`` and ``use_rslora`` are honoured; other PEFT types are refused.
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
    options = stack.EncoderOptions(attention=attention, block_size=block_size, remat=remat)
    path = resolve(path, revision)
    raw = read_config(path)
    model_type = raw["model_type"]
    dtype = jnp.dtype(dtype)
    arch, config, module = _configured(raw, dtype, options)  # the base: adapters come last
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
    flat_shardings = flatten_dict(shardings)
    release = getattr(tensors, "release", lambda _: None)
    params = unflatten_dict(
        {k: _place(v, flat_shardings[k], dtype, release) for k, v in flatten_dict(host).items()}
    )
    encoder = Encoder(model_type, config, module, params, dtype, mesh, rules, config_json=raw)
    if adapter is not None:
        from gaam_jax.adapters import peft  # noqa: PLC0415 - safetensors only when asked

        lora_cfg, variables = peft.load(adapter, model_type, config)
        if adapters is not None and adapters.lora is not None:
            raise ValueError("from_pretrained: give adapters.lora or adapter, not both.")
        adapters = Adapters(lora=lora_cfg, daam=adapters.daam if adapters else False)
        return encoder.with_adapters(adapters, variables=_with_daam(adapters, variables, encoder))
    if adapters is not None and adapters.any:
        return encoder.with_adapters(adapters, seed=adapter_seed)
    return encoder


def init_adapters(module: nn.Module, example: Mapping[str, Any], seed: int = 0) -> Any:
    """Fresh adapter variables of an adapted encoder module (float32, on the default device).

    Only the adapters are computed: the base parameters' initialisers are traced away.
    """

    def init(key):
        inputs = {k: jnp.zeros(v.shape, v.dtype) for k, v in example.items()}
        return module.init(key, **inputs)[ADAPTERS]

    return jax.jit(init)(jax.random.key(seed))


def _without_lora(tree: Any) -> Any:
    flat = flatten_dict(tree)
    return unflatten_dict({k: v for k, v in flat.items() if k[-1] not in ("lora_a", "lora_b")})


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
    arch, config, _ = _configured(raw)
    tensors = open_tensors(path)
    return config, arch.params_from_hf(config, tensors), tensors
