"""The functional core: hand-computed goldens, heads, masks, transforms and numerics."""

import inspect
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from arrays import bernoulli, normal
from tolerances import BF16, F32, scaled_atol

from gaam_jax import functional as F

# The functions under test, compiled. Eagerly every call runs (and compiles) dozens of single
# ops, which made this the slowest file of the suite; test_jit_vmap_grad checks that the
# compiled and the eager function agree, and the argument checks below call them eagerly.
_STATIC = ("axis", "feature_axis", "variance", "var_eps", "norm_eps", "eps", "return_gate")


def _compiled(fn):
    names = [n for n in _STATIC if n in inspect.signature(fn).parameters]
    return jax.jit(fn, static_argnames=names)


gaam = _compiled(F.gaussian_adaptive_attention)
gaussian_gate = _compiled(F.gaussian_gate)
mixture_gate = _compiled(F.mixture_gate)
mixture_gaam = _compiled(F.mixture_gaussian_adaptive_attention)


_normal = normal  # numpy draws: eager jax.random would compile a program for every shape


# ----------------------------------------------------------------------------------------------
# Closed-form goldens, computed by hand from the paper's formulas
# ----------------------------------------------------------------------------------------------


def test_paper_gate_golden_one_head():
    # One sample, 3 layers, 1 feature: mean 2, population variance 2/3.
    x = jnp.array([1.0, 2.0, 3.0]).reshape(1, 3, 1)
    delta, xi = jnp.zeros((1, 1)), jnp.full((1, 1), 2.0)
    denom = math.sqrt(2.0 / 3.0 + 1e-8 + 1e-5)
    expected_gate = [math.exp(-(((v - 2.0) / denom) ** 2) / 4.0) for v in (1.0, 2.0, 3.0)]
    y, gate = gaam(x, delta, xi, return_gate=True)
    chex.assert_trees_all_close(gate.ravel(), jnp.array(expected_gate), rtol=F32)
    chex.assert_trees_all_close(
        y.ravel(),
        jnp.array([v * g for v, g in zip((1.0, 2.0, 3.0), expected_gate, strict=True)]),
        rtol=F32,
    )


def test_paper_gate_golden_two_heads_offsets():
    # 4 layers, 2 heads of 2 layers, 2 features; per-head, per-feature delta and xi.
    x = jnp.array([[0.0, 10.0], [2.0, 20.0], [5.0, -1.0], [9.0, 1.0]])[None]  # [1, 4, 2]
    delta = jnp.array([[0.5, 0.0], [0.0, -1.0]])
    xi = jnp.array([[1.0, 2.0], [3.0, 0.5]])
    gate = gaussian_gate(x, delta, xi)
    expected = np.zeros((4, 2))
    for h, rows in enumerate(((0, 1), (2, 3))):
        for f in range(2):
            vals = [float(x[0, r, f]) for r in rows]
            mean = sum(vals) / 2
            var = sum((v - mean) ** 2 for v in vals) / 2 + 1e-8
            for r, v in zip(rows, vals, strict=True):
                z = (v - (mean + float(delta[h, f]))) / math.sqrt(var + 1e-5)
                expected[r, f] = math.exp(-(z**2) / (2 * float(xi[h, f])))
    chex.assert_trees_all_close(gate[0], jnp.asarray(expected, jnp.float32), rtol=F32, atol=1e-7)


def test_mixture_gate_golden_single_gaussian():
    # x = (-1, 0, 1): mean 0, unbiased variance 1. With m = 0, c = 1 the product is the standard
    # normal pdf of x, and sum-normalisation gives exp(-x^2/2) / (1 + 2 exp(-1/2)).
    x = jnp.array([-1.0, 0.0, 1.0])[None]
    gate = mixture_gate(x, jnp.zeros((1, 1)), jnp.ones((1, 1)), axis=1)
    e = math.exp(-0.5)
    # The variance is 1 + 1e-8; the effect on the gate is below float32 resolution.
    chex.assert_trees_all_close(gate[0], jnp.array([e, 1.0, e]) / (1 + 2 * e), rtol=F32)


