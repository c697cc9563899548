"""NNX GQGAAM (GQDAAM): multi-head GAAM, a linear map to the attention width, then GQA."""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from gaam_jax import _validation as check
from gaam_jax.functional import Variance
from gaam_jax.initializers import torch_default_init
from gaam_jax.nnx.attention import GaussianAdaptiveAttention
from gaam_jax.nnx.gqa import GroupedQueryAttention, PaperCodeGroupedQueryAttention
from gaam_jax.nnx.layers import Dense

Dtype = Any

__all__ = ["GQGAAM"]


class GQGAAM(nnx.Module):
    """Grouped-Query Gaussian Adaptive Attention over the N encoder-layer tokens.

    As :class:`gaam_jax.GQGAAM`: ``x [batch, N, d]`` -> multi-head GAAM over the layer axis
    (attribute ``GaussianAdaptiveAttention_0``, whose gate is kept in its ``gate``) ->
    ``embed_transform``, ``Dense(d -> embed_dim)`` with PyTorch's default init -> ``gqa``, the
    authors' block (``attention='paper_code'``) or textbook GQA (``'textbook'``, head width
    ``embed_dim // query_heads``) -> ``[batch, N, embed_dim]``. The attribute names are the Linen
    parameter paths.

    Args:
      num_features: d, the width of each layer's features.
      rngs: NNX random streams (the ``params`` stream).
      gaam_heads: GAAM heads (g in the paper: 8; the CIFAR code uses 1).
      embed_dim: attention width (512 in the paper).
      query_heads: query heads (8).
      kv_heads: key/value heads (2).
      attention: ``'paper_code'`` or ``'textbook'``.
      variance: GAAM variance estimator, ``'shifted'`` (default) or ``'one_pass'``.
      dtype: computation dtype outside GAAM's float32 statistics.
      param_dtype: parameter dtype.
    """

    def __init__(
        self,
        num_features: int,
        *,
        rngs: nnx.Rngs,
        gaam_heads: int = 8,
        embed_dim: int = 512,
        query_heads: int = 8,
        kv_heads: int = 2,
        attention: Literal["paper_code", "textbook"] = "paper_code",
        variance: Variance = "shifted",
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
    ):
        check.positive_int(num_features, "num_features")
        if attention not in ("paper_code", "textbook"):
            raise ValueError(f"attention must be 'paper_code' or 'textbook', got {attention!r}.")
        # Linen's automatic name for the unnamed GAAM, so the parameter paths match.
        self.GaussianAdaptiveAttention_0 = GaussianAdaptiveAttention(
            gaam_heads,
            num_features,
            rngs=rngs,
            variance=variance,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.embed_transform = Dense(
            num_features,
            embed_dim,
            rngs=rngs,
            kernel_init=torch_default_init(num_features),
            bias_init=torch_default_init(num_features),
            kernel_axes=("embed", "mlp"),
            bias_axes=("mlp",),
            dtype=dtype,
            param_dtype=param_dtype,
        )
        if attention == "paper_code":
            self.gqa = PaperCodeGroupedQueryAttention(
                embed_dim, query_heads, kv_heads, rngs=rngs, dtype=dtype, param_dtype=param_dtype
            )
        else:
            if embed_dim % query_heads:
                raise ValueError(
                    f"embed_dim={embed_dim} must be divisible by query_heads={query_heads}."
                )
            self.gqa = GroupedQueryAttention(
                embed_dim,
                query_heads,
                kv_heads,
                embed_dim // query_heads,
                rngs=rngs,
                dtype=dtype,
                param_dtype=param_dtype,
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies GQGAAM.

        Args:
          x: ``[batch, N, num_features]``.

        Returns:
          ``[batch, N, embed_dim]``.
        """
        if x.ndim != 3:
            raise ValueError(f"x must be [batch, layers, features], got shape {x.shape}.")
        x = self.GaussianAdaptiveAttention_0(x)
        return self.gqa(self.embed_transform(x))
