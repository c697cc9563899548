"""Parity of gaam_jax.encoders.llama with transformers 5.24's PyTorch LlamaModel.

Fixtures (tests/fixtures/encoders/llama/<variant>/, written by
tests/reference/make_llama_fixtures.py) are tiny random Llamas with every parameter perturbed and
the reference ``torch.stack(hidden_states, 1)`` for a batch with a full, a right-padded and a
left-padded row. Every position of every row is compared, padding positions included: right
padding queries attend to the row's real tokens, and left padding queries (no visible key) get
sdpa's zero attention output, both reproduced exactly. Checkpoint layouts and transformers-4
configs are derived from the committed folders at test time.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gaam_jax import sharding
from gaam_jax.encoders import EncoderOptions, checkpoint, pooling
from gaam_jax.encoders.llama import MODEL_TYPE, LlamaConfig, LlamaEncoder, params_from_hf

ROOT = pathlib.Path(__file__).parents[1] / "fixtures" / "encoders" / "llama"
VARIANTS = ("base", "llama3", "linear")

# float32 on CPU: the port does the same float32 operations as torch in a different order (einsum
# vs matmul, fused softmax), which measures <= 1e-6 of the layer's max |value|; 1e-4 is the
# contract's bound and leaves room for other BLAS backends.
F32_RTOL = 1e-4
# bfloat16 keeps 8 significant bits (rounding 2^-9 = 0.2% per operation); over a few matmuls and
# two layers the measured error is ~1% of the layer's max |value|. 5% leaves margin while a wrong
# component (see test_fixtures_detect_wrong_rope) gives errors of order 10-100%.
BF16_RTOL = 5e-2


def _raw_config(folder: pathlib.Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _load(folder: pathlib.Path) -> tuple[LlamaConfig, dict]:
    raw = checkpoint.read_config(folder)
    assert raw["model_type"] == MODEL_TYPE
    config = LlamaConfig.from_hf(raw)
    return config, params_from_hf(config, checkpoint.open_tensors(folder))


def _io(variant: str) -> dict[str, np.ndarray]:
    with np.load(ROOT / variant / "io.npz") as data:
        return dict(data)


def _layer_errors(
    config: LlamaConfig, params: dict, io: dict, dtype=jnp.float32, attention: str = "xla"
) -> np.ndarray:
    """max |jax - torch| / max |torch| for each hidden state [L + 1]."""
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    # block 4 < T = 12: the blockwise path runs three query and three key blocks.
    options = EncoderOptions(attention=attention, block_size=4)
    out = LlamaEncoder(config, dtype, options).apply(
        {"params": params}, io["input_ids"], io["attention_mask"]
    )
    assert out.dtype == jnp.float32
    ref = io["hidden_states"]
    assert out.shape == ref.shape == (3, config.num_hidden_layers + 1, 12, config.hidden_size)
    diff = np.abs(np.asarray(out) - ref).max(axis=(0, 2, 3))
    return diff / np.abs(ref).max(axis=(0, 2, 3))


# Variants differ in RoPE, not in how attention runs: blockwise on one of them.
@pytest.mark.parametrize(
    ("variant", "attention"), [(v, "xla") for v in VARIANTS] + [("base", "blockwise")]
)
def test_float32_matches_transformers(variant, attention):
    config, params = _load(ROOT / variant)
    errors = _layer_errors(config, params, _io(variant), attention=attention)
    print(variant, attention, "float32 relative error per layer", errors)
    assert np.all(errors <= F32_RTOL), errors


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_close_to_float32_reference(variant):
    config, params = _load(ROOT / variant)
    errors = _layer_errors(config, params, _io(variant), jnp.bfloat16)
    print(variant, "bfloat16 relative error per layer", errors)
    assert np.all(errors <= BF16_RTOL), errors


def test_fixtures_detect_wrong_rope():
    """The fixtures are sensitive to the RoPE settings the port reads (so parity is not luck)."""
    config, params = _load(ROOT / "llama3")
    io = _io("llama3")
    import dataclasses

    for wrong in (
        dataclasses.replace(config, rope_type="default"),
        dataclasses.replace(config, rope_theta=10000.0),
    ):
        assert _layer_errors(wrong, params, io)[1:].max() > 100 * F32_RTOL


def _tree_equal(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)  # same stored values: layouts must agree exactly


def _rewrite(src: pathlib.Path, dst: pathlib.Path, rename, shards: int = 1) -> None:
    """Copies a fixture folder with renamed tensors, in one file or ``shards`` files + index."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = {rename(k): v for k, v in load_file(str(src / "model.safetensors")).items()}
    tensors = {k: v for k, v in tensors.items() if k is not None}
    if shards == 1:
        save_file(tensors, str(dst / "model.safetensors"))
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::shards]}
        save_file(part, str(dst / file))
        weight_map.update(dict.fromkeys(part, file))
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )


