"""WavLM encoder against transformers 5.24 ``WavLMModel`` hidden states (tiny perturbed fixtures).

Fixtures: tests/fixtures/encoders/wavlm/{stable,base,odd}, written by
tests/reference/make_wavlm_fixtures.py (see there for what each variant covers).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import shutil
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gaam_jax import sharding
from gaam_jax.encoders import EncoderOptions, checkpoint, pooling
from gaam_jax.encoders.wavlm import (
    MODEL_TYPE,
    WavLMConfig,
    WavLMEncoder,
    params_from_hf,
    relative_position_buckets,
)

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "encoders" / "wavlm"
VARIANTS = ("stable", "base", "odd")

# Two float32 implementations of a ~10-op-deep network (3 convs, norms, 1-2 attention layers)
# agree to ~1e-6 of scale (measured: <= 7.3e-7); the contract's bound 1e-4 leaves ample margin
# for other CPUs and XLA versions while any missing piece (all params are perturbed) gives O(1).
F32_BOUND = 1e-4
# bfloat16 keeps 8 mantissa bits (unit roundoff 3.9e-3); params, conv and matmul inputs are
# rounded at every layer and errors compound through 3 convs, 2 norms and the attention layers.
# Measured: <= 2.2e-2 of the layer's max |ref|; 5e-2 bounds it with margin, while a wrong
# computation gives errors of order 1.
BF16_BOUND = 5e-2


@functools.cache
def _load(variant: str) -> tuple[WavLMConfig, dict, dict]:
    folder = FIXTURES / variant
    config = WavLMConfig.from_hf(checkpoint.read_config(folder))
    params = params_from_hf(config, checkpoint.open_tensors(folder))
    io = dict(np.load(folder / "io.npz"))
    return config, params, io


@functools.cache
def _jitted(config: WavLMConfig, dtype: Any, final: bool, attention: str) -> Any:
    # One compile per config, dtype, flag, attention and shapes (eager would recompile the scan).
    # block 4 < frames: the blockwise path runs several query and key blocks, the last padded.
    options = EncoderOptions(attention=attention, block_size=4)
    return jax.jit(
        WavLMEncoder(config, dtype=dtype, final_norm_on_last_state=final, options=options).apply
    )


def _run(
    config: WavLMConfig,
    params: dict,
    input_values: np.ndarray,
    attention_mask: np.ndarray | None = None,
    dtype: Any = jnp.float32,
    final: bool = False,
    attention: str = "xla",
) -> np.ndarray:
    # The stacked layers are lazy host views (StackedTensor): read them into arrays.
    params = jax.tree.map(jnp.asarray, params)
    out = _jitted(config, dtype, final, attention)({"params": params}, input_values, attention_mask)
    assert out.dtype == jnp.float32
    return np.asarray(out)


def _rel_errors(got: np.ndarray, ref: np.ndarray) -> list[float]:
    """Max |got - ref| / max |ref| per layer (axis 1)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return [
        float(np.abs(got[:, i] - ref[:, i]).max() / np.abs(ref[:, i]).max())
        for i in range(ref.shape[1])
    ]


def _shapes(tree: dict) -> dict:
    return jax.tree_util.tree_map(lambda x: tuple(x.shape), tree)


def _assert_same_arrays(a: dict, b: dict) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Variants differ in norms and convs, not in how attention runs: blockwise on one of them.
@pytest.mark.parametrize(
    ("variant", "attention"), [(v, "xla") for v in VARIANTS] + [("odd", "blockwise")]
)
def test_hidden_states_match_transformers_float32(variant, attention):
    config, params, io = _load(variant)
    got = _run(config, params, io["input_values"], io["attention_mask"], attention=attention)
    assert got.shape == io["hidden_states"].shape
    errors = _rel_errors(got, io["hidden_states"])
    print(variant, attention, "float32 max rel error per layer:", errors)
    assert max(errors) <= F32_BOUND, errors


def test_hidden_states_without_attention_mask():
    config, params, io = _load("base")
    got = _run(config, params, io["input_values"])
    errors = _rel_errors(got, io["hidden_states_nomask"])
    assert max(errors) <= F32_BOUND, errors


def test_final_norm_on_last_state_is_transformers_4_last_state():
    config, params, io = _load("stable")
    got = _run(config, params, io["input_values"], io["attention_mask"], final=True)
    # transformers 5's last_hidden_state carries the final LayerNorm; hidden_states[-1] does not.
    last = io["last_hidden_state"][:, None]
    assert _rel_errors(got[:, -1:], last)[0] <= F32_BOUND
    assert max(_rel_errors(got[:, :-1], io["hidden_states"][:, :-1])) <= F32_BOUND
    # The config flag transformers reads (tie_last_hidden_states) does the same.
    tied = dataclasses.replace(config, tie_last_hidden_states=True)
    got_tied = _run(tied, params, io["input_values"], io["attention_mask"])
    np.testing.assert_array_equal(got_tied, got)


