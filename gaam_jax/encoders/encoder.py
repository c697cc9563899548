"""A loaded encoder: its Flax module and parameters, run for every layer's (pooled) states.

:func:`gaam_jax.encoders.from_pretrained` returns an :class:`Encoder`; it holds the
architecture's config, the Linen module (adapted or not, :mod:`gaam_jax.adapters`) and the
parameters on their devices, and runs one jitted program per input shape, pooling and layer
selection. :func:`init_adapters` draws an adapted module's fresh adapter variables.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gaam_jax.adapters import COLLECTION as ADAPTERS
from gaam_jax.adapters import FACTORS, Adapters, init_magnitudes, merge
from gaam_jax.encoders import pooling as poolings
from gaam_jax.encoders import registry
from gaam_jax.sharding import DEFAULT_RULES, Rules

__all__ = ["Encoder", "init_adapters"]


@dataclasses.dataclass(eq=False)
class Encoder:
    """A loaded encoder: config, Flax module and its parameters on device(s).

    Attributes:
      model_type: ``config.json``'s ``model_type``.
      config: the architecture's config dataclass.
      module: the Flax module (``module.apply({'params': params}, **inputs)``).
      params: the params tree on device, floating leaves in the compute dtype; the layers'
        parameters are stacked ``[layers, ...]`` under ``params['layers']``. Or, from
        :func:`~gaam_jax.encoders.abstract_from_pretrained`, the same tree of
        ``jax.ShapeDtypeStruct`` s with their shardings (:attr:`is_abstract`).
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
        return registry.get(self.model_type).example_inputs(self.config_json or {})

    def with_adapters(self, adapters: Adapters, seed: int = 0, variables: Any = None) -> Encoder:
        """This encoder (same base parameters, not copied) adapted by ``adapters``.

        Args:
          adapters: what to adapt (:class:`gaam_jax.adapters.Adapters`).
          seed: seeds the fresh adapters (LoRA's ``A``; ``B`` and the DAAM gates start at the
            identity), unless ``variables`` is given.
          variables: the adapter collection to use instead of fresh ones.

        Returns:
          An :class:`Encoder` whose ``adapters`` are float32 and replicated over the mesh; for
          an abstract encoder (:attr:`is_abstract`), their ``jax.ShapeDtypeStruct`` s with that
          placement (nothing is computed).
        """
        module = self.module.clone(adapters=adapters)
        if not adapters.any:
            return dataclasses.replace(self, module=module, adapters=None)

        def fresh(params: Any) -> Any:
            out = init_adapters(module, self.example_inputs(), seed)
            if adapters.lora is not None and adapters.lora.use_dora:
                # init drew its own base weights: DoRA's magnitudes come from this encoder's.
                out = init_magnitudes(params, out, adapters.lora)
            return out

        replicated = None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())
        if self.is_abstract:  # shapes only, placed as the concrete ones would be
            if variables is None:
                variables = jax.eval_shape(fresh, self.params)
            placement = replicated or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            variables = jax.tree.map(
                lambda v: jax.ShapeDtypeStruct(
                    np.shape(v), jax.dtypes.canonicalize_dtype(v.dtype), sharding=placement
                ),
                variables,
            )
            return dataclasses.replace(self, module=module, adapters=variables)
        if variables is None:
            variables = fresh(self.params)
        if replicated is not None:
            variables = jax.device_put(variables, replicated)
        return dataclasses.replace(self, module=module, adapters=variables)

    @property
    def is_abstract(self) -> bool:
        """Whether ``params`` are ``jax.ShapeDtypeStruct`` s (:func:`abstract_from_pretrained`).

        An abstract encoder has the shapes, dtypes and shardings of the loaded one, for
        ``jax.eval_shape`` and :meth:`bytes_per_device`; it does not run.
        """
        return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self.params))

    def _require_concrete(self, what: str) -> None:
        if self.is_abstract:
            raise ValueError(
                f"{self.model_type} encoder: {what} needs the weights, and this encoder has "
                "shapes only (abstract_from_pretrained); load it with from_pretrained."
            )

    def merged(self) -> Encoder:
        """LoRA folded into the base kernels (jitted, same shardings); DAAM adapters kept."""
        lora_cfg = self.module.adapters.lora
        if lora_cfg is None:
            return self
        self._require_concrete("merged()")
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
        self._require_concrete("running")
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

    def bytes_per_device(self) -> dict[Any, int]:
        """Bytes of parameters each device holds (would hold, for an abstract encoder)."""
        held: dict[Any, int] = {}
        for leaf in jax.tree.leaves(self.params):
            if isinstance(leaf, jax.ShapeDtypeStruct):
                size = math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                shards = [(device, size) for device in leaf.sharding.addressable_devices]
            else:
                shards = [(shard.device, shard.data.nbytes) for shard in leaf.addressable_shards]
            for device, nbytes in shards:
                held[device] = held.get(device, 0) + nbytes
        return held


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
    return unflatten_dict({k: v for k, v in flat.items() if k[-1] not in FACTORS})
