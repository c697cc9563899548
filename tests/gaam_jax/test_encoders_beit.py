"""Parity of the Flax BEiT encoder with transformers 5.24 ``BeitModel`` hidden states.

Fixtures (tests/reference/make_beit_fixtures.py) are tiny random BEiT models with every
parameter perturbed, saved as head models (``beit.`` prefix): ``mim_relbias`` (BEiT-Large
style: per-layer relative position bias, layer scale, BeitForMaskedImageModeling) and
``cls_shared_abs`` (shared relative bias, absolute position embeddings, no layer scale,
BeitForImageClassification). Other layouts are derived from them in tmp_path.
"""

from __future__ import annotations

import functools
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from gaam_jax import sharding
from gaam_jax.encoders import EncoderOptions, beit, pooling
from gaam_jax.encoders.checkpoint import open_tensors, read_config

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "encoders" / "beit"
VARIANTS = ("mim_relbias", "cls_shared_abs")

# Two float32 implementations of a 2-layer transformer (different matmul/softmax/LayerNorm
# orders) agree to ~1e-7 of the scale (measured <= 1.6e-7); 1e-4 is the contract's bound.
F32 = 1e-4
# bfloat16 has an 8-bit mantissa (relative rounding 2^-9 ~ 2e-3) and each block rounds its
# matmul inputs and outputs several times; measured 3e-3 .. 4.3e-3 of the scale, bound 2e-2.
BF16 = 2e-2
VOCABULARY = {None, "vocab", "embed", "heads", "kv_heads", "mlp", "conv_in", "conv_out", "stack"}


def _io(variant: str) -> tuple[np.ndarray, np.ndarray]:
    io = np.load(FIXTURES / variant / "io.npz")
    return io["pixel_values"], io["hidden_states"]


def _load(folder: pathlib.Path) -> tuple[beit.BeitConfig, dict]:
    config = beit.BeitConfig.from_hf(read_config(folder))
    return config, beit.params_from_hf(config, open_tensors(folder))


def _relative_errors(out: np.ndarray, ref: np.ndarray) -> list[float]:
    """max |out - ref| / max |ref| per layer; arrays are [B, L + 1, T, D]."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return [
        float(np.abs(out[:, i] - ref[:, i]).max() / np.abs(ref[:, i]).max())
        for i in range(ref.shape[1])
    ]


@functools.cache
def _apply(config: beit.BeitConfig, dtype, attention: str):
    # One compile per config, dtype and attention (and input shapes): eagerly, every call
    # re-runs the scanned layers' compilation (~0.7 s each, more than the checks it feeds).
    # block 4 < T: the blockwise path runs several query and key blocks, the last one padded.
    options = EncoderOptions(attention=attention, block_size=4)
    return jax.jit(beit.BeitEncoder(config, dtype=dtype, options=options).apply)


def _run(
    config: beit.BeitConfig,
    params: dict,
    pixels: np.ndarray,
    dtype=jnp.float32,
    attention: str = "xla",
):
    # Stacked layers are lazy host views (StackedTensor): read them into arrays, dtype kept.
    params = jax.tree.map(np.asarray, params)
    return _apply(config, dtype, attention)({"params": params}, pixels)


def _write(folder: pathlib.Path, raw: dict, tensors: dict[str, np.ndarray], shards: int = 1):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(raw))
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _stored(variant: str) -> tuple[dict, dict[str, np.ndarray]]:
    folder = FIXTURES / variant
    tensors = {k: np.array(v) for k, v in open_tensors(folder).items()}
    return read_config(folder), tensors


def _base_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """BeitModel's layout: the ``beit.`` prefix stripped, head tensors dropped."""
    return {k.removeprefix("beit."): v for k, v in tensors.items() if k.startswith("beit.")}