def test_final_norm_flag_is_a_no_op_without_stable_layer_norm():
    config, params, io = _load("odd")
    x, mask = io["input_values"], io["attention_mask"]
    np.testing.assert_array_equal(
        _run(config, params, x, mask, final=True), _run(config, params, x, mask)
    )


def test_pooling_defaults_to_the_frame_mask():
    config, params, io = _load("odd")
    x, mask = io["input_values"], io["attention_mask"]
    params = jax.tree.map(jnp.asarray, params)
    got = jax.jit(functools.partial(WavLMEncoder(config).apply, collect=pooling.mean))(
        {"params": params}, x, mask
    )
    # Mean over the real frames of each row (the second row is padded), as the layers emit it.
    states = _run(config, params, x, mask)
    frames = np.asarray(config.frame_lengths(mask.sum(-1)))
    assert frames[1] < states.shape[2]
    ref = np.stack([states[i, :, : frames[i]].mean(1) for i in range(len(frames))])
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ("stable", "base"))
def test_bfloat16_compute_error(variant):
    config, params, io = _load(variant)
    params16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    got = _run(config, params16, io["input_values"], io["attention_mask"], dtype=jnp.bfloat16)
    errors = _rel_errors(got, io["hidden_states"])
    print(variant, "bfloat16 max rel error per layer:", errors)
    assert max(errors) <= BF16_BOUND, errors


@pytest.mark.parametrize("variant", VARIANTS)
def test_init_tree_equals_params_from_hf_tree(variant):
    config, params, io = _load(variant)
    boxed = sharding.abstract_params(WavLMEncoder(config), io["input_values"], io["attention_mask"])
    assert _shapes(nn.unbox(boxed)) == _shapes(params)
    # Every parameter carries logical axis names for the sharding rules.
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.Partitioned) for x in leaves)
    names = nn.get_partition_spec(boxed)
    assert tuple(names["layers"]["q_proj"]["kernel"]) == ("stack", "embed", "heads")
    assert tuple(names["layers"]["intermediate_dense"]["bias"]) == ("stack", "mlp")
    assert tuple(names["rel_attn_embed"]) == (None, None)
    assert tuple(names["feature_extractor"]["conv_1"]["kernel"]) == (None, "conv_in", "conv_out")


def test_params_are_views_and_keep_bfloat16():
    folder = FIXTURES / "stable"
    config = WavLMConfig.from_hf(checkpoint.read_config(folder))
    tensors = {
        k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(folder / "model.safetensors").items()
    }
    params = params_from_hf(config, tensors)
    v = params["pos_conv"]["weight_v"]
    assert v.dtype == ml_dtypes.bfloat16
    assert np.shares_memory(
        v, tensors["encoder.pos_conv_embed.conv.parametrizations.weight.original1"]
    )
    # Layers are stacked lazily: each layer's part is still a view of its tensor.
    q = params["layers"]["q_proj"]["kernel"]
    assert q.shape == (config.num_hidden_layers, *q.parts[1].shape)
    assert q.dtype == ml_dtypes.bfloat16
    assert np.shares_memory(q.parts[1], tensors["encoder.layers.1.attention.q_proj.weight"])
    const = params["layers"]["gru_rel_pos_const"]
    assert np.shares_memory(const.parts[1], tensors["encoder.layers.1.attention.gru_rel_pos_const"])


def _rewrite(
    tmp_path: pathlib.Path, variant: str, rename, extra: dict | None = None
) -> pathlib.Path:
    """Copies a fixture folder with renamed (and extra) tensors."""
    src = FIXTURES / variant
    folder = tmp_path / variant
    folder.mkdir()
    shutil.copy(src / "config.json", folder / "config.json")
    tensors = {rename(k): v for k, v in load_file(src / "model.safetensors").items()}
    save_file({**tensors, **(extra or {})}, folder / "model.safetensors")
    return folder


def _params(folder: pathlib.Path) -> dict:
    config = WavLMConfig.from_hf(checkpoint.read_config(folder))
    return params_from_hf(config, checkpoint.open_tensors(folder))


def test_head_model_checkpoint(tmp_path):
    _, params, _ = _load("stable")
    heads = {
        "lm_head.weight": np.ones((5, 32), np.float32),
        "lm_head.bias": np.ones((5,), np.float32),
        "projector.weight": np.ones((4, 32), np.float32),
        "classifier.weight": np.ones((2, 4), np.float32),
        "wavlm.masked_spec_embed": np.ones((32,), np.float32),
        "wavlm.adapter.layers.0.conv.weight": np.ones((64, 32, 3), np.float32),
    }
    folder = _rewrite(tmp_path, "stable", lambda k: "wavlm." + k, heads)
    _assert_same_arrays(_params(folder), params)


def test_old_weight_norm_names(tmp_path):
    _, params, _ = _load("base")

    def rename(k: str) -> str:
        k = k.replace("parametrizations.weight.original0", "weight_g")
        return k.replace("parametrizations.weight.original1", "weight_v")

    folder = _rewrite(tmp_path, "base", rename)
    assert "encoder.pos_conv_embed.conv.weight_g" in checkpoint.open_tensors(folder)
    _assert_same_arrays(_params(folder), params)