def test_causal_lm_layout_equals_base_layout(tmp_path):
    """LlamaModel names and LlamaForCausalLM names ("model." + lm_head) load the same params."""
    _, base = _load(ROOT / "base")
    rng = np.random.default_rng(0)
    lm_head = rng.standard_normal((128, 64)).astype(np.float32)
    _rewrite(ROOT / "base", tmp_path / "prefixed", lambda k: "model." + k)
    tensors = load_file(str(tmp_path / "prefixed" / "model.safetensors"))
    save_file({**tensors, "lm_head.weight": lm_head}, str(tmp_path / "prefixed/model.safetensors"))
    _tree_equal(_load(tmp_path / "prefixed")[1], base)

    # And the other way: the committed LlamaForCausalLM fixture stripped to LlamaModel names.
    _, head = _load(ROOT / "llama3")
    strip = lambda k: None if k.startswith("lm_head.") else k.removeprefix("model.")  # noqa: E731
    _rewrite(ROOT / "llama3", tmp_path / "stripped", strip)
    _tree_equal(_load(tmp_path / "stripped")[1], head)


@pytest.mark.parametrize("variant", ["base", "llama3"])
def test_sharded_checkpoint_equals_single_file(tmp_path, variant):
    _, single = _load(ROOT / variant)
    _rewrite(ROOT / variant, tmp_path / "sharded", lambda k: k, shards=3)
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    _tree_equal(_load(tmp_path / "sharded")[1], single)


def _transformers4(raw: dict, scaling: dict | None, drop_head_dim: bool) -> dict:
    """A transformers-4 style config: top-level rope_theta, rope_scaling, maybe no head_dim."""
    old = {k: v for k, v in raw.items() if k != "rope_parameters"}
    old["rope_theta"] = raw["rope_parameters"]["rope_theta"]
    old["rope_scaling"] = scaling
    if drop_head_dim:
        del old["head_dim"]
    return old


def test_transformers4_configs_equal_transformers5_configs():
    """Each t4 style was checked to give the same rope_parameters in transformers 5.24."""
    llama3 = _raw_config(ROOT / "llama3")["rope_parameters"]
    cases = {
        "base": (None, True),
        "llama3": ({k: v for k, v in llama3.items() if k != "rope_theta"}, False),
        "linear": ({"type": "linear", "factor": 3.0}, True),  # old "type" key
    }
    for variant, (scaling, drop_head_dim) in cases.items():
        raw = _raw_config(ROOT / variant)
        new = LlamaConfig.from_hf(raw)
        assert LlamaConfig.from_hf(_transformers4(raw, scaling, drop_head_dim)) == new, variant
    base = LlamaConfig.from_hf(_raw_config(ROOT / "base"))
    assert (base.rope_theta, base.head_dim, base.num_key_value_heads) == (5000.0, 16, 2)
    no_rope = {k: v for k, v in _raw_config(ROOT / "base").items() if k != "rope_parameters"}
    assert LlamaConfig.from_hf(no_rope).rope_theta == 10000.0  # transformers' default_theta


