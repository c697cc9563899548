"""Raw-input inference through the encoder that made a run's features, and its export.

A tiny random BERT (tests/model_folders.py's ``tiny_bert_folder``: 2 layers x 32) extracts 24
offline texts; a tiny decoder trains one epoch on them. The audio case extracts synthetic
waveforms with the tiny WavLM (tests/model_folders.py's ``wavlm_folder``) through a stubbed
source and uses a freshly initialised decoder: what it checks is the encoder's path.

Tolerances: float32 on CPU. Extraction pads each batch of texts to a bucketed length and fills
batches to their row count; ``predict_raw`` batches the same texts differently and the exported
program pads them to ``max_length``. Masked positions add exact zeros, but the shapes change the
order of XLA's float sums, so values agree to 1e-5 of their largest magnitude, not bit for bit.
"""

import json
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_folders import tiny_bert_folder, wavlm_folder
from train_helpers import tiny_config

from data import extract, feature_encoder, pipeline
from data.datasets import encoder_features, registry
from gaam_jax.encoders import checkpoint
from train import artefacts, trainer
from train import config as config_lib
from train.inference import Predictor, load_exported
from train.splits import open_folds
from train.steps import Steps

# Every test here extracts, trains or compiles an encoder: integration tests. Marked together,
# they stay together when the slow tests are sorted first (conftest.py): one text_run.
pytestmark = pytest.mark.slow


def _close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tfds_dir):
    """``folder`` (the encoder), ``name`` (its name in the dataset's), ``path`` (the feature
    dataset) and ``run`` (a run folder): tiny BERT features, one epoch."""
    tmp = tmp_path_factory.mktemp("raw")
    folder = tiny_bert_folder(tmp / "bert")
    encoder = feature_encoder.FeatureEncoder(folder, max_length=16, batch_size=8)
    # The session's tfds folder holds the source texts; a name of this folder's own keeps
    # the shards and dataset apart from any other (a reordered run sets this fixture up again).
    name = f"rawinf_{tmp.name}"
    path = extract.extract("pang_lee_polarity", tfds_dir, encoder=encoder, encoder_name=name,
                           limit=24, shard_size=24, progress=False)  # fmt: skip
    config = config_lib.load(tiny_config(tmp / "cfg.py", path, num_epochs=1))
    trainer.run(config, tmp / "w", progress=False)
    return types.SimpleNamespace(folder=folder, name=name, path=path,
                                 run=tmp / "w" / "toy" / "seed0_fold1")  # fmt: skip


def _texts_and_features(tfds_dir, path, n):
    """The first ``n`` source texts and their extracted features ``[n, 2, 32]``."""
    source, _ = pipeline.load_features(path)
    by_id = {int(source[i]["id"]): source[i]["features"] for i in range(len(source))}
    texts, _ = registry.load_text("pang_lee_polarity", tfds_dir)
    records = [texts[i] for i in range(n)]
    return [r["text"] for r in records], np.stack([by_id[int(r["id"])] for r in records])


def test_extraction_records_its_encoder_and_the_run_keeps_it(text_run, tfds_dir, tmp_path):
    folder, path, run = text_run.folder, text_run.path, text_run.run
    _, info = pipeline.load_features(path)
    record = info.metadata["extraction"]
    assert record["encoder"] == "folder" and record["folder"] == str(folder.absolute())
    assert record["fingerprint"] == checkpoint.weights_fingerprint(folder)
    assert (record["model_type"], record["pooling"], record["max_length"]) == ("bert", "mean", 16)
    assert (record["first_layer"], record["compute_dtype"]) == (1, "float32")
    assert json.loads((run / "config.json").read_text())["data"]["extraction"] == record
    # The packaged MiniLM is recorded as such, without its install-specific folder.
    minilm = feature_encoder.FeatureEncoder(max_length=32).record()
    assert minilm["encoder"] == "minilm" and "folder" not in minilm
    # Shards of other weights are refused on resume (the manifest alone would not see them).
    shards = tmp_path / "shards"
    shutil.copytree(tfds_dir / "shards" / path.parent.name, shards)
    stale = json.loads((shards / encoder_features.EXTRACTION).read_text())
    (shards / encoder_features.EXTRACTION).write_text(json.dumps(stale | {"fingerprint": "0"}))
    encoder = feature_encoder.FeatureEncoder(folder, max_length=16, batch_size=8)
    with pytest.raises(ValueError, match="shards of another encoder's weights"):
        extract.extract("pang_lee_polarity", tfds_dir, encoder=encoder, shards_dir=shards,
                        encoder_name=text_run.name, limit=24, shard_size=24,
                        progress=False)  # fmt: skip


