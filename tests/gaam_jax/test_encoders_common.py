"""gaam_jax.encoders: checkpoint reading (lazy safetensors), dispatch, the Encoder, its errors."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from model_folders import bert_tensors, text_inputs, write_tiny_bert
from safetensors.numpy import save_file

from gaam_jax.encoders import bert, checkpoint, from_pretrained

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "encoders"
REPO = pathlib.Path(__file__).parents[2]


# -- checkpoint.read_config -------------------------------------------------------------------


def test_read_config_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        checkpoint.read_config(tmp_path / "nope")
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        checkpoint.read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="'gpt2' is not supported .supported: bert, llama, beit"):
        checkpoint.read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        checkpoint.read_config(tmp_path)


# -- checkpoint.open_tensors ------------------------------------------------------------------


def test_open_tensors_reads_every_dtype_as_memory_mapped_views(tmp_path):
    rng = np.random.default_rng(0)
    stored = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((4,)).astype(np.float16),
        "bf16": rng.standard_normal((2, 3, 2)).astype(ml_dtypes.bfloat16),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "u8": np.arange(5, dtype=np.uint8),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(2.5, np.float64),
    }
    save_file(stored, tmp_path / "model.safetensors", metadata={"format": "np"})
    tensors = checkpoint.open_tensors(tmp_path)
    assert sorted(tensors) == sorted(stored) and len(tensors) == len(stored)
    for name, want in stored.items():
        got = tensors[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want)  # bit-exact: no conversion on the way
        # A view of the read-only memory map, not a copy read from the file.
        assert not got.flags.owndata and not got.flags.writeable, name
    tensors.release(tensors["f32"].T)  # dropping its pages: the values are read again on use
    np.testing.assert_array_equal(tensors["f32"], stored["f32"])


def test_open_tensors_follows_the_shard_index(tmp_path):
    write_tiny_bert(tmp_path / "one")
    write_tiny_bert(tmp_path / "three", shards=3)
    one, three = (
        checkpoint.open_tensors(tmp_path / "one"),
        checkpoint.open_tensors(tmp_path / "three"),
    )
    assert len(list((tmp_path / "three").glob("model-*-of-00003.safetensors"))) == 3
    assert sorted(one) == sorted(three)
    for name in one:
        np.testing.assert_array_equal(one[name], three[name])


def test_open_tensors_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        checkpoint.open_tensors(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="python -m gaam_jax.encoders.convert") as err:
        checkpoint.open_tensors(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(ValueError, match="not a safetensors file"):
        checkpoint.open_tensors(tmp_path)
    sharded = write_tiny_bert(tmp_path / "sharded", shards=2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors .named by"):
        checkpoint.open_tensors(sharded)


# -- from_pretrained and the Encoder ----------------------------------------------------------


def test_from_pretrained_bert_equals_the_module(tmp_path):
    folder = write_tiny_bert(tmp_path / "bert")
    enc = from_pretrained(folder)
    assert enc.model_type == "bert" and isinstance(enc.config, bert.BertConfig)
    inputs = text_inputs(batch=2)
    hs = enc.hidden_states(**inputs)
    assert hs.shape == (2, 3, 7, 32) and hs.dtype == jnp.float32
    # The same params through the module directly, from jax inputs. Separately compiled
    # programs fuse float32 sums differently: agreement to ~1e-6 of values of ~3.
    jax_inputs = {k: jnp.asarray(v) for k, v in inputs.items()}
    direct = jax.jit(enc.module.apply)({"params": enc.params}, **jax_inputs)
    np.testing.assert_allclose(np.asarray(hs), np.asarray(direct), rtol=0, atol=1e-5)
    # The layers' parameters are stacked [layers, ...] under one scanned module.
    assert enc.params["layers"]["query"]["kernel"].shape == (2, 32, 32)
    # Layer 0 is the embedding LayerNorm output, so the layers do differ.
    assert not np.allclose(hs[:, 0], hs[:, 1])


def test_head_model_prefix_and_shards_load_the_same_params(tmp_path):
    base = from_pretrained(write_tiny_bert(tmp_path / "base"))
    for folder in (
        write_tiny_bert(tmp_path / "head", prefix="bert."),
        write_tiny_bert(tmp_path / "shards", shards=3),
    ):
        other = from_pretrained(folder)
        want, got = flatten_dict(base.params), flatten_dict(other.params)
        assert sorted(want) == sorted(got)
        for k in want:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=str(k))


def test_params_are_cast_to_the_compute_dtype_and_the_output_stays_float32(tmp_path):
    bf16_folder = write_tiny_bert(tmp_path / "bf16", dtype=ml_dtypes.bfloat16)
    f32 = from_pretrained(bf16_folder, dtype=jnp.float32)
    assert {leaf.dtype for leaf in jax.tree.leaves(f32.params)} == {jnp.dtype(jnp.float32)}
    bf = from_pretrained(write_tiny_bert(tmp_path / "f32"), dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(bf.params)} == {jnp.dtype(jnp.bfloat16)}
    inputs = text_inputs()
    ref, low = f32.hidden_states(**inputs), bf.hidden_states(**inputs)
    assert low.dtype == jnp.float32
    # Same weights up to bf16 rounding of the float32 ones (bf16 file vs f32 file of one draw),
    # bf16 matmuls: 8 mantissa bits give ~4e-3 relative per op; 2 layers stay below 5e-2.
    err = np.abs(np.asarray(low) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max()
    assert 0 < err < 5e-2


@pytest.fixture(scope="module")
def minilm():
    return from_pretrained(bert.minilm_dir())


def _pool_by_hand(hs: np.ndarray, pooling: str, mask: np.ndarray) -> np.ndarray:
    """float64 ``[B, L, H]`` pooling of float32 ``[B, L, T, H]`` hidden states."""
    hs = hs.astype(np.float64)
    if pooling == "mean":
        m = mask[:, None, :, None].astype(np.float64)
        return (hs * m).sum(axis=2) / m.sum(axis=2)
    if pooling == "mean_with_padding":
        return hs.mean(axis=2)
    if pooling == "first":
        return hs[:, :, 0]
    last = np.array([np.flatnonzero(row).max() for row in mask])  # the last real token
    return hs[np.arange(len(hs)), :, last]


def test_pooled_states_equal_pooling_the_hidden_states(minilm):
    ref = np.load(REPO / "tests" / "fixtures" / "minilm_hidden_states.npz")
    inputs = {k: ref[k] for k in ("input_ids", "attention_mask")}  # rows of 11, 18, 19, 3 tokens
    hs = np.asarray(minilm.hidden_states(**inputs))  # [4, 7, 19, 384]
    mask = inputs["attention_mask"].astype(bool)
    # Separately compiled programs (a pooling inside the scan vs the [B, L+1, T, H] stack, then
    # numpy in float64) differ by float32 rounding of the layers and of the sums over <= 19
    # tokens: states reach ~10 (one ulp ~1e-6), measured <= 5e-7 apart; the bound is 1e-6 of
    # the largest state.
    tol = 1e-6 * np.abs(hs).max()
    # Every pooling over the scanned layers' states (slice(1, None): the last one included),
    # then layers=[0, 3] (the embedding output's entry, indices) with and without a pool_mask.
    # Each call compiles the whole model (~2 s here), so the selection is not crossed with all
    # four poolings: it is applied to the pooled [B, L + 1, H] output, the same for each.
    cases = [
        (name, slice(1, None), None) for name in ("mean", "mean_with_padding", "first", "last")
    ]
    # An explicit pool_mask replaces attention_mask's positions: here [CLS] is left out.
    no_cls = mask.copy()
    no_cls[:, 0] = False
    cases += [("first", [0, 3], None), ("mean", [0, 3], no_cls)]
    for pooling, layers, pool_mask in cases:
        picked = range(7)[layers] if isinstance(layers, slice) else layers
        want = _pool_by_hand(hs, pooling, mask if pool_mask is None else pool_mask)
        got = minilm.pooled_states(pooling=pooling, layers=layers, pool_mask=pool_mask, **inputs)
        assert got.shape == (4, len(picked), 384) and got.dtype == jnp.float32
        np.testing.assert_allclose(
            np.asarray(got), want[:, list(picked)], rtol=0, atol=tol, err_msg=pooling
        )
    with pytest.raises(ValueError, match="pooling must be one of"):
        minilm.pooled_states(pooling="max", **inputs)
    for bad in ([0, 7], [-8], slice(7, None)):
        with pytest.raises(ValueError, match="layer|selects no layer"):
            minilm.pooled_states(pooling="mean", layers=bad, **inputs)


def test_input_name_errors(tmp_path):
    enc = from_pretrained(write_tiny_bert(tmp_path / "bert"))
    inputs = text_inputs()
    with pytest.raises(ValueError, match="unknown input 'pixel_values' .it takes input_ids"):
        enc.hidden_states(pixel_values=np.zeros((1, 3, 4, 4)), **inputs)
    with pytest.raises(ValueError, match="missing input 'input_ids'"):
        enc.hidden_states(attention_mask=inputs["attention_mask"])
    with pytest.raises(ValueError, match="one batch size"):
        enc.hidden_states(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"][:2]
        )
    # attention_mask is optional: all ones (two compilations: float32 rounding, values ~3).
    np.testing.assert_allclose(
        enc.hidden_states(input_ids=inputs["input_ids"][:2]),
        enc.hidden_states(input_ids=inputs["input_ids"][:2], attention_mask=np.ones((2, 7))),
        rtol=0, atol=1e-5,
    )  # fmt: skip


def test_checkpoint_and_config_errors(tmp_path):
    folder = write_tiny_bert(tmp_path / "bert")
    config, tensors = bert_tensors()
    del tensors["encoder.layer.1.output.dense.bias"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensor 'encoder.layer.1.output.dense.bias'"):
        from_pretrained(folder)
    _, tensors = bert_tensors(ff=48)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"intermediate.dense.weight has shape \(48, 32\)"):
        from_pretrained(folder)
    for field, value, match in [
        ("hidden_act", "relu", "hidden_act='relu' is not supported"),
        ("position_embedding_type", "relative_key", "position_embedding_type"),
        ("is_decoder", True, "is_decoder"),
    ]:
        (folder / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(ValueError, match=match):
            from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    with pytest.raises(ValueError, match="supported: bert, llama, beit, wavlm"):
        from_pretrained(folder)


@pytest.mark.parametrize("arch", ["llama", "beit", "wavlm"])
def test_every_committed_fixture_dispatches(arch):
    """The entry point loads each architecture's fixtures (parity is in test_encoders_<arch>)."""
    folders = sorted(p for p in (FIXTURES / arch).glob("*") if (p / "config.json").exists())
    assert folders, f"no committed {arch} fixtures under {FIXTURES / arch}"
    enc = from_pretrained(folders[0])
    assert enc.model_type == arch
    io = np.load(folders[0] / "io.npz")
    inputs = {k: io[k] for k in enc.input_names if k in io.files}
    hs = np.asarray(enc.hidden_states(**inputs))
    ref = io["hidden_states"]
    assert hs.shape == ref.shape
    # float32 CPU vs transformers: the contract's bound, 1e-4 of the largest magnitude.
    assert np.abs(hs - ref).max() <= 1e-4 * np.abs(ref).max()


# -- convert ----------------------------------------------------------------------------------


def test_convert_cli(tmp_path):
    folder = tmp_path / "pt"
    folder.mkdir()
    cmd = [sys.executable, "-m", "gaam_jax.encoders.convert", str(folder)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "nothing to convert" in run.stderr
    bad = subprocess.run([*cmd[:3], "--no-such-flag"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("error: ")
    if importlib.util.find_spec("torch") is None:
        # torch is an optional extra: without it the command says how to get it, in one line.
        (folder / "pytorch_model.bin").write_bytes(b"")
        run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert run.returncode == 2
        assert run.stderr.strip().splitlines() == [
            "error: converting .bin weights needs torch and safetensors: "
            "pip install 'gaam-jax[convert]'"
        ]
        pytest.skip("torch is not installed: the conversion itself is not exercised")
    import torch

    _, tensors = bert_tensors()
    state = {k: torch.from_numpy(v) for k, v in tensors.items()}
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k] for k in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    converted = checkpoint.open_tensors(folder)
    assert sorted(converted) == names
    for name in names:
        np.testing.assert_array_equal(converted[name], tensors[name])
