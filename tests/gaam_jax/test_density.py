"""The density gate (docs/design.md section 15): functional core, Linen and NNX layers.

The reference is a float64 numpy transcription of the authors' formulas (``_ref_gate``), written
from the description, not from the library; its gradients are central finite differences in
float64 (step 1e-5: truncation ~1e-10 and rounding ~1e-11 relative, far below the float32
tolerances they are compared with).
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from arrays import bernoulli, init, normal, random_params
from flax import nnx
from flax.traverse_util import flatten_dict
from tolerances import BF16, F32, F32_PARAM_GRAD, scaled_atol

from gaam_jax import functional as F
from gaam_jax import importance, sharding
from gaam_jax.density import DensityGate, DensityResidualGate
from gaam_jax.nnx import density as nnx_density

_STATIC = ("axis", "return_gate")
gate_fn = jax.jit(F.density_gate, static_argnames=("axis",))
apply_fn = jax.jit(F.density_mean_gate, static_argnames=_STATIC)

# The authors' initial width: sigma = softplus(log 0.5) + 1e-3 = log(1.5) + 1e-3.
SIGMA_AT_INIT = math.log(1.5) + 1e-3


# ----------------------------------------------------------------------------------------------
# Float64 reference, from the formulas
# ----------------------------------------------------------------------------------------------


def _ref_gate(x, mean_offsets, log_sigma, axis, mask=None):
    """Float64 density gate: mean over k of N(z_k) / sigma_k, statistics over valid elements."""
    x = np.asarray(x, np.float64)
    m = np.asarray(mean_offsets, np.float64)
    ls = np.asarray(log_sigma, np.float64)
    valid = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
    xv = np.where(valid, x, 0.0)
    count = np.maximum(valid.sum(axis=axis, keepdims=True), 1)
    mean = xv.sum(axis=axis, keepdims=True) / count
    var = (np.where(valid, xv - mean, 0.0) ** 2).sum(axis=axis, keepdims=True) / count
    std = np.sqrt(np.maximum(var, 1e-6))
    sigma = np.logaddexp(0.0, ls) + 1e-3  # softplus
    log_g = np.stack(
        [
            -0.5 * ((xv - (mean + m[k])) / (std * sigma[k] + 1e-8)) ** 2
            - np.log(sigma[k])
            - 0.5 * np.log(2 * np.pi)
            for k in range(m.shape[0])
        ],
        axis=-1,
    )
    gate = np.exp(np.logaddexp.reduce(log_g, axis=-1) - np.log(m.shape[0]))
    return np.where(valid, gate, 1.0)


def _ref_residual(x, params, time_axis, channel_axis, mask=None):
    """Float64 ``x * (1 + alpha * gate(Conv1x1(x)))``; masked steps returned as they are."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(params["proj"]["kernel"], np.float64)[:, 0]
    bias = float(params["proj"]["bias"][0])
    xs = x if mask is None else np.where(mask, x, 0.0)
    a = np.expand_dims(np.tensordot(np.moveaxis(xs, channel_axis, -1), kernel, 1), channel_axis)
    a = a + bias
    g = params["gate"]
    gate = _ref_gate(a, g["mean_offsets"], g["log_sigma"], time_axis, mask)
    y = xs * (1.0 + float(params["alpha"]) * gate)
    return (y if mask is None else np.where(mask, y, x)), gate


def _fd_grad(f, arg):
    """Central finite-difference gradient of the scalar float64 ``f`` at ``arg``."""
    arg = np.asarray(arg, np.float64)
    grad = np.zeros_like(arg)
    h = 1e-5
    for i in np.ndindex(arg.shape):
        e = np.zeros_like(arg)
        e[i] = h
        grad[i] = (f(arg + e) - f(arg - e)) / (2 * h)
    return grad


def _close(actual, expected, tol):
    expected = np.asarray(expected, np.float64)
    chex.assert_trees_all_close(
        np.asarray(actual, np.float64), expected, atol=scaled_atol(expected, tol), rtol=0
    )


def _params(k, seed):
    """Offsets and width parameters around the authors' init, spread enough to differ."""
    m = normal((k,), seed=seed, scale=0.3)
    ls = normal((k,), seed=seed + 1, scale=0.5, shift=math.log(0.5))
    return m, ls


