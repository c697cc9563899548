"""NNX Grouped-Query Attention: the textbook form, and the block of the paper's experiment code.

The Linen modules of :mod:`gaam_jax.gqa` with their parameter names, shapes, initialisers and
logical axes; the attention itself is the same function,
:func:`gaam_jax.gqa.grouped_query_attention` (float32 logits and softmax). NNX needs the input
width up front: ``in_features`` (and ``kv_features`` when keys and values come from inputs of
another width).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from gaam_jax import _validation as check
from gaam_jax.gqa import grouped_query_attention
from gaam_jax.nnx.layers import Dense, LayerNorm

Dtype = Any

__all__ = ["GroupedQueryAttention", "PaperCodeGroupedQueryAttention"]

XAVIER_UNIFORM: nn.initializers.Initializer = nn.initializers.xavier_uniform()


class GroupedQueryAttention(nnx.Module):
    """Textbook Grouped-Query Attention (Ainslie et al., 2023).

    The NNX twin of :class:`gaam_jax.GroupedQueryAttention`: ``query``, ``key`` and ``value``
    project to ``[..., heads, head_dim]`` (kernels ``[in, heads, head_dim]``, logical axes
    ``('embed', 'heads', None)``); every group of ``num_query_heads // num_kv_heads`` consecutive
    query heads shares one key/value head; ``out`` projects the concatenated heads to
    ``out_features`` (kernel ``[heads, head_dim, out]``).

    Args:
      in_features: width of ``inputs_q``.
      num_query_heads: query heads.
      num_kv_heads: key/value heads; must divide ``num_query_heads``.
      head_dim: width of each head.
      rngs: NNX random streams (the ``params`` stream).
      kv_features: width of ``inputs_kv``; None: ``in_features``.
      out_features: output width; None: ``in_features``.
      use_bias: biases in the projections.
      dtype: computation dtype of the projections (softmax is float32 regardless).
      param_dtype: parameter dtype.
      kernel_init: projection kernel initialiser (Xavier-uniform).
    """

    def __init__(
        self,
        in_features: int,
        num_query_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        rngs: nnx.Rngs,
        kv_features: int | None = None,
        out_features: int | None = None,
        use_bias: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        kernel_init: nn.initializers.Initializer = XAVIER_UNIFORM,
    ):
        for value, name in (
            (in_features, "in_features"),
            (num_query_heads, "num_query_heads"),
            (num_kv_heads, "num_kv_heads"),
            (head_dim, "head_dim"),
        ):
            check.positive_int(value, name)
        if num_query_heads % num_kv_heads:
            raise ValueError(
                f"num_query_heads={num_query_heads} must be a multiple of "
                f"num_kv_heads={num_kv_heads}."
            )
        kv_features = in_features if kv_features is None else kv_features

        def dense(features: int, heads: int) -> Dense:
            return Dense(
                features,
                (heads, head_dim),
                rngs=rngs,
                kernel_init=kernel_init,
                kernel_axes=("embed", "heads", None),
                bias_axes=("heads", None),
                use_bias=use_bias,
                dtype=dtype,
                param_dtype=param_dtype,
            )

        self.query = dense(in_features, num_query_heads)
        self.key = dense(kv_features, num_kv_heads)
        self.value = dense(kv_features, num_kv_heads)
        self.out = Dense(
            (num_query_heads, head_dim),
            out_features or in_features,
            rngs=rngs,
            kernel_init=kernel_init,
            kernel_axes=("heads", None, "embed"),
            bias_axes=("mlp",),
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
        )

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
          inputs_q: ``[batch, q_len, in_features]``.
          inputs_kv: ``[batch, kv_len, kv_features]``; None for self-attention.
          mask: boolean broadcastable to ``[batch, num_query_heads, q_len, kv_len]``, True =
            attend.
          return_weights: also return the float32 attention weights.

        Returns:
          ``[batch, q_len, out_features]``, or ``(output, weights)``.
        """
        if inputs_q.ndim != 3:
            raise ValueError(f"inputs_q must be [batch, length, features], got {inputs_q.shape}.")
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        q, k, v = self.query(inputs_q), self.key(inputs_kv), self.value(inputs_kv)
        out, weights = grouped_query_attention(q, k, v, mask)
        out = self.out(out)
        return (out, weights) if return_weights else out


