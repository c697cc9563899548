"""Grouped-Query Attention: the textbook form, and the block of the paper's experiment code."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaam_jax import _validation as check
from gaam_jax.sharding import AnnotatedInit, with_logical_axes

Dtype = Any

__all__ = ["GroupedQueryAttention", "PaperCodeGroupedQueryAttention", "grouped_query_attention"]


def grouped_query_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
    *,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Scaled dot-product attention where groups of query heads share a key/value head.

    Query head ``i`` uses key/value head ``i // (num_query_heads // num_kv_heads)``, so
    ``num_kv_heads == num_query_heads`` is multi-head attention and ``num_kv_heads == 1`` is
    multi-query attention. Logits and softmax are computed in float32.

    Args:
      query: ``[batch, q_len, num_query_heads, head_dim]``.
      key: ``[batch, kv_len, num_kv_heads, head_dim]``.
      value: ``[batch, kv_len, num_kv_heads, head_dim]``.
      mask: optional boolean broadcastable to ``[batch, num_query_heads, q_len, kv_len]``;
        True = attend. A query row with no key to attend to gets uniform weights.
      scale: logit scale; default ``1 / sqrt(head_dim)``.

    Returns:
      ``(out, weights)``: ``out`` is ``[batch, q_len, num_query_heads, head_dim]`` in the dtype of
      ``query``; ``weights`` is float32 ``[batch, num_query_heads, q_len, kv_len]``.

    Raises:
      ValueError: on inconsistent shapes or a head count that does not divide.
    """
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            "query, key and value must be [batch, length, heads, head_dim]; got shapes "
            f"{query.shape}, {key.shape}, {value.shape}."
        )
    b, q_len, hq, d = query.shape
    if key.shape != value.shape or key.shape[0] != b or key.shape[3] != d:
        raise ValueError(
            f"key {key.shape} and value {value.shape} must match each other and the batch and "
            f"head_dim of query {query.shape}."
        )
    hkv = key.shape[2]
    if hq % hkv:
        raise ValueError(
            f"num_query_heads={hq} must be a multiple of num_kv_heads={hkv} (each group of "
            "query heads shares one key/value head)."
        )
    groups = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q = query.astype(jnp.float32).reshape(b, q_len, hkv, groups, d) * scale
    # [b, kv_head, group, q, kv]
    logits = jnp.einsum("blkgd,bskd->bkgls", q, key.astype(jnp.float32))
    logits = logits.reshape(b, hq, q_len, key.shape[1])
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise ValueError(f"mask must be boolean (True = attend), got dtype {mask.dtype}.")
        try:
            mask = jnp.broadcast_to(mask, logits.shape)
        except ValueError as err:
            raise ValueError(
                f"mask of shape {mask.shape} does not broadcast to [batch, num_query_heads, "
                f"q_len, kv_len] = {logits.shape}."
            ) from err
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(
        "bkgls,bskd->blkgd",
        weights.reshape(b, hkv, groups, q_len, key.shape[1]),
        value.astype(jnp.float32),
    )
    return out.reshape(b, q_len, hq, d).astype(query.dtype), weights