def test_predict_raw_equals_the_decoder_on_extracted_features(text_run, tfds_dir):
    path, run = text_run.path, text_run.run
    texts, features = _texts_and_features(tfds_dir, path, 8)
    predictor = Predictor.from_run(run)
    _close(predictor.features(texts), features)
    logits = predictor.logits_raw(texts)
    _close(logits, predictor.logits(features))
    assert predictor.predict_raw(texts).tolist() == logits.argmax(-1).tolist()
    assert predictor.predict_text(texts).tolist() == logits.argmax(-1).tolist()


def test_raw_export_reloads_with_jax_alone(text_run, tfds_dir, tmp_path):
    path, run = text_run.path, text_run.run
    texts, features = _texts_and_features(tfds_dir, path, 8)
    predictor = Predictor.from_run(run)
    artefact = predictor.export(tmp_path / "raw.jaxexport", raw=True)
    exported = load_exported(artefact)
    inputs = predictor.preprocess(texts)
    assert {k: v.shape for k, v in inputs.items()} == {"input_ids": (8, 16),
                                                       "attention_mask": (8, 16)}  # fmt: skip
    _close(exported(**inputs), predictor.logits_raw(texts))
    three = predictor.preprocess(texts[:3])  # any batch size
    _close(exported(**three), predictor.logits(features[:3]))
    np.savez(tmp_path / "x.npz", **inputs)
    code = (
        "import sys, jax, numpy as np\n"
        f"e = jax.export.deserialize(bytearray(open({str(artefact)!r}, 'rb').read()))\n"
        f"out = np.asarray(e.call(dict(np.load({str(tmp_path / 'x.npz')!r}))))\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "assert not loaded & {'gaam_jax', 'train', 'data', 'flax'}, loaded\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, out)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    _close(np.load(tmp_path / "y.npy"), predictor.logits_raw(texts))
    # raw=False keeps features -> logits.
    _close(load_exported(predictor.export(tmp_path / "f.jaxexport"))(features),
           predictor.logits(features))  # fmt: skip


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_a_changed_or_missing_encoder_is_refused_in_one_line(text_run, tmp_path):
    folder, run = text_run.folder, text_run.run
    copy, moved = tmp_path / "bert", tmp_path / "run"
    shutil.copytree(folder, copy)
    shutil.copytree(run, moved)
    recorded = json.loads((moved / "config.json").read_text())
    recorded["data"]["extraction"]["folder"] = str(copy)
    (moved / "config.json").write_text(json.dumps(recorded))
    Predictor.from_run(moved).predict_raw(["a film ."])  # the copy is the same encoder
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    for call in (lambda p: p.predict_raw(["a film ."]), lambda p: p.export(tmp_path / "x", True)):
        with pytest.raises(ValueError, match="fingerprint differs") as excinfo:
            call(Predictor.from_run(moved))
        assert str(copy) in _one_line(excinfo)
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace("film", "x"))
    with pytest.raises(ValueError, match="tokenizer.json is not the one") as excinfo:
        Predictor.from_run(moved).predict_text(["a film ."])
    _one_line(excinfo)
    shutil.rmtree(copy)
    with pytest.raises(FileNotFoundError, match=f"{copy}, which the features") as excinfo:
        Predictor.from_run(moved).predict_raw(["a film ."])
    _one_line(excinfo)


