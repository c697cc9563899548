"""Linen modules: parameters, gates, dtypes, masks, errors, and use from flax.nnx."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from arrays import init
from flax import nnx
from tolerances import BF16, F32, scaled_atol

from gaam_jax import (
    GaussianAdaptiveAttention,
    GaussianBlock,
    MixtureGaussianAdaptiveAttention,
    functional,
)

# Drawn by jax.random, not numpy (tests/arrays.py): test_bfloat16_compute_and_storage[mixture]'s
# bound holds for this draw, not for numpy's seed-0 draw (bf16 errors of 0.13, bound 0.031).
X = jax.random.normal(jax.random.key(0), (4, 24, 32))


def test_paper_module_parameters_follow_the_paper():
    layer = GaussianAdaptiveAttention(num_heads=8)
    variables = layer.init(jax.random.key(1), X)
    params = variables["params"]
    chex.assert_shape((params["delta"], params["xi"]), (8, 32))
    chex.assert_trees_all_equal(params["delta"], jnp.zeros((8, 32)))  # delta = 0
    chex.assert_trees_all_equal(params["xi"], jnp.full((8, 32), 2.0))  # xi = 2
    # P_DAAM = 2 * H * d: 16,384 for the paper's H = 8, d = 1024.
    big = jax.eval_shape(
        layer.init, jax.random.key(1), jax.ShapeDtypeStruct((2, 24, 1024), jnp.float32)
    )
    assert sum(p.size for p in jax.tree.leaves(big)) == 16_384


def test_paper_module_equals_functional_and_sows_gate():
    layer = GaussianAdaptiveAttention(num_heads=4)
    variables = layer.init(jax.random.key(1), X)
    params = {"delta": 0.1 * jnp.ones((4, 32)), "xi": 1.5 * jnp.ones((4, 32))}
    y, state = layer.apply({"params": params}, X, mutable=["intermediates"])
    y_ref, gate_ref = functional.gaussian_adaptive_attention(
        X, params["delta"], params["xi"], return_gate=True
    )
    chex.assert_trees_all_close(y, y_ref)
    chex.assert_trees_all_close(state["intermediates"]["gate"], (gate_ref,))
    y2, gate = layer.apply(variables, X, return_gate=True)
    chex.assert_shape(gate, X.shape)


def test_mixture_module_parameters_and_init():
    layer = MixtureGaussianAdaptiveAttention(num_heads=8, num_gaussians=4)
    params = layer.init(jax.random.key(2), X)["params"]
    chex.assert_shape((params["mean_offsets"], params["c"]), (8, 4))
    chex.assert_trees_all_equal(params["mean_offsets"], jnp.zeros((8, 4)))
    assert bool(jnp.all(params["c"] > 0))  # exp(N(0, 1))
    assert sum(p.size for p in jax.tree.leaves(params)) == 64  # the paper's Table 3


def test_gaussian_block_is_a_residual_stack():
    block = GaussianBlock(norm_axes=(1, -1), num_heads=(4, 2), num_gaussians=(3, 2))
    variables = init(block, 3, X)
    y, gates = jax.jit(functools.partial(block.apply, return_gates=True))(variables, X)

    @jax.jit  # the stack by hand, compiled as the block is
    def by_hand(params, x):
        layer_gates = []
        for i, axis in enumerate((1, -1)):
            p = params[f"layer_{i}"]
            layer_out, gate = functional.mixture_gaussian_adaptive_attention(
                x, p["mean_offsets"], p["c"], axis=axis, return_gate=True
            )
            layer_gates.append(gate)
            x = layer_out + x
        return x, layer_gates

    x, layer_gates = by_hand(variables["params"], X)
    for i, gate in enumerate(layer_gates):
        chex.assert_trees_all_close(gates[f"layer_{i}"], gate)
    chex.assert_trees_all_close(y, x, rtol=F32)


def test_gaussian_block_mask_passes_through_unchanged():
    block = GaussianBlock(norm_axes=(1, 1), num_heads=(2, 2), num_gaussians=(2, 2))
    variables = init(block, 4, X)
    apply = jax.jit(block.apply)
    # The last two positions of each head's chunk of 12 are padding.
    pos = np.arange(24)
    valid = (pos % 12) < 10
    y = np.asarray(apply(variables, X, jnp.asarray(valid[None, :, None])))
    x = np.asarray(X)
    chex.assert_trees_all_equal(y[:, ~valid], x[:, ~valid])
    # The valid positions behave as if the padding were not there at all.
    y_valid = apply(variables, jnp.asarray(x[:, valid]))
    chex.assert_trees_all_close(y[:, valid], y_valid, rtol=F32, atol=1e-6)


@pytest.mark.parametrize(
    "module",
    [
        GaussianAdaptiveAttention(num_heads=8),
        MixtureGaussianAdaptiveAttention(num_heads=8, num_gaussians=2),
        GaussianBlock((1,), (8,), (2,)),
    ],
    ids=["paper", "mixture", "block"],
)
def test_bfloat16_compute_and_storage(module):
    module_bf16 = module.clone(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    variables = module_bf16.init(jax.random.key(5), X)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(variables))
    y = module_bf16.apply(variables, X)
    assert y.dtype == jnp.bfloat16
    chex.assert_tree_all_finite(y)
    y32 = module.apply(jax.tree.map(lambda p: p.astype(jnp.float32), variables), X)
    chex.assert_trees_all_close(y.astype(jnp.float32), y32, rtol=0, atol=scaled_atol(y32, BF16))


def test_jit_and_grad_through_modules():
    layer = GaussianAdaptiveAttention(num_heads=8)
    variables = layer.init(jax.random.key(6), X)

    @jax.jit
    def loss(params):
        return jnp.mean(layer.apply({"params": params}, X) ** 2)

    grads = jax.grad(loss)(variables["params"])
    chex.assert_tree_all_finite(grads)
    assert float(jnp.max(jnp.abs(grads["delta"]))) > 0.0


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: GaussianAdaptiveAttention(num_heads=0), "num_heads must be a positive int"),
        (lambda: GaussianAdaptiveAttention(num_heads=2.0), "num_heads must be a positive int"),
        (lambda: GaussianAdaptiveAttention(variance="x"), "variance must be"),
        (lambda: MixtureGaussianAdaptiveAttention(num_gaussians=0), "num_gaussians"),
        (lambda: MixtureGaussianAdaptiveAttention(eps=-1.0), "eps must be positive"),
        (lambda: GaussianBlock((1, 1), (2,), (2, 2)), "equal length"),
        (lambda: GaussianBlock((1,), (0,), (2,)), r"num_heads\[0\]"),
        (lambda: GaussianBlock((), (), ()), "non-empty"),
    ],
)
def test_invalid_constructor_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_indivisible_heads_error_names_the_sizes():
    with pytest.raises(ValueError, match="24 cannot be split into 5 equal heads"):
        jax.eval_shape(GaussianAdaptiveAttention(num_heads=5).init, jax.random.key(0), X)


def test_nnx_bridge_example():
    # The README's NNX example: wrap the Linen module, initialise lazily, call eagerly.
    linen_layer = GaussianAdaptiveAttention(num_heads=8)
    model = nnx.bridge.ToNNX(linen_layer, rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(model, X)
    y = model(X)
    params = nnx.state(model, nnx.Param)
    assert params["delta"].shape == (8, 32)
    chex.assert_trees_all_close(y, linen_layer.apply(linen_layer.init(jax.random.key(0), X), X))

    # Train one step the NNX way: the parameters move and the loss falls.
    optimizer_free_loss = lambda m: jnp.mean((m(X) - 0.5 * X) ** 2)  # noqa: E731
    loss0, grads = nnx.value_and_grad(optimizer_free_loss)(model)
    nnx.update(model, jax.tree.map(lambda p, g: p - 0.5 * g, nnx.state(model, nnx.Param), grads))
    assert float(optimizer_free_loss(model)) < float(loss0)


def test_linen_module_inside_a_linen_model():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = GaussianAdaptiveAttention(num_heads=4)(x)
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    variables = init(Model(), 7, X)
    assert set(variables["params"]) == {"GaussianAdaptiveAttention_0", "Dense_0"}
    chex.assert_shape(jax.jit(Model().apply)(variables, X), (4, 3))
    np.testing.assert_equal(
        np.asarray(variables["params"]["GaussianAdaptiveAttention_0"]["xi"]), 2.0
    )
