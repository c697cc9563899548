"""Classifiers from a checkpoint plus a peft sequence-classification adapter.

Fixtures (tests/fixtures/peft_cls/<name>/, written by
tests/reference/make_peft_classifier_fixtures.py with peft 0.21.2 and transformers 5.24) are
``LoraConfig(task_type="SEQ_CLS")`` adapters saved by ``PeftModel.save_pretrained`` (the LoRA
under the ``*ForSequenceClassification`` module paths, the head through ``modules_to_save``) and
peft's logits: on the packaged MiniLM, and on the tiny perturbed classification models of
tests/fixtures/heads with rank and alpha patterns and rsLoRA (bert, its pooler saved too), DoRA
(llama; wavlm, its projector saved too) and ``layers_to_transform`` (beit). WavLM's reference is
peft's merged model (see tests/gaam_jax/test_adapters_peft.py).
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gaam_jax.adapters import peft
from gaam_jax.encoders import classifier_from_pretrained, from_pretrained
from gaam_jax.encoders.bert import minilm_dir

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"
ROOT = FIXTURES / "peft_cls"
HEADS = FIXTURES / "heads"
BASES = {
    "bert": HEADS / "bert" / "cls",
    "llama": HEADS / "llama" / "pad",
    "beit": HEADS / "beit" / "mean",
    "wavlm": HEADS / "wavlm" / "base",
}
# float32 on CPU, as tests/gaam_jax/test_adapters_peft.py (measured <= 3e-7 of each fixture's
# scale).
F32_RTOL = 1e-4


def _minilm() -> pathlib.Path:
    try:
        return minilm_dir()
    except FileNotFoundError as err:
        pytest.skip(str(err))


def _base(name: str) -> pathlib.Path:
    return _minilm() if name == "minilm" else BASES[name]


def _io(folder: pathlib.Path) -> tuple[dict, np.ndarray]:
    with np.load(folder / "io.npz") as data:
        io = dict(data)
    return io, io.pop("logits")


def _lines(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("name", ["minilm", *BASES])
def test_logits_equal_peft(name):
    clf = classifier_from_pretrained(_base(name), adapter=ROOT / name / "adapter")
    inputs, ref = _io(ROOT / name)
    got = np.asarray(clf.logits(**inputs))
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=F32_RTOL * np.abs(ref).max())


def test_options_of_the_fixtures_are_read():
    lora = classifier_from_pretrained(BASES["bert"], adapter=ROOT / "bert" / "adapter").encoder
    lora = lora.module.adapters.lora
    # rank_pattern {"value": 3, "layer\\.1\\.output\\.dense": 1}, alpha_pattern {"query": 6}.
    assert lora.scaling == "rslora" and lora.rank_for("layers/value") == 3
    assert lora.alpha_for("layers/query") == 6.0 and lora.rank_for("layers/output") == 2
    raw = json.loads((ROOT / "llama" / "adapter" / peft.CONFIG_FILE).read_text())
    assert raw["use_dora"] and raw["task_type"] == "SEQ_CLS"


def test_without_adapter_the_checkpoint_head_is_used():
    clf = classifier_from_pretrained(BASES["bert"])
    inputs, ref = _io(BASES["bert"])
    got = np.asarray(clf.logits(**inputs))
    np.testing.assert_allclose(got, ref, rtol=0, atol=F32_RTOL * np.abs(ref).max())


def test_the_encoder_ignores_a_saved_head():
    enc = from_pretrained(BASES["bert"], adapter=ROOT / "bert" / "adapter")
    assert enc.module.adapters.lora.rank_for("layers/value") == 3


def _copy(tmp_path: pathlib.Path, name: str = "bert") -> pathlib.Path:
    return pathlib.Path(shutil.copytree(ROOT / name / "adapter", tmp_path / "adapter"))


# Options still unsupported: (config changes, the word the one-line message names).
REFUSED = {
    "lora_bias": ({"lora_bias": True}, "lora_bias"),
    "trainable_token_indices": ({"trainable_token_indices": [3]}, "trainable_token_indices"),
    "peft_type": ({"peft_type": "IA3"}, "peft_type"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_unsupported_options_give_one_line(case, tmp_path):
    changes, word = REFUSED[case]
    folder = _copy(tmp_path)
    path = folder / peft.CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    with pytest.raises(ValueError) as err:
        classifier_from_pretrained(BASES["bert"], adapter=folder)
    text = _lines(err)
    assert str(folder) in text and word in text, text


def test_a_saved_encoder_module_is_refused(tmp_path):
    folder = _copy(tmp_path)
    path = folder / peft.WEIGHTS_FILE
    extra = "base_model.model.bert.embeddings.word_embeddings.weight"
    save_file(
        dict(load_file(path), **{extra: np.zeros((64, 16), np.float32)}),
        path,
        metadata={"format": "pt"},
    )
    for load in (classifier_from_pretrained, from_pretrained):
        with pytest.raises(ValueError) as err:
            load(BASES["bert"], adapter=folder)
        text = _lines(err)
        assert "modules_to_save" in text and "bert.embeddings.word_embeddings" in text, text


def test_dora_on_some_layers_takes_the_other_magnitudes_from_the_base(tmp_path):
    folder = _copy(tmp_path, "llama")
    path = folder / peft.CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "layers_to_transform": [0]}))
    tensors = load_file(folder / peft.WEIGHTS_FILE)
    kept = {k: v for k, v in tensors.items() if ".layers.1." not in k}
    save_file(kept, folder / peft.WEIGHTS_FILE, metadata={"format": "pt"})
    enc = from_pretrained(BASES["llama"])
    with pytest.raises(ValueError) as err:
        peft.read(folder, "llama", enc.config)
    assert "params" in _lines(err)
    read = peft.read(folder, "llama", enc.config, params=enc.params)
    query = read.variables["layers"]["self_attn"]["q_proj"]
    kernel = np.asarray(enc.params["layers"]["self_attn"]["q_proj"]["kernel"][1], np.float32)
    np.testing.assert_allclose(
        np.asarray(query["lora_magnitude"][1]), np.linalg.norm(kernel, axis=0), rtol=1e-6
    )
    assert not np.asarray(query["lora_b"][1]).any()
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    np.testing.assert_array_equal(np.asarray(query["lora_magnitude"][0]), tensors[key])


@pytest.mark.parametrize("name", BASES)
def test_save_round_trips_a_classifier_adapter(name, tmp_path):
    """peft's SEQ_CLS adapter -> gaam_jax -> peft.save -> the same classifier and config."""
    from gaam_jax.encoders import heads

    folder = ROOT / name / "adapter"
    clf = classifier_from_pretrained(BASES[name], adapter=folder)
    enc = clf.encoder
    saved, left = heads.head_params_to_hf(name, enc.config_json, clf.params["head"])
    assert not left
    out = tmp_path / "out"
    peft.save(out, enc.module.adapters.lora, enc.adapters, name, enc.config,
              task_type="SEQ_CLS", saved=saved)  # fmt: skip
    inputs, ref = _io(ROOT / name)
    again = classifier_from_pretrained(BASES[name], adapter=out)
    got = np.asarray(again.logits(**inputs))
    np.testing.assert_allclose(got, ref, rtol=0, atol=F32_RTOL * np.abs(ref).max())
    theirs = json.loads((folder / peft.CONFIG_FILE).read_text())
    ours = json.loads((out / peft.CONFIG_FILE).read_text())
    assert set(ours) == set(theirs)
    for key in ("task_type", "use_dora", "use_rslora", "r", "lora_alpha", "peft_type"):
        assert ours[key] == theirs[key], key
    assert set(theirs["modules_to_save"]) <= set(ours["modules_to_save"]) | {"pooler"}
    keys = set(load_file(out / peft.WEIGHTS_FILE))
    theirs_keys = set(load_file(folder / peft.WEIGHTS_FILE))
    if theirs["layers_to_transform"] is None and not theirs["rank_pattern"]:
        # The same tensors under the same names, the head included (peft's layout).
        assert {k for k in keys if "lora" in k} == {k for k in theirs_keys if "lora" in k}
    assert {k for k in theirs_keys if "lora" not in k} <= keys
    assert (out / peft.README_FILE).is_file() and not (out / peft.DAAM_FILE).exists()
