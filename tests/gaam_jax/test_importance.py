"""The Importance Factor: streaming accumulation, the formula, rankings, the heatmap."""

import struct

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from arrays import init, normal, uniform

from gaam_jax import GaussianAdaptiveTransformer, importance

GATES = uniform((23, 6, 10))  # 23 samples of [N=6, d=10]


def test_streaming_mean_equals_mean_over_the_concatenated_set():
    update = jax.jit(importance.update)
    state = importance.init_state((6, 10))
    for start in range(0, 23, 8):  # batches of 8, 8 and a smaller last batch of 7
        state = update(state, GATES[start : start + 8])
    chex.assert_trees_all_close(importance.mean_gate(state), jnp.mean(GATES, axis=0), rtol=1e-6)
    chex.assert_trees_all_close(
        importance.importance_factor(importance.mean_gate(state)),
        importance.importance_factor(jnp.mean(GATES, axis=0)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_padded_samples_are_not_counted():
    # An evaluation batch padded from 7 to 8 samples: the padding must not count.
    padded = jnp.concatenate([GATES[16:], jnp.full((1, 6, 10), 100.0)])
    valid = jnp.arange(8) < 7
    state = importance.update(
        importance.update(importance.init_state((6, 10)), GATES[:16]), padded, valid
    )
    chex.assert_trees_all_close(importance.mean_gate(state), jnp.mean(GATES, axis=0), rtol=1e-6)
    # Per-element masks work too.
    elem = jnp.ones((23, 6, 10), bool).at[:, 0, 0].set(False)
    state = importance.update(importance.init_state((6, 10)), GATES, elem)
    assert float(state.count[0, 0]) == 0.0 and float(state.count[1, 1]) == 23.0


def test_importance_factor_formula_on_a_known_map():
    da = jnp.array([[0.5, 1.0], [0.75, 0.5], [0.625, 0.875]])
    expected = jnp.array([[0.0, 1.0], [0.5, 0.0], [0.25, 0.75]])
    chex.assert_trees_all_close(importance.importance_factor(da), expected)
    chex.assert_trees_all_equal(importance.importance_factor(jnp.ones((2, 3))), jnp.zeros((2, 3)))
    share = importance.layer_contribution(da)
    chex.assert_trees_all_close(share, 100 * jnp.array([1.5, 1.25, 1.5]) / 4.25, rtol=1e-6)
    np.testing.assert_array_equal(
        importance.rank_layers(importance.importance_factor(da)), [0, 2, 1]
    )


def test_heatmap_is_a_png_of_the_stated_size(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    path = importance.plot_heatmap(
        importance.importance_factor(jnp.mean(GATES, 0)),
        tmp_path / "if.png",
        figsize=(8, 3),
        dpi=50,
    )
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (400, 150)
    assert matplotlib.get_backend() == backend  # the caller's backend is left as it was
    with pytest.raises(ValueError, match="layers, features"):
        importance.plot_heatmap(jnp.ones(3), tmp_path / "bad.png")


def test_gaussian_parameter_summary_and_find_gate():
    x = normal((2, 8, 16), seed=1)
    model = GaussianAdaptiveTransformer(num_classes=2, num_heads=4, conv_features=8)
    params = init(model, 2, x)["params"]
    params["attention"]["delta"] = params["attention"]["delta"].at[0, 0].set(-0.06)
    params["attention"]["xi"] = params["attention"]["xi"].at[1, 2].set(2.06)
    summary = importance.gaussian_parameter_summary(params)
    assert set(summary) == {"attention"}
    assert summary["attention"]["mean_offset"] == pytest.approx((-0.06, 0.0))
    assert summary["attention"]["scaled_variance"] == pytest.approx((2.0, 2.06))
    mixture = GaussianAdaptiveTransformer(
        num_classes=2, front="mixture", num_heads=4, conv_features=8
    )
    mp = init(mixture, 3, x)["params"]
    ms = importance.gaussian_parameter_summary(mp)
    assert set(ms) == {"attention/layer_0"} and set(ms["attention/layer_0"]) == {
        "mean_offset",
        "scale",
    }
    with pytest.raises(ValueError, match="exactly one sown gate, found 0"):
        importance.find_gate({"intermediates": {}})