def _module_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers 5 in-memory names (conversion_mapping's ViTModel + BeitModel renames)."""
    rules = [
        ("encoder.layer.", "layers."),
        ("attention.attention.query", "attention.q_proj"),
        ("attention.attention.key", "attention.k_proj"),
        ("attention.attention.value", "attention.v_proj"),
        ("attention.output.dense", "attention.o_proj"),
        ("intermediate.dense", "mlp.fc1"),
        ("output.dense", "mlp.fc2"),
        ("attention.attention.relative_position_bias", "relative_position_bias"),
        ("encoder.relative_position_bias", "shared_position_bias"),
    ]
    out = {}
    for name, value in tensors.items():
        for old, new in rules:
            name = name.replace(old, new)
        out[name] = value
    return out


def _transformers4_config(raw: dict) -> dict:
    """An older config.json: fields at their defaults omitted, torch_dtype, list image size."""
    raw = {k: v for k, v in raw.items() if beit._DEFAULTS.get(k, object()) != v}
    for key in ("dtype", "stage_names", "out_features", "out_indices", "transformers_version"):
        raw.pop(key, None)
    raw["torch_dtype"] = "float32"
    raw["image_size"] = [raw["image_size"]] * 2
    return raw


# Variants differ in what feeds the attention, not in how it runs: blockwise on one of them.
@pytest.mark.parametrize(
    ("variant", "attention"),
    [(v, "xla") for v in VARIANTS] + [("mim_relbias", "blockwise")],
)
def test_float32_parity_committed_head_layout(variant, attention):
    config, params = _load(FIXTURES / variant)
    pixels, ref = _io(variant)
    assert config.num_tokens > 4 and config.num_tokens % 4  # several blocks, the last padded
    out = np.asarray(_run(config, params, pixels, attention=attention))
    assert out.dtype == np.float32 and out.shape == ref.shape
    errors = _relative_errors(out, ref)
    print(f"{variant} {attention} float32 max relative error per layer: {errors}")
    assert max(errors) <= F32, errors


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", ["base", "base_sharded", "module_names", "transformers4"])
def test_float32_parity_derived_layouts(variant, layout, tmp_path):
    raw, tensors = _stored(variant)
    if layout in ("base", "base_sharded"):
        tensors = _base_names(tensors)
        assert "embeddings.cls_token" in tensors and not any("lm_head" in k for k in tensors)
    elif layout == "module_names":
        tensors = _module_names(_base_names(tensors))
        assert "layers.0.attention.k_proj.weight" in tensors
    else:
        raw = _transformers4_config(raw)
    _write(tmp_path / "m", raw, tensors, shards=3 if layout == "base_sharded" else 1)
    config, params = _load(tmp_path / "m")
    assert config == beit.BeitConfig.from_hf(read_config(FIXTURES / variant))
    pixels, ref = _io(variant)
    errors = _relative_errors(_run(config, params, pixels), ref)
    assert max(errors) <= F32, (layout, errors)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_compute(variant):
    config, params = _load(FIXTURES / variant)
    # As the entry point does: floating params cast to the compute dtype.
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    pixels, ref = _io(variant)
    out = _run(config, params, pixels, dtype=jnp.bfloat16)
    assert out.dtype == jnp.float32
    errors = _relative_errors(out, ref)
    print(f"{variant} bfloat16 max relative error per layer: {errors}")
    assert max(errors) <= BF16, errors


def test_pooled_collect_equals_pooled_hidden_states():
    """A pooling inside the scan (no pool_mask: every token) equals pooling the hidden states."""
    config, params = _load(FIXTURES / "cls_shared_abs")
    pixels, ref = _io("cls_shared_abs")
    params = jax.tree.map(np.asarray, params)
    apply = functools.partial(beit.BeitEncoder(config).apply, collect=pooling.mean)
    pooled = jax.jit(apply)({"params": params}, pixels)
    assert pooled.shape == (ref.shape[0], ref.shape[1], ref.shape[3])
    errors = _relative_errors(pooled[:, :, None], ref.mean(axis=2, keepdims=True))
    assert max(errors) <= F32, errors


@pytest.mark.parametrize("variant", VARIANTS)
def test_init_tree_equals_checkpoint_tree(variant):
    config, params = _load(FIXTURES / variant)
    pixels, _ = _io(variant)
    # The tree init builds, abstractly: structure and shapes without drawing a value.
    init = nn.unbox(jax.eval_shape(beit.BeitEncoder(config).init, jax.random.key(0), pixels))
    init = init["params"]
    assert jax.tree.structure(init) == jax.tree.structure(params)
    shapes = lambda t: jax.tree.map(lambda a: tuple(a.shape), t)  # noqa: E731
    assert shapes(init) == shapes(params)


def test_params_are_views_of_the_checkpoint():
    tensors = open_tensors(FIXTURES / "mim_relbias")
    config = beit.BeitConfig.from_hf(read_config(FIXTURES / "mim_relbias"))
    params = beit.params_from_hf(config, tensors)
    # Layers are stacked lazily: each layer's part is still a view of its tensor.
    kernel = params["layers"]["query"]["kernel"]
    assert kernel.shape == (config.num_hidden_layers, *kernel.parts[1].shape)
    name = "beit.encoder.layer.1.attention.attention.query.weight"
    assert np.shares_memory(kernel.parts[1], tensors[name])
    table = params["layers"]["relative_position_bias"]["relative_position_bias_table"]
    name = "beit.encoder.layer.1.attention.attention.relative_position_bias"
    assert np.shares_memory(table.parts[1], tensors[name + ".relative_position_bias_table"])
    kernel = params["patch_embeddings"]["kernel"]
    assert np.shares_memory(kernel, tensors["beit.embeddings.patch_embeddings.projection.weight"])


def test_logical_axis_names():
    config, _ = _load(FIXTURES / "mim_relbias")
    pixels, _ = _io("mim_relbias")
    boxed = sharding.abstract_params(beit.BeitEncoder(config), pixels)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= VOCABULARY
    layer = boxed["layers"]
    assert layer["query"]["kernel"].names == ("stack", "embed", "heads")
    assert layer["query"]["bias"].names == ("stack", "heads")
    assert layer["key"]["kernel"].names == ("stack", "embed", "kv_heads")
    assert layer["attention_output"]["kernel"].names == ("stack", "heads", "embed")
    assert layer["fc1"]["kernel"].names == ("stack", "embed", "mlp")
    assert layer["fc1"]["bias"].names == ("stack", "mlp")
    assert layer["fc2"]["kernel"].names == ("stack", "mlp", "embed")
    assert layer["fc2"]["bias"].names == ("stack", None)
    table = layer["relative_position_bias"]["relative_position_bias_table"]
    assert table.names == ("stack", None, None)
    assert table.value.shape == (
        config.num_hidden_layers,
        config.num_relative_distance,
        config.num_attention_heads,
    )
    assert layer["lambda_1"].names == ("stack", None)
    assert boxed["patch_embeddings"]["kernel"].names == (None, None, None, "embed")


def test_relative_position_index_matches_definition():
    w = 3
    index = beit.relative_position_index(w)
    r = (2 * w - 1) ** 2 + 3
    expected = np.empty((w * w + 1,) * 2, np.int64)
    for a in range(w * w):
        for b in range(w * w):
            dy, dx = a // w - b // w, a % w - b % w
            expected[a + 1, b + 1] = (dy + w - 1) * (2 * w - 1) + (dx + w - 1)
    expected[0, 1:] = r - 3  # CLS query to patch keys
    expected[1:, 0] = r - 2  # patch queries to the CLS key
    expected[0, 0] = r - 1
    np.testing.assert_array_equal(index, expected)


@pytest.mark.parametrize(
    ("variant", "piece"),
    [
        ("mim_relbias", "relative_position_bias"),
        ("mim_relbias", "lambda_1"),
        ("mim_relbias", "cls_token"),
        ("cls_shared_abs", "shared_relative_position_bias"),
        ("cls_shared_abs", "position_embeddings"),
    ],
)
def test_fixture_detects_a_missing_piece(variant, piece):
    """Resetting one piece to its init value moves the output far outside the bound."""
    config, params = _load(FIXTURES / variant)
    # Stacked layers read into plain [L, ...] numpy arrays, so they can be replaced.
    params = jax.tree.map(np.asarray, params)
    if piece == "relative_position_bias":
        table = params["layers"][piece]
        table["relative_position_bias_table"] = np.zeros_like(table["relative_position_bias_table"])
    elif piece == "shared_relative_position_bias":
        table = params[piece]
        table["relative_position_bias_table"] = np.zeros_like(table["relative_position_bias_table"])
    elif piece == "lambda_1":
        assert params["layers"][piece].shape == (config.num_hidden_layers, config.hidden_size)
        params["layers"][piece] = np.ones_like(params["layers"][piece])
    else:
        params[piece] = np.zeros_like(params[piece])
    pixels, ref = _io(variant)
    assert max(_relative_errors(_run(config, params, pixels), ref)) > 100 * F32


def _one_line_error(match: str, fn, *args):
    with pytest.raises(ValueError, match=match) as err:
        fn(*args)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"hidden_act": "relu"}, "hidden_act='relu' is not supported"),
        ({"hidden_act": "gelu_new"}, "hidden_act='gelu_new' is not supported"),
        ({"image_size": [32, 24]}, r"image_size=\[32, 24\] is not supported"),
        ({"patch_size": [8, 4]}, r"patch_size=\[8, 4\] is not supported"),
        ({"model_type": "vit"}, "model_type='vit' is not supported"),
    ],
)
def test_rejected_config_values(change, match):
    raw = {**read_config(FIXTURES / "mim_relbias"), **change}
    _one_line_error(match, beit.BeitConfig.from_hf, raw)


