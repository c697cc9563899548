"""Linen module for multi-head Gaussian Adaptive Attention, paper form (Algorithm 1 + 3)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaam_jax import _validation as check
from gaam_jax import functional
from gaam_jax.functional import Variance
from gaam_jax.sharding import AnnotatedInit, with_logical_axes

Dtype = Any
Initializer = nn.initializers.Initializer


class GaussianAdaptiveAttention(AnnotatedInit, nn.Module):
    """Multi-head GAAM (paper form): ``y = x * exp(-z^2 / (2 xi))``, vectorised over heads.

    The heads are ``num_heads`` contiguous equal groups along ``axis``; each head standardises its
    group per sample and per feature and has its own ``delta`` and ``xi`` per feature, stored
    stacked as ``[num_heads, features]`` (``2 * num_heads * features`` parameters, the paper's
    ``P_DAAM = 2 H d``). The gate is computed in float32 and sown as
    ``intermediates/gate`` (pass ``mutable=['intermediates']`` to ``apply`` to read it).

    Example::

        layer = GaussianAdaptiveAttention(num_heads=8)       # x: [batch, 24 layers, 1024]
        variables = layer.init(jax.random.key(0), x)
        y = layer.apply(variables, x)                        # [batch, 24, 1024]

    Attributes:
      num_heads: number of heads; must divide ``x.shape[axis]``.
      axis: axis the statistics are taken over (the encoder-layer axis in the paper's decoder).
      feature_axis: axis indexing the per-feature parameters, or None for one pair per head.
      delta_init: initialiser of the mean offsets (paper: 0).
      xi_init: initialiser of the scaled variances (paper: 2).
      variance: ``"shifted"`` (default) or ``"one_pass"`` (the experiment code's estimator).
      dtype: output dtype; None keeps the input's. Statistics are float32 regardless.
      param_dtype: storage dtype of ``delta`` and ``xi``.
    """

    num_heads: int = 1
    axis: int = -2
    feature_axis: int | None = -1
    delta_init: Initializer = nn.initializers.zeros_init()
    xi_init: Initializer = nn.initializers.constant(2.0)
    variance: Variance = "shifted"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        check.positive_int(self.num_heads, "num_heads")
        if self.variance not in ("shifted", "one_pass"):
            raise ValueError(f"variance must be 'shifted' or 'one_pass', got {self.variance!r}.")
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, *, return_gate: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Applies the layer.

        Args:
          x: float input, e.g. ``[batch, layers, features]``.
          mask: optional boolean broadcastable to ``x`` (True = valid); masked elements are left
            out of the statistics and returned unchanged.
          return_gate: also return the float32 gate.

        Returns:
          ``y`` (shape of ``x``, dtype ``self.dtype`` or that of ``x``), or ``(y, gate)``.
        """
        if self.dtype is not None:
            x = x.astype(self.dtype)
        if self.feature_axis is None:
            features = 1
        else:
            features = x.shape[check.canonical_axis(self.feature_axis, x.ndim, "feature_axis")]
        shape = (self.num_heads, features)
        axes = ("heads", "embed")
        delta = self.param(
            "delta", with_logical_axes(self.delta_init, axes), shape, self.param_dtype
        )
        xi = self.param("xi", with_logical_axes(self.xi_init, axes), shape, self.param_dtype)
        y, gate = functional.gaussian_adaptive_attention(
            x,
            delta,
            xi,
            axis=self.axis,
            feature_axis=self.feature_axis,
            mask=mask,
            variance=self.variance,
            return_gate=True,
        )
        self.sow("intermediates", "gate", gate)
        return (y, gate) if return_gate else y
