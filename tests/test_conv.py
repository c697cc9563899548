"""The GEMM-based 'SAME' convolution equals XLA's, values and gradients."""

import chex
import jax
import jax.numpy as jnp
import pytest
from arrays import normal
from tolerances import F32, scaled_atol

from gaam_jax import GaussianAdaptiveTransformer
from gaam_jax.conv import SameConv, conv_same


def _xla(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize(
    "cin,cout,kernel", [(3, 16, (3, 3)), (16, 3, (3, 3)), (5, 5, (5, 3)), (12, 2, (1, 5))]
)
def test_values_and_gradients_equal_xla(cin, cout, kernel):
    x = normal((2, 6, 7, cin), seed=0)
    w = normal((*kernel, cin, cout), seed=1)
    # Sums of up to 144 products in another order: compare at float32 rounding of the scale.
    ref = _xla(x, w)
    chex.assert_trees_all_close(conv_same(x, w), ref, rtol=0, atol=scaled_atol(ref, F32))

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w)))

    got = jax.grad(loss(conv_same), argnums=(0, 1))(x, w)
    ref = jax.grad(loss(_xla), argnums=(0, 1))(x, w)
    for g, r in zip(got, ref, strict=True):
        chex.assert_trees_all_close(g, r, rtol=0, atol=scaled_atol(r, F32))


def test_decoder_is_the_same_with_either_implementation():
    x = normal((3, 4, 64), seed=2)
    gemm = GaussianAdaptiveTransformer(
        num_classes=3, num_heads=2, conv_features=8, conv_impl="gemm"
    )
    xla = gemm.clone(conv_impl="xla")
    # Compiled, not eager: one program per call instead of hundreds of single ops.
    variables = jax.jit(gemm.init)(jax.random.key(3), x)
    abstract = jax.eval_shape(xla.init, jax.random.key(3), x)
    assert jax.tree.structure(variables) == jax.tree.structure(abstract)

    def loss(model):
        return lambda v: jnp.sum(model.apply(v, x) ** 2)

    chex.assert_trees_all_close(
        jax.jit(gemm.apply)(variables, x), jax.jit(xla.apply)(variables, x), rtol=1e-5, atol=1e-5
    )
    chex.assert_trees_all_close(
        jax.jit(jax.grad(loss(gemm)))(variables),
        jax.jit(jax.grad(loss(xla)))(variables),
        rtol=1e-4,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="odd"):
        SameConv(4, (2, 3)).init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)))
    with pytest.raises(ValueError, match="conv_impl"):
        gemm.clone(conv_impl="fft").init(jax.random.key(0), x)
