"""Memory-linear scaled dot-product attention for the encoder ports, one implementation per call.

Every implementation computes the same function::

    logits = scale * q . k  (+ bias)            # float32
    weights = softmax(logits over allowed keys)  # float32, then cast to v.dtype
    out = weights @ v                            # v.dtype

with grouped-query heads (query head ``j`` uses key/value head ``j // (H // K)``, as transformers'
``repeat_kv``) and without ever repeating ``k``/``v`` in memory. A key is *allowed* for a query
when ``key_mask`` is True for it and, with ``causal``, it is not after the query. A query row
with no allowed key returns zeros (torch ``sdpa``'s behaviour), never NaN.

Implementations:

* ``"xla"``: the dense reference; materialises ``[B, H, T, S]`` float32 logits.
* ``"blockwise"``: pure-JAX online softmax (flash-attention style) over query and key blocks of
  ``block_size``; extra memory ``O(B * H * block_size**2 + B * T * H * D)``, forward and backward.
* ``"cudnn"``: ``jax.nn.dot_product_attention(..., implementation="cudnn")`` (GPU, bf16/fp16).
* ``"auto"``: see :func:`choose_implementation`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["IMPLEMENTATIONS", "choose_implementation", "dot_product_attention"]

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn")
# Query and key block length of the blockwise path: 128 x 128 float32 logits per head stay in
# cache; on XLA:CPU blocks of 128 ran 1.6x faster than blocks of 512 at 512 causal tokens.
BLOCK_SIZE = 128

_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Half of what jax's cuDNN wrapper gives masked keys (-2**41 in bf16, -2**15 in fp16; it avoids
# far larger values because of a cuDNN bug when subtracting two of them).
_CUDNN_BIAS_FLOOR = {jnp.dtype(jnp.bfloat16): -(2.0**40), jnp.dtype(jnp.float16): -(2.0**14)}
# Masked logits and the initial running max: finite, so max/exp/subtract never produce NaN, and
# equal to what the dense path writes so a row that only a finfo.min *bias* masks (BERT's
# padding) gets the same uniform weights in both paths.
_NEG = float(jnp.finfo(jnp.float32).min)


def _backend() -> str:
    """The default JAX backend (a function so tests can pretend to be on a GPU)."""
    return jax.default_backend()


def choose_implementation(
    implementation: str,
    q: Any,
    k: Any,
    bias: Any | None = None,
    *,
    block_size: int = BLOCK_SIZE,
    causal: bool = False,
) -> str:
    """Resolves ``implementation`` to the one :func:`dot_product_attention` will run.

    ``"auto"`` picks ``"cudnn"`` on a GPU backend for bfloat16/float16 inputs with a head dim
    that is a multiple of 8 and at most 128 and no ``bias``; otherwise ``"blockwise"`` when
    ``max(T, S)`` exceeds ``4 * block_size`` (``2 * block_size`` when ``causal``: the blockwise
    path skips the key blocks above the diagonal, half the work); otherwise ``"xla"``. Measured
    on XLA:CPU at 16 heads of 64 with blocks of 128: dense is 5x faster at 197 tokens and on par
    at 512 (non-causal), 2x slower at 512 causal and at 2048 causal. An explicit name is
    returned as is, after checking that ``"cudnn"`` can run here.

    Args:
      implementation: one of :data:`IMPLEMENTATIONS`.
      q: queries ``[B, T, H, D]`` (an array or anything with ``shape`` and ``dtype``).
      k: keys ``[B, S, K, D]`` (likewise).
      bias: the additive logit bias, or None; only whether it is given matters.
      block_size: the blockwise path's block length; ``"auto"``'s length threshold scales
        with it.
      causal: whether the attention is causal.

    Returns:
      ``"xla"``, ``"blockwise"`` or ``"cudnn"``.

    Raises:
      ValueError: for an unknown name, or ``"cudnn"`` off a GPU or with a dtype other than
        bfloat16/float16.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}."
        )
    dtype = jnp.dtype(q.dtype)
    if implementation == "cudnn":
        if _backend() != "gpu":
            raise ValueError(
                f"implementation='cudnn' needs a GPU backend, but JAX's backend is {_backend()!r}."
            )
        if dtype not in _CUDNN_DTYPES or jnp.dtype(k.dtype) != dtype:
            raise ValueError(
                "implementation='cudnn' needs bfloat16 or float16 q, k and v of one dtype, got "
                f"q {dtype} and k {jnp.dtype(k.dtype)}."
            )
        return "cudnn"
    if implementation != "auto":
        return implementation
    d = q.shape[-1]
    if (
        _backend() == "gpu"
        and dtype in _CUDNN_DTYPES
        and jnp.dtype(k.dtype) == dtype
        and d % 8 == 0
        and d <= 128
        and bias is None
    ):
        return "cudnn"
    if max(q.shape[1], k.shape[1]) > (2 if causal else 4) * block_size:
        return "blockwise"
    return "xla"


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    key_mask: jax.Array | None = None,
    causal: bool = False,
    scale: float | None = None,
    implementation: str = "auto",
    block_size: int = BLOCK_SIZE,
) -> jax.Array:
    """Grouped-query scaled dot-product attention with float32 logits and softmax.

    With ``"cudnn"``, ``key_mask`` and ``bias`` are broadcast to full ``T`` and ``S`` (cuDNN's
    requirement; batch and head dims stay as given) in the compute dtype, and the bias is
    clamped at ``-2**40`` (bf16) or ``-2**14`` (fp16); cuDNN itself limits the head dim.

    Args:
      q: queries ``[B, T, H, D]`` in the compute dtype.
      k: keys ``[B, S, K, D]`` with ``H % K == 0``; query head ``j`` uses key head
        ``j // (H // K)``.
      v: values ``[B, S, K, D]``.
      bias: optional float array of rank 4 broadcastable to ``[B, H, T, S]`` (each dim either
        full size or 1), added to the float32 logits. It is never broadcast to full size by the
        blockwise path. A ``finfo(float32).min`` bias (BERT's padding) masks like ``key_mask``
        does, except that a row with *every* key so biased gets uniform weights, as in the
        ports today. Do not also ``key_mask`` such a row's keys (``"xla"`` would then spread
        its weight over the masked keys too, the others over its allowed keys only), and do not
        use ``-inf`` (NaN in ``"xla"`` for a row with nothing else).
      key_mask: optional bool ``[B, S]``; False keys get no weight.
      causal: query ``i`` sees only keys ``j <= i`` (needs ``T == S``).
      scale: logits are ``scale * q . k``; default ``D ** -0.5`` (pass 1.0 for pre-scaled q).
      implementation: one of :data:`IMPLEMENTATIONS`; see :func:`choose_implementation`.
      block_size: query and key block length of the blockwise path (static under jit).

    Returns:
      ``[B, T, H, D]`` in ``v.dtype``; all zeros for a query row with no allowed key.

    Raises:
      ValueError: for an unknown implementation, inconsistent shapes or dtypes, ``causal`` with
        ``T != S``, or ``"cudnn"`` where it cannot run.
    """
    _check_inputs(q, k, v, bias, key_mask, causal, block_size)
    impl = choose_implementation(implementation, q, k, bias, block_size=block_size, causal=causal)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl == "cudnn":
        return _cudnn(q, k, v, bias, key_mask, causal, scale)
    bias5 = None if bias is None else _grouped_bias(bias, k.shape[2])
    if impl == "xla":
        return _xla(q, k, v, bias5, key_mask, causal, scale)
    return _blockwise(q, k, v, bias5, key_mask, causal, scale, block_size)


