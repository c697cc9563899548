"""Hugging Face peft LoRA folders read and written by gaam_jax.adapters.peft.

Fixtures (tests/fixtures/peft/<arch>/, written by tests/reference/make_peft_fixtures.py with
peft 0.21.2 and transformers 5.24) are peft LoRAs (r=2, lora_alpha=4, query and value
projections, random non-zero lora_B; llama with use_rslora) on tiny random base models, saved by
``PeftModel.save_pretrained``, and peft's hidden states. WavLM's reference is peft's *merged*
model: transformers' WavLM attention reads ``q_proj.weight`` directly, so peft's unmerged LoRA
there does nothing (``hidden_states_unmerged``); the encoders here apply it, as merging does.
Variants of the files (head-model key prefixes, changed options, damaged tensors) are derived
at test time in temporary folders.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

from gaam_jax.adapters import LoRA, peft
from gaam_jax.encoders import from_pretrained, open_host_params

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"
ROOT = FIXTURES / "peft"
BASES = {
    "bert": ROOT / "bert" / "model",
    "llama": FIXTURES / "encoders" / "llama" / "base",
    "beit": FIXTURES / "encoders" / "beit" / "cls_shared_abs",
    "wavlm": FIXTURES / "encoders" / "wavlm" / "base",
}
ARCHS = tuple(BASES)
# The query and value projections the fixtures adapt, by their names in our modules.
QV = {"bert": {"query", "value"}, "beit": {"query", "value"}}
HEAD_PREFIX = {"bert": "bert.", "llama": "model.", "beit": "beit.", "wavlm": "wavlm."}
INPUTS = ("input_ids", "attention_mask", "pixel_values", "input_values")
# float32 on CPU: the encoders do the same float32 operations as torch in another order (and
# the LoRA update as (x A) B in float32, as peft); measured <= 7e-7 of each fixture's max
# |value|. 1e-4 is the encoders' parity bound (tests/gaam_jax/test_encoders_llama.py), with room for
# other BLAS backends.
F32_RTOL = 1e-4
# Merging changes only the rounding: W + s A B once instead of x W + s (x A) B per token.
MERGED_RTOL = 1e-5


def _config(arch: str):
    config, _, _ = open_host_params(BASES[arch])
    return config


def _io(arch: str) -> dict[str, np.ndarray]:
    with np.load(ROOT / arch / "io.npz") as data:
        return dict(data)


def _flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in flatten_dict(tree).items()}


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: pathlib.Path, **changes) -> None:
    path = folder / peft.CONFIG_FILE
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def _edit_tensors(folder: pathlib.Path, edit) -> None:
    path = folder / peft.WEIGHTS_FILE
    tensors = load_file(path)
    save_file(edit(tensors), path, metadata={"format": "pt"})


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_states_match_peft_and_merged_match_unmerged(arch):
    enc = from_pretrained(BASES[arch], adapter=ROOT / arch / "adapter")
    io = _io(arch)
    inputs = {k: io[k] for k in INPUTS if k in io}
    ref = io["hidden_states"]
    scale = np.abs(ref).max()
    got = np.asarray(enc.hidden_states(**inputs))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=F32_RTOL * scale)
    merged = np.asarray(enc.merged().hidden_states(**inputs))
    np.testing.assert_allclose(merged, got, rtol=0, atol=MERGED_RTOL * scale)
    if arch == "wavlm":
        # peft's unmerged WavLM ignores the LoRA on q/v (transformers bypasses the modules).
        assert np.abs(got - io["hidden_states_unmerged"]).max() > 0.1 * scale


@pytest.mark.parametrize("arch", ARCHS)
def test_load_reads_the_peft_tensors_exactly(arch):
    config = _config(arch)
    lora, variables = peft.load(ROOT / arch / "adapter", arch, config)
    assert (lora.rank, lora.alpha) == (2, 4.0)
    assert lora.scale == pytest.approx(4 / math.sqrt(2) if arch == "llama" else 2.0)
    tensors = load_file(ROOT / arch / "adapter" / peft.WEIGHTS_FILE)
    names = peft.hf_module_names(arch, config)
    flat = _flat(variables)
    adapted = sorted({k[:-1] for k in flat})
    # targets selects exactly the adapted modules, all of them q/v projections.
    assert all(lora.matches("/".join(p)) for p in adapted)
    assert not any(lora.matches("/".join(p)) for p, _ in names.values() if p not in adapted)
    assert {p[-1] for p in adapted} == QV.get(arch, {"q_proj", "v_proj"})
    assert len(tensors) == 2 * len(adapted) * config.num_hidden_layers
    for name, (path, i) in names.items():
        if path not in adapted:
            continue
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        np.testing.assert_array_equal(flat[(*path, "lora_a")][i], a.T)
        np.testing.assert_array_equal(flat[(*path, "lora_b")][i], b.T)
        assert flat[(*path, "lora_a")].dtype == np.float32


def test_beit_transformers4_names_load_the_same():
    config = _config("beit")
    lora, variables = peft.load(ROOT / "beit" / "adapter", "beit", config)
    lora4, variables4 = peft.load(ROOT / "beit" / "adapter_v4", "beit", config)
    assert lora4 == lora
    jax.tree.map(np.testing.assert_array_equal, variables4, variables)
    keys = load_file(ROOT / "beit" / "adapter_v4" / peft.WEIGHTS_FILE)
    assert all(".attention.attention." in k for k in keys)


@pytest.mark.parametrize("arch", ARCHS)
def test_head_model_prefix_is_stripped(arch, tmp_path):
    """An adapter made on BertForSequenceClassification (etc.) names base.model.bert.<...>."""
    config = _config(arch)
    folder = _copy(ROOT / arch / "adapter", tmp_path / "head")
    head = HEAD_PREFIX[arch]
    _edit_tensors(
        folder,
        lambda t: {
            k.replace("base_model.model.", "base_model.model." + head): v for k, v in t.items()
        },
    )
    want = peft.load(ROOT / arch / "adapter", arch, config)
    got = peft.load(folder, arch, config)
    assert got[0] == want[0]
    jax.tree.map(np.testing.assert_array_equal, got[1], want[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_save_writes_what_peft_writes_and_round_trips(arch, tmp_path):
    config = _config(arch)
    src = ROOT / arch / "adapter"
    lora, variables = peft.load(src, arch, config)
    theirs = json.loads((src / peft.CONFIG_FILE).read_text())
    peft.save(
        tmp_path / "ours",
        lora,
        variables,
        arch,
        config,
        base_model_name_or_path=theirs["base_model_name_or_path"],
    )
    ours = json.loads((tmp_path / "ours" / peft.CONFIG_FILE).read_text())
    assert ours == theirs  # every field, peft_version and auto_mapping included
    mine, peft_file = (load_file(f / peft.WEIGHTS_FILE) for f in (tmp_path / "ours", src))
    assert sorted(mine) == sorted(peft_file)
    for key, value in peft_file.items():
        assert (mine[key].shape, mine[key].dtype) == (value.shape, value.dtype), key
        np.testing.assert_array_equal(mine[key], value)
    lora2, variables2 = peft.load(tmp_path / "ours", arch, config)
    assert lora2 == lora
    jax.tree.map(np.testing.assert_array_equal, variables2, variables)


def test_save_keeps_the_scale_and_puts_daam_gates_in_their_own_file(tmp_path):
    config = _config("bert")
    lora, variables = peft.load(ROOT / "bert" / "adapter", "bert", config)
    extra = dict(variables, layers=dict(variables["layers"], daam_adapter={"scale": np.ones(32)}))
    for scaling, alpha, rslora in (("raw_alpha", 8, False), ("rslora", 3, True)):
        raw_lora = LoRA(rank=2, alpha=alpha / 2 if scaling == "raw_alpha" else 3.0, scaling=scaling)
        peft.save(tmp_path / scaling, raw_lora, extra, "bert", config)
        raw = json.loads((tmp_path / scaling / peft.CONFIG_FILE).read_text())
        assert (raw["lora_alpha"], raw["use_rslora"]) == (alpha, rslora)
        back, loaded = peft.load(tmp_path / scaling, "bert", config)
        assert back.scale == raw_lora.scale
        # The gates: in DAAM_FILE (peft ignores it), named in the README, read back.
        assert "daam_adapter" not in str(load_file(tmp_path / scaling / peft.WEIGHTS_FILE))
        assert peft.DAAM_FILE in (tmp_path / scaling / peft.README_FILE).read_text()
        gates = load_file(tmp_path / scaling / peft.DAAM_FILE)
        assert list(gates) == ["layers/daam_adapter/scale"]
        jax.tree.map(np.testing.assert_array_equal, loaded, extra)


def test_save_writes_exact_targets_for_any_selection(tmp_path):
    """BERT's output.dense has no suffix of its own (attention.output.dense): one entry a layer."""
    config = _config("bert")
    denses = peft._denses("bert", config, 3)  # every Dense: (lora_a, lora_b) shapes
    rng = np.random.default_rng(0)
    for chosen in (("output",), ("attention_output", "intermediate", "output", "key")):
        lora = LoRA(rank=3, alpha=6.0, targets=f"^layers/({'|'.join(chosen)})$")
        variables = {"layers": {}}
        for path, (shape_a, shape_b) in denses.items():
            if path[-1] in chosen:
                variables["layers"][path[-1]] = {
                    "lora_a": rng.normal(size=shape_a).astype(np.float32),
                    "lora_b": rng.normal(size=shape_b).astype(np.float32),
                }
        folder = tmp_path / "_".join(chosen)
        peft.save(folder, lora, variables, "bert", config)
        raw = json.loads((folder / peft.CONFIG_FILE).read_text())
        if chosen == ("output",):
            assert raw["target_modules"] == [f"encoder.layer.{i}.output.dense" for i in (0, 1)]
        back, loaded = peft.load(folder, "bert", config)
        assert set(flatten_dict(loaded)) == set(flatten_dict(variables))
        assert all(back.matches(f"layers/{c}") for c in chosen)
        assert not back.matches("layers/query")
        jax.tree.map(np.testing.assert_array_equal, loaded, variables)


