"""LoRA and DAAM adapters on any Linen model, by method interception.

The model is not rewritten: while an adapted model runs, ``nn.intercept_methods`` sees every
module call inside it. A ``Dense``, ``DenseGeneral`` or ``Einsum`` whose path matches the
LoRA's targets adds its low-rank update; a module whose path matches the DAAM's targets has
its output gated. The adapters' variables are created beside the module they adapt, in the
collection :data:`~gaam_jax.adapters.lora.COLLECTION` (``'adapters'``): ``lora_a`` /
``lora_b`` (and DoRA's ``lora_magnitude``, initialised from the kernel when it is created) at
the projection's path, at the path's rank and scale (``LoRA.rank_for``, ``scale_for``);
``daam_adapter/{delta,xi,scale}`` under the gated module's. ``params`` stays exactly the base
model's, so its checkpoints load unchanged. Inside ``nn.scan`` the adapters are stacked like
the parameters when the scan's ``variable_axes`` include the collection.

Adapters are annotated with logical axes ``(None, ...)``: replicated on a mesh, never split
along the rank, while the base keeps its own shardings.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from gaam_jax import sharding
from gaam_jax.adapters import daam as daam_lib
from gaam_jax.adapters.daam import DAAM
from gaam_jax.adapters.lora import COLLECTION, LoRA, Projection, weight_norm

__all__ = ["adapt", "in_call", "intercepting"]

_KINDS = (nn.Dense, nn.DenseGeneral, nn.Einsum)


def _replicated(init: Callable[..., Any], ndim: int) -> Callable[..., Any]:
    return sharding.with_logical_axes(init, (None,) * ndim)


def _projection(
    module: nn.Module, x: Any, args: Sequence[Any], kwargs: dict, rank: int
) -> tuple[Projection, Any]:
    """The module's :class:`Projection` at ``rank`` and its kernel (unboxed)."""
    kernel = nn.meta.unbox(module.get_variable("params", "kernel"))
    if isinstance(module, nn.Einsum):
        equation = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
        return Projection.einsum(equation or module.einsum_str, kernel.shape, rank), kernel
    if isinstance(module, nn.Dense):
        return Projection.dense_general(x.ndim, (-1,), kernel.shape, rank), kernel
    if module.batch_dims:
        raise ValueError(
            f"LoRA at {'/'.join(module.path)!r}: a DenseGeneral with batch_dims is not supported."
        )
    axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
    return Projection.dense_general(x.ndim, axis, kernel.shape, rank), kernel


def _lora(
    module: nn.Module, lora: LoRA, y: Any, args: Sequence[Any], kwargs: dict, where: str
) -> Any:
    """``y`` (the module's output) with the LoRA (or DoRA) of the module at ``where``."""
    x = args[0] if args else kwargs["inputs"]
    scale = lora.scale_for(where)
    proj, kernel = _projection(module, x, args, kwargs, lora.rank_for(where))
    init_a = _replicated(lambda key, shape: lora.init_a(key, shape, proj.fan_in), len(proj.a_shape))
    init_b = _replicated(nn.initializers.zeros_init(), len(proj.b_shape))
    scope = module.scope
    # Lazily initialised: make_rng is only called when the variable is created.
    a = scope.variable(COLLECTION, "lora_a", lambda: init_a(scope.make_rng("params"), proj.a_shape))
    b = scope.variable(COLLECTION, "lora_b", lambda: init_b(None, proj.b_shape, jnp.float32))
    if not lora.use_dora:
        return y + proj.update(x, a.value, b.value, scale).astype(y.dtype)
    if proj.m is None:
        raise ValueError(
            f"DoRA at {where!r}: an einsum kernel axis is neither contracted nor an output axis."
        )
    # The magnitude starts as the norm of the kernel it rescales (read here, at creation).
    init_m = _replicated(
        lambda key, shape: weight_norm(kernel, a.value, b.value, scale, shape), len(proj.m_shape)
    )
    m = scope.variable(COLLECTION, "lora_magnitude", lambda: init_m(None, proj.m_shape))
    bias = nn.meta.unbox(module.get_variable("params", "bias"))
    return proj.dora(y, x, kernel, bias, a.value, b.value, m.value, scale).astype(y.dtype)