def _naive_package_numpy(x, m, c, axis, eps=1e-8):
    """Float64 transcription of the package's loop over heads and Gaussians (the reference)."""
    x = np.asarray(x, np.float64)
    heads = m.shape[0]
    sizes = F.head_sizes(x.shape[axis], heads, even=False)
    out, start = [], 0
    for h, size in enumerate(sizes):
        chunk = np.take(x, np.arange(start, start + size), axis=axis)
        start += size
        mean = chunk.mean(axis=axis, keepdims=True)
        var = chunk.var(axis=axis, keepdims=True, ddof=1) + eps
        mix = 1.0
        for k in range(m.shape[1]):
            y = (chunk - (mean + m[h, k])) / np.sqrt(var)
            mix = mix * np.exp(-(y**2) / (2 * c[h, k] ** 2)) / np.sqrt(2 * np.pi * c[h, k] ** 2)
        mix = mix / np.maximum(mix.sum(axis=axis, keepdims=True), eps)
        out.append(mix)
    return np.concatenate(out, axis=axis)


@pytest.mark.parametrize(
    "shape,axis,heads,k",
    [((6, 20), 1, 4, 5), ((3, 10, 4), 1, 3, 3), ((7, 3), 0, 2, 1), ((2, 5, 9), -1, 4, 8)],
)
def test_mixture_closed_form_equals_product_of_k_gaussians(shape, axis, heads, k):
    x = _normal(shape, seed=1, scale=2.0, shift=1.0)
    rng = np.random.default_rng(0)
    m = 0.5 * rng.standard_normal((heads, k))
    c = rng.choice([-1, 1], (heads, k)) * rng.uniform(0.5, 2.0, (heads, k))
    gate = mixture_gate(x, jnp.asarray(m, jnp.float32), jnp.asarray(c, jnp.float32), axis=axis)
    expected = _naive_package_numpy(np.asarray(x), m, c, axis)
    chex.assert_trees_all_close(
        np.asarray(gate, np.float64), expected, atol=scaled_atol(expected, F32), rtol=0
    )


def test_mixture_eps_floor_applies_when_sum_is_tiny():
    # A far offset makes every density tiny: the package divides by eps instead of the sum.
    x = jnp.array([[0.0, 1.0, 2.0, 3.0]])
    m = jnp.full((1, 3), 30.0)
    c = jnp.full((1, 3), 1.0)
    expected = _naive_package_numpy(np.asarray(x), np.asarray(m), np.asarray(c), 1)
    gate = mixture_gate(x, m, c, axis=1)
    assert float(jnp.sum(gate)) < 1e-3  # the floor applied: the gate no longer sums to 1
    chex.assert_trees_all_close(
        np.asarray(gate, np.float64), expected, atol=1e-12 + scaled_atol(expected, F32), rtol=0
    )


# ----------------------------------------------------------------------------------------------
# Heads: the vectorised computation equals a per-head loop
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 2, 3, 6])
def test_paper_multihead_equals_per_head_loop(heads):
    x = _normal((4, 6, 5), seed=2)
    delta = _normal((heads, 5), seed=3, scale=0.1)
    xi = _normal((heads, 5), seed=4, scale=0.1, shift=2.0)
    y = gaam(x, delta, xi, axis=1)
    g = 6 // heads
    loop = jnp.concatenate(
        [
            gaam(x[:, h * g : (h + 1) * g], delta[h : h + 1], xi[h : h + 1], axis=1)
            for h in range(heads)
        ],
        axis=1,
    )
    chex.assert_trees_all_close(y, loop, rtol=F32, atol=1e-7)


