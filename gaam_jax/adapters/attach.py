"""LoRA and DAAM adapters on any NNX model, attached to the modules they adapt.

NNX modules are objects, so the adapters are attached where they act: every ``nnx.Linear``,
``nnx.LinearGeneral`` or ``nnx.Einsum`` whose path matches the LoRA's targets gets ``lora_a``
and ``lora_b`` (:class:`flax.nnx.LoRAParam`) at its path's rank, its path's scale as
``lora_scale``, and with DoRA ``lora_magnitude`` (a ``LoRAParam``, initialised from the kernel
when attached); every module whose path matches the DAAM's targets gets a ``daam_adapter``
(its variables are :class:`DaamParam`, a ``LoRAParam`` subclass). Each adapted module's class
becomes a subclass of its own whose ``__call__`` adds the update or gates the output, so the
base variables keep their paths (``attn/query/kernel``) and checkpoints of the base load
unchanged. Flax's own idioms select the adapters:
``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``, ``nnx.DiffState(0, nnx.LoRAParam)``,
``nnx.state(model, nnx.LoRAParam)``.

The factors and the update are float32 (see :mod:`gaam_jax.adapters.lora`); the adapters carry
the logical axes ``(None, ...)`` (replicated) as their sharding metadata.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gaam_jax.adapters import daam as daam_lib
from gaam_jax.adapters.daam import DAAM
from gaam_jax.adapters.lora import LoRA, Projection, merged_kernel, weight_norm

__all__ = ["DaamAdapter", "DaamParam", "adapt", "merge_model"]

_KINDS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)
_WIDTHS = ("out_features", "num_features", "features", "embed_dim", "hidden_size", "d_model")


class DaamParam(nnx.LoRAParam):
    """A DAAM adapter's variable: a ``LoRAParam``, so ``wrt=nnx.LoRAParam`` trains it too."""


def _param(cls: type[nnx.Variable], value: jax.Array) -> nnx.Variable:
    # Replicated on a mesh. The annotation is metadata only (not eager): adapting places nothing.
    return cls(value, out_sharding=(None,) * value.ndim, eager_sharding=False)


class DaamAdapter(nnx.Module):
    """The DAAM gate of one module's output (``delta``, ``xi`` ``[1, d]``, ``scale`` ``[d]``)."""

    def __init__(self, features: int):
        for name, (shape, value) in daam_lib.INITS.items():
            setattr(self, name, _param(DaamParam, jnp.full(shape(features), value, jnp.float32)))

    def __call__(self, h: jax.Array, mask: jax.Array | None, axis: int, where: str) -> jax.Array:
        """Gates ``h`` ``[..., T, d]`` (see :func:`gaam_jax.adapters.daam.gate`)."""
        variables = {name: getattr(self, name)[...] for name in daam_lib.INITS}
        return daam_lib.gate(h, variables, mask, axis, where)


def _lora_projection(module: nnx.Module, x: Any, args: tuple, kwargs: dict) -> Projection:
    rank = module.lora_a.shape[-1]
    shape = module.kernel.shape
    if isinstance(module, nnx.Einsum):
        equation = kwargs.get("einsum_str", args[0] if args else None) or module.einsum_str
        return Projection.einsum(equation, shape, rank)
    axis = (-1,) if isinstance(module, nnx.Linear) else module.axis
    return Projection.dense_general(x.ndim, axis, shape, rank)


def _call(self, *args: Any, **kwargs: Any) -> Any:
    base = type(self)._gaam_base
    y = base.__call__(self, *args, **kwargs)
    if getattr(self, "lora_a", None) is not None:
        x = args[0] if args else kwargs["inputs"]
        proj = _lora_projection(self, x, args[1:], kwargs)
        a, b = self.lora_a[...], self.lora_b[...]
        magnitude = getattr(self, "lora_magnitude", None)
        if magnitude is None:
            y = y + proj.update(x, a, b, self.lora_scale).astype(y.dtype)
        else:
            bias = getattr(self, "bias", None)
            bias = None if bias is None else bias[...]
            kernel = self.kernel[...]
            y = proj.dora(y, x, kernel, bias, a, b, magnitude[...], self.lora_scale).astype(y.dtype)
    daam = getattr(self, "daam_adapter", None)
    if daam is not None:
        cfg: DAAM = self.daam_config
        mask = daam_lib.mask_of(cfg, base.__call__, (self, *args), kwargs, self.daam_path)
        y = daam(y, mask, cfg.axis, self.daam_path)
    return y


