"""``flax.nnx`` versions of the density gate and the residual gate around it.

The same computation as the Linen modules of :mod:`gaam_jax.density` (both call
:func:`gaam_jax.functional.density_mean_gate`), with the same parameter paths, shapes and
initialisers (the random projection draws from other keys), so parameters move between the two
by renaming nothing (``gaam_jax.nnx.linen_variables`` / ``load_linen_variables``):

* :class:`DensityGate`: ``mean_offsets`` ``[K]``, ``log_sigma`` ``[K]`` (``nnx.Param``); the
  last gate as ``gate`` (``nnx.Intermediate``), the Linen module's ``intermediates/gate``.
* :class:`DensityResidualGate`: ``proj/kernel`` ``[C, 1]``, ``proj/bias`` ``[1]`` (an
  ``nnx.Linear``), ``alpha`` ``[]``, ``gate/mean_offsets``, ``gate/log_sigma`` (an inner
  :class:`DensityGate`), and the last gate as ``gate/gate``.

Mapping from the authors' PyTorch ``state_dict`` (their ``GaussianAdaptiveAttention`` and
``GAttnGateG`` of the Density-Adaptive-JEPA code): ``mean_offsets`` -> ``mean_offsets``,
``log_sigma`` -> ``log_sigma`` (the same ``[K]`` vectors); ``to_attn.weight`` ``[1, C, 1]`` (the
``Conv1d(C, 1, 1)``) -> ``proj/kernel`` ``[C, 1] = weight[:, :, 0].T``; ``to_attn.bias`` ``[1]``
-> ``proj/bias``; ``alpha`` -> ``alpha``; ``gaa.mean_offsets``/``gaa.log_sigma`` ->
``gate/mean_offsets``/``gate/log_sigma``. PyTorch's layout is ``[B, C, T]``: pass
``time_axis=-1, channel_axis=-2`` for it (the default is channels-last ``[B, T, C]``).

Sharding metadata: every parameter carries its logical axes as NNX's ``out_sharding`` metadata
(the key of flax 0.12.8 through 0.12.12; ``sharding`` and ``sharding_names`` are deprecated
aliases there), through ``nnx.with_partitioning``: ``(None,)`` for the Gaussians,
``('embed', None)`` and ``(None,)`` for the projection, ``()`` for ``alpha``, as in the Linen
modules (``docs/design.md`` section 12). ``nnx.get_partition_spec(nnx.state(module))`` reads
them, and ``gaam_jax.nnx.param_shardings(module, mesh)`` maps them through the library's
rules. The parameters are created with ``eager_sharding=False``: NNX's eager sharding (on by
default in 0.12) would require a mesh to build any module, and these few replicated scalars
gain nothing from it; as the Linen ``init`` does, construction returns plain arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gaam_jax import _validation as check
from gaam_jax import functional
from gaam_jax.density import (
    ALPHA_AXES,
    ALPHA_INIT,
    GAUSSIAN_AXES,
    LOG_SIGMA_INITIALIZER,
    MEAN_OFFSETS_INIT,
    PROJ_BIAS_AXES,
    PROJ_KERNEL_AXES,
    residual_axes,
    residual_scale,
    time_mask,
)
from gaam_jax.initializers import torch_default_init
from gaam_jax.sharding import LogicalAxes

Dtype = Any
Initializer = Callable[..., jax.Array]

__all__ = ["DensityGate", "DensityResidualGate"]


def _annotated(init: Initializer, axes: LogicalAxes) -> Initializer:
    """``init`` with ``axes`` as NNX sharding metadata, never sharded eagerly (module doc)."""
    return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


class DensityGate(nnx.Module):
    """The authors' density gate (NNX): ``y = x * mean_k N(z_k)``, K Gaussians for all features.

    See :class:`gaam_jax.density.DensityGate` (the Linen module, same parameters) and
    :func:`gaam_jax.functional.density_gate` (the formulas). Each call stores the float32 gate
    as ``self.gate`` (an ``nnx.Intermediate``); ``return_gate=True`` also returns it.

    Example::

        layer = DensityGate(4, rngs=nnx.Rngs(0), axis=1)     # x: [batch, time, features]
        y, gate = layer(x, return_gate=True)                 # layer.gate[...] is gate

    Args:
      num_gaussians: K, the number of Gaussians.
      rngs: random streams; ``params`` draws the initial values.
      axis: the axis the statistics are taken over.
      mean_offsets_init: initialiser of the offsets (authors: 0).
      log_sigma_init: initialiser of the width parameters (authors: ``log 0.5``).
      dtype: output dtype; None keeps the input's. Statistics are float32 regardless.
      param_dtype: storage dtype of the parameters.
    """

    def __init__(
        self,
        num_gaussians: int = 4,
        *,
        rngs: nnx.Rngs,
        axis: int = -2,
        mean_offsets_init: Initializer = MEAN_OFFSETS_INIT,
        log_sigma_init: Initializer = LOG_SIGMA_INITIALIZER,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
    ) -> None:
        check.positive_int(num_gaussians, "num_gaussians")
        self.num_gaussians = num_gaussians
        self.axis = axis
        self.dtype = dtype
        shape = (num_gaussians,)
        self.mean_offsets = nnx.Param(
            _annotated(mean_offsets_init, GAUSSIAN_AXES)(rngs.params(), shape, param_dtype)
        )
        self.log_sigma = nnx.Param(
            _annotated(log_sigma_init, GAUSSIAN_AXES)(rngs.params(), shape, param_dtype)
        )

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
          ``y`` (shape of ``x``, dtype ``dtype`` or that of ``x``), or ``(y, gate)`` with
          ``gate`` float32 of the shape of ``x``.
        """
        if self.dtype is not None:
            x = x.astype(self.dtype)
        y, gate = functional.density_mean_gate(
            x,
            self.mean_offsets.get_value(),
            self.log_sigma.get_value(),
            axis=self.axis,
            mask=mask,
            return_gate=True,
        )
        self.gate = nnx.Intermediate(gate)
        return (y, gate) if return_gate else y


