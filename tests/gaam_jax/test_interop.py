"""Loading the authors' PyTorch GaussianBlock weights (parity itself is in test_parity.py)."""

import numpy as np
import pytest

from gaam_jax import interop


def _state_dict(prefix="", heads=(2, 3), k=(4, 1)):
    sd = {}
    for i, (h, kk) in enumerate(zip(heads, k, strict=True)):
        for j in range(h):
            sd[f"{prefix}layers.{i}.attention_heads.{j}.mean_offsets"] = np.full(
                kk, 10 * i + j, np.float32
            )
            sd[f"{prefix}layers.{i}.attention_heads.{j}.c"] = np.full(kk, -(10 * i + j), np.float32)
    return sd


def test_heads_are_stacked_in_order():
    v = interop.gaussian_block_variables_from_torch(_state_dict(), (1, 2), (2, 3), (4, 1))
    p = v["params"]
    assert p["layer_0"]["mean_offsets"].shape == (2, 4)
    np.testing.assert_array_equal(p["layer_1"]["mean_offsets"][:, 0], [10, 11, 12])
    np.testing.assert_array_equal(p["layer_1"]["c"][:, 0], [-10, -11, -12])


def test_prefix_selects_the_block_inside_a_model():
    sd = _state_dict(prefix="daam.") | {"fc.weight": np.zeros((4, 3))}
    v = interop.gaussian_block_variables_from_torch(sd, (1, 2), (2, 3), (4, 1), prefix="daam.")
    assert set(v["params"]) == {"layer_0", "layer_1"}


@pytest.mark.parametrize(
    "sd,args,message",
    [
        (_state_dict(), ((1,), (2, 3), (4, 1)), "one entry per layer"),
        (_state_dict(), ((1, 2), (2, 4), (4, 1)), "no entry 'layers.1.attention_heads.3"),
        (_state_dict(), ((1, 2), (2, 3), (4, 2)), r"shape \(1,\), expected \(2,\)"),
        (_state_dict(), ((1,), (2,), (4,)), "does not use"),
        (_state_dict(), ((1, 2), (2, 0), (4, 1)), r"num_heads\[1\]"),
    ],
)
def test_mismatched_state_dicts_raise(sd, args, message):
    with pytest.raises(ValueError, match=message):
        interop.gaussian_block_variables_from_torch(sd, *args)