@functools.cache
def _adapted_class(base: type[nnx.Module]) -> type[nnx.Module]:
    return type(base.__name__, (base,), {"__call__": _call, "_gaam_base": base})


def _base_class(module: nnx.Module) -> type[nnx.Module]:
    return getattr(type(module), "_gaam_base", type(module))


def _attach_lora(module: nnx.Module, lora: LoRA, where: str, key: jax.Array) -> None:
    shape = module.kernel.shape
    rank, scale = lora.rank_for(where), lora.scale_for(where)
    if isinstance(module, nnx.Einsum):
        proj = Projection.einsum(module.einsum_str or "", shape, rank)
        lead = ()
    else:
        if isinstance(module, nnx.LinearGeneral) and module.batch_axis:
            raise ValueError(
                f"LoRA at {where!r}: a LinearGeneral with batch_axis is not supported."
            )
        n_in = 1 if isinstance(module, nnx.Linear) else len(module.in_features)
        n_out = 1 if isinstance(module, nnx.Linear) else len(module.out_features)
        lead = shape[: len(shape) - n_in - n_out]  # stacked layers (nnx.vmap'd modules)
        core = shape[len(lead) :]
        proj = Projection.dense_general(n_in + 1, tuple(range(1, n_in + 1)), core, rank)
    a = lora.init_a(key, (*lead, *proj.a_shape), proj.fan_in)
    b = jnp.zeros((*lead, *proj.b_shape), jnp.float32)
    if lora.use_dora:
        if proj.m is None:
            raise ValueError(
                f"DoRA at {where!r}: an einsum kernel axis is neither contracted nor an output "
                "axis."
            )
        m = weight_norm(module.kernel[...], a, b, scale, (*lead, *proj.m_shape))
        module.lora_magnitude = _param(nnx.LoRAParam, m)
    module.lora_a = _param(nnx.LoRAParam, a)
    module.lora_b = _param(nnx.LoRAParam, b)
    module.lora_scale = scale


def _width(module: nnx.Module, daam: DAAM, where: str) -> int:
    if daam.features is not None:
        return daam.features
    for name in _WIDTHS:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ValueError(
        f"DAAM at {where!r}: {type(module).__name__} does not say its output width; "
        "give DAAM(features=...)."
    )


def adapt(model: nnx.Module, lora: LoRA | None, daam: DAAM | None, rngs: nnx.Rngs) -> nnx.Module:
    """A copy of ``model`` with adapters attached (see the module docstring).

    The base variables are shared with ``model`` (arrays are immutable), not copied.

    Raises:
      ValueError: nothing matched a target, or a DAAM target's width is unknown.
    """
    model = nnx.clone(model)
    matched_lora, matched_daam = [], []
    for path, module in list(nnx.iter_modules(model)):
        where = "/".join(str(p) for p in path)
        adapted = False
        if lora is not None and isinstance(module, _KINDS) and lora.matches(where):
            _attach_lora(module, lora, where, rngs.params())
            matched_lora.append(where)
            adapted = True
        if daam is not None and path and daam.matches(where):
            module.daam_adapter = DaamAdapter(_width(module, daam, where))
            module.daam_config = daam
            module.daam_path = where
            matched_daam.append(where)
            adapted = True
        if adapted:
            module.__class__ = _adapted_class(_base_class(module))
    for cfg, found, kind in ((lora, matched_lora, "LoRA"), (daam, matched_daam, "DAAM")):
        if cfg is not None and not found:
            raise ValueError(f"{kind} targets {cfg.targets!r} match no module of the model.")
    return model


def merge_model(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every LoRA folded into its kernel and no LoRA factor left.

    The kernel becomes ``W + s A B``, or with DoRA ``(m / ||W + s A B||) * (W + s A B)``
    (:func:`gaam_jax.adapters.lora.merged_kernel`).

    DAAM adapters (a nonlinear gate, :class:`DaamParam`) cannot be folded and stay.
    """
    model = nnx.clone(model)
    for _, module in list(nnx.iter_modules(model)):
        if getattr(module, "lora_a", None) is None:
            continue
        magnitude = getattr(module, "lora_magnitude", None)
        module.kernel[...] = merged_kernel(
            module.kernel[...],
            module.lora_a[...],
            module.lora_b[...],
            module.lora_scale,
            None if magnitude is None else magnitude[...],
        )
        del module.lora_a, module.lora_b, module.lora_scale
        if magnitude is not None:
            del module.lora_magnitude
        if getattr(module, "daam_adapter", None) is None:
            module.__class__ = _base_class(module)
    return model
