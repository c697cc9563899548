"""NNX layers of GAAM: the paper form, the mixture form and the package's ``GaussianBlock``.

Each is the Linen module of the same name (:mod:`gaam_jax.gaussian_attention`,
:mod:`gaam_jax.mixture`) over the same functional core, with the same parameter names, shapes,
initialisers, logical axes and dtype rules (statistics in float32). NNX needs the shapes up front,
so the paper form takes ``num_features``, the size of ``feature_axis``, which Linen reads from the
first input.

The float32 gate of the latest call is kept as ``nnx.Intermediate`` in the attribute ``gate`` (in
``GaussianBlock``: ``layer_i.gate``), for the Importance Factor; read it with
``nnx.state(model, nnx.Intermediate)`` or ``nnx.pop(model, nnx.Intermediate)``. It is replaced at
every call, not appended as ``sow`` would: after its first step a training loop under ``nnx.jit``
keeps one state structure, where a growing tuple would hold every step's gate and retrace every
step. The gate equals the one Linen sows as ``intermediates/gate`` in one ``apply``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from gaam_jax import _validation as check
from gaam_jax import functional
from gaam_jax.functional import Variance
from gaam_jax.mixture import lognormal_init
from gaam_jax.nnx.sharding import param

Dtype = Any
Initializer = nn.initializers.Initializer

__all__ = ["GaussianAdaptiveAttention", "GaussianBlock", "MixtureGaussianAdaptiveAttention"]

# The paper's initial values (delta = 0, xi = 2) and the package's (mean offsets 0).
ZEROS: Initializer = nn.initializers.zeros_init()
TWO: Initializer = nn.initializers.constant(2.0)


class GaussianAdaptiveAttention(nnx.Module):
    """Multi-head GAAM (paper form): ``y = x * exp(-z^2 / (2 xi))``, vectorised over heads.

    As :class:`gaam_jax.GaussianAdaptiveAttention`: ``num_heads`` contiguous equal groups along
    ``axis``, each standardised per sample and per feature, with ``delta`` and ``xi`` stored as
    ``nnx.Param`` ``[num_heads, num_features]`` (logical axes ``('heads', 'embed')``).

    Example::

        layer = GaussianAdaptiveAttention(8, 1024, rngs=nnx.Rngs(0))   # x: [batch, 24, 1024]
        y = layer(x)                                                  # [batch, 24, 1024]
        gate = layer.gate[...]                                        # float32 [batch, 24, 1024]

    Args:
      num_heads: number of heads; must divide ``x.shape[axis]``.
      num_features: ``x.shape[feature_axis]``; 1 when ``feature_axis`` is None (one pair per head).
      rngs: NNX random streams (the ``params`` stream).
      axis: axis the statistics are taken over (the encoder-layer axis in the paper's decoder).
      feature_axis: axis indexing the per-feature parameters, or None.
      delta_init: initialiser of the mean offsets (paper: 0).
      xi_init: initialiser of the scaled variances (paper: 2).
      variance: ``"shifted"`` (default) or ``"one_pass"`` (the experiment code's estimator).
      dtype: output dtype; None keeps the input's. Statistics are float32 regardless.
      param_dtype: storage dtype of ``delta`` and ``xi``.
    """

    def __init__(
        self,
        num_heads: int,
        num_features: int,
        *,
        rngs: nnx.Rngs,
        axis: int = -2,
        feature_axis: int | None = -1,
        delta_init: Initializer = ZEROS,
        xi_init: Initializer = TWO,
        variance: Variance = "shifted",
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
    ):
        check.positive_int(num_heads, "num_heads")
        check.positive_int(num_features, "num_features")
        if variance not in ("shifted", "one_pass"):
            raise ValueError(f"variance must be 'shifted' or 'one_pass', got {variance!r}.")
        if feature_axis is None and num_features != 1:
            raise ValueError(
                f"num_features must be 1 when feature_axis is None (one pair per head), got "
                f"{num_features}."
            )
        self.num_heads, self.num_features = num_heads, num_features
        self.axis, self.feature_axis, self.variance = axis, feature_axis, variance
        self.dtype = dtype
        shape, axes = (num_heads, num_features), ("heads", "embed")
        self.delta = param(delta_init, rngs.params(), shape, param_dtype, axes)
        self.xi = param(xi_init, rngs.params(), shape, param_dtype, axes)

    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, *, return_gate: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Applies the layer and keeps its gate in ``self.gate``.

        Args:
          x: float input, e.g. ``[batch, layers, features]``.
          mask: optional boolean broadcastable to ``x`` (True = valid); masked elements are left
            out of the statistics and returned unchanged.
          return_gate: also return the float32 gate.

        Returns:
          ``y`` (shape of ``x``, dtype ``dtype`` or that of ``x``), or ``(y, gate)``.
        """
        if self.dtype is not None:
            x = x.astype(self.dtype)
        y, gate = functional.gaussian_adaptive_attention(
            x,
            self.delta[...],
            self.xi[...],
            axis=self.axis,
            feature_axis=self.feature_axis,
            mask=mask,
            variance=self.variance,
            return_gate=True,
        )
        self.gate = nnx.Intermediate(gate)
        return (y, gate) if return_gate else y


class MixtureGaussianAdaptiveAttention(nnx.Module):
    """Multi-head mixture GAAM (the package's ``MultiHeadGaussianAdaptiveAttention``), no residual.

    As :class:`gaam_jax.MixtureGaussianAdaptiveAttention`: ``mean_offsets`` and ``c`` are
    ``nnx.Param`` ``[num_heads, num_gaussians]`` (logical axes ``('heads', None)``); the heads
    split ``axis`` into chunks of ``size // num_heads``, the last taking the remainder.

    Args:
      num_heads: number of heads (at most ``x.shape[axis]``).
      num_gaussians: Gaussians per head.
      rngs: NNX random streams (the ``params`` stream).
      axis: the normalised axis, also split by the heads.
      eps: variance epsilon and floor of the normalising sum (honoured, unlike the package).
      mean_offsets_init: initialiser of the offsets (package: zeros).
      c_init: initialiser of the scales (default ``exp(N(0,1))``, see
        :func:`gaam_jax.lognormal_init`).
      dtype: output dtype; None keeps the input's. Statistics are float32 regardless.
      param_dtype: storage dtype of the parameters.
    """

    def __init__(
        self,
        num_heads: int,
        num_gaussians: int,
        *,
        rngs: nnx.Rngs,
        axis: int = -2,
        eps: float = 1e-8,
        mean_offsets_init: Initializer = ZEROS,
        c_init: Initializer = lognormal_init,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
    ):
        check.positive_int(num_heads, "num_heads")
        check.positive_int(num_gaussians, "num_gaussians")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}.")
        self.num_heads, self.num_gaussians = num_heads, num_gaussians
        self.axis, self.eps, self.dtype = axis, eps, dtype
        shape, axes = (num_heads, num_gaussians), ("heads", None)
        self.mean_offsets = param(mean_offsets_init, rngs.params(), shape, param_dtype, axes)
        self.c = param(c_init, rngs.params(), shape, param_dtype, axes)

    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, *, return_gate: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Applies the layer and keeps its gate in ``self.gate``.

        Args:
          x: float input of rank >= 1.
          mask: optional boolean broadcastable to ``x`` (True = valid).
          return_gate: also return the float32 gate.

        Returns:
          ``y = x * gate`` (shape of ``x``), or ``(y, gate)``.
        """
        if self.dtype is not None:
            x = x.astype(self.dtype)
        y, gate = functional.mixture_gaussian_adaptive_attention(
            x,
            self.mean_offsets[...],
            self.c[...],
            axis=self.axis,
            mask=mask,
            eps=self.eps,
            return_gate=True,
        )
        self.gate = nnx.Intermediate(gate)
        return (y, gate) if return_gate else y


class GaussianBlock(nnx.Module):
    """Residual stack of mixture layers: ``x <- layer_i(x) + x`` (the package's ``GaussianBlock``).

    As :class:`gaam_jax.GaussianBlock`: one entry per layer in each argument, the layers in the
    attributes ``layer_0``, ``layer_1``, ... (the Linen parameter paths), masked elements passed
    through the whole block unchanged.

    Example::

        block = GaussianBlock((1, 1, 1), (4, 4, 4), (5, 5, 5), rngs=nnx.Rngs(0))   # x: [10, 128]
        y = block(x)

    Args:
      norm_axes: the normalised axis of each layer.
      num_heads: heads of each layer.
      num_gaussians: Gaussians per head of each layer.
      rngs: NNX random streams (the ``params`` stream).
      eps: see :class:`MixtureGaussianAdaptiveAttention`.
      c_init: initialiser of every layer's scales.
      dtype: output dtype; None keeps the input's.
      param_dtype: storage dtype of the parameters.
    """

    def __init__(
        self,
        norm_axes: Sequence[int],
        num_heads: Sequence[int],
        num_gaussians: Sequence[int],
        *,
        rngs: nnx.Rngs,
        eps: float = 1e-8,
        c_init: Initializer = lognormal_init,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
    ):
        lengths = {len(norm_axes), len(num_heads), len(num_gaussians)}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(
                "norm_axes, num_heads and num_gaussians must be non-empty and of equal length "
                f"(one entry per layer); got lengths {len(norm_axes)}, {len(num_heads)} and "
                f"{len(num_gaussians)}."
            )
        for i, (heads, k) in enumerate(zip(num_heads, num_gaussians, strict=True)):
            check.positive_int(heads, f"num_heads[{i}]")
            check.positive_int(k, f"num_gaussians[{i}]")
        self.num_layers, self.dtype = len(norm_axes), dtype
        for i, (axis, heads, k) in enumerate(zip(norm_axes, num_heads, num_gaussians, strict=True)):
            # As in Linen, the layers compute in the block's (already cast) dtype.
            layer = MixtureGaussianAdaptiveAttention(
                heads, k, rngs=rngs, axis=axis, eps=eps, c_init=c_init, param_dtype=param_dtype
            )
            setattr(self, f"layer_{i}", layer)

    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, *, return_gates: bool = False
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Applies the block; each layer keeps its gate in ``layer_i.gate``.

        Args:
          x: float input of rank >= 1.
          mask: optional boolean broadcastable to ``x`` (True = valid), shared by all layers.
          return_gates: also return ``{'layer_i': gate}`` (float32).

        Returns:
          The block output (shape of ``x``), or ``(output, gates)``.
        """
        if self.dtype is not None:
            x = x.astype(self.dtype)
        gates = {}
        for i in range(self.num_layers):
            y, gates[f"layer_{i}"] = getattr(self, f"layer_{i}")(x, mask, return_gate=True)
            y = y + x
            x = y if mask is None else jnp.where(mask, y, x)
        return (x, gates) if return_gates else x