# ----------------------------------------------------------------------------------------------
# Functional core against the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,axis,k", [((4, 16, 6), 1, 4), ((3, 10), -1, 1), ((5, 2, 7), 0, 3), ((2, 9, 3), -2, 8)]
)
def test_gate_and_output_match_float64_reference(shape, axis, k):
    x = normal(shape, seed=1, scale=2.0, shift=0.5)
    m, ls = _params(k, seed=2)
    y, gate = apply_fn(x, m, ls, axis=axis, return_gate=True)
    expected = _ref_gate(x, m, ls, axis)
    assert gate.dtype == jnp.float32 and y.dtype == jnp.float32
    # float32 has ~20 operations of rounding here (see tolerances.F32).
    _close(gate, expected, F32)
    _close(y, np.asarray(x, np.float64) * expected, F32)
    chex.assert_trees_all_equal(gate_fn(x, m, ls, axis=axis), gate)


def test_gate_at_init_is_the_mean_of_normalised_densities():
    # At init (offsets 0, sigma 0.4065) every Gaussian is the same: the gate is one normalised
    # density N(u; 0, sigma^2) of the standardised input u, peaking at 1 / (sigma sqrt(2 pi)).
    x = jnp.array([[-1.0, 0.0, 1.0]])  # mean 0, population std sqrt(2/3)
    k = 4
    m, ls = jnp.zeros((k,)), jnp.full((k,), math.log(0.5))
    gate = gate_fn(x, m, ls, axis=1)
    u = np.array([-1.0, 0.0, 1.0]) / math.sqrt(2.0 / 3.0)
    width = math.sqrt(2.0 / 3.0) * SIGMA_AT_INIT + 1e-8
    expected = np.exp(-0.5 * (u * math.sqrt(2.0 / 3.0) / width) ** 2) / (
        SIGMA_AT_INIT * math.sqrt(2 * math.pi)
    )
    _close(gate[0], expected, F32)
    assert float(gate[0, 1]) == pytest.approx(1 / (SIGMA_AT_INIT * math.sqrt(2 * math.pi)), 1e-6)


def test_gradients_match_float64_finite_differences():
    x = normal((2, 8, 3), seed=3, scale=1.5, shift=-0.3)
    m, ls = _params(3, seed=4)
    w = np.asarray(normal(x.shape, seed=5), np.float64)  # a generic cotangent

    def loss(x, m, ls):
        return jnp.sum(F.density_mean_gate(x, m, ls, axis=1) * w.astype(np.float32))

    gx, gm, gls = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, m, ls)
    x64, m64, ls64 = (np.asarray(a, np.float64) for a in (x, m, ls))

    def ref_loss(x, m, ls):
        return float(np.sum(x * _ref_gate(x, m, ls, 1) * w))

    # The input gradient is elementwise plus the statistics' terms: F32 of its scale. The
    # parameter gradients sum over every element with cancellation (tolerances.F32_PARAM_GRAD).
    _close(gx, _fd_grad(lambda a: ref_loss(a, m64, ls64), x64), F32)
    _close(gm, _fd_grad(lambda a: ref_loss(x64, a, ls64), m64), F32_PARAM_GRAD)
    _close(gls, _fd_grad(lambda a: ref_loss(x64, m64, a), ls64), F32_PARAM_GRAD)


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------