def test_sharded_checkpoint(tmp_path):
    _, params, _ = _load("odd")
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(FIXTURES / "odd" / "config.json", folder / "config.json")
    tensors = load_file(FIXTURES / "odd" / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_same_arrays(_params(folder), params)


def test_transformers_4_and_minimal_configs():
    raw = checkpoint.read_config(FIXTURES / "stable")
    config = WavLMConfig.from_hf(raw)
    v4 = {k: v for k, v in raw.items() if k != "dtype"}
    v4.update(torch_dtype="float32", transformers_version="4.46.3")
    assert WavLMConfig.from_hf(v4) == config
    defaults = WavLMConfig()
    minimal = {
        k: v
        for k, v in raw.items()
        if not hasattr(defaults, k)
        or getattr(defaults, k) != (tuple(v) if isinstance(v, list) else v)
    }
    assert "layer_norm_eps" not in minimal  # left to the default
    assert WavLMConfig.from_hf(minimal) == config
    # The adapter runs after the encoder and changes last_hidden_state only, not hidden_states.
    assert WavLMConfig.from_hf({**raw, "add_adapter": True}) == config
    assert config.do_stable_layer_norm and config.conv_dim == (16, 16, 16)
    assert MODEL_TYPE == raw["model_type"]


@pytest.mark.parametrize(
    "change, match",
    [
        ({"hidden_act": "relu"}, "hidden_act='relu'"),
        ({"feat_extract_activation": "gelu_new"}, "feat_extract_activation='gelu_new'"),
        ({"feat_extract_norm": "batch"}, "feat_extract_norm='batch'"),
        ({"conv_kernel": [10, 3]}, "lengths"),
        ({"num_attention_heads": 5}, "num_attention_heads=5"),
        ({"num_conv_pos_embedding_groups": 3}, "num_conv_pos_embedding_groups=3"),
        ({"tie_last_hidden_states": True, "add_adapter": True}, "add_adapter"),
        ({"model_type": "wav2vec2"}, "model_type='wav2vec2'"),
    ],
)
def test_rejected_config_values(change, match):
    raw = {**checkpoint.read_config(FIXTURES / "base"), **change}
    with pytest.raises(ValueError, match=match) as info:
        WavLMConfig.from_hf(raw)
    assert "\n" not in str(info.value)


def test_missing_and_misshaped_tensors():
    config, _, _ = _load("base")
    tensors = dict(load_file(FIXTURES / "base" / "model.safetensors"))
    name = "encoder.layers.1.attention.k_proj.weight"
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        params_from_hf(config, {k: v for k, v in tensors.items() if k != name})
    with pytest.raises(ValueError, match=f"{name} has shape \\(32, 31\\)"):
        params_from_hf(config, {**tensors, name: tensors[name][:, :31]})
    g = "encoder.pos_conv_embed.conv.parametrizations.weight.original0"
    with pytest.raises(ValueError, match="original0 \\(or the old name weight_g\\)"):
        params_from_hf(config, {k: v for k, v in tensors.items() if k != g})


def test_relative_position_buckets_direction_and_clipping():
    buckets = relative_position_buckets(200, num_buckets=32, max_distance=64)
    # Keys after the query use the upper half of the table, before it the lower half.
    assert buckets[0, 1] == 16 + 1 and buckets[1, 0] == 1 and buckets[5, 5] == 0
    # Distances below num_buckets // 4 are exact; far ones clip to the last bucket of each half.
    np.testing.assert_array_equal(buckets[0, :8], np.r_[0, 17:24])
    assert buckets[0, 199] == 31 and buckets[199, 0] == 15
    assert np.all(np.diff(buckets[0, 1:]) >= 0)


def test_masked_samples_do_not_change_real_frames():
    config, params, io = _load("stable")
    noisy = io["input_values"].copy()
    noisy[1, 1100:] = np.random.default_rng(0).normal(size=500)
    a = _run(config, params, io["input_values"], io["attention_mask"])
    b = _run(config, params, noisy, io["attention_mask"])
    # Real frames only see real samples (the conv length formula), padded frames are zeroed
    # before the positional conv, and padded keys get no attention weight: nothing changes.
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(a).max())


@pytest.mark.parametrize("mesh_shape", (None, {"data": 2, "model": 4}))
def test_from_pretrained_entry_point(mesh_shape):
    from gaam_jax.encoders import from_pretrained
    from gaam_jax.sharding import make_mesh

    variant = "odd" if mesh_shape is None else "base"
    mesh = None if mesh_shape is None else make_mesh(mesh_shape, jax.devices()[:8])
    _, _, io = _load(variant)
    enc = from_pretrained(FIXTURES / variant, dtype=jnp.float32, mesh=mesh)
    got = enc.hidden_states(input_values=io["input_values"], attention_mask=io["attention_mask"])
    # Sharded: heads, mlp and conv channels split 4 ways, including the grouped weight-normed conv.
    assert max(_rel_errors(np.asarray(got), io["hidden_states"])) <= F32_BOUND