class DensityResidualGate(nnx.Module):
    """The authors' residual density gate (NNX, ``GAttnGateG``): ``y = x * (1 + alpha * gate)``.

    See :class:`gaam_jax.density.DensityResidualGate` (the Linen module, same parameters): a
    1x1 convolution ``proj`` (``nnx.Linear(C, 1)``, PyTorch's default ``Conv1d`` init
    ``U(+-1/sqrt(C))``) projects the channels to one signal per time step; its density gate along
    time (the inner :class:`DensityGate` ``gate``, which keeps it as ``gate.gate``) scales
    every channel by ``1 + alpha * gate``, ``alpha`` a learnable scalar (init 0.05).

    Example::

        block = DensityResidualGate(256, rngs=nnx.Rngs(0))    # x: [batch, time, 256]
        y, gate = block(x, return_gate=True)                  # gate: [batch, time, 1]

    Args:
      num_channels: C, the size of ``x`` along ``channel_axis``.
      num_gaussians: K of the inner density gate.
      rngs: random streams; ``params`` draws the initial values.
      alpha_init: initial ``alpha`` (authors: 0.05).
      time_axis: the axis of the gate's statistics.
      channel_axis: the axis the projection sums over (``-1``: channels-last; PyTorch's
        ``[B, C, T]`` is ``time_axis=-1, channel_axis=-2``).
      mean_offsets_init: initialiser of the gate's offsets (authors: 0).
      log_sigma_init: initialiser of the gate's width parameters (authors: ``log 0.5``).
      dtype: output dtype; None keeps the input's.
      param_dtype: storage dtype of the parameters.
    """

    def __init__(
        self,
        num_channels: int,
        num_gaussians: int = 4,
        *,
        rngs: nnx.Rngs,
        alpha_init: float = ALPHA_INIT,
        time_axis: int = -2,
        channel_axis: int = -1,
        mean_offsets_init: Initializer = MEAN_OFFSETS_INIT,
        log_sigma_init: Initializer = LOG_SIGMA_INITIALIZER,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
    ) -> None:
        check.positive_int(num_channels, "num_channels")
        check.positive_int(num_gaussians, "num_gaussians")
        self.num_channels = num_channels
        self.time_axis = time_axis
        self.channel_axis = channel_axis
        self.dtype = dtype
        self.proj = nnx.Linear(
            num_channels,
            1,
            dtype=jnp.float32,
            param_dtype=param_dtype,
            precision=jax.lax.Precision.HIGHEST,
            kernel_init=_annotated(torch_default_init(num_channels), PROJ_KERNEL_AXES),
            bias_init=_annotated(torch_default_init(num_channels), PROJ_BIAS_AXES),
            rngs=rngs,
        )
        self.alpha = nnx.Param(
            _annotated(nnx.initializers.constant(alpha_init), ALPHA_AXES)(
                rngs.params(), (), param_dtype
            )
        )
        self.gate = DensityGate(
            num_gaussians,
            rngs=rngs,
            axis=time_axis,
            mean_offsets_init=mean_offsets_init,
            log_sigma_init=log_sigma_init,
            param_dtype=param_dtype,
        )

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
        _, c = residual_axes(x.ndim, self.time_axis, self.channel_axis)
        if x.shape[c] != self.num_channels:
            raise ValueError(
                f"x has {x.shape[c]} channels on axis {self.channel_axis}; this layer was built "
                f"for num_channels={self.num_channels}."
            )
        mask = time_mask(mask, x.shape, c)
        xs = x.astype(jnp.float32)
        if mask is not None:
            xs = jnp.where(mask, xs, 0.0)
        a = jnp.moveaxis(self.proj(jnp.moveaxis(xs, c, -1)), -1, c)  # [..., 1 channel, ...]
        _, gate = self.gate(a, mask, return_gate=True)
        y = residual_scale(x, xs, gate, self.alpha.get_value(), mask, x.dtype)
        return (y, gate) if return_gate else y
