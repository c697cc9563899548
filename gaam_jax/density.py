"""Linen modules for the authors' density gate and the residual gate around it.

The density gate is the newest form of the mechanism, from the authors' Density-Adaptive-JEPA
code (``docs/design.md`` section 15; the formulas are in :mod:`gaam_jax.functional`):
``K`` scalar Gaussians shared by every feature, widths relative to the standard deviation along
``axis``, the gate the mean of their normalised densities (``y = x * gate``, no normalisation
along the axis). :class:`DensityResidualGate` is the authors' ``GAttnGateG``: a 1x1 convolution
projects the channels to one signal, the density gate of that signal along time rescales every
channel, ``y = x * (1 + alpha * gate)``.

Parameters map one to one onto the authors' PyTorch modules (their ``state_dict`` keys):

* gate alone (their ``GaussianAdaptiveAttention``): ``mean_offsets`` ``[K]`` -> ``mean_offsets``
  ``[K]``; ``log_sigma`` ``[K]`` -> ``log_sigma`` ``[K]``. Their ``num_heads``,
  ``padding_value`` and ``eps`` are unused there and have no counterpart here.
* residual gate (their ``GAttnGateG``): ``to_attn.weight`` ``[1, C, 1]`` (the ``Conv1d``) ->
  ``proj/kernel`` ``[C, 1]`` ``= weight[:, :, 0].T``; ``to_attn.bias`` ``[1]`` -> ``proj/bias``
  ``[1]``; ``alpha`` ``[]`` -> ``alpha`` ``[]``; ``gaa.mean_offsets``, ``gaa.log_sigma`` ->
  ``gate/mean_offsets``, ``gate/log_sigma``. Their unused ``cap`` has no counterpart.

The PyTorch code works on ``[B, C, T]`` and returns the gate in the input's dtype; here the
layout is channels-last ``[B, T, C]`` by default (``time_axis=-1, channel_axis=-2`` takes the
PyTorch one) and the gate is returned in float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaam_jax import _validation as check
from gaam_jax import functional
from gaam_jax.initializers import torch_default_init
from gaam_jax.sharding import AnnotatedInit, LogicalAxes, with_logical_axes

Dtype = Any
Initializer = nn.initializers.Initializer

__all__ = ["DensityGate", "DensityResidualGate"]

#: ``log_sigma`` at init: ``log 0.5`` (the authors'), so ``sigma = softplus(log 0.5) + 1e-3``.
LOG_SIGMA_INIT = math.log(0.5)
#: Default initialisers (the authors'): offsets 0, width parameters ``log 0.5``.
MEAN_OFFSETS_INIT: Initializer = nn.initializers.zeros_init()
LOG_SIGMA_INITIALIZER: Initializer = nn.initializers.constant(LOG_SIGMA_INIT)
#: The residual gate's ``alpha`` at init (the authors'): ``y = x * (1 + 0.05 * gate)``.
ALPHA_INIT = 0.05

# Logical axes of the parameters (docs/design.md section 12): the K Gaussians and the scalar
# alpha are never split; the projection's input is the model width.
GAUSSIAN_AXES: LogicalAxes = (None,)
PROJ_KERNEL_AXES: LogicalAxes = ("embed", None)
PROJ_BIAS_AXES: LogicalAxes = (None,)
ALPHA_AXES: LogicalAxes = ()


# --------------------------------------------------------------------------------------------
# Helpers shared with gaam_jax.nnx.density
# --------------------------------------------------------------------------------------------


def residual_axes(ndim: int, time_axis: int, channel_axis: int) -> tuple[int, int]:
    """Canonical ``(time_axis, channel_axis)`` of an input of rank ``ndim``.

    Raises:
      ValueError: if either is out of range or they coincide.
    """
    t = check.canonical_axis(time_axis, ndim, "time_axis")
    c = check.canonical_axis(channel_axis, ndim, "channel_axis")
    if t == c:
        raise ValueError(f"time_axis ({time_axis}) and channel_axis ({channel_axis}) must differ.")
    return t, c


def time_mask(
    mask: jax.Array | None, shape: tuple[int, ...], channel_axis: int
) -> jax.Array | None:
    """A per-time-step validity mask, checked and broadcast to ``shape`` with 1 channel.

    Args:
      mask: None, or a boolean array (True = valid) either of the input's rank with size 1 on
        the channel axis, or of lower rank and broadcastable to the input's shape without its
        channel axis (e.g. ``[batch, time]`` for ``[batch, time, channels]``).
      shape: the input's shape.
      channel_axis: the canonical channel axis.

    Returns:
      None, or the mask with shape ``shape`` except 1 on ``channel_axis``.

    Raises:
      ValueError: for a non-boolean mask, one of the input's rank with more than one entry on
        the channel axis, or one that does not broadcast.
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise ValueError(
            f"mask must be boolean (True = valid), got dtype {mask.dtype}; padding is never "
            "inferred from values."
        )
    ndim = len(shape)
    target = shape[:channel_axis] + (1,) + shape[channel_axis + 1 :]
    if mask.ndim == ndim:
        if mask.shape[channel_axis] != 1:
            raise ValueError(
                f"mask of shape {mask.shape} has size {mask.shape[channel_axis]} on the channel "
                f"axis ({channel_axis}); the residual gate masks whole time steps: give it size 1 "
                "there, or drop that axis."
            )
        want = target
    else:
        want = shape[:channel_axis] + shape[channel_axis + 1 :]
    try:
        ok = mask.ndim <= ndim and jnp.broadcast_shapes(mask.shape, want) == want
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"mask of shape {mask.shape} does not broadcast to the input shape {shape} without "
            f"its channel axis ({want})."
        )
    mask = jnp.broadcast_to(mask, want)
    return mask if mask.ndim == ndim else jnp.expand_dims(mask, channel_axis)