class GroupedQueryAttention(AnnotatedInit, nn.Module):
    """Textbook Grouped-Query Attention (Ainslie et al., 2023).

    Projects the inputs to ``num_query_heads`` query heads and ``num_kv_heads`` key/value heads
    of ``head_dim`` each; every group of ``num_query_heads // num_kv_heads`` consecutive query
    heads shares one key/value head; the ``num_query_heads`` outputs are concatenated and
    projected to ``out_features`` (default: the input width). With ``num_kv_heads ==
    num_query_heads`` this is multi-head attention, with ``num_kv_heads == 1`` multi-query
    attention.

    This differs from :class:`PaperCodeGroupedQueryAttention`, the block in the authors'
    experiment code, which sums the query heads of a group, scales the logits twice, normalises
    the key/value-width output and projects it from that width.

    Attributes:
      num_query_heads: query heads.
      num_kv_heads: key/value heads; must divide ``num_query_heads``.
      head_dim: width of each head.
      out_features: output width; None keeps the input width.
      use_bias: biases in the projections.
      dtype: computation dtype of the projections (softmax is float32 regardless).
      param_dtype: parameter dtype.
      kernel_init: projection kernel initialiser.
    """

    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    out_features: int | None = None
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()

    def __post_init__(self) -> None:
        check.positive_int(self.num_query_heads, "num_query_heads")
        check.positive_int(self.num_kv_heads, "num_kv_heads")
        check.positive_int(self.head_dim, "head_dim")
        if self.num_query_heads % self.num_kv_heads:
            raise ValueError(
                f"num_query_heads={self.num_query_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}."
            )
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array | None = None,
        mask: jax.Array | None = None,
        *,
        return_weights: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Applies attention.

        Args:
          inputs_q: ``[batch, q_len, features]``.
          inputs_kv: ``[batch, kv_len, features]``; None for self-attention.
          mask: boolean broadcastable to ``[batch, num_query_heads, q_len, kv_len]``, True =
            attend.
          return_weights: also return the float32 attention weights.

        Returns:
          ``[batch, q_len, out_features]``, or ``(output, weights)``.
        """
        if inputs_q.ndim != 3:
            raise ValueError(f"inputs_q must be [batch, length, features], got {inputs_q.shape}.")
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        dense = lambda heads, name: nn.DenseGeneral(  # noqa: E731
            (heads, self.head_dim),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=with_logical_axes(self.kernel_init, ("embed", "heads", None)),
            bias_init=with_logical_axes(nn.initializers.zeros_init(), ("heads", None)),
            name=name,
        )
        q = dense(self.num_query_heads, "query")(inputs_q)
        k = dense(self.num_kv_heads, "key")(inputs_kv)
        v = dense(self.num_kv_heads, "value")(inputs_kv)
        out, weights = grouped_query_attention(q, k, v, mask)
        out = nn.DenseGeneral(
            self.out_features or inputs_q.shape[-1],
            axis=(-2, -1),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=with_logical_axes(self.kernel_init, ("heads", None, "embed")),
            bias_init=with_logical_axes(nn.initializers.zeros_init(), ("mlp",)),
            name="out",
        )(out)
        return (out, weights) if return_weights else out


class PaperCodeGroupedQueryAttention(AnnotatedInit, nn.Module):
    """The GQA block of the authors' experiment code (``MultiheadGQA``), reproduced exactly.

    With ``embed_dim`` E, ``query_heads`` Hq and ``kv_heads`` Hkv: ``head_dim = E / Hq``; the
    query projection is E -> E, the key and value projections E -> ``kv_dim = head_dim * Hkv``.
    Differences from textbook GQA (:class:`GroupedQueryAttention`), all kept on purpose so the
    paper's parameter counts and behaviour are reproduced:

    * the query heads of each group (``Hq / Hkv`` consecutive heads) are **summed** before the
      dot product, so there are only Hkv output heads and the output width is ``kv_dim``;
    * the logits are scaled by ``1/sqrt(head_dim)`` **twice** (effective ``1/head_dim``);
    * the ``kv_dim``-wide output goes through LayerNorm (eps 1e-5) and is projected
      ``kv_dim -> E``.

    Xavier-normal kernels and zero biases, as in the code. No mask, no dropout (the code has
    none); with Hq = 8, Hkv = 2, E = 512 it has 460,288 parameters.

    Attributes:
      embed_dim: model width E (input and output).
      query_heads: Hq.
      kv_heads: Hkv; must divide Hq.
      dtype: computation dtype (softmax and LayerNorm statistics are float32).
      param_dtype: parameter dtype.
    """

    embed_dim: int
    query_heads: int = 8
    kv_heads: int = 2
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        check.positive_int(self.embed_dim, "embed_dim")
        check.positive_int(self.query_heads, "query_heads")
        check.positive_int(self.kv_heads, "kv_heads")
        if self.embed_dim % self.query_heads or self.query_heads % self.kv_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} must be divisible by query_heads="
                f"{self.query_heads}, which must be divisible by kv_heads={self.kv_heads}."
            )
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: jax.Array, *, return_weights: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Self-attention over the sequence axis.

        Args:
          x: ``[batch, length, embed_dim]``.
          return_weights: also return the float32 weights ``[batch, kv_heads, length, length]``.

        Returns:
          ``[batch, length, embed_dim]``, or ``(output, weights)``.
        """
        if x.ndim != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be [batch, length, {self.embed_dim}], got {x.shape}.")
        head_dim = self.embed_dim // self.query_heads
        kv_dim = head_dim * self.kv_heads
        groups = self.query_heads // self.kv_heads
        dense = lambda n, name: nn.Dense(  # noqa: E731
            n,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=with_logical_axes(nn.initializers.xavier_normal(), ("embed", "mlp")),
            bias_init=with_logical_axes(nn.initializers.zeros_init(), ("mlp",)),
            name=name,
        )
        b, n, _ = x.shape
        q = dense(self.embed_dim, "q_proj")(x).astype(jnp.float32)
        k = dense(kv_dim, "k_proj")(x).astype(jnp.float32)
        v = dense(kv_dim, "v_proj")(x).astype(jnp.float32)
        scale = math.sqrt(head_dim)
        q = q.reshape(b, n, self.kv_heads, groups, head_dim) / scale  # "(h g)": heads h*G+g
        k = k.reshape(b, n, self.kv_heads, head_dim)
        v = v.reshape(b, n, self.kv_heads, head_dim)
        # Summing over g: the code's einsum "b g h n d, b h s d -> b h n s".
        logits = jnp.einsum("bnhgd,bshd->bhns", q, k) / scale  # the second scaling
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhns,bshd->bnhd", weights, v).reshape(b, n, kv_dim)
        out = nn.LayerNorm(
            epsilon=1e-5,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            scale_init=with_logical_axes(nn.initializers.ones_init(), (None,)),
            bias_init=with_logical_axes(nn.initializers.zeros_init(), ("mlp",)),
        )(out)
        out = dense(self.embed_dim, "out_proj")(out.astype(self.dtype or x.dtype))
        return (out, weights) if return_weights else out