def test_rejected_inputs():
    config, params = _load(FIXTURES / "mim_relbias")
    pixels, _ = _io("mim_relbias")
    bigger = np.zeros((2, 3, 48, 48), np.float32)
    _one_line_error("position interpolation is not supported", _run, config, params, bigger)
    _one_line_error("expected", _run, config, params, pixels[:, :2])
    _one_line_error("expected", _run, config, params, pixels[0])


def test_missing_or_misshapen_tensor():
    raw, tensors = _stored("mim_relbias")
    config = beit.BeitConfig.from_hf(raw)
    name = "beit.encoder.layer.1.lambda_2"
    missing = {k: v for k, v in tensors.items() if k != name}
    _one_line_error(f"missing tensor {name}", beit.params_from_hf, config, missing)
    table = "beit.encoder.layer.0.attention.attention.relative_position_bias"
    table += ".relative_position_bias_table"
    bad = {**tensors, table: tensors[table][:-1]}
    _one_line_error(f"{table} has shape", beit.params_from_hf, config, bad)


def test_from_pretrained_entry_point():
    """The package entry point gives the same float32 hidden states."""
    import gaam_jax.encoders as encoders

    pixels, ref = _io("mim_relbias")
    enc = encoders.from_pretrained(FIXTURES / "mim_relbias", dtype=jnp.float32)
    errors = _relative_errors(enc.hidden_states(pixel_values=pixels), ref)
    assert max(errors) <= F32, errors
