"""Grouped-Query Attention: textbook form against independent references, and the paper's block."""

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from arrays import init, normal, random_params
from tolerances import F32

from gaam_jax import GroupedQueryAttention, PaperCodeGroupedQueryAttention, count_params
from gaam_jax.gqa import grouped_query_attention

X = normal((3, 6, 16))


def _reference_gqa(params, x, mask=None):
    """Plain GQA written independently: repeat each key/value head over its query group."""
    proj = lambda name: (  # noqa: E731
        jnp.einsum("ble,ehd->blhd", x, params[name]["kernel"]) + params[name]["bias"][None, None]
    )
    q, k, v = proj("query"), proj("key"), proj("value")
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = jnp.where(mask, logits, -1e30)
    w = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", w, v)
    out = jnp.einsum("bqhd,hde->bqe", out, params["out"]["kernel"])
    return out + params["out"]["bias"][None, None], w


@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4), (4, 1), (6, 3)])
def test_gqa_matches_independent_reference(hq, hkv):
    layer = GroupedQueryAttention(num_query_heads=hq, num_kv_heads=hkv, head_dim=5)
    params = random_params(layer, 1, X)
    y, w = jax.jit(functools.partial(layer.apply, return_weights=True))({"params": params}, X)
    y_ref, w_ref = jax.jit(_reference_gqa)(params, X)
    chex.assert_trees_all_close(y, y_ref, rtol=F32, atol=1e-6)
    chex.assert_trees_all_close(w, w_ref, rtol=F32, atol=1e-7)
    chex.assert_shape(w, (3, hq, 6, 6))
    chex.assert_trees_all_close(jnp.sum(w, -1), jnp.ones((3, hq, 6)), atol=1e-6)


def test_gqa_with_equal_heads_is_flax_multi_head_attention():
    layer = GroupedQueryAttention(num_query_heads=4, num_kv_heads=4, head_dim=4)
    params = random_params(layer, 2, X)
    mha = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16, out_features=16)
    y_mha = jax.jit(mha.apply)({"params": params}, X, X)  # same parameter names and shapes
    y = jax.jit(layer.apply)({"params": params}, X)
    chex.assert_trees_all_close(y, y_mha, rtol=F32, atol=1e-6)


def test_masked_keys_get_no_weight_and_do_not_matter():
    layer = GroupedQueryAttention(num_query_heads=4, num_kv_heads=2, head_dim=4)
    params = random_params(layer, 3, X)
    valid = np.array([True, True, True, False, True, False])
    mask = jnp.asarray(valid[None, None, None, :])
    apply = jax.jit(layer.apply, static_argnames="return_weights")
    y, w = apply({"params": params}, X, mask=mask, return_weights=True)
    assert float(np.max(np.asarray(w)[..., ~valid])) == 0.0
    x2 = jnp.asarray(np.where(valid[None, :, None], X, 1e3))  # the masked tokens (keys, values)
    kv_only = apply({"params": params}, X, x2, mask=mask)
    chex.assert_trees_all_close(kv_only, y, rtol=F32, atol=1e-6)
    y_ref, _ = jax.jit(_reference_gqa)(params, X, mask)
    chex.assert_trees_all_close(y, y_ref, rtol=F32, atol=1e-6)


def test_gqa_function_errors():
    q = jnp.zeros((1, 2, 6, 4))
    kv = jnp.zeros((1, 2, 4, 4))
    with pytest.raises(ValueError, match="multiple of num_kv_heads=4"):
        grouped_query_attention(q, kv, kv)
    with pytest.raises(ValueError, match="must be boolean"):
        grouped_query_attention(q, q, q, jnp.ones((1, 1, 2, 2)))
    with pytest.raises(ValueError, match="does not broadcast"):
        grouped_query_attention(q, q, q, jnp.ones((1, 1, 3, 2), bool))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        GroupedQueryAttention(num_query_heads=6, num_kv_heads=4, head_dim=2)