def test_paper_form_axis_and_feature_axis_are_general():
    # Statistics over axis 3 of a [B, T, d, N] layout must equal the [B, T, N, d] result.
    x = _normal((2, 3, 4, 6), seed=5)  # [B, T, N=4... no: B, T, d=4, N=6]
    delta = _normal((3, 4), seed=6, scale=0.2)
    xi = _normal((3, 4), seed=7, scale=0.1, shift=1.5)
    y = gaam(x, delta, xi, axis=3, feature_axis=2)
    xt = jnp.swapaxes(x, 2, 3)  # [B, T, N, d]
    yt = gaam(xt, delta, xi, axis=2, feature_axis=3)
    chex.assert_trees_all_close(y, jnp.swapaxes(yt, 2, 3), rtol=F32, atol=1e-7)
    # Feature axis before the head axis (parameters are transposed internally).
    x2 = jnp.moveaxis(x, 2, 0)  # [d, B, T, N]
    y2 = gaam(x2, delta, xi, axis=3, feature_axis=0)
    chex.assert_trees_all_close(jnp.moveaxis(y2, 0, 2), y, rtol=F32, atol=1e-7)


def test_paper_form_scalar_parameters_per_head():
    x = _normal((3, 8, 5), seed=8)
    y = gaam(x, jnp.full((2, 1), 0.3), jnp.full((2, 1), 1.5), axis=1, feature_axis=None)
    y_full = gaam(x, jnp.full((2, 5), 0.3), jnp.full((2, 5), 1.5), axis=1)
    chex.assert_trees_all_close(y, y_full, rtol=F32)


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------


def _mask(shape, seed, p=0.7):
    return bernoulli(shape, seed, p)


@pytest.mark.parametrize("form", ["paper", "mixture"])
def test_masked_values_do_not_affect_valid_outputs_or_gradients(form):
    x = _normal((3, 12, 4), seed=10)
    mask = _mask((3, 12, 1), seed=11)  # broadcast over features
    garbage = jnp.where(mask, x, _normal(x.shape, seed=12, scale=1e6))
    garbage_nan = jnp.where(mask, x, jnp.nan)

    if form == "paper":
        p = (_normal((4, 4), seed=13, scale=0.1), _normal((4, 4), seed=14, scale=0.1, shift=2.0))

        def f(x):
            return gaam(x, *p, axis=1, mask=mask)
    else:
        p = (_normal((4, 2), seed=13, scale=0.1), _normal((4, 2), seed=14, scale=0.1, shift=1.0))

        def f(x):
            return mixture_gaam(x, *p, axis=1, mask=mask)

    f = jax.jit(f)  # one compile for the three inputs (and the gradient's two)
    y = f(x)
    for other in (garbage, garbage_nan):
        y2 = f(other)
        chex.assert_trees_all_close(jnp.where(mask, y, 0), jnp.where(mask, y2, 0))
        # Masked elements pass through unchanged.
        chex.assert_trees_all_equal(jnp.where(mask, 0, y2), jnp.where(mask, 0, other))

    def loss(x):
        return jnp.sum(jnp.where(mask, f(x), 0.0) ** 2)

    grad = jax.jit(jax.grad(loss))
    g1, g2 = grad(x), grad(garbage_nan)
    chex.assert_tree_all_finite(g2)
    chex.assert_trees_all_close(g1, g2)
    assert float(jnp.max(jnp.abs(jnp.where(mask, 0.0, g2)))) == 0.0


def test_mask_excludes_elements_from_statistics():
    # Masked statistics equal the statistics of the valid elements alone.
    x = _normal((1, 10, 3), seed=20)
    mask = jnp.asarray(np.arange(10)[None, :, None] < 6)
    delta, xi = jnp.zeros((1, 3)), jnp.full((1, 3), 2.0)
    y = gaam(x, delta, xi, axis=1, mask=mask)
    y_valid = gaam(x[:, :6], delta, xi, axis=1)
    chex.assert_trees_all_close(y[:, :6], y_valid, rtol=F32, atol=1e-7)
    m, c = jnp.zeros((1, 2)), jnp.array([[1.0, 0.7]])
    g = mixture_gate(x, m, c, axis=1, mask=mask)
    g_valid = mixture_gate(x[:, :6], m, c, axis=1)
    chex.assert_trees_all_close(g[:, :6], g_valid, rtol=F32, atol=1e-7)
    chex.assert_trees_all_close(g[:, 6:], jnp.ones((1, 4, 3)))


