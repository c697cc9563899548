"""The GEMM-based 'SAME' convolution equals XLA's, values and gradients."""

import chex
import jax
import jax.numpy as jnp
import pytest
from arrays import init, normal
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

    def values_and_grads(conv):  # compiled: one program for each, not dozens of single ops
        loss = lambda x, w: jnp.sum(jnp.sin(conv(x, w)))  # noqa: E731
        return jax.jit(lambda x, w: (conv(x, w), jax.grad(loss, argnums=(0, 1))(x, w)))

    out, got = values_and_grads(conv_same)(x, w)
    ref, ref_grads = values_and_grads(_xla)(x, w)
    # Sums of up to 144 products in another order: compare at float32 rounding of the scale.
    chex.assert_trees_all_close(out, ref, rtol=0, atol=scaled_atol(ref, F32))
    for g, r in zip(got, ref_grads, strict=True):
        chex.assert_trees_all_close(g, r, rtol=0, atol=scaled_atol(r, F32))


def test_decoder_is_the_same_with_either_implementation():
    x = normal((3, 4, 64), seed=2)
    gemm = GaussianAdaptiveTransformer(
        num_classes=3, num_heads=2, conv_features=8, conv_impl="gemm"
    )
    xla = gemm.clone(conv_impl="xla")
    variables = init(gemm, 3, x)
    abstract = jax.eval_shape(xla.init, jax.random.key(3), x)
    assert jax.tree.structure(variables) == jax.tree.structure(abstract)

    def logits_and_grads(model):  # one program each: the logits and the gradients
        loss = lambda v: jnp.sum(model.apply(v, x) ** 2)  # noqa: E731
        return jax.jit(lambda v: (model.apply(v, x), jax.grad(loss)(v)))(variables)

    (gemm_logits, gemm_grads), (xla_logits, xla_grads) = map(logits_and_grads, (gemm, xla))
    chex.assert_trees_all_close(gemm_logits, xla_logits, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(gemm_grads, xla_grads, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="odd"):
        jax.eval_shape(SameConv(4, (2, 3)).init, jax.random.key(0), jnp.zeros((1, 4, 4, 2)))
    with pytest.raises(ValueError, match="conv_impl"):
        jax.eval_shape(gemm.clone(conv_impl="fft").init, jax.random.key(0), x)