def test_masked_values_do_not_reach_valid_outputs_or_gradients():
    x = normal((3, 12, 4), seed=10)
    mask = bernoulli((3, 12, 1), seed=11, p=0.7)  # broadcast over features
    m, ls = _params(3, seed=12)
    garbage = jnp.where(mask, x, normal(x.shape, seed=13, scale=1e6))
    garbage_nan = jnp.where(mask, x, jnp.nan)
    f = jax.jit(lambda x, m, ls: F.density_mean_gate(x, m, ls, axis=1, mask=mask))
    y = f(x, m, ls)
    _close(y, np.where(mask, np.asarray(x, np.float64) * _ref_gate(x, m, ls, 1, mask), x), F32)
    for other in (garbage, garbage_nan):
        y2 = f(other, m, ls)
        chex.assert_trees_all_close(jnp.where(mask, y, 0), jnp.where(mask, y2, 0))
        chex.assert_trees_all_equal(jnp.where(mask, 0, y2), jnp.where(mask, 0, other))

    def loss(x, m, ls):
        return jnp.sum(jnp.where(mask, f(x, m, ls), 0.0) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    g1, g2 = grad(x, m, ls), grad(garbage_nan, m, ls)
    chex.assert_tree_all_finite(g2)
    chex.assert_trees_all_close(g1, g2)
    assert float(jnp.max(jnp.abs(jnp.where(mask, 0.0, g2[0])))) == 0.0


def test_mask_statistics_equal_the_valid_part_alone():
    x = normal((2, 10, 3), seed=20)
    mask = jnp.asarray(np.arange(10)[None, :, None] < 6)
    m, ls = _params(2, seed=21)
    y, gate = apply_fn(x, m, ls, axis=1, mask=mask, return_gate=True)
    y_valid, gate_valid = apply_fn(x[:, :6], m, ls, axis=1, return_gate=True)
    chex.assert_trees_all_close(gate[:, :6], gate_valid, rtol=F32, atol=1e-7)
    chex.assert_trees_all_close(y[:, :6], y_valid, rtol=F32, atol=1e-7)
    chex.assert_trees_all_equal(gate[:, 6:], jnp.ones((2, 4, 3)))
    chex.assert_trees_all_equal(y[:, 6:], x[:, 6:])


def test_zero_variance_and_fully_masked_slices_have_finite_values_and_gradients():
    # Constant slices (var = 0: the 1e-6 floor applies) and a sample with every element masked.
    x = jnp.ones((2, 6, 3)) * jnp.array([0.0, 5.0, -1e4])[None, None, :]
    mask = jnp.asarray(np.arange(2)[:, None, None] == 0)  # sample 1 fully masked
    m, ls = _params(3, seed=30)

    def loss(x, m, ls):
        return jnp.sum(F.density_mean_gate(x, m, ls, axis=1, mask=mask) ** 2)

    y, gate = apply_fn(x, m, ls, axis=1, mask=mask, return_gate=True)
    chex.assert_tree_all_finite((y, gate))
    chex.assert_trees_all_equal(y[1], x[1])
    _close(gate, _ref_gate(x, m, ls, 1, mask), F32)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    chex.assert_tree_all_finite(grad(x, m, ls))
    # Far offsets and the narrowest widths: |z| ~ 1e7, every density underflows to 0.
    far_m, narrow_ls = jnp.array([5.0, -3.0, 0.5]), jnp.full((3,), -20.0)
    far_gate = gate_fn(x, far_m, narrow_ls, axis=1, mask=mask)
    chex.assert_trees_all_equal(far_gate, jnp.where(mask, 0.0, jnp.ones_like(x)))
    chex.assert_tree_all_finite(grad(x, far_m, narrow_ls))


# ----------------------------------------------------------------------------------------------
# Dtypes and arguments
# ----------------------------------------------------------------------------------------------


def test_bfloat16_input_gives_bfloat16_output_and_float32_gate():
    x = normal((4, 24, 16), seed=60, scale=3.0).astype(jnp.bfloat16)
    m, ls = _params(4, seed=61)
    yb, gate_b = apply_fn(x, m, ls, axis=1, return_gate=True)
    assert yb.dtype == jnp.bfloat16 and gate_b.dtype == jnp.float32
    y32, gate32 = apply_fn(x.astype(jnp.float32), m, ls, axis=1, return_gate=True)
    chex.assert_trees_all_equal(gate_b, gate32)  # the gate sees the same rounded input
    # One bfloat16 rounding of the output (tolerances.BF16).
    _close(yb.astype(jnp.float32), y32, BF16)


def _call(x_shape=(2, 6, 4), m_shape=(3,), ls_shape=None, dtype=jnp.float32, **kw):
    ls_shape = m_shape if ls_shape is None else ls_shape
    kw.setdefault("axis", 1)
    return lambda: F.density_gate(
        jnp.ones(x_shape, dtype), jnp.zeros(m_shape), jnp.zeros(ls_shape), **kw
    )


@pytest.mark.parametrize(
    "call,message",
    [
        (_call(m_shape=(3, 1)), r"must both have shape \[num_gaussians\]"),
        (_call(m_shape=(3,), ls_shape=(2,)), r"\(3,\) and \(2,\)"),
        (_call(m_shape=(0,)), "num_gaussians >= 1"),
        (_call(axis=3), "axis=3 is out of range"),
        (_call(axis=1.0), "axis must be an int"),
        (_call(dtype=jnp.int32), "floating dtype"),
        (_call(mask=jnp.ones((2, 6, 4))), "mask must be boolean"),
        (_call(mask=jnp.ones((3, 6, 1), bool)), "does not broadcast"),
        (lambda: DensityGate(num_gaussians=0), "num_gaussians must be a positive int"),
        (lambda: DensityResidualGate(num_gaussians=-1), "num_gaussians must be a positive int"),
        (
            lambda: DensityResidualGate(time_axis=2, channel_axis=-1).init(
                jax.random.key(0), jnp.ones((2, 5, 3))
            ),
            "must differ",
        ),
        (
            lambda: DensityResidualGate().init(
                jax.random.key(0), jnp.ones((2, 5, 3)), jnp.ones((2, 5, 3), bool)
            ),
            "has size 3 on the channel axis",
        ),
        (
            lambda: DensityResidualGate().init(
                jax.random.key(0), jnp.ones((2, 5, 3)), jnp.ones((2, 4), bool)
            ),
            "does not broadcast",
        ),
        (
            lambda: DensityResidualGate().init(jax.random.key(0), jnp.ones((5,))),
            "time and a channel axis",
        ),
        (lambda: nnx_density.DensityGate(0, rngs=nnx.Rngs(0)), "num_gaussians must be"),
        (
            lambda: nnx_density.DensityResidualGate(4, rngs=nnx.Rngs(0))(jnp.ones((2, 5, 3))),
            "num_channels=4",
        ),
    ],
)
def test_invalid_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------------------------
# Linen layers
# ----------------------------------------------------------------------------------------------


def test_initial_values_are_the_authors():
    x = normal((2, 7, 5), seed=40)
    block = DensityResidualGate()
    p = init(block, 0, x)["params"]
    chex.assert_trees_all_equal(p["gate"]["mean_offsets"], jnp.zeros(4))
    chex.assert_trees_all_close(p["gate"]["log_sigma"], jnp.full(4, math.log(0.5)))
    np.testing.assert_allclose(jax.nn.softplus(p["gate"]["log_sigma"]) + 1e-3, SIGMA_AT_INIT)
    assert SIGMA_AT_INIT == pytest.approx(0.4065, abs=1e-4)
    assert p["alpha"].shape == () and float(p["alpha"]) == pytest.approx(0.05)
    assert p["proj"]["kernel"].shape == (5, 1) and p["proj"]["bias"].shape == (1,)
    bound = 1 / math.sqrt(5)  # PyTorch's Conv1d(5, 1, 1) default
    assert float(jnp.max(jnp.abs(p["proj"]["kernel"]))) <= bound
    assert float(jnp.max(jnp.abs(p["proj"]["bias"]))) <= bound
    gate_p = init(DensityGate(num_gaussians=3), 0, x)["params"]
    assert set(gate_p) == {"mean_offsets", "log_sigma"} and gate_p["log_sigma"].shape == (3,)


def test_residual_gate_at_init_is_close_to_identity():
    x = normal((3, 20, 8), seed=41, scale=2.0)
    block = DensityResidualGate()
    variables = init(block, 1, x)
    y, gate = jax.jit(lambda v, x: block.apply(v, x, return_gate=True))(variables, x)
    assert gate.shape == (3, 20, 1)
    chex.assert_trees_all_close(y, x * (1 + 0.05 * gate), rtol=F32, atol=1e-7)
    # The gate is at most 1 / (sigma sqrt(2 pi)) = 0.98, so y is within 5% of x.
    assert float(jnp.max(gate)) <= 1 / (SIGMA_AT_INIT * math.sqrt(2 * math.pi)) + 1e-6
    assert float(jnp.max(jnp.abs(y - x) - 0.05 * jnp.abs(x))) <= 1e-6


@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
def test_residual_gate_matches_float64_reference(layout):
    block = DensityResidualGate(num_gaussians=3)
    x = normal((2, 11, 6), seed=42, scale=1.5)  # [B, T, C]
    params = random_params(block, 43, x, scale=0.5)
    params["alpha"] = jnp.asarray(0.3)
    expected_y, expected_gate = _ref_residual(x, params, 1, 2)
    if layout == "channels_first":  # the PyTorch layout [B, C, T]
        block = DensityResidualGate(num_gaussians=3, time_axis=-1, channel_axis=-2)
        x = jnp.swapaxes(x, 1, 2)
        expected_y, expected_gate = (np.swapaxes(a, 1, 2) for a in (expected_y, expected_gate))
    y, gate = jax.jit(lambda p, x: block.apply({"params": p}, x, return_gate=True))(params, x)
    _close(gate, expected_gate, F32)
    _close(y, expected_y, F32)


def test_residual_gate_masks_whole_time_steps():
    block = DensityResidualGate(num_gaussians=2)
    x = normal((2, 10, 4), seed=44)
    params = random_params(block, 45, x, scale=0.5)
    lengths = np.array([10, 6])
    mask = jnp.asarray(np.arange(10)[None, :] < lengths[:, None])  # [B, T]
    valid = np.asarray(mask)[..., None]  # [B, T, 1]
    garbage = jnp.where(valid, x, jnp.nan)
    f = jax.jit(lambda p, x, mask: block.apply({"params": p}, x, mask, return_gate=True))
    y, gate = f(params, garbage, mask)
    expected_y, expected_gate = _ref_residual(np.asarray(x), params, 1, 2, valid)
    _close(jnp.where(valid, y, 0), np.where(valid, expected_y, 0), F32)
    _close(gate, expected_gate, F32)
    # Masked steps pass through unchanged (NaN included), and a [B, T, 1] mask means the same.
    chex.assert_trees_all_equal(y[1, 6:], garbage[1, 6:])
    chex.assert_trees_all_equal(f(params, garbage, mask[..., None]), (y, gate))
    # The valid part equals the unpadded sequence alone.
    y_short, gate_short = f(params, x[1:, :6], None)
    chex.assert_trees_all_close((y[1:, :6], gate[1:, :6]), (y_short, gate_short), atol=1e-6)

    def loss(p, x):
        return jnp.sum(jnp.where(valid, block.apply({"params": p}, x, mask), 0.0) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    g_clean, g_nan = grad(params, jnp.where(valid, x, 0.0)), grad(params, garbage)
    chex.assert_tree_all_finite(g_nan)
    chex.assert_trees_all_close(g_clean, g_nan)


def test_residual_gate_bfloat16():
    block = DensityResidualGate()
    x = normal((2, 16, 8), seed=46, scale=2.0).astype(jnp.bfloat16)
    variables = init(block, 2, x)
    f = jax.jit(lambda v, x: block.apply(v, x, return_gate=True))
    yb, gate_b = f(variables, x)
    assert yb.dtype == jnp.bfloat16 and gate_b.dtype == jnp.float32
    y32, gate32 = f(variables, x.astype(jnp.float32))
    chex.assert_trees_all_equal(gate_b, gate32)
    _close(yb.astype(jnp.float32), y32, BF16)


def test_gate_is_sown_and_found_by_importance():
    x = normal((2, 9, 5), seed=47)
    for module, path in (
        (DensityGate(axis=1), ("gate",)),
        (DensityResidualGate(), ("gate", "gate")),
    ):
        variables = init(module, 0, x)
        (y, gate), state = jax.jit(
            lambda v, x, module=module: module.apply(
                v, x, return_gate=True, mutable=["intermediates"]
            )
        )(variables, x)
        sown = flatten_dict(state["intermediates"])
        assert list(sown) == [path]
        chex.assert_trees_all_equal(sown[path][0], gate, importance.find_gate(state))


def test_logical_axes_of_the_parameters():
    x = jax.ShapeDtypeStruct((2, 9, 5), jnp.float32)
    axes = sharding.param_logical_axes(sharding.abstract_params(DensityResidualGate(), x))
    assert flatten_dict(axes) == {
        ("proj", "kernel"): ("embed", None),
        ("proj", "bias"): (None,),
        ("alpha",): (),
        ("gate", "mean_offsets"): (None,),
        ("gate", "log_sigma"): (None,),
    }
    # init itself returns plain arrays (sharding.AnnotatedInit).
    variables = jax.eval_shape(DensityGate().init, jax.random.key(0), x)
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(variables))


# ----------------------------------------------------------------------------------------------
# NNX layers: the same state, the same numbers
# ----------------------------------------------------------------------------------------------


def _nnx_params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _load(model, params):
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


@pytest.mark.parametrize("kind", ["gate", "residual"])
def test_nnx_equals_linen(kind):
    x = normal((2, 10, 4), seed=50, scale=1.5)
    mask = jnp.asarray(np.arange(10)[None, :] < np.array([[10], [7]]))  # [B, T]
    if kind == "gate":
        linen = DensityGate(num_gaussians=3, axis=1)
        model = nnx_density.DensityGate(3, rngs=nnx.Rngs(0), axis=1)
        mask = mask[..., None]  # the plain gate takes masks broadcastable to x
    else:
        linen = DensityResidualGate(num_gaussians=3)
        model = nnx_density.DensityResidualGate(4, 3, rngs=nnx.Rngs(0))
    # Same paths and shapes as Linen, and the authors' initial values where they are not random.
    abstract = jax.eval_shape(linen.init, jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, _nnx_params(model)) == jax.tree.map(jnp.shape, abstract)
    nnx_init = _nnx_params(model)
    if kind == "residual":
        assert float(nnx_init["alpha"]) == pytest.approx(0.05)
        nnx_init = nnx_init["gate"]
    chex.assert_trees_all_equal(
        nnx_init, {"mean_offsets": jnp.zeros(3), "log_sigma": jnp.full(3, math.log(0.5))}
    )

    params = random_params(linen, 51, x, scale=0.5)
    _load(model, params)
    w = normal(x.shape, seed=52)

    def linen_loss(p, x):
        y, gate = linen.apply({"params": p}, x, mask, return_gate=True)
        return jnp.sum(y * w) + jnp.sum(gate), (y, gate)

    (_, (y, gate)), grads = jax.jit(jax.value_and_grad(linen_loss, argnums=(0, 1), has_aux=True))(
        params, x
    )

    # nnx.jit / nnx.grad on the module itself.
    def nnx_loss(model, x):
        y, gate = model(x, mask, return_gate=True)
        return jnp.sum(y * w) + jnp.sum(gate), (y, gate)

    step = nnx.jit(nnx.value_and_grad(nnx_loss, argnums=(0, 1), has_aux=True))
    (_, (y_n, gate_n)), (g_model, g_x) = step(model, x)
    _close(y_n, y, F32)
    _close(gate_n, gate, F32)
    chex.assert_trees_all_close(nnx.to_pure_dict(g_model), grads[0], atol=1e-6, rtol=F32)
    _close(g_x, grads[1], F32)
    # The gate is kept as an nnx.Intermediate (the inner gate's, for the residual).
    holder = model if kind == "gate" else model.gate
    chex.assert_trees_all_equal(holder.gate.get_value(), gate_n)
    assert isinstance(holder.gate, nnx.Intermediate)

    # Plain jax.jit through nnx.split / nnx.merge (the rest: the stored gate).
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)

    def pure_loss(state, x):
        return nnx_loss(nnx.merge(graphdef, state, rest), x)

    (_, (y_j, gate_j)), (g_state, g_xj) = jax.jit(
        jax.value_and_grad(pure_loss, argnums=(0, 1), has_aux=True)
    )(state, x)
    _close(y_j, y, F32)
    _close(gate_j, gate, F32)
    chex.assert_trees_all_close(nnx.to_pure_dict(g_state), grads[0], atol=1e-6, rtol=F32)
    _close(g_xj, grads[1], F32)


def test_nnx_sharding_metadata():
    model = nnx_density.DensityResidualGate(5, rngs=nnx.Rngs(0))
    specs = flatten_dict(nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param))))
    P = jax.sharding.PartitionSpec
    assert specs == {
        ("proj", "kernel"): P("embed", None),
        ("proj", "bias"): P(None),
        ("alpha",): P(),
        ("gate", "mean_offsets"): P(None),
        ("gate", "log_sigma"): P(None),
    }
    assert model.gate.log_sigma.get_metadata()["out_sharding"] == (None,)