@pytest.mark.parametrize("form", ["paper", "mixture"])
def test_fully_masked_slice_is_finite(form):
    x = _normal((2, 4, 3), seed=30)
    mask = np.zeros((2, 4, 3), bool)
    mask[0] = True  # sample 1 fully masked
    mask = jnp.asarray(mask)

    def f(x):
        if form == "paper":
            return gaam(x, jnp.zeros((2, 3)), jnp.full((2, 3), 2.0), axis=1, mask=mask)
        return mixture_gaam(x, jnp.zeros((2, 1)), jnp.ones((2, 1)), axis=1, mask=mask)

    y = f(x)
    chex.assert_tree_all_finite(y)
    chex.assert_trees_all_equal(y[1], x[1])
    chex.assert_tree_all_finite(jax.jit(jax.grad(lambda x: jnp.sum(f(x) ** 2)))(x))


# ----------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------


def test_jit_vmap_grad():
    x = _normal((5, 8, 6), seed=40)
    delta, xi = _normal((4, 6), seed=41, scale=0.1), _normal((4, 6), seed=42, scale=0.1, shift=2.0)
    f = jax.jit(lambda x, d, s: F.gaussian_adaptive_attention(x, d, s, axis=1))
    chex.assert_trees_all_close(
        f(x, delta, xi), F.gaussian_adaptive_attention(x, delta, xi, axis=1)
    )
    # vmap over the batch of a per-example function equals the batched call.
    per_example = jax.jit(jax.vmap(lambda xe: F.gaussian_adaptive_attention(xe, delta, xi, axis=0)))
    chex.assert_trees_all_close(per_example(x), f(x, delta, xi), rtol=F32, atol=1e-7)
    # grad against a central finite difference along a random direction. The forward pass is
    # float32, so the difference carries ~6e-8 * |loss| / h of rounding and O(h^2) truncation:
    # h = 1e-3 keeps both near 1e-3 relative.
    loss = jax.jit(lambda d: jnp.sum(F.gaussian_adaptive_attention(x, d, xi, axis=1) ** 2))
    g = jax.jit(jax.grad(loss))(delta)
    v = _normal(delta.shape, seed=43)
    h = 1e-3
    fd = (loss(delta + h * v) - loss(delta - h * v)) / (2 * h)
    np.testing.assert_allclose(float(jnp.vdot(g, v)), float(fd), rtol=1e-2)


def test_mixture_grad_matches_finite_differences():
    x = _normal((3, 9, 4), seed=44)
    m, c = _normal((2, 3), seed=45, scale=0.2), _normal((2, 3), seed=46, scale=0.2, shift=1.0)
    loss = jax.jit(  # compiled once for the four evaluations below
        lambda m, c: jnp.sum(mixture_gaam(x, m, c, axis=1) * x)
    )
    gm, gc = jax.jit(jax.grad(loss, argnums=(0, 1)))(m, c)
    for g, arg in ((gm, 0), (gc, 1)):
        v = _normal(m.shape, seed=47 + arg)
        h = 1e-3  # see test_jit_vmap_grad
        plus = [m, c]
        minus = [m, c]
        plus[arg] = plus[arg] + h * v
        minus[arg] = minus[arg] - h * v
        fd = (loss(*plus) - loss(*minus)) / (2 * h)
        np.testing.assert_allclose(float(jnp.vdot(g, v)), float(fd), rtol=1e-2)


