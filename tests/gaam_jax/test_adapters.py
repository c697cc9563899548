"""LoRA and DAAM adapters on models built from Flax's own layers (not the project's): Linen and NNX.

Each model projects its input with an ``Einsum``, runs two pre-LN blocks of Flax's own
multi-head attention (``DenseGeneral`` / ``LinearGeneral`` query, key, value and out) and an
MLP (``Dense`` / ``Linear``), and classifies the masked mean. LoRA goes on every attention
projection and the ``Einsum``, DAAM after every block (reading the block's ``mask`` argument).
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict
from tolerances import F32, scaled_atol

from gaam_jax.adapters import COLLECTION, DAAM, DaamParam, LoRA, adapt, merge, merge_model

B, T, F, D, HEADS, C = 4, 6, 5, 8, 2, 3
LORA = LoRA(rank=2, alpha=4.0, targets=r"attn/(query|key|value|out)$|^embed$")
DAAM_BLOCKS = DAAM(targets=r"^block_\d$", mask_arg="mask")


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
    lengths = np.array([6, 4, 3, 5])
    mask = jnp.asarray(np.arange(T)[None, :] < lengths[:, None])
    y = jnp.asarray(rng.integers(0, C, size=B))
    return x, mask, y


def _pool(x, mask):
    m = mask[..., None].astype(x.dtype)
    return (x * m).sum(1) / m.sum(1)


# --- Linen -------------------------------------------------------------------------------


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm()(x)
        attn = nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")
        x = x + attn(h, h, mask=nn.make_attention_mask(mask, mask))
        h = nn.LayerNorm()(x)
        return x + nn.Dense(D, name="mlp_out")(nn.gelu(nn.Dense(2 * D, name="mlp_in")(h)))


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        x = nn.Einsum((F, D), "btf,fd->btd", name="embed")(x)
        for i in range(2):
            x = LinenBlock(name=f"block_{i}")(x, mask)
        return nn.Dense(C, name="head")(_pool(x, mask))


def _linen():
    x, mask, y = _data()
    base = LinenModel()
    params = base.init(jax.random.key(0), x, mask)["params"]
    model = adapt(base, lora=LORA, daam=DAAM_BLOCKS)
    adapters = model.init(jax.random.key(1), x, mask)[COLLECTION]
    return base, params, model, adapters, (x, mask, y)


def _perturbed(tree, seed):
    """Every leaf moved off its initial value (B = 0 and DAAM's scale = 0 block gradients)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [v + 0.3 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, moved)


def test_linen_adapters_sit_beside_the_unchanged_params_and_start_as_the_base():
    base, params, model, adapters, (x, mask, _) = _linen()
    variables = model.init(jax.random.key(0), x, mask)
    assert jax.tree.structure(variables["params"]) == jax.tree.structure(params)
    paths = {"/".join(k) for k in flatten_dict(adapters)}
    for i in range(2):
        for proj in ("query", "key", "value", "out"):
            assert f"block_{i}/attn/{proj}/lora_a" in paths
        for name in ("delta", "xi", "scale"):
            assert f"block_{i}/daam_adapter/{name}" in paths
    assert "embed/lora_b" in paths
    assert not any(re.search("mlp|head", p) for p in paths)
    # DenseGeneral's kernel is [in, heads, head_dim]: A [in, r], B [r, heads, head_dim].
    a = flatten_dict(adapters)[("block_0", "attn", "query", "lora_a")]
    b = flatten_dict(adapters)[("block_0", "attn", "query", "lora_b")]
    assert a.shape == (D, 2) and b.shape == (2, HEADS, D // HEADS)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(adapters))
    want = base.apply({"params": params}, x, mask)
    got = model.apply({"params": params, COLLECTION: adapters}, x, mask)
    np.testing.assert_array_equal(got, want)


def test_linen_every_adapter_gets_a_gradient_and_merged_lora_equals_unmerged():
    _, params, model, adapters, (x, mask, _) = _linen()
    adapters = _perturbed(adapters, 2)

    def out(adapters):
        return model.apply({"params": params, COLLECTION: adapters}, x, mask)

    grads = jax.grad(lambda a: jnp.sum(out(a) ** 2))(adapters)
    for path, g in flatten_dict(grads).items():
        assert np.abs(np.asarray(g)).max() > 0, path
    lora_only = adapt(LinenModel(), lora=LORA)
    flat = flatten_dict(adapters)
    lora_tree = unflatten_dict({k: v for k, v in flat.items() if k[-1].startswith("lora")})
    unmerged = lora_only.apply({"params": params, COLLECTION: lora_tree}, x, mask)
    merged = LinenModel().apply({"params": merge(params, lora_tree, LORA)}, x, mask)
    np.testing.assert_allclose(merged, unmerged, atol=scaled_atol(unmerged, F32))
    assert not np.allclose(unmerged, LinenModel().apply({"params": params}, x, mask))


def test_linen_daam_leaves_padding_out_of_its_statistics():
    # A padded token's value must not move any real token's output (the attention is masked,
    # the MLP is per token, the DAAM gate's statistics skip padding).
    _, params, model, adapters, (x, mask, _) = _linen()
    adapters = _perturbed(adapters, 3)
    full = jax.jit(lambda x: model.apply({"params": params, COLLECTION: adapters}, x, mask))
    noisy = x.at[2, 4:].set(1e3)  # row 2 has 3 real tokens
    np.testing.assert_allclose(full(noisy), full(x), atol=scaled_atol(full(x), F32))


def _linen_finetune_losses(steps=25):
    _, params, model, adapters, (x, mask, y) = _linen()

    def loss(adapters):
        logits = model.apply({"params": params, COLLECTION: adapters}, x, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    tx = optax.adam(3e-2)
    state = tx.init(adapters)

    @jax.jit
    def step(adapters, state):
        value, grads = jax.value_and_grad(loss)(adapters)
        updates, state = tx.update(grads, state, adapters)
        return optax.apply_updates(adapters, updates), state, value

    losses = []
    for _ in range(steps):
        adapters, state, value = step(adapters, state)
        losses.append(float(value))
    return losses, params


def test_linen_short_finetuning_lowers_the_loss_and_leaves_the_base_untouched():
    before = _linen()[1]
    losses, params = _linen_finetune_losses()
    assert losses[-1] < 0.5 * losses[0], losses
    jax.tree.map(np.testing.assert_array_equal, params, before)


def test_adapt_refuses_in_one_line():
    with pytest.raises(ValueError, match="give lora"):
        adapt(LinenModel())
    with pytest.raises(ValueError, match="rngs is for NNX"):
        adapt(LinenModel(), lora=LORA, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not a regular expression"):
        DAAM(targets="(")
    with pytest.raises(ValueError, match="expected a Linen or NNX"):
        adapt(object(), lora=LORA)


# --- NNX ---------------------------------------------------------------------------------


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.norm1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(D, rngs=rngs)
        self.mlp_in = nnx.Linear(D, 2 * D, rngs=rngs)
        self.mlp_out = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x, mask):
        h = self.norm1(x)
        x = x + self.attn(h, mask=nnx.make_attention_mask(mask, mask))
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x))))


