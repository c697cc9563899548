"""Linen modules for the mixture form of the authors' package: the layer and GaussianBlock."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaam_jax import _validation as check
from gaam_jax import functional
from gaam_jax.sharding import AnnotatedInit, with_logical_axes

Dtype = Any
Initializer = nn.initializers.Initializer


def lognormal_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    """``exp(N(0, 1))``: the package's initialisation of ``c`` at GitHub HEAD.

    Release 0.1.5 draws ``c ~ N(0, 1)``, which can start a Gaussian arbitrarily close to zero
    width; HEAD (and the paper's appendix code) moved to the log-normal draw used here.
    """
    return jnp.exp(jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class MixtureGaussianAdaptiveAttention(AnnotatedInit, nn.Module):
    """Multi-head mixture GAAM (package ``MultiHeadGaussianAdaptiveAttention``), no residual.

    Each head owns ``num_gaussians`` scalar pairs ``(mean_offsets, c)`` stored stacked as
    ``[num_heads, num_gaussians]``; the product of its Gaussians is evaluated in closed form and
    sum-normalised along ``axis`` (see :mod:`gaam_jax.functional`). The heads split ``axis`` into
    chunks of ``size // num_heads``; the last head takes the remainder. The float32 gate is sown
    as ``intermediates/gate``.

    Attributes:
      num_heads: number of heads (at most ``x.shape[axis]``).
      num_gaussians: Gaussians per head.
      axis: the normalised axis, also split by the heads.
      eps: variance epsilon and floor of the normalising sum. The package ignores the value it
        is given and always uses 1e-8 in its heads; here it is honoured.
      mean_offsets_init: initialiser of the offsets (package: zeros).
      c_init: initialiser of the scales (default ``exp(N(0,1))``, see :func:`lognormal_init`).
      dtype: output dtype; None keeps the input's. Statistics are float32 regardless.
      param_dtype: storage dtype of the parameters.
    """

    num_heads: int = 1
    num_gaussians: int = 1
    axis: int = -2
    eps: float = 1e-8
    mean_offsets_init: Initializer = nn.initializers.zeros_init()
    c_init: Initializer = lognormal_init
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        check.positive_int(self.num_heads, "num_heads")
        check.positive_int(self.num_gaussians, "num_gaussians")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}.")
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, *, return_gate: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Applies the layer.

        Args:
          x: float input of rank >= 1.
          mask: optional boolean broadcastable to ``x`` (True = valid).
          return_gate: also return the float32 gate.

        Returns:
          ``y = x * gate`` (shape of ``x``), or ``(y, gate)``.
        """
        if self.dtype is not None:
            x = x.astype(self.dtype)
        shape = (self.num_heads, self.num_gaussians)
        axes = ("heads", None)
        mean_offsets = self.param(
            "mean_offsets", with_logical_axes(self.mean_offsets_init, axes), shape, self.param_dtype
        )
        c = self.param("c", with_logical_axes(self.c_init, axes), shape, self.param_dtype)
        y, gate = functional.mixture_gaussian_adaptive_attention(
            x, mean_offsets, c, axis=self.axis, mask=mask, eps=self.eps, return_gate=True
        )
        self.sow("intermediates", "gate", gate)
        return (y, gate) if return_gate else y


class GaussianBlock(AnnotatedInit, nn.Module):
    """Residual stack of mixture layers: ``x <- layer_i(x) + x`` (the package's ``GaussianBlock``).

    Constructor arguments mean what they mean in the package (one entry per layer); the number
    of layers is ``len(norm_axes)``. Parameters live under ``layer_{i}``. Unlike the package,
    masked elements pass through the whole block unchanged (the package doubles them at every
    residual).

    Example::

        block = GaussianBlock(norm_axes=(1, 1, 1), num_heads=(4, 4, 4), num_gaussians=(5, 5, 5))
        variables = block.init(jax.random.key(0), x)          # x: [10, 128]
        y = block.apply(variables, x)

    Attributes:
      norm_axes: the normalised axis of each layer.
      num_heads: heads of each layer.
      num_gaussians: Gaussians per head of each layer.
      eps: see :class:`MixtureGaussianAdaptiveAttention`.
      c_init: initialiser of every layer's scales.
      dtype: output dtype; None keeps the input's.
      param_dtype: storage dtype of the parameters.
    """

    norm_axes: Sequence[int]
    num_heads: Sequence[int]
    num_gaussians: Sequence[int]
    eps: float = 1e-8
    c_init: Initializer = lognormal_init
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        lengths = {len(self.norm_axes), len(self.num_heads), len(self.num_gaussians)}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(
                "norm_axes, num_heads and num_gaussians must be non-empty and of equal length "
                f"(one entry per layer); got lengths {len(self.norm_axes)}, {len(self.num_heads)}"
                f" and {len(self.num_gaussians)}."
            )
        for i, (heads, k) in enumerate(zip(self.num_heads, self.num_gaussians, strict=True)):
            check.positive_int(heads, f"num_heads[{i}]")
            check.positive_int(k, f"num_gaussians[{i}]")
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, *, return_gates: bool = False
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Applies the block.

        Args:
          x: float input of rank >= 1.
          mask: optional boolean broadcastable to ``x`` (True = valid), shared by all layers.
          return_gates: also return ``{'layer_i': gate}`` (float32), like the package's
            ``return_attention_details``.

        Returns:
          The block output (shape of ``x``), or ``(output, gates)``.
        """
        if self.dtype is not None:
            x = x.astype(self.dtype)
        gates = {}
        for i, (axis, heads, k) in enumerate(
            zip(self.norm_axes, self.num_heads, self.num_gaussians, strict=True)
        ):
            layer = MixtureGaussianAdaptiveAttention(
                num_heads=heads,
                num_gaussians=k,
                axis=axis,
                eps=self.eps,
                c_init=self.c_init,
                param_dtype=self.param_dtype,
                name=f"layer_{i}",
            )
            y, gates[f"layer_{i}"] = layer(x, mask, return_gate=True)
            y = y + x
            x = y if mask is None else jnp.where(mask, y, x)
        return (x, gates) if return_gates else x
