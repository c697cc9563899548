"""DAAM adapters: a Gaussian gate after a module's output, the identity at initialisation.

After the output ``h`` ``[..., T, d]`` of every module whose path matches :attr:`DAAM.targets`::

    h <- h + g * (h * G(h) - h)

with ``G`` the paper-form Gaussian gate (:func:`gaam_jax.functional.gaussian_gate`) over the
token axis :attr:`DAAM.axis`: one head, per-channel mean offset ``delta`` and scaled variance
``xi`` (``[1, d]``, initialised 0 and 2 as in the paper), statistics over the real tokens only
(the mask, when the module is called with one, leaves padding out) and computed in float32.
``g`` ``[d]`` is a per-channel scale initialised to 0, so the adapted model starts exactly as
the frozen one and each channel learns how much gating it takes: ``3 d`` parameters a module.

The statistics span every real token of the sequence, the future ones included: in a causal
model a position's gate depends on later tokens. That is harmless for sequence classification
(the head reads the last position, which sees every token anyway) but makes an adapted causal
model unfit for generation.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from gaam_jax.functional import gaussian_gate

__all__ = ["DAAM", "INITS", "gate", "mask_of"]

# Each variable's shape (from the width d) and initial value: the identity at initialisation.
INITS: dict[str, tuple[Callable[[int], tuple[int, ...]], float]] = {
    "delta": (lambda d: (1, d), 0.0),
    "xi": (lambda d: (1, d), 2.0),
    "scale": (lambda d: (d,), 0.0),
}


@dataclasses.dataclass(frozen=True)
class DAAM:
    """Where DAAM adapters go and how they read their module's call.

    Attributes:
      targets: regular expression searched in each module's path (``'/'``-joined, relative to
        the adapted model); a DAAM adapter follows every match's ``__call__``. The module must
        return one array ``[..., T, d]`` (features last).
      axis: the token axis of that output (the statistics' axis).
      mask_arg: the name of the module's call argument that holds the token mask (bool,
        ``[..., T]``, True for real tokens), or None: the statistics use every token.
      features: the output width ``d``; NNX only, where the adapters are created before any
        call, and only when the module does not tell it (``out_features``, ``num_features``,
        ``features``, ``embed_dim``, ``hidden_size`` or ``d_model``).
    """

    targets: str
    axis: int = -2
    mask_arg: str | None = None
    features: int | None = None

    def __post_init__(self):
        try:
            re.compile(self.targets)
        except re.error as err:
            raise ValueError(
                f"DAAM targets {self.targets!r} is not a regular expression: {err}."
            ) from None
        if not isinstance(self.axis, int) or isinstance(self.axis, bool) or self.axis >= -1:
            raise ValueError(
                f"DAAM axis must be a negative int before the feature axis (-1), got {self.axis!r}."
            )
        if self.features is not None and (not isinstance(self.features, int) or self.features < 1):
            raise ValueError(f"DAAM features must be a positive int, got {self.features!r}.")

    def matches(self, path: str) -> bool:
        """Whether a DAAM adapter follows the module at ``path``."""
        return re.search(self.targets, path) is not None


def mask_of(
    daam: DAAM, call: Callable, args: Sequence[Any], kwargs: Mapping[str, Any], where: str
) -> jax.Array | None:
    """The token mask among a call's arguments (``daam.mask_arg``), or None.

    Args:
      daam: the adapter's settings.
      call: the module's (unbound) ``__call__``, for its signature.
      args: the call's positional arguments, ``self`` first.
      kwargs: its keyword arguments.
      where: the module's path, for the error message.

    Raises:
      ValueError: the call has no argument of that name.
    """
    if daam.mask_arg is None:
        return None
    try:
        bound = inspect.signature(call).bind(*args, **kwargs)
    except TypeError:
        bound = None
    if bound is None or daam.mask_arg not in inspect.signature(call).parameters:
        raise ValueError(
            f"DAAM at {where!r}: its __call__ has no argument {daam.mask_arg!r} (mask_arg)."
        )
    return bound.arguments.get(daam.mask_arg)


def gate(
    h: jax.Array,
    variables: Mapping[str, jax.Array],
    mask: jax.Array | None,
    axis: int = -2,
    where: str = "",
) -> jax.Array:
    """``h + g * (h * G(h) - h)`` over the token axis (see the module docstring).

    Args:
      h: a module's output ``[..., T, d]`` in any floating dtype.
      variables: ``delta``, ``xi`` ``[1, d]`` and ``scale`` ``[d]`` (float32).
      mask: bool ``[..., T]`` (True for real tokens), or None.
      axis: the token axis of ``h``.
      where: the module's path, for error messages.

    Returns:
      ``h``'s shape and dtype.
    """
    if not isinstance(h, jax.Array) or not jnp.issubdtype(h.dtype, jnp.floating) or h.ndim < 2:
        raise ValueError(
            f"DAAM at {where!r}: the module must return one floating array [..., T, d], got "
            f"{getattr(h, 'shape', type(h).__name__)}."
        )
    if mask is not None:
        mask = jnp.asarray(mask).astype(bool)
        try:
            mask = jnp.broadcast_to(mask, h.shape[:-1])[..., None]
        except ValueError:
            raise ValueError(
                f"DAAM at {where!r}: the mask {mask.shape} does not broadcast to the output's "
                f"tokens {h.shape[:-1]}."
            ) from None
    d = h.shape[-1]
    g = gaussian_gate(h, variables["delta"], variables["xi"], axis=axis, feature_axis=-1, mask=mask)
    hf = h.astype(jnp.float32)
    scale = variables["scale"].reshape((1,) * (h.ndim - 1) + (d,))
    return (hf + scale * (hf * g - hf)).astype(h.dtype)