def test_transformers4_config_end_to_end(tmp_path):
    folder = tmp_path / "t4"
    shutil.copytree(ROOT / "base", folder)
    old = _transformers4(_raw_config(folder), None, drop_head_dim=True)
    (folder / "config.json").write_text(json.dumps(old))
    config, params = _load(folder)
    assert np.all(_layer_errors(config, params, _io("base")) <= F32_RTOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_init_tree_equals_loaded_tree_and_has_logical_axes(variant):
    config, params = _load(ROOT / variant)
    ids = jnp.zeros((1, 4), jnp.int32)
    boxed = sharding.abstract_params(LlamaEncoder(config), ids)
    shapes = jax.tree.map(lambda a: a.shape, nn.unbox(boxed))
    assert shapes == jax.tree.map(lambda a: tuple(a.shape), params)
    names = {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf.names
        for path, leaf in jax.tree_util.tree_flatten_with_path(
            boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
        )[0]
    }
    assert all(
        isinstance(leaf, nn.Partitioned)
        for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    )
    assert names["embed_tokens/embedding"] == ("vocab", "embed")
    assert names["layers/self_attn/q_proj/kernel"] == ("stack", "embed", "heads")
    assert names["layers/self_attn/k_proj/kernel"] == ("stack", "embed", "kv_heads")
    assert names["layers/self_attn/o_proj/kernel"] == ("stack", "heads", "embed")
    assert names["layers/mlp/up_proj/kernel"] == ("stack", "embed", "mlp")
    assert names["layers/mlp/down_proj/kernel"] == ("stack", "mlp", "embed")
    assert names["norm/scale"] == (None,)
    if config.attention_bias:
        assert names["layers/self_attn/q_proj/bias"] == (
            "stack",
            "heads",
        )
        assert names["layers/self_attn/o_proj/bias"] == (
            "stack",
            None,
        )
    if config.mlp_bias:
        assert names["layers/mlp/gate_proj/bias"] == (
            "stack",
            "mlp",
        )


def test_params_are_views_of_the_checkpoint():
    """params_from_hf neither casts nor copies (memory-mapped weights stay on disk)."""
    tensors = checkpoint.open_tensors(ROOT / "llama3")
    config = LlamaConfig.from_hf(_raw_config(ROOT / "llama3"))
    params = params_from_hf(config, tensors)
    # Layers are stacked lazily: each layer's part is still a view of its tensor.
    q = params["layers"]["self_attn"]["q_proj"]
    assert q["kernel"].shape == (config.num_hidden_layers, *q["kernel"].parts[1].shape)
    assert np.shares_memory(q["kernel"].parts[1], tensors["model.layers.1.self_attn.q_proj.weight"])
    assert np.shares_memory(q["bias"].parts[1], tensors["model.layers.1.self_attn.q_proj.bias"])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "yarn"),
        ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "dyn"),
        ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "longrope"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "factor"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"model_type": "mistral"}, "model_type"),
        ({"vocab_size": None}, "vocab_size"),
    ],
)
def test_rejected_config_values(change, match):
    raw = {**_raw_config(ROOT / "base"), **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ValueError, match=match) as err:
        LlamaConfig.from_hf(raw)
    assert "\n" not in str(err.value)


def test_missing_or_misshapen_tensor():
    config = LlamaConfig.from_hf(_raw_config(ROOT / "base"))
    tensors = dict(checkpoint.open_tensors(ROOT / "base"))
    del tensors["layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj.weight' is missing"):
        params_from_hf(config, tensors)
    tensors["layers.1.mlp.up_proj.weight"] = np.zeros((96, 63), np.float32)
    with pytest.raises(ValueError, match=r"up_proj.weight has shape \(96, 63\)"):
        params_from_hf(config, tensors)


def test_from_pretrained_entry_point():
    import gaam_jax.encoders as encoders

    io = _io("base")
    enc = encoders.from_pretrained(ROOT / "base", dtype=jnp.float32)
    out = np.asarray(
        enc.hidden_states(input_ids=io["input_ids"], attention_mask=io["attention_mask"])
    )
    ref = io["hidden_states"]
    bound = F32_RTOL * np.abs(ref).max(axis=(0, 2, 3), keepdims=True)
    assert np.all(np.abs(out - ref) <= bound)


def test_remat_gives_the_same_gradients():
    """Rematerialising each layer changes what the backward pass stores, not what it computes."""
    config, params = _load(ROOT / "base")
    params = jax.tree.map(jnp.asarray, params)
    io = _io("base")

    def loss(params, options):
        out = LlamaEncoder(config, options=options).apply(
            {"params": params}, io["input_ids"], io["attention_mask"], collect=pooling.mean
        )
        return jnp.sum(out**2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    plain = grad(params, EncoderOptions(attention="xla"))
    rematted = grad(params, EncoderOptions(attention="xla", remat="full"))
    # The recomputed forward runs the same float32 ops, but XLA fuses and orders the backward
    # sums (over tokens and layers) differently: measured <= 4e-5 of each gradient's largest
    # value. 1e-4 of it; a wrong recomputation gives errors of order 1.
    for got, want in zip(jax.tree.leaves(rematted), jax.tree.leaves(plain), strict=True):
        scale = float(np.abs(want).max())
        chex.assert_trees_all_close(got, want, rtol=0, atol=1e-4 * scale)
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(plain["layers"]))
    for remat, present in (("none", False), ("full", True), ("dots", True)):
        jaxpr = jax.make_jaxpr(jax.grad(loss), static_argnums=1)(
            params, EncoderOptions(attention="xla", remat=remat)
        )
        assert ("checkpoint" in str(jaxpr) or "remat" in str(jaxpr)) == present, remat