class PaperCodeGroupedQueryAttention(nnx.Module):
    """The GQA block of the authors' experiment code, reproduced exactly.

    The NNX twin of :class:`gaam_jax.PaperCodeGroupedQueryAttention`: summed query heads per
    group, logits scaled twice, LayerNorm over the key/value width and a projection from it
    (docs/design.md section 5). Its layers are ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``
    (Xavier-normal kernels, logical axes ``('embed', 'mlp')``, zero biases) and ``LayerNorm_0``,
    the Linen names. 460,288 parameters at 512/8/2.

    Args:
      embed_dim: model width E (input and output).
      query_heads: Hq.
      kv_heads: Hkv; must divide Hq.
      rngs: NNX random streams (the ``params`` stream).
      dtype: computation dtype (softmax and LayerNorm statistics are float32).
      param_dtype: parameter dtype.
    """

    def __init__(
        self,
        embed_dim: int,
        query_heads: int = 8,
        kv_heads: int = 2,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
    ):
        check.positive_int(embed_dim, "embed_dim")
        check.positive_int(query_heads, "query_heads")
        check.positive_int(kv_heads, "kv_heads")
        if embed_dim % query_heads or query_heads % kv_heads:
            raise ValueError(
                f"embed_dim={embed_dim} must be divisible by query_heads={query_heads}, which "
                f"must be divisible by kv_heads={kv_heads}."
            )
        self.embed_dim, self.query_heads, self.kv_heads = embed_dim, query_heads, kv_heads
        self.dtype = dtype
        head_dim = embed_dim // query_heads
        kv_dim = head_dim * kv_heads

        def dense(n_in: int, n_out: int) -> Dense:
            return Dense(
                n_in,
                n_out,
                rngs=rngs,
                kernel_init=nn.initializers.xavier_normal(),
                kernel_axes=("embed", "mlp"),
                bias_axes=("mlp",),
                dtype=dtype,
                param_dtype=param_dtype,
            )

        self.q_proj = dense(embed_dim, embed_dim)
        self.k_proj = dense(embed_dim, kv_dim)
        self.v_proj = dense(embed_dim, kv_dim)
        # Linen's automatic name for the unnamed LayerNorm, so the parameter paths match.
        self.LayerNorm_0 = LayerNorm(
            kv_dim,
            rngs=rngs,
            epsilon=1e-5,
            dtype=jnp.float32,
            param_dtype=param_dtype,
            scale_axes=(None,),
            bias_axes=("mlp",),
        )
        self.out_proj = dense(kv_dim, embed_dim)

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
        b, n, _ = x.shape
        q = self.q_proj(x).astype(jnp.float32)
        k = self.k_proj(x).astype(jnp.float32)
        v = self.v_proj(x).astype(jnp.float32)
        scale = math.sqrt(head_dim)
        q = q.reshape(b, n, self.kv_heads, groups, head_dim) / scale  # "(h g)": heads h*G+g
        k = k.reshape(b, n, self.kv_heads, head_dim)
        v = v.reshape(b, n, self.kv_heads, head_dim)
        # Summing over g: the code's einsum "b g h n d, b h s d -> b h n s".
        logits = jnp.einsum("bnhgd,bshd->bhns", q, k) / scale  # the second scaling
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhns,bshd->bnhd", weights, v).reshape(b, n, kv_dim)
        out = self.LayerNorm_0(out)
        out = self.out_proj(out.astype(self.dtype or x.dtype))
        return (out, weights) if return_weights else out