class NnxModel(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Einsum("btf,fd->btd", (F, D), (D,), rngs=rngs)
        self.block_0 = NnxBlock(rngs)
        self.block_1 = NnxBlock(rngs)
        self.head = nnx.Linear(D, C, rngs=rngs)

    def __call__(self, x, mask):
        x = self.embed(x)
        x = self.block_1(self.block_0(x, mask), mask)
        return self.head(_pool(x, mask))


NNX_DAAM = DAAM(targets=r"^block_\d$", mask_arg="mask", features=D)


def _nnx():
    base = NnxModel(nnx.Rngs(0))
    model = adapt(base, lora=LORA, daam=NNX_DAAM, rngs=nnx.Rngs(1))
    return base, model, _data()


def _set(model, tree):
    nnx.update(model, tree)
    return model


def test_nnx_adapters_are_lora_params_beside_unchanged_base_paths_and_start_as_the_base():
    base, model, (x, mask, _) = _nnx()
    base_paths = set(flatten_dict(nnx.to_pure_dict(nnx.state(base, nnx.Param))))
    frozen = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    assert set(flatten_dict(frozen)) == base_paths
    adapters = flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    names = {"/".join(map(str, k)) for k in adapters}
    for i in range(2):
        for proj in ("query", "key", "value", "out"):
            assert f"block_{i}/attn/{proj}/lora_a" in names
        assert f"block_{i}/daam_adapter/xi" in names
    assert "embed/lora_a" in names and not any("mlp" in n or "head" in n for n in names)
    assert len(nnx.to_pure_dict(nnx.state(model, DaamParam))) == 2
    np.testing.assert_array_equal(model(x, mask), base(x, mask))


def test_nnx_gradients_reach_every_adapter_under_jax_jit_and_merging_folds_lora():
    _, model, (x, mask, _) = _nnx()
    _set(model, _perturbed(nnx.state(model, nnx.LoRAParam), 2))
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)

    @jax.jit
    def grads(adapters, rest):
        def f(adapters):
            return jnp.sum(nnx.merge(graphdef, adapters, rest)(x, mask) ** 2)

        return jax.grad(f)(adapters)

    for path, g in flatten_dict(nnx.to_pure_dict(grads(adapters, rest))).items():
        assert np.abs(np.asarray(g)).max() > 0, path
    lora_only = adapt(NnxModel(nnx.Rngs(0)), lora=LORA, rngs=nnx.Rngs(1))
    _set(lora_only, _perturbed(nnx.state(lora_only, nnx.LoRAParam), 4))
    merged = merge_model(lora_only)
    assert not nnx.to_pure_dict(nnx.state(merged, nnx.LoRAParam))
    assert nnx.to_pure_dict(nnx.state(lora_only, nnx.LoRAParam))  # the original keeps its LoRA
    want = lora_only(x, mask)
    np.testing.assert_allclose(merged(x, mask), want, atol=scaled_atol(want, F32))
    kept = merge_model(model)  # DAAM gates are not linear: they stay
    assert set(flatten_dict(nnx.to_pure_dict(nnx.state(kept, nnx.LoRAParam)))) == set(
        flatten_dict(nnx.to_pure_dict(nnx.state(kept, DaamParam)))
    )
    np.testing.assert_allclose(kept(x, mask), model(x, mask), atol=scaled_atol(want, F32))


def test_nnx_short_finetuning_with_flax_idioms_lowers_the_loss_and_leaves_the_base_untouched():
    _, model, (x, mask, y) = _nnx()
    base_before = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.LoRAParam)

    def loss_fn(model):
        logits = model(x, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(25)]
    assert losses[-1] < 0.5 * losses[0], losses
    after = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    jax.tree.map(np.testing.assert_array_equal, after, base_before)


def test_nnx_refusals_name_the_cause():
    with pytest.raises(ValueError, match="match no module"):
        adapt(NnxModel(nnx.Rngs(0)), lora=LoRA(targets="nothing_here"))
    with pytest.raises(ValueError, match="features"):
        adapt(NnxModel(nnx.Rngs(0)), daam=DAAM(targets=r"^block_0$"))