def _daam(module: nn.Module, daam: DAAM, y: Any, args: Sequence[Any], kwargs: dict, where: str):
    if not hasattr(y, "shape") or len(y.shape) < 2:
        raise ValueError(f"DAAM at {where!r}: the module must return one array [..., T, d].")
    d = y.shape[-1]
    mask = daam_lib.mask_of(daam, type(module).__call__, (module, *args), kwargs, where)
    scope = module.scope.push("daam_adapter", reuse=True)
    variables = {}
    for name, (shape_of, value) in daam_lib.INITS.items():
        shape = shape_of(d)
        init = _replicated(nn.initializers.constant(value), len(shape))
        variables[name] = scope.variable(COLLECTION, name, init, None, shape, jnp.float32).value
    return daam_lib.gate(y, variables, mask, daam.axis, where)


def _interceptor(lora: LoRA | None, daam: DAAM | None, root: tuple[str, ...]):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        full = tuple(module.path)
        where = "/".join(full[len(root) :] if full[: len(root)] == root else full)
        adapt_lora = lora is not None and isinstance(module, _KINDS) and lora.matches(where)
        adapt_daam = daam is not None and daam.matches(where)
        if not (adapt_lora or adapt_daam):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        if adapt_lora:
            y = _lora(module, lora, y, args, kwargs, where)
        if adapt_daam:
            y = _daam(module, daam, y, args, kwargs, where)
        return y

    return intercept


@contextlib.contextmanager
def intercepting(lora: LoRA | None, daam: DAAM | None, root: Sequence[str] = ()) -> Iterator[None]:
    """Within this context the targeted modules are adapted (both None: a no-op).

    Args:
      lora: the LoRA, or None.
      daam: the DAAM adapters, or None.
      root: the adapted model's own module path; targets are matched relative to it.
    """
    if lora is None and daam is None:
        yield
        return
    with nn.intercept_methods(_interceptor(lora, daam, tuple(root))):
        yield


def in_call(call: Callable) -> Callable:
    """Decorates an encoder's ``__call__`` to run adapted by ``self.adapters`` (an ``Adapters``).

    The project's encoders use it: the same interception as :func:`adapt`, configured by the
    encoder's ``adapters`` field (its ``lora`` and, with ``daam``, DAAM after every layer's
    output, which each layer marks with an identity module named ``layer_output``).
    """

    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        adapters = self.adapters
        with intercepting(adapters.lora, adapters.daam_config, tuple(self.path)):
            return call(self, *args, **kwargs)

    return wrapper


def _unwrapped(fn: Callable) -> Callable:
    # Linen wraps every method of a Module class; re-wrapping the raw function in the new class
    # lets Linen wrap it once more, with its compact marker kept by functools.wraps.
    while hasattr(fn, "method_handler_wrapped"):
        fn = fn.__wrapped__
    return fn


@functools.cache
def _adapted_class(
    base: type[nn.Module], lora: LoRA | None, daam: DAAM | None, methods: tuple[str, ...]
) -> type[nn.Module]:
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def method(self, *args, **kwargs):
            with intercepting(lora, daam, tuple(self.path)):
                return fn(self, *args, **kwargs)

        return method

    attrs = {name: wrap(_unwrapped(getattr(base, name))) for name in methods}
    attrs.update(_gaam_base=base, _gaam_lora=lora, _gaam_daam=daam)
    return type(base.__name__, (base,), attrs)


def adapt(
    model: nn.Module,
    lora: LoRA | None,
    daam: DAAM | None,
    methods: Sequence[str] = ("__call__",),
) -> nn.Module:
    """``model`` with LoRA and/or DAAM adapters (see the module docstring).

    Args:
      model: any Linen module (not modified; a copy is returned). An adapted model is adapted
        afresh from its base.
      lora: the LoRA, or None.
      daam: the DAAM adapters, or None.
      methods: the methods that run adapted.

    Returns:
      A module of a subclass of ``model``'s class, with the same fields: ``init`` returns the
      base's ``params`` plus an ``adapters`` collection, ``apply`` takes both.
    """
    base = getattr(type(model), "_gaam_base", type(model))
    adapted = model.clone()
    adapted.__class__ = _adapted_class(base, lora, daam, tuple(methods))
    return adapted