def test_regex_and_exclude_targets_are_honoured(tmp_path):
    config = _config("llama")
    want = peft.load(ROOT / "llama" / "adapter", "llama", config)
    for changes in (
        {"target_modules": r".*\.self_attn\.(q|v)_proj"},
        {"target_modules": ["q_proj", "k_proj", "v_proj"], "exclude_modules": ["k_proj"]},
        {"target_modules": ["self_attn.q_proj", "v_proj", "o_proj"], "exclude_modules": ".*o_proj"},
    ):
        folder = _copy(ROOT / "llama" / "adapter", tmp_path / str(len(list(tmp_path.iterdir()))))
        _edit_config(folder, **changes)
        got = peft.load(folder, "llama", config)
        assert got[0] == want[0]
        jax.tree.map(np.testing.assert_array_equal, got[1], want[1])


def test_name_tables_agree_with_the_checkpoint_loaders():
    """Each Dense's peft module name is the one whose weight params_from_hf puts in its kernel."""
    for arch in ARCHS:
        config, host, tensors = open_host_params(BASES[arch])
        names = peft.hf_module_names(arch, config)
        head = HEAD_PREFIX[arch]
        prefix = head if any(k.startswith(head) for k in tensors) else ""
        # (BEiT's fixture checkpoint has transformers-4 names: the second of its names.)
        flat = flatten_dict(host)
        seen = set()
        for name, (path, i) in names.items():
            kernel = flat[(*path, "kernel")]
            part = kernel if i is None else kernel.parts[i]
            stored = [f"{prefix}{n}.weight" for n in peft._hf_names(arch, path, i)]
            assert any(s in tensors and np.shares_memory(part, tensors[s]) for s in stored), name
            seen.add(path)
        # Every Dense of the encoder has a name.
        assert seen == set(peft._denses(arch, config, 1)), arch
    # The pooler is a Linear of BertModel that the encoder lacks.
    assert "pooler.dense" not in peft.hf_module_names("bert", _config("bert"))


