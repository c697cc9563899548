"""GQGAAM (GQDAAM): multi-head GAAM, a linear map to the attention width, then GQA (section 6)."""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaam_jax.functional import Variance
from gaam_jax.gaussian_attention import GaussianAdaptiveAttention
from gaam_jax.gqa import GroupedQueryAttention, PaperCodeGroupedQueryAttention
from gaam_jax.initializers import torch_default_init
from gaam_jax.sharding import AnnotatedInit, with_logical_axes

Dtype = Any


class GQGAAM(AnnotatedInit, nn.Module):
    """Grouped-Query Gaussian Adaptive Attention over the N encoder-layer tokens.

    ``x [batch, N, d]`` -> multi-head GAAM over the layer axis (``gaam_heads`` contiguous groups
    of layers) -> ``Dense(d -> embed_dim)`` (PyTorch-default init, the code's
    ``embed_transform``) -> self-attention over the N layer tokens with ``query_heads`` query
    heads sharing ``kv_heads`` key/value heads -> ``[batch, N, embed_dim]``.

    ``attention='paper_code'`` (default) uses the authors' block
    (:class:`~gaam_jax.gqa.PaperCodeGroupedQueryAttention`), which the paper's parameter counts
    come from; ``'textbook'`` uses :class:`~gaam_jax.gqa.GroupedQueryAttention` with
    ``head_dim = embed_dim // query_heads`` and output width ``embed_dim``.

    The GAAM gate is sown as ``GaussianAdaptiveAttention_0/intermediates/gate``.

    Attributes:
      gaam_heads: GAAM heads (g in the paper: 8; the CIFAR code uses 1).
      embed_dim: attention width (512 in the paper).
      query_heads: query heads (8).
      kv_heads: key/value heads (2).
      attention: ``'paper_code'`` or ``'textbook'``.
      variance: GAAM variance estimator, ``'shifted'`` (default) or ``'one_pass'`` (the
        experiment code's), see :func:`gaam_jax.functional.gaussian_gate`.
      dtype: computation dtype outside GAAM's float32 statistics.
      param_dtype: parameter dtype.
    """

    gaam_heads: int = 8
    embed_dim: int = 512
    query_heads: int = 8
    kv_heads: int = 2
    attention: Literal["paper_code", "textbook"] = "paper_code"
    variance: Variance = "shifted"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        if self.attention not in ("paper_code", "textbook"):
            raise ValueError(
                f"attention must be 'paper_code' or 'textbook', got {self.attention!r}."
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies GQGAAM.

        Args:
          x: ``[batch, N, d]``.

        Returns:
          ``[batch, N, embed_dim]``.
        """
        if x.ndim != 3:
            raise ValueError(f"x must be [batch, layers, features], got shape {x.shape}.")
        x = GaussianAdaptiveAttention(
            num_heads=self.gaam_heads,
            variance=self.variance,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)
        x = nn.Dense(
            self.embed_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=with_logical_axes(torch_default_init(x.shape[-1]), ("embed", "mlp")),
            bias_init=with_logical_axes(torch_default_init(x.shape[-1]), ("mlp",)),
            name="embed_transform",
        )(x)
        if self.attention == "paper_code":
            return PaperCodeGroupedQueryAttention(
                self.embed_dim,
                self.query_heads,
                self.kv_heads,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="gqa",
            )(x)
        if self.embed_dim % self.query_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} must be divisible by query_heads={self.query_heads}."
            )
        return GroupedQueryAttention(
            self.query_heads,
            self.kv_heads,
            self.embed_dim // self.query_heads,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="gqa",
        )(x)