def test_shard_map_over_batch_equals_unsharded():
    devices = np.array(jax.devices()[:8])
    assert devices.size == 8, "conftest must provide 8 CPU devices"
    mesh = jax.sharding.Mesh(devices, ("data",))
    P = jax.sharding.PartitionSpec
    x = _normal((16, 8, 6), seed=50)
    delta, xi = _normal((2, 6), seed=51, scale=0.1), _normal((2, 6), seed=52, scale=0.1, shift=2.0)

    def f(x, d, s):
        return gaam(x, d, s, axis=1)

    sharded = jax.jit(
        jax.shard_map(f, mesh=mesh, in_specs=(P("data"), P(), P()), out_specs=P("data"))
    )
    chex.assert_trees_all_close(sharded(x, delta, xi), f(x, delta, xi))


# ----------------------------------------------------------------------------------------------
# Numerics: dtypes, large magnitudes, zero variance
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["paper", "mixture"])
def test_bfloat16_input_is_finite_and_close_to_float32(form):
    x = _normal((4, 24, 16), seed=60, scale=3.0)
    xb = x.astype(jnp.bfloat16)
    if form == "paper":
        p = (_normal((8, 16), seed=61, scale=0.1), _normal((8, 16), seed=62, scale=0.1, shift=2.0))
        f = lambda x: gaam(x, *p, axis=1, return_gate=True)  # noqa: E731
    else:
        p = (_normal((8, 4), seed=61, scale=0.1), _normal((8, 4), seed=62, scale=0.1, shift=1.0))
        f = lambda x: mixture_gaam(  # noqa: E731
            x, *p, axis=1, return_gate=True
        )
    yb, gate_b = f(xb)
    assert yb.dtype == jnp.bfloat16 and gate_b.dtype == jnp.float32
    chex.assert_tree_all_finite(yb)
    y32, _ = f(xb.astype(jnp.float32))  # same rounded input, float32 throughout
    chex.assert_trees_all_close(yb.astype(jnp.float32), y32, rtol=0, atol=scaled_atol(y32, BF16))