def _lines(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# Each refused option: (config changes, a word the one-line message must contain).
REFUSED = {
    "peft_type": ({"peft_type": "IA3"}, "peft_type"),
    "bias": ({"bias": "all"}, "bias"),
    "use_dora_without_magnitudes": ({"use_dora": True}, "lora_magnitude_vector"),
    "fan_in_fan_out": ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    "rank_pattern": ({"rank_pattern": {"query": 4}}, "shape"),
    "bad_rank_pattern": ({"rank_pattern": {"query": 0}}, "rank_pattern"),
    "alpha_pattern": ({"alpha_pattern": {"query": "x"}}, "alpha_pattern"),
    "layers_to_transform": ({"layers_to_transform": 0}, "layers_to_transform"),
    "layers_pattern": ({"layers_pattern": "blocks"}, "layers_pattern"),
    "trainable_token_indices": ({"trainable_token_indices": [1]}, "trainable_token_indices"),
    "lora_bias": ({"lora_bias": True}, "lora_bias"),
    "not_a_dense": ({"target_modules": ["query", "value", "word_embeddings"]}, "word_embeddings"),
    "no_target": ({"target_modules": None}, "target_modules"),
    "some_layers": ({"target_modules": r"encoder\.layer\.0\..*\.(query|value)"}, "layers"),
    "rank": ({"r": 3}, "shape"),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSED)
def test_refused_options_give_one_line(case, tmp_path):
    changes, word = REFUSED[case]
    folder = _copy(ROOT / "bert" / "adapter", tmp_path / "adapter")
    _edit_config(folder, **changes)
    with pytest.raises(ValueError) as err:
        peft.load(folder, "bert", _config("bert"))
    text = _lines(err)
    assert str(folder) in text and word in text, text


def _drop_one(t: dict) -> dict:
    return {k: v for k, v in t.items() if "layer.1.attention.self.value.lora_B" not in k}


def _transpose_one(t: dict) -> dict:
    key = LAYER0 + "query.lora_A.weight"
    return dict(t, **{key: np.ascontiguousarray(t[key].T)})


def _extra(name: str):
    return lambda t: dict(t, **{name: np.zeros((2, 32), np.float32)})


LAYER0 = "base_model.model.encoder.layer.0.attention.self."
BAD_TENSORS = {
    "missing": (_drop_one, "missing"),
    "misshapen": (_transpose_one, "shape"),
    "pooler": (_extra("base_model.model.pooler.dense.lora_A.weight"), "pooler.dense"),
    "unselected": (_extra(LAYER0 + "key.lora_A.weight"), "target_modules"),
    "dora": (_extra(LAYER0 + "query.lora_magnitude_vector"), "lora_magnitude_vector"),
    "embedding": (_extra("base_model.model.embeddings.word_embeddings.lora_embedding_A"),
                  "lora_embedding_A"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_TENSORS)
def test_bad_tensors_give_one_line(case, tmp_path):
    edit, word = BAD_TENSORS[case]
    folder = _copy(ROOT / "bert" / "adapter", tmp_path / "adapter")
    _edit_tensors(folder, edit)
    with pytest.raises(ValueError) as err:
        peft.load(folder, "bert", _config("bert"))
    text = _lines(err)
    assert str(folder) in text and word in text, text


def test_missing_files_give_one_line(tmp_path):
    config = _config("bert")
    with pytest.raises(FileNotFoundError) as err:
        peft.load(tmp_path / "nowhere", "bert", config)
    assert "nowhere" in _lines(err)
    folder = _copy(ROOT / "bert" / "adapter", tmp_path / "adapter")
    (folder / peft.WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError) as err:
        peft.load(folder, "bert", config)
    assert peft.WEIGHTS_FILE in _lines(err)
    (folder / peft.CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError) as err:
        peft.load(folder, "bert", config)
    assert peft.CONFIG_FILE in _lines(err)


def test_save_refuses_variables_the_encoder_does_not_have(tmp_path):
    config = _config("bert")
    lora, variables = peft.load(ROOT / "bert" / "adapter", "bert", config)
    with pytest.raises(ValueError, match="rank 3"):
        peft.save(tmp_path / "a", LoRA(rank=3), variables, "bert", config)
    bogus = {"layers": {"attention_norm": variables["layers"]["query"]}}
    with pytest.raises(ValueError, match="not a Dense"):
        peft.save(tmp_path / "b", lora, bogus, "bert", config)
    with pytest.raises(ValueError, match="no lora_a"):
        peft.save(tmp_path / "c", lora, {}, "bert", config)
