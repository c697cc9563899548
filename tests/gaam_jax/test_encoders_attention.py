"""gaam_jax.encoders.attention: blockwise == dense reference, masks, GQA, grads, memory, errors."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import BF16, F32, scaled_atol

from gaam_jax.encoders import attention
from gaam_jax.encoders.attention import choose_implementation, dot_product_attention

B, H, D = 2, 4, 8
BLOCK = 8  # several blocks at T, S <= 40, and padding when a length is not a multiple of 8
NEG = float(jnp.finfo(jnp.float32).min)
# Unit-scale float32 outputs: the online softmax sums the same terms in another order and
# rescales them by exp(m_old - m_new), so the two paths agree to a few float32 ulps.
ATOL_F32 = 1e-5


def _qkv(seed: int, t: int, s: int, kv: int, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=shape) for shape in ((B, t, H, D), (B, s, kv, D), (B, s, kv, D)))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _key_mask(kind: str, s: int) -> jax.Array | None:
    mask = np.ones((B, s), bool)
    if kind == "none":
        return None
    if kind == "random_and_empty":
        mask[0] = np.random.default_rng(1).random(s) < 0.6
        mask[1] = False  # a row with no key at all: zeros, not NaN
    elif kind == "left_pad":
        mask[1, :13] = False  # Llama-style left padding: queries 0..12 of row 1 see no key
    return jnp.asarray(mask)


def _bias(kind: str, t: int, s: int) -> jax.Array | None:
    rng = np.random.default_rng(2)
    if kind == "none":
        return None
    if kind == "shared":
        return jnp.asarray(rng.normal(size=(1, H, t, s)), jnp.float32)
    if kind == "batch":
        return jnp.asarray(rng.normal(size=(B, H, t, s)), jnp.float32)
    # BERT's padding bias: finfo.min on padded keys, row 1 entirely padded (uniform weights).
    keep = np.ones((B, 1, 1, s), bool)
    keep[0, ..., s - 7 :] = False
    keep[1] = False
    return jnp.asarray(np.where(keep, 0.0, NEG), jnp.float32)


# (t, s, kv heads, causal, key mask, bias): each case exercises GQA with K in {4, 2, 1}.
CASES = {
    "plain": (37, 29, 4, False, "none", "none"),
    "key_mask_bias_shared": (24, 40, 2, False, "random_and_empty", "shared"),
    "causal": (37, 37, 1, True, "none", "none"),
    "causal_left_pad": (40, 40, 2, True, "left_pad", "none"),
    "bias_batch_mask_causal": (33, 33, 4, True, "random_and_empty", "batch"),
    "bert_padding_bias": (19, 26, 1, False, "none", "bert"),
}


def _case(name: str, dtype=jnp.float32):
    t, s, kv, causal, mask_kind, bias_kind = CASES[name]
    return (*_qkv(len(name), t, s, kv, dtype), _bias(bias_kind, t, s), _key_mask(mask_kind, s))


@functools.partial(jax.jit, static_argnames=("implementation", "causal"))
def _attend(q, k, v, bias, key_mask, *, implementation, causal):
    return dot_product_attention(
        q, k, v, bias=bias, key_mask=key_mask, causal=causal,
        implementation=implementation, block_size=BLOCK,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("implementation", "causal"))
def _grads(q, k, v, bias, key_mask, cotangent, *, implementation, causal):
    def loss(q, k, v, bias):
        out = dot_product_attention(
            q, k, v, bias=bias, key_mask=key_mask, causal=causal,
            implementation=implementation, block_size=BLOCK,
        )  # fmt: skip
        return jnp.sum(out * cotangent)

    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)


@pytest.mark.parametrize("name", list(CASES))
def test_blockwise_matches_xla(name):
    q, k, v, bias, key_mask = _case(name)
    causal = CASES[name][3]
    ref = _attend(q, k, v, bias, key_mask, implementation="xla", causal=causal)
    out = _attend(q, k, v, bias, key_mask, implementation="blockwise", causal=causal)
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    chex.assert_trees_all_close(out, ref, rtol=0, atol=ATOL_F32)
    if CASES[name][4] == "random_and_empty":  # row 1 has no key: exact zeros in both paths
        np.testing.assert_array_equal(np.asarray(ref[1]), 0.0)
        np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
    if CASES[name][4] == "left_pad":  # queries before the first real token see nothing
        np.testing.assert_array_equal(np.asarray(out[1, :13]), 0.0)
        assert (np.abs(np.asarray(out[1, 13:])).max(axis=(-2, -1)) > 0).all()


@jax.jit
def _dense_formula(q, k, v, bias, key_mask):
    # The ports' code, with k and v repeated per query head (repeat_kv), only for this check.
    t, g = q.shape[1], q.shape[2] // k.shape[2]
    kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, kr) * D**-0.5 + bias
    allowed = key_mask[:, None, None, :] & jnp.tril(jnp.ones((t, t), bool))[None, None]
    weights = jax.nn.softmax(jnp.where(allowed, logits, NEG), axis=-1)
    weights = jnp.where(jnp.any(allowed, axis=-1, keepdims=True), weights, 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, vr)


def test_xla_matches_dense_formula():
    q, k, v, bias, key_mask = _case("bias_batch_mask_causal")
    out = _attend(q, k, v, bias, key_mask, implementation="xla", causal=True)
    chex.assert_trees_all_close(out, _dense_formula(q, k, v, bias, key_mask), rtol=0, atol=ATOL_F32)


# One case without and one with causal masking; both have a bias, a key mask and an empty row.
@pytest.mark.parametrize("name", ["key_mask_bias_shared", "bias_batch_mask_causal"])
def test_blockwise_gradients_match_xla(name):
    q, k, v, bias, key_mask = _case(name)
    causal = CASES[name][3]
    cotangent = jnp.asarray(np.random.default_rng(3).normal(size=q.shape), jnp.float32)
    ref = _grads(q, k, v, bias, key_mask, cotangent, implementation="xla", causal=causal)
    got = _grads(q, k, v, bias, key_mask, cotangent, implementation="blockwise", causal=causal)
    for g, r in zip(got, ref, strict=True):  # q, k, v, bias
        assert np.isfinite(np.asarray(g)).all()
        # Gradients of k, v and bias sum over queries; compare relative to each one's scale.
        chex.assert_trees_all_close(g, r, rtol=0, atol=scaled_atol(r, F32))


def test_bf16_close_to_float32_reference():
    q, k, v, bias, key_mask = _case("bias_batch_mask_causal", jnp.bfloat16)
    f32 = [None if x is None else x.astype(jnp.float32) for x in (q, k, v, bias)]
    ref = _attend(*f32, key_mask, implementation="xla", causal=True)
    for impl in ("xla", "blockwise"):
        out = _attend(q, k, v, bias, key_mask, implementation=impl, causal=True)
        assert out.dtype == jnp.bfloat16
        # Same bf16 inputs; the weights and the output are each rounded to bf16 once.
        chex.assert_trees_all_close(
            out.astype(jnp.float32), ref, rtol=0, atol=scaled_atol(ref, BF16)
        )


def test_vmap_over_an_extra_axis():
    q, k, v, _, key_mask = _case("causal_left_pad")
    stacked = [jnp.stack([x, x[::-1]]) for x in (q, k, v, key_mask)]
    out = jax.vmap(
        lambda q, k, v, m: _attend(q, k, v, None, m, implementation="blockwise", causal=True)
    )(*stacked)
    for i, sl in enumerate((slice(None), slice(None, None, -1))):
        ref = _attend(q[sl], k[sl], v[sl], None, key_mask[sl], implementation="xla", causal=True)
        chex.assert_trees_all_close(out[i], ref, rtol=0, atol=ATOL_F32)


def test_choose_implementation_on_cpu():
    short = jax.ShapeDtypeStruct((B, 512, H, D), jnp.bfloat16)
    long = jax.ShapeDtypeStruct((B, 513, H, D), jnp.float32)
    assert choose_implementation("auto", short, short, None) == "xla"
    assert choose_implementation("auto", short, long, None) == "blockwise"  # S > 4 * 128
    assert choose_implementation("auto", short, short, None, causal=True) == "blockwise"
    assert choose_implementation("auto", long, long, None, block_size=1024) == "xla"
    assert choose_implementation("blockwise", short, short, None) == "blockwise"
    with pytest.raises(ValueError, match="GPU"):
        choose_implementation("cudnn", short, short, None)


def test_choose_implementation_on_gpu(monkeypatch):
    monkeypatch.setattr(attention, "_backend", lambda: "gpu")
    bf16 = jax.ShapeDtypeStruct((B, 4096, H, 64), jnp.bfloat16)
    assert choose_implementation("auto", bf16, bf16, None) == "cudnn"
    assert choose_implementation("auto", bf16, bf16, jnp.zeros((1, 1, 1, 1))) == "blockwise"
    odd_head = jax.ShapeDtypeStruct((B, 64, H, 12), jnp.bfloat16)
    assert choose_implementation("auto", odd_head, odd_head, None) == "xla"
    f32 = jax.ShapeDtypeStruct((B, 64, H, 64), jnp.float32)
    assert choose_implementation("auto", f32, f32, None) == "xla"
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        choose_implementation("cudnn", f32, f32, None)


def test_cudnn_glue_with_xla_standing_in(monkeypatch):
    # No GPU here: check what the cudnn path hands to jax.nn.dot_product_attention and how it
    # zeroes rows without keys, with jax's own xla implementation standing in for cuDNN.
    real = jax.nn.dot_product_attention
    seen = {}

    def fake(q, k, v, bias=None, mask=None, *, implementation, **kwargs):
        seen.update(implementation=implementation, mask=mask.shape, bias=(bias.shape, bias.dtype))
        return real(q, k, v, bias=bias, mask=mask, implementation="xla", **kwargs)

    monkeypatch.setattr(attention, "_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    q, k, v, bias, key_mask = _case("bias_batch_mask_causal", jnp.bfloat16)
    # A fresh jit: a trace made while pretending to be on a GPU must not be reused elsewhere.
    out = jax.jit(
        lambda *a: dot_product_attention(*a[:3], bias=a[3], key_mask=a[4], causal=True,
                                         implementation="cudnn")
    )(q, k, v, bias, key_mask)  # fmt: skip
    t = q.shape[1]
    assert seen == {
        "implementation": "cudnn",
        "mask": (B, 1, t, t),
        "bias": ((B, H, t, t), jnp.bfloat16),
    }
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out[1], np.float32), 0.0)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, bias)]
    ref = _attend(*f32, key_mask, implementation="xla", causal=True)
    chex.assert_trees_all_close(out.astype(jnp.float32), ref, rtol=0, atol=scaled_atol(ref, BF16))


def test_blockwise_memory_is_far_below_dense_logits():
    # Compiled temp buffers, forward and backward, at T = S = 2048: the dense logits alone are
    # T * S * H * 4 bytes; blocks of 128 need O(H * 128**2 + T * H * D).
    t, heads = 2048, 2
    spec = jax.ShapeDtypeStruct((1, t, heads, D), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, t), jnp.bool_)
    logits_bytes = t * t * heads * 4

    def temp_bytes(implementation: str, grad: bool) -> int:
        def f(q, k, v, m):
            return dot_product_attention(
                q, k, v, key_mask=m, implementation=implementation, block_size=128
            )

        if grad:
            f = jax.grad(lambda q, k, v, m, f=f: jnp.sum(f(q, k, v, m)), argnums=(0, 1, 2))
        compiled = jax.jit(f).lower(spec, spec, spec, mask).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes("xla", grad=False) >= logits_bytes  # the measurement sees the logits
    assert temp_bytes("blockwise", grad=False) < logits_bytes / 8
    assert temp_bytes("blockwise", grad=True) < logits_bytes / 8


@functools.cache
def _errors():
    q, k, v = _qkv(0, 6, 6, 2)
    mask = jnp.ones((B, 6), bool)
    bias = jnp.zeros((1, H, 6, 6))
    attend = functools.partial(dot_product_attention, q, k, v)
    return {
        "unknown implementation": (lambda: attend(implementation="flash"), "implementation"),
        "q rank": (lambda: dot_product_attention(q[0], k, v), "q must have rank 4"),
        "v shape": (lambda: dot_product_attention(q, k, v[:, :5]), "v must have"),
        "batch": (lambda: dot_product_attention(q, k[:1], v[:1]), "batch"),
        "head dim": (lambda: dot_product_attention(q, k[..., :4], v[..., :4]), "head dim"),
        "heads": (lambda: dot_product_attention(q[:, :, :3], k, v), "multiple"),
        "empty": (lambda: dot_product_attention(q[:, :0], k, v), "positive"),
        "causal T != S": (lambda: dot_product_attention(q[:, :5], k, v, causal=True), "T == S"),
        "block size": (lambda: attend(block_size=0), "block_size"),
        "mask dtype": (lambda: attend(key_mask=mask.astype(jnp.int32)), "boolean"),
        "mask shape": (lambda: attend(key_mask=mask[:, :5]), "key_mask"),
        "bias rank": (lambda: attend(bias=bias[0]), "rank 4"),
        "bias dtype": (lambda: attend(bias=bias.astype(jnp.int32)), "float"),
        "bias shape": (lambda: attend(bias=bias[:, :2]), "broadcast"),
        "cudnn on cpu": (lambda: attend(implementation="cudnn"), "GPU"),
        "chooser name": (lambda: choose_implementation("dense", q, k, None), "implementation"),
    }


@pytest.mark.parametrize("name", list(_errors()))
def test_errors_raise_value_error(name):
    call, match = _errors()[name]
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