def residual_scale(
    x: jax.Array,
    xs: jax.Array,
    gate: jax.Array,
    alpha: jax.Array,
    mask: jax.Array | None,
    dtype: Dtype,
) -> jax.Array:
    """``x * (1 + alpha * gate)`` in float32, cast to ``dtype``; masked steps are ``x`` as is.

    ``xs`` is ``x`` in float32 with the masked steps zeroed, so that no masked value (even NaN)
    reaches the gradient of ``alpha`` or of the gate.
    """
    scale = 1.0 + alpha.astype(jnp.float32) * gate
    y = (xs * scale).astype(dtype)
    return y if mask is None else jnp.where(mask, y, x.astype(dtype))


def _check_num_gaussians(num_gaussians: object) -> None:
    check.positive_int(num_gaussians, "num_gaussians")


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class DensityGate(AnnotatedInit, nn.Module):
    """The authors' density gate: ``y = x * mean_k N(z_k)``, K Gaussians shared by all features.

    Along ``axis``, per sample and per feature, the input is centred by its mean plus each of
    the ``num_gaussians`` offsets and scaled by its standard deviation times each relative width
    ``sigma_k = softplus(log_sigma_k) + 1e-3``; the gate is the mean of the K normalised
    densities (computed in float32 in the log domain, see
    :func:`gaam_jax.functional.density_gate`). The parameters ``mean_offsets`` and ``log_sigma``
    are ``[num_gaussians]`` scalars (logical axes ``(None,)``). The gate is sown as
    ``intermediates/gate``.

    Example::

        layer = DensityGate(num_gaussians=4, axis=1)         # x: [batch, time, features]
        variables = layer.init(jax.random.key(0), x)         # mean_offsets, log_sigma: [4]
        y, gate = layer.apply(variables, x, return_gate=True)

    Attributes:
      num_gaussians: K, the number of Gaussians.
      axis: the axis the statistics are taken over.
      mean_offsets_init: initialiser of the offsets (authors: 0).
      log_sigma_init: initialiser of the width parameters (authors: ``log 0.5``).
      dtype: output dtype; None keeps the input's. Statistics are float32 regardless.
      param_dtype: storage dtype of the parameters.
    """

    num_gaussians: int = 4
    axis: int = -2
    mean_offsets_init: Initializer = MEAN_OFFSETS_INIT
    log_sigma_init: Initializer = LOG_SIGMA_INITIALIZER
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        _check_num_gaussians(self.num_gaussians)
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, *, return_gate: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Applies the gate.

        Args:
          x: float input of rank >= 1, e.g. ``[batch, time, features]``.
          mask: optional boolean broadcastable to ``x`` (True = valid); masked elements are left
            out of the statistics and returned unchanged.
          return_gate: also return the float32 gate.

        Returns:
          ``y`` (shape of ``x``, dtype ``self.dtype`` or that of ``x``), or ``(y, gate)`` with
          ``gate`` float32 of the shape of ``x``.
        """
        if self.dtype is not None:
            x = x.astype(self.dtype)
        shape = (self.num_gaussians,)
        mean_offsets = self.param(
            "mean_offsets",
            with_logical_axes(self.mean_offsets_init, GAUSSIAN_AXES),
            shape,
            self.param_dtype,
        )
        log_sigma = self.param(
            "log_sigma",
            with_logical_axes(self.log_sigma_init, GAUSSIAN_AXES),
            shape,
            self.param_dtype,
        )
        y, gate = functional.density_mean_gate(
            x, mean_offsets, log_sigma, axis=self.axis, mask=mask, return_gate=True
        )
        self.sow("intermediates", "gate", gate)
        return (y, gate) if return_gate else y


class DensityResidualGate(AnnotatedInit, nn.Module):
    """The authors' residual density gate (``GAttnGateG``): ``y = x * (1 + alpha * gate)``.

    A 1x1 convolution over the channels (a ``Dense(C -> 1)`` named ``proj``, kernel ``[C, 1]``,
    bias ``[1]``, PyTorch's default ``Conv1d`` initialisation ``U(+-1/sqrt(C))``) projects
    ``x`` to one signal ``a`` per time step; the density gate of ``a`` along time (a
    :class:`DensityGate` named ``gate``, sown as ``intermediates/gate/gate``) multiplies every
    channel through ``1 + alpha * gate``, with a learnable scalar ``alpha`` (init 0.05). So the
    block starts near the identity. The projection, the gate and the product are float32; the
    output has the input's dtype (or ``dtype``).

    Example::

        block = DensityResidualGate(num_gaussians=4)         # x: [batch, time, channels]
        variables = block.init(jax.random.key(0), x)         # proj, alpha, gate
        y, gate = block.apply(variables, x, return_gate=True)  # gate: [batch, time, 1]

    Attributes:
      num_gaussians: K of the inner density gate.
      alpha_init: initial ``alpha`` (authors: 0.05).
      time_axis: the axis of the gate's statistics.
      channel_axis: the axis the projection sums over (``-1``: channels-last, the library's
        layout; the PyTorch code is ``[B, C, T]``: ``time_axis=-1, channel_axis=-2``).
      mean_offsets_init: initialiser of the gate's offsets (authors: 0).
      log_sigma_init: initialiser of the gate's width parameters (authors: ``log 0.5``).
      dtype: output dtype; None keeps the input's.
      param_dtype: storage dtype of the parameters.
    """

    num_gaussians: int = 4
    alpha_init: float = ALPHA_INIT
    time_axis: int = -2
    channel_axis: int = -1
    mean_offsets_init: Initializer = MEAN_OFFSETS_INIT
    log_sigma_init: Initializer = LOG_SIGMA_INITIALIZER
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        _check_num_gaussians(self.num_gaussians)
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, *, return_gate: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Applies the residual gate.

        Args:
          x: float input of rank >= 2, e.g. ``[batch, time, channels]``.
          mask: optional boolean validity of the time steps (True = valid): of ``x``'s rank with
            size 1 on the channel axis, or broadcastable to ``x``'s shape without it (e.g.
            ``[batch, time]``). Masked steps are left out of the gate's statistics and returned
            unchanged.
          return_gate: also return the gate.

        Returns:
          ``y`` (shape of ``x``), or ``(y, gate)`` with ``gate`` the float32 density gate of the
          projected signal: shape of ``x`` with 1 channel, 1 at masked steps.
        """
        if self.dtype is not None:
            x = x.astype(self.dtype)
        check.floating_input(x)
        if x.ndim < 2:
            raise ValueError(f"x must have a time and a channel axis, got shape {x.shape}.")
        t, c = residual_axes(x.ndim, self.time_axis, self.channel_axis)
        mask = time_mask(mask, x.shape, c)
        xs = x.astype(jnp.float32)
        if mask is not None:
            xs = jnp.where(mask, xs, 0.0)
        channels = x.shape[c]
        proj = nn.Dense(
            1,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            precision=jax.lax.Precision.HIGHEST,
            kernel_init=with_logical_axes(torch_default_init(channels), PROJ_KERNEL_AXES),
            bias_init=with_logical_axes(torch_default_init(channels), PROJ_BIAS_AXES),
            name="proj",
        )
        a = jnp.moveaxis(proj(jnp.moveaxis(xs, c, -1)), -1, c)  # [..., 1 channel, ...]
        alpha = self.param(
            "alpha",
            with_logical_axes(nn.initializers.constant(self.alpha_init), ALPHA_AXES),
            (),
            self.param_dtype,
        )
        _, gate = DensityGate(
            num_gaussians=self.num_gaussians,
            axis=t,
            mean_offsets_init=self.mean_offsets_init,
            log_sigma_init=self.log_sigma_init,
            param_dtype=self.param_dtype,
            name="gate",
        )(a, mask, return_gate=True)
        y = residual_scale(x, xs, gate, alpha, mask, x.dtype)
        return (y, gate) if return_gate else y