def _reference_paper_block(p, x, query_heads=8, kv_heads=2):
    """numpy transcription of the authors' MultiheadGQA forward (docs/design.md section 5)."""
    x = np.asarray(x, np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    lin = lambda x, layer: x @ layer["kernel"] + layer["bias"]  # noqa: E731
    b, n, e = x.shape
    d = e // query_heads
    g = query_heads // kv_heads
    q = lin(x, p["q_proj"]).reshape(b, n, query_heads, d).transpose(0, 2, 1, 3)  # b H n d
    k = lin(x, p["k_proj"]).reshape(b, n, kv_heads, d).transpose(0, 2, 1, 3)
    v = lin(x, p["v_proj"]).reshape(b, n, kv_heads, d).transpose(0, 2, 1, 3)
    q = q / math.sqrt(d)
    q = q.reshape(b, kv_heads, g, n, d)  # "b (h g) n d -> b g h n d" keeps head h*g + j
    sim = np.einsum("bhgnd,bhsd->bhns", q, k)
    sim = sim / math.sqrt(d)
    att = np.exp(sim - sim.max(-1, keepdims=True))
    att = att / att.sum(-1, keepdims=True)
    out = np.einsum("bhns,bhsd->bhnd", att, v).transpose(0, 2, 1, 3).reshape(b, n, kv_heads * d)
    mu, var = out.mean(-1, keepdims=True), out.var(-1, keepdims=True)
    ln = p["LayerNorm_0"]
    out = (out - mu) / np.sqrt(var + 1e-5) * ln["scale"] + ln["bias"]
    return lin(out, p["out_proj"])


def test_paper_code_block_reproduces_the_authors_code():
    x = normal((2, 24, 512), seed=4)
    block = PaperCodeGroupedQueryAttention(512, query_heads=8, kv_heads=2)
    params = init(block, 5, x)["params"]
    assert count_params(params) == 460_288  # docs/design.md section 5
    assert params["out_proj"]["kernel"].shape == (128, 512)  # projected from the kv width
    p = jax.tree.map(lambda a: a + normal(a.shape, seed=6, scale=0.01), params)
    apply = jax.jit(functools.partial(block.apply, return_weights=True))
    y, w = apply({"params": p}, x)
    chex.assert_shape(w, (2, 2, 24, 24))
    chex.assert_trees_all_close(
        np.asarray(y, np.float64), _reference_paper_block(p, x), rtol=1e-4, atol=1e-4
    )


def test_paper_code_block_differs_from_textbook_gqa():
    # Same projections, but summing a group's query heads and scaling twice changes the result.
    x = normal((1, 5, 16), seed=7)
    block = PaperCodeGroupedQueryAttention(16, query_heads=4, kv_heads=2)
    p = random_params(block, 8, x)
    _, w = jax.jit(functools.partial(block.apply, return_weights=True))({"params": p}, x)

    @jax.jit  # one program for the references below
    def references(p, x):
        lin = lambda name: x @ p[name]["kernel"] + p[name]["bias"][None, None]  # noqa: E731
        q = lin("q_proj").reshape(1, 5, 4, 4)
        k = lin("k_proj").reshape(1, 5, 2, 4)
        v = lin("v_proj").reshape(1, 5, 2, 4)
        _, w_textbook = grouped_query_attention(q, k, v)
        logits_paper = (
            jnp.einsum("bnhgd,bshd->bhns", q.reshape(1, 5, 2, 2, 4), k) / 4.0
        )  # 1/sqrt(4), twice
        return w_textbook, jax.nn.softmax(logits_paper, -1)

    w_textbook, w_paper = references(p, x)
    assert w.shape == (1, 2, 5, 5) and w_textbook.shape == (1, 4, 5, 5)
    chex.assert_trees_all_close(w, w_paper, rtol=F32, atol=1e-6)