def _paper_gate_float64(x, delta, xi, heads):
    """Float64 numpy paper-form gate of x [B, N, d] (the exact answer for the given inputs)."""
    x = np.asarray(x, np.float64)
    b, n, d = x.shape
    xs = x.reshape(b, heads, n // heads, d)
    mean = xs.mean(axis=2, keepdims=True)
    var = xs.var(axis=2, keepdims=True) + 1e-8
    z = (xs - (mean + np.asarray(delta)[None, :, None])) / np.sqrt(var + 1e-5)
    return np.exp(-(z**2) / (2 * np.asarray(xi)[None, :, None])).reshape(b, n, d)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_large_magnitude_inputs(dtype):
    # Llama-2 hidden states reach ~1e4 (float16 tops out at 65504, so it gets 1e3).
    shift = 1e3 if dtype == jnp.float16 else 1e4
    x = _normal((2, 40, 8), seed=70, scale=2.0, shift=shift, dtype=dtype)
    delta, xi = jnp.full((8, 8), 0.1), jnp.full((8, 8), 2.0)
    y, gate = gaam(x, delta, xi, axis=1, return_gate=True)
    chex.assert_tree_all_finite((y, gate))
    assert y.dtype == dtype and gate.dtype == jnp.float32
    # Exact for the given (already rounded) inputs: only float32 rounding of x - mean remains.
    chex.assert_trees_all_close(gate, _paper_gate_float64(x, delta, xi, 8), atol=1e-5, rtol=0)
    y_mix, g_mix = mixture_gaam(x, jnp.zeros((8, 2)), jnp.ones((8, 2)), axis=1, return_gate=True)
    chex.assert_tree_all_finite((y_mix, g_mix))
    chex.assert_trees_all_close(jnp.sum(g_mix, axis=1), jnp.full((2, 8), 8.0), rtol=F32)


def test_one_pass_variance_loses_accuracy_at_large_magnitude():
    # Why shifted is the default: at 1e4 the experiment code's E[x^2] - E[x]^2 cancels.
    x = _normal((2, 40, 8), seed=71, shift=1e4)
    delta, xi = jnp.zeros((8, 8)), jnp.full((8, 8), 2.0)
    exact = _paper_gate_float64(x, delta, xi, 8)
    err_two = np.max(np.abs(np.asarray(gaussian_gate(x, delta, xi, axis=1)) - exact))
    err_one = np.max(
        np.abs(np.asarray(gaussian_gate(x, delta, xi, axis=1, variance="one_pass")) - exact)
    )
    assert err_two < 1e-5 and err_one > 1e-2, (err_two, err_one)


@pytest.mark.parametrize("form", ["paper", "mixture"])
def test_zero_variance_slices_are_finite(form):
    x = jnp.ones((2, 6, 3)) * jnp.array([0.0, 5.0, -1e4])[None, None, :]
    if form == "paper":
        y, gate = gaam(x, jnp.zeros((3, 3)), jnp.full((3, 3), 2.0), axis=1, return_gate=True)
        chex.assert_trees_all_close(gate, jnp.ones_like(gate))  # z = 0 everywhere
    else:
        y, gate = mixture_gaam(x, jnp.zeros((3, 2)), jnp.ones((3, 2)), axis=1, return_gate=True)
        chex.assert_trees_all_close(gate, jnp.full_like(gate, 0.5))  # uniform over 2 positions
    chex.assert_tree_all_finite((y, gate))


def test_single_element_heads_are_finite():
    # The package's unbiased variance of one element is NaN; here it is 0 (+eps).
    x = _normal((2, 4), seed=80)
    y = mixture_gaam(x, jnp.zeros((4, 1)), jnp.ones((4, 1)), axis=1)
    chex.assert_trees_all_close(y, x)  # one position per head: the normalised gate is 1


# ----------------------------------------------------------------------------------------------
# Invalid arguments
# ----------------------------------------------------------------------------------------------


def _gate(x_shape=(2, 6, 4), p_shape=(1, 4), xi_shape=None, dtype=jnp.float32, **kw):
    xi_shape = p_shape if xi_shape is None else xi_shape
    return lambda: F.gaussian_gate(
        jnp.ones(x_shape, dtype), jnp.zeros(p_shape), jnp.ones(xi_shape), **kw
    )


def _mix(p_shape=(1, 2), c_shape=None, **kw):
    c_shape = p_shape if c_shape is None else c_shape
    return lambda: F.mixture_gate(jnp.ones((2, 3)), jnp.zeros(p_shape), jnp.ones(c_shape), **kw)


@pytest.mark.parametrize(
    "call,message",
    [
        (_gate(p_shape=(4, 4)), "6 is not divisible by 4"),
        (_gate(p_shape=(2, 3)), r"\[2, 4\]"),
        (_gate(p_shape=(2, 4), xi_shape=(2, 3)), "xi"),
        (_gate(p_shape=(4,)), "delta must have shape"),
        (_gate(axis=3), "axis=3 is out of range"),
        (_gate(axis=-1), "must differ"),
        (_gate(axis=1.0), "axis must be an int"),
        (_gate(dtype=jnp.int32), "floating dtype"),
        (_gate(mask=jnp.ones((2, 6, 4))), "mask must be boolean"),
        (_gate(mask=jnp.ones((3, 6, 1), bool)), "does not broadcast"),
        (_gate(variance="welford"), "variance must be"),
        (_mix(p_shape=(4, 1), axis=1), "smaller than num_heads=4"),
        (_mix(c_shape=(1, 3), axis=1), "num_gaussians"),
        (_mix(axis=1, eps=0.0), "eps must be positive"),
        (lambda: F.head_sizes(5, 0, even=False), "num_heads must be a positive int"),
    ],
)
def test_invalid_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