def _check_inputs(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    key_mask: jax.Array | None,
    causal: bool,
    block_size: int,
) -> None:
    """Raises one-line ValueErrors for inconsistent arguments."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(
                f"{name} must have rank 4 ([B, T|S, heads, D]), got shape {getattr(x, 'shape', x)}."
            )
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {k.shape}, got {v.shape}.")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {k.shape} must share q's batch and head dim, q is {q.shape}.")
    if t == 0 or s == 0:
        raise ValueError(f"query and key lengths must be positive, got T={t}, S={s}.")
    if kh == 0 or h % kh:
        raise ValueError(f"query heads H={h} must be a multiple of key/value heads K={kh}.")
    if causal and t != s:
        raise ValueError(f"causal attention needs T == S, got T={t}, S={s}.")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}.")
    if key_mask is not None:
        if getattr(key_mask, "dtype", None) != jnp.bool_:
            dtype = getattr(key_mask, "dtype", None)
            raise ValueError(f"key_mask must be boolean (True = real key), got dtype {dtype}.")
        if tuple(key_mask.shape) != (b, s):
            raise ValueError(f"key_mask must have shape [B, S] = {(b, s)}, got {key_mask.shape}.")
    if bias is not None:
        if getattr(bias, "ndim", None) != 4 or not jnp.issubdtype(bias.dtype, jnp.floating):
            raise ValueError(
                f"bias must be a float array of rank 4, got shape {getattr(bias, 'shape', None)} "
                f"and dtype {getattr(bias, 'dtype', None)}."
            )
        if any(n not in (1, full) for n, full in zip(bias.shape, (b, h, t, s), strict=True)):
            raise ValueError(
                f"bias of shape {bias.shape} does not broadcast to [B, H, T, S] = {(b, h, t, s)}."
            )


def _grouped_bias(bias: jax.Array, kv_heads: int) -> jax.Array:
    """``[B|1, H|1, T|1, S|1]`` -> float32 ``[B|1, K|1, G|1, T|1, S|1]``, size-1 dims kept."""
    bb, bh, bt, bs = bias.shape
    if bh == 1:
        return bias.reshape(bb, 1, 1, bt, bs).astype(jnp.float32)
    return bias.reshape(bb, kv_heads, bh // kv_heads, bt, bs).astype(jnp.float32)


def _causal_allowed(q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """Whether query position ``>=`` key position, bool ``[1, 1, 1, Tq, Sk]``."""
    return (q_pos[:, None] >= k_pos[None, :])[None, None, None]


def _heads_first(q: jax.Array, k: jax.Array, v: jax.Array, kv_heads: int):
    """``[B, T, H, D]`` / ``[B, S, K, D]`` -> ``[B, K, G, T, D]`` / ``[B, K, S, D]``.

    XLA:CPU runs the two batched matmuls 3-4x faster on head-major operands than when the
    einsum contracts the ``[B, T, H, D]`` layout in place (measured at BEiT's and Llama's
    shapes); the transposes cost one pass over q, k, v and the output.
    """
    b, t, h, d = q.shape
    qh = q.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)
    return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias5: jax.Array | None,
    key_mask: jax.Array | None,
    causal: bool,
    scale: float,
) -> jax.Array:
    """The dense path: float32 logits of every query against every key, one softmax.

    The G query heads that share a key/value head are laid end to end, ``[B, K, G * T, S]``:
    one batched matmul per key/value head, as large as XLA:CPU runs them fastest.
    """
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = h // kh
    qh, kt, vt = _heads_first(q, k, v, kh)
    rows = qh.reshape(b, kh, g * t, d)
    logits = jnp.einsum("bkrd,bksd->bkrs", rows, kt, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(scale)
    if bias5 is not None:
        if bias5.shape[2] == 1 and bias5.shape[3] == 1:  # the same for every query row
            bias4 = bias5.reshape(bias5.shape[0], bias5.shape[1], 1, s if bias5.shape[4] > 1 else 1)
        else:
            full = (bias5.shape[0], bias5.shape[1], g, t, bias5.shape[4])
            bias4 = jnp.broadcast_to(bias5, full).reshape(*full[:2], g * t, full[4])
        logits = logits + bias4
    allowed = None
    if key_mask is not None:
        allowed = key_mask[:, None, None, :]
    if causal:
        tri = jnp.tile(jnp.arange(t)[:, None] >= jnp.arange(s)[None, :], (g, 1))[None, None]
        allowed = tri if allowed is None else allowed & tri
    if allowed is not None:
        logits = jnp.where(allowed, logits, _NEG)
    # The output does not depend on the max (it only keeps exp in range): no gradient through it.
    p = jnp.exp(logits - lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    if allowed is not None:
        p = jnp.where(allowed, p, 0.0)  # a masked key gets exactly 0
    # A row with an allowed key sums to >= 1 (its largest term is exp(0)); a row with none sums
    # to 0 and its product is 0, so dividing by max(total, 1) gives torch sdpa's zero row.
    # Normalising after the product divides [T, D] numbers instead of [T, S].
    total = jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1.0)
    ctx = jnp.einsum("bkrs,bksd->bkrd", p.astype(v.dtype), vt, preferred_element_type=jnp.float32)
    ctx = (ctx / total).reshape(b, kh, g, t, d)
    return ctx.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(v.dtype)


def _pad_axis(x: jax.Array, axis: int, length: int, value: Any = 0) -> jax.Array:
    """Pads ``x`` at the end of ``axis`` up to ``length``."""
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _blockwise(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias5: jax.Array | None,
    key_mask: jax.Array | None,
    causal: bool,
    scale: float,
    block_size: int,
) -> jax.Array:
    """Online-softmax attention over ``block_size`` query and key blocks; never builds [T, S]."""
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = h // kh
    # Short sequences use one block of their own length rather than padding up to block_size.
    bq, bk = min(block_size, t), min(block_size, s)
    nq, nk = -(-t // bq), -(-s // bk)
    tp, sp = nq * bq, nk * bk

    qh, kt, vt = _heads_first(q, k, v, kh)  # head-major: see _heads_first
    q_blocks = jnp.moveaxis(_pad_axis(qh, 3, tp).reshape(b, kh, g, nq, bq, d), 3, 0)
    k_blocks = jnp.moveaxis(_pad_axis(kt, 2, sp).reshape(b, kh, nk, bk, d), 2, 0)
    v_blocks = jnp.moveaxis(_pad_axis(vt, 2, sp).reshape(b, kh, nk, bk, d), 2, 0)
    # Key validity is needed for the caller's mask and for the keys padded onto the last block.
    masked = key_mask is not None or sp != s
    valid = jnp.ones((b, s), jnp.bool_) if key_mask is None else key_mask
    valid_blocks = jnp.moveaxis(_pad_axis(valid, 1, sp, False).reshape(b, nk, bk), 1, 0)
    if bias5 is not None:
        # Only full-size dims are padded; broadcast (size-1) dims stay size 1.
        if bias5.shape[3] == t:
            bias5 = _pad_axis(bias5, 3, tp)
        if bias5.shape[4] == s:
            bias5 = _pad_axis(bias5, 4, sp)
    scale = jnp.float32(scale)

    def query_block(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        qb, qi = args  # [B, K, G, bq, D], scalar block index
        q_start = qi * bq
        bias_q = bias5
        if bias_q is not None and bias_q.shape[3] != 1:
            bias_q = lax.dynamic_slice_in_dim(bias_q, q_start, bq, axis=3)

        def step(carry: tuple[jax.Array, ...], xs: tuple[jax.Array, ...]) -> tuple[Any, None]:
            m, total, acc = carry  # [B, K, G, bq], [B, K, G, bq], [B, K, G, bq, D] float32
            kb, vb, valid_b, kj = xs
            logits = jnp.einsum("bkgqd,bksd->bkgqs", qb, kb, preferred_element_type=jnp.float32)
            logits = logits * scale
            if bias_q is not None:
                bias_b = bias_q
                if bias_b.shape[4] != 1:
                    bias_b = lax.dynamic_slice_in_dim(bias_b, kj * bk, bk, axis=4)
                logits = logits + bias_b
            allowed = None
            if masked:
                allowed = valid_b[:, None, None, None, :]
            if causal:
                tri = _causal_allowed(q_start + jnp.arange(bq), kj * bk + jnp.arange(bk))
                allowed = tri if allowed is None else allowed & tri
            if allowed is not None:
                logits = jnp.where(allowed, logits, _NEG)
            # The output does not depend on the running max, so its gradient is exactly zero:
            # stopping it saves the backward pass the max's tie-breaking work.
            m_new = lax.stop_gradient(jnp.maximum(m, jnp.max(logits, axis=-1)))
            correction = jnp.exp(m - m_new)
            p = jnp.exp(logits - m_new[..., None])
            if allowed is not None:
                # A masked key gets exactly 0, even when all of a row's logits equal _NEG.
                p = jnp.where(allowed, p, 0.0)
            total = total * correction + jnp.sum(p, axis=-1)
            pv = jnp.einsum(
                "bkgqs,bksd->bkgqd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32
            )
            return (m_new, total, acc * correction[..., None] + pv), None

        # Recomputing each step in the backward pass keeps only the carries, not [bq, bk] blocks.
        step = jax.checkpoint(step, prevent_cse=False)
        if causal:
            full_step = step

            def step(carry: tuple[jax.Array, ...], xs: tuple[jax.Array, ...]) -> tuple[Any, None]:
                # A key block starting after this query block's last row contributes nothing.
                above = xs[3] * bk > q_start + bq - 1
                return lax.cond(above, lambda c, _: (c, None), full_step, carry, xs)

        init = (
            jnp.full((b, kh, g, bq), _NEG, jnp.float32),
            jnp.zeros((b, kh, g, bq), jnp.float32),
            jnp.zeros((b, kh, g, bq, d), jnp.float32),
        )
        xs = (k_blocks, v_blocks, valid_blocks, jnp.arange(nk))
        (_, total, acc), _ = lax.scan(step, init, xs)
        # total >= 1 when a key was allowed (the largest term is exp(0)); with none, total and
        # acc are 0, so dividing by max(total, 1) gives the zero row.
        return (acc / jnp.maximum(total, 1.0)[..., None]).astype(v.dtype)

    # Checkpointing a whole query block keeps only its inputs for the backward pass, so the
    # inner scan's per-step carries exist for one query block at a time.
    query_block = jax.checkpoint(query_block, prevent_cse=False)
    out = lax.map(query_block, (q_blocks, jnp.arange(nq)))  # [nq, B, K, G, bq, D]
    return out.transpose(1, 0, 4, 2, 3, 5).reshape(b, tp, h, d)[:, :t]


def _cudnn(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    key_mask: jax.Array | None,
    causal: bool,
    scale: float,
) -> jax.Array:
    """``jax.nn.dot_product_attention`` on cuDNN, with the fully-masked rows set to zero."""
    b, t, _, _ = q.shape
    s = k.shape[1]
    mask = None
    if key_mask is not None:
        # cuDNN wants mask and bias with full-length T and S dims (heads and batch may be 1).
        mask = jnp.broadcast_to(key_mask[:, None, None, :], (b, 1, t, s))
    if bias is not None:
        bias = jnp.broadcast_to(bias, (*bias.shape[:2], t, s))
        # float32's finfo.min is -inf in bf16, and jax's wrapper adds its mask value to the bias
        # in q's dtype: clamp at half that value so the sum stays finite.
        low = _CUDNN_BIAS_FLOOR[jnp.dtype(q.dtype)]
        bias = jnp.maximum(bias.astype(jnp.float32), jnp.float32(low)).astype(q.dtype)
    out = jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, scale=scale, is_causal=causal, implementation="cudnn"
    )
    if key_mask is not None:
        # cuDNN turns the mask into a large negative bias, so a row with no real key would
        # average all keys; torch's sdpa (and the other paths) return zeros.
        if causal:
            has_key = jnp.cumsum(key_mask.astype(jnp.int32), axis=-1) > 0
        else:
            has_key = jnp.broadcast_to(jnp.any(key_mask, axis=-1, keepdims=True), (b, t))
        out = jnp.where(has_key[:, :, None, None], out, jnp.zeros((), out.dtype))
    return out.astype(v.dtype)