def test_features_without_a_record_train_but_refuse_raw_inputs(text_run, toy, tmp_path):
    """Features from before datasets recorded their encoder (here the toy set, built without
    one) give runs without ``data.extraction``; such a run predicts features, not raw inputs."""
    config = config_lib.load(tiny_config(tmp_path / "cfg.py", toy))
    assert "extraction" not in artefacts.run_config(config, open_folds(config, "toy"))["data"]
    run = text_run.run
    old = tmp_path / "run"
    shutil.copytree(run, old)
    recorded = json.loads((old / "config.json").read_text())
    del recorded["data"]["extraction"]
    (old / "config.json").write_text(json.dumps(recorded))
    predictor = Predictor.from_run(old)
    assert predictor.predict(np.zeros((2, 2, 32), np.float32)).shape == (2,)
    with pytest.raises(ValueError, match="record no encoder.*re-extract") as excinfo:
        predictor.predict_text(["a film ."])
    _one_line(excinfo)


def test_audio_raw_inputs_through_the_recorded_wavlm(tmp_path, monkeypatch):
    """Waveforms shorter than the chunk are padded to it and masked (``mean`` pooling) as the
    extracted chunks were; the exported program pools the frames WavLM derives from the mask."""
    samples, n = 3200, 6
    rng = np.random.default_rng(0)
    lengths = [3200, 2000, 1200, 3200, 800, 2600]
    waves = [rng.integers(-3000, 3000, size=m).astype(np.int16) for m in lengths]
    records = [{"audio": np.pad(w, (0, samples - len(w))), "length": len(w), "label": i % 2,
                "id": i, "group": 1} for i, w in enumerate(waves)]  # fmt: skip
    info = types.SimpleNamespace(features={"label": types.SimpleNamespace(names=["a", "b"])})
    monkeypatch.setattr(registry, "load_examples", lambda *a, **k: (records, info))
    folder = wavlm_folder(tmp_path / "wavlm")
    encoder = feature_encoder.FeatureEncoder(folder, pooling="mean", batch_size=8)
    path = extract.extract("iemocap", tmp_path / "data", encoder=encoder, encoder_name="w",
                           progress=False)  # fmt: skip
    source, meta = pipeline.load_features(path)
    assert meta.metadata["extraction"]["samples"] == samples
    features = np.stack([source[i]["features"] for i in np.argsort(
        [source[i]["id"] for i in range(n)])])  # fmt: skip
    config = config_lib.load(tiny_config(tmp_path / "cfg.py", path))
    steps = Steps(config, 2, features.shape[1:])
    variables = jax.jit(steps.model.init)(jax.random.key(0), jnp.zeros((1, *features.shape[1:])))
    predictor = Predictor(steps, {"batch_stats": {}, **variables},
                          extraction=dict(meta.metadata["extraction"]))  # fmt: skip
    _close(predictor.features(waves), features)
    logits = predictor.logits(features)
    _close(predictor.logits_raw(waves), logits)
    exported = load_exported(predictor.export(tmp_path / "a.jaxexport", raw=True))
    inputs = predictor.preprocess(waves)
    assert inputs["input_values"].shape == inputs["attention_mask"].shape == (n, samples)
    _close(exported(**inputs), logits)
    with pytest.raises(ValueError, match="cut it into chunks of 3200"):
        predictor.predict_raw([np.zeros(3201, np.int16)])


def test_load_exported_takes_a_dict_of_one_array_as_keywords(tmp_path):
    """A raw artefact of an image encoder has one input, ``pixel_values``, in a dict."""
    spec = {"pixel_values": jax.ShapeDtypeStruct((2, 3, 4, 4), jnp.float32)}
    exported = jax.export.export(jax.jit(lambda x: x["pixel_values"].sum((1, 2, 3))))(spec)
    (tmp_path / "one.jaxexport").write_bytes(exported.serialize())
    loaded = load_exported(tmp_path / "one.jaxexport")
    assert loaded(pixel_values=np.ones((2, 3, 4, 4), np.float32)).tolist() == [48.0, 48.0]
