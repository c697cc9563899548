"""Feature extraction: pooling, preprocessing, meshes, resumable shards, CLI errors, bad data.

The tiny random encoders are the committed parity fixtures (tests/fixtures/encoders), copied to
tmp_path with the files a Hugging Face snapshot adds (tests/model_folders.py): a word-level
``tokenizer.json`` for Llama (built with the tokenizers library) and ``preprocessor_config.json``
for BEiT and WavLM.
"""

import json
import shutil

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from data_helpers import extract_cli_error
from model_folders import FIXTURES, beit_folder, llama_folder, wavlm_folder

from data import extract, feature_encoder, pipeline
from data.datasets import encoder_features
from data.preprocess import audio, image, text
from gaam_jax.encoders import pooling


@pytest.fixture(scope="module")
def encoder():
    # Batches of 8 rows: one per shard of the resume test (the default 32 pads each to 32).
    return feature_encoder.TextEncoder(max_length=64, batch_size=8)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return llama_folder(tmp_path_factory.mktemp("enc") / "llama")


def test_pooling_is_mask_aware_by_default():
    hidden = jnp.arange(1 * 4 * 3, dtype=jnp.float32).reshape(1, 4, 3)  # one layer's [B, T, d]
    mask = jnp.array([[1, 1, 0, 0]])
    mean = pooling.pooling("mean")(hidden, mask)
    chex.assert_shape(mean, (1, 3))
    chex.assert_trees_all_close(mean[0], hidden[0, :2].mean(0))
    chex.assert_trees_all_close(pooling.pooling("mean_with_padding")(hidden, mask), hidden.mean(1))
    # No mask (images, audio as the paper): every position counts.
    chex.assert_trees_all_close(pooling.mean(hidden, None), hidden.mean(1))
    chex.assert_trees_all_close(pooling.last(hidden, mask), hidden[:, 1])
    chex.assert_trees_all_close(pooling.first(hidden, mask), hidden[:, 0])
    with pytest.raises(ValueError, match="pooling must be one of"):
        pooling.pooling("max")


def test_llama_batches_equal_the_papers_one_text_at_a_time(llama):
    """Right padding with pad = eos and a masked mean give the paper's unpadded features."""
    texts = ["world news", "the science of tech and business in the world", "a", "sports"]
    enc = feature_encoder.TextEncoder(llama, max_length=32)
    pre = enc.preprocess
    assert pre.pad_id == 2 and pre.max_length == 32  # eos; Llama has no pad token
    ids = pre.encode(texts)
    assert [int(i[0]) for i in ids] == [1] * 4  # BOS included, as the paper's features
    batch = pre.collate(ids, 6)
    assert batch["input_ids"].shape == (6, 16) and batch["input_ids"][2, 2] == 2
    batched = enc(texts)
    from gaam_jax.encoders import from_pretrained

    model = from_pretrained(llama)
    for i, seq in enumerate(ids):  # one text at a time, no padding, mean over all tokens
        alone = np.asarray(model.hidden_states(input_ids=seq[None]))[0, 1:].mean(1)
        # float32 on CPU; only the padded length changes the reduction order: 1e-5 relative.
        np.testing.assert_allclose(batched[i], alone, rtol=1e-5, atol=1e-5 * np.abs(alone).max())
    assert text.bucket_length(130, 4096) == 256 and text.bucket_length(17, 4096) == 32
    assert text.DEFAULT_MAX_LENGTH["llama"] == 4096  # the paper's truncation


def test_beit_images_are_resized_and_normalised_as_the_processor(tmp_path):
    from PIL import Image

    folder = beit_folder(tmp_path / "beit")
    pre = image.ImagePreprocessor.from_folder(
        folder, json.loads((folder / "config.json").read_text())
    )
    img = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    out = pre([img, img])["pixel_values"]
    assert out.shape == (2, 3, 24, 24) and out.dtype == np.float32
    resized = np.asarray(Image.fromarray(img).resize((24, 24), Image.BILINEAR), np.float64)
    expected = ((resized / 255).astype(np.float32) - 0.5) / 0.5
    np.testing.assert_array_equal(out[1], expected.transpose(2, 0, 1))  # same ops, same order
    # A size that is not the model's is refused with the fix.
    bad = json.loads((folder / "preprocessor_config.json").read_text()) | {"size": 32}
    (folder / "preprocessor_config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="come out 32x32 but config.json's image_size is 24"):
        image.ImagePreprocessor.from_folder(folder, {"image_size": 24})


def test_wavlm_chunks_are_normalised_per_chunk(tmp_path):
    folder = wavlm_folder(tmp_path / "w")
    config = json.loads((folder / "config.json").read_text())
    assert audio.frame_lengths(np.array([80_000]), config).tolist() == [250]
    chunk = np.zeros((2, 80_000), np.int16)
    chunk[:, :32_000] = np.random.default_rng(0).integers(-3000, 3000, size=(2, 32_000))
    paper = audio.AudioPreprocessor.from_folder(folder, config)(chunk, np.array([32_000] * 2))
    x = paper["input_values"]
    assert "attention_mask" not in paper  # the paper passes no mask
    np.testing.assert_allclose([x.mean(), x.std()], [0, 1], atol=1e-4)  # whole padded chunk
    masked = audio.AudioPreprocessor.from_folder(folder, config, use_mask=True)
    y = masked(chunk, np.array([32_000] * 2))
    assert not y["input_values"][:, 32_000:].any() and y["attention_mask"].sum() == 64_000
    np.testing.assert_allclose(y["input_values"][:, :32_000].std(), 1, atol=1e-4)


@pytest.mark.slow
def test_extraction_resumes_after_an_interruption(tfds_dir, tmp_path, encoder):
    shards = tmp_path / "shards"

    def stop_after_two(index):
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract.extract(
            "pang_lee_polarity", tfds_dir, encoder=encoder, shards_dir=shards, shard_size=8,
            limit=28, on_shard=stop_after_two, progress=False, encoder_name="resume",
        )  # fmt: skip
    done = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.npz")}
    assert sorted(done) == ["shard-00000.npz", "shard-00001.npz"]
    written = []
    path = extract.extract(
        "pang_lee_polarity", tfds_dir, encoder=encoder, shards_dir=shards, shard_size=8,
        limit=28, on_shard=written.append, progress=False, encoder_name="resume",
    )  # fmt: skip
    assert written == [2, 3]  # only the unfinished shards were computed
    assert {p: shards.joinpath(p).stat().st_mtime_ns for p in done} == done

    # The result equals an uninterrupted extraction of the same examples.
    source, info = pipeline.load_features(path)
    assert len(source) == 28
    assert info.metadata["pooling"] == "mean" and info.metadata["num_layers"] == 6
    by_id = {source[i]["id"]: source[i]["features"] for i in range(len(source))}
    from data.datasets import registry

    texts, _ = registry.load_text("pang_lee_polarity", tfds_dir)
    direct = encoder([texts[i]["text"] for i in range(8)])
    for i in range(8):
        chex.assert_trees_all_close(by_id[texts[i]["id"]], direct[i], atol=1e-5)


def test_minilm_features_are_unchanged(tfds_dir, encoder):
    """MiniLM through from_pretrained equals the committed BERT parity fixture's pooling."""
    from data.datasets import registry

    texts, _ = registry.load_text("pang_lee_polarity", tfds_dir)
    batch = [texts[i]["text"] for i in range(3)]
    ids = encoder.preprocess(batch)
    hidden = np.asarray(encoder.encoder.hidden_states(**ids))  # [B, 7, T, 384]
    m = ids["attention_mask"][:, None, :, None]
    expected = (hidden[:, 1:] * m).sum(2) / m.sum(2)
    np.testing.assert_allclose(encoder(batch), expected, rtol=1e-5, atol=1e-5)


def test_changed_settings_are_refused(tfds_dir, tmp_path, encoder):
    shards = tmp_path / "s"
    shards.mkdir()
    (shards / encoder_features.MANIFEST).write_text(json.dumps({"pooling": "other"}))
    with pytest.raises(ValueError, match="made with other settings"):
        extract.extract("pang_lee_polarity", tfds_dir, encoder=encoder, shards_dir=shards, limit=4)


def _write_shards(folder, features, labels, ids=None):
    folder.mkdir(parents=True)
    n, layers, dim = features.shape
    ids = np.arange(n) if ids is None else ids
    np.savez(folder / encoder_features.shard_name(0), features=features, label=labels, id=ids)
    manifest = dict(encoder="toy", pooling="mean", num_layers=layers, dim=dim, dtype="float32",
                    label_names=["a", "b"], num_shards=1, source="toy/train")  # fmt: skip
    (folder / encoder_features.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda f, lab: f.__setitem__((3, 0, 1), np.nan),
         "example id 3 in .*shard-00000.npz: features contain NaN"),
        (lambda f, lab: f.__setitem__((2, 1, 0), np.inf), "example id 2 .*NaN or Inf"),
        (lambda f, lab: lab.__setitem__(4, 7),
         "example id 4 .*label 7 is not one of the 2 classes"),
    ],
)  # fmt: skip
def test_bad_examples_stop_the_build_and_leave_nothing_complete(tmp_path, mutate, message):
    features = np.random.default_rng(0).normal(size=(6, 3, 4)).astype(np.float32)
    labels = np.array([0, 1, 0, 1, 0, 1])
    mutate(features, labels)
    _write_shards(tmp_path / "shards", features, labels)
    with pytest.raises(ValueError, match=message):
        encoder_features.build(tmp_path / "shards", tmp_path / "data", "toy")
    built = tmp_path / "data" / "encoder_features" / "toy" / "1.0.0"
    assert not (built / "dataset_info.json").exists()
    with pytest.raises(FileNotFoundError, match="python -m data.extract"):
        pipeline.load_features(built)


def test_wrong_shapes_empty_splits_and_missing_manifests(tmp_path):
    _write_shards(tmp_path / "a", np.zeros((2, 3, 4), np.float32), np.zeros(2, int))
    manifest = json.loads((tmp_path / "a" / encoder_features.MANIFEST).read_text())
    manifest["dim"] = 5
    (tmp_path / "a" / encoder_features.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"shape \(3, 4\), expected \(3, 5\)"):
        encoder_features.build(tmp_path / "a", tmp_path / "data", "a")
    _write_shards(tmp_path / "b", np.zeros((0, 3, 4), np.float32), np.zeros(0, int))
    with pytest.raises(ValueError, match="empty split"):
        encoder_features.build(tmp_path / "b", tmp_path / "data", "b")
    with pytest.raises(FileNotFoundError, match="extract the features first"):
        encoder_features.build(tmp_path / "none", tmp_path / "data", "c")


def test_cli_runs_end_to_end(tfds_dir, tmp_path, capsys):
    code = extract.main(
        ["--dataset", "mini_newsgroup", "--data-dir", str(tmp_path), "--limit", "8",
         "--shard-size", "4", "--batch-size", "4", "--max-length", "32", "--pooling",
         "mean_with_padding", "--feature-dtype", "float16"]
    )  # fmt: skip
    assert code == 0
    out, err = capsys.readouterr()
    (line,) = out.splitlines()  # tfds' own lines go to stderr: stdout is the result only
    assert line.startswith(f"wrote {tmp_path}/encoder_features/") and "[6, 384] per example" in line
    assert "compute float32" in err and "matmul precision" in err and "examples/s" in err
    folder = tmp_path / "encoder_features" / "mini_newsgroup_minilm_mean_with_padding" / "1.0.0"
    source, info = pipeline.load_features(folder)
    assert (
        source[0]["features"].dtype == np.float16
        and info.metadata["pooling"] == "mean_with_padding"
    )


def test_sharded_extraction_equals_one_device(tfds_dir, tmp_path, llama):
    """Llama tensor-parallel over model=2 and data-parallel over 4 (8 CPU devices)."""
    common = ["--encoder", str(llama), "--dataset", "pang_lee_polarity", "--data-dir",
              str(tfds_dir), "--limit", "6", "--batch-size", "3", "--no-progress"]  # fmt: skip
    feats = {}
    for name, extra in [("one", []), ("mesh", ["--mesh", "data=-1,model=2"])]:
        assert extract.main([*common, "--encoder-name", name, *extra]) == 0
        source, _ = pipeline.load_features(
            tfds_dir / "encoder_features" / f"pang_lee_polarity_{name}_mean" / "1.0.0"
        )
        feats[name] = np.stack([source[i]["features"] for i in np.argsort(
            [source[i]["id"] for i in range(len(source))])])  # fmt: skip
    scale = np.abs(feats["one"]).max()
    # float32 on CPU: sharded matmuls sum in another order, 1e-5 of the largest magnitude.
    np.testing.assert_allclose(feats["mesh"], feats["one"], atol=1e-5 * scale)


def test_every_user_error_is_one_line_and_exit_2(tmp_path, capsys, llama):
    data = str(tmp_path / "data")
    beit = beit_folder(tmp_path / "beit")
    no_tok = tmp_path / "no_tok"
    shutil.copytree(FIXTURES / "llama" / "base", no_tok)
    cases = [
        (["--dataset", "imdb"], "unknown dataset 'imdb'; choose one of"),
        (["--dataset", "ag_news", "--encoder", str(tmp_path / "nope")], "is not a folder"),
        (["--dataset", "ag_news", "--mesh", "data=2,pipe=2"], "axes must be data and model"),
        (["--dataset", "ag_news", "--mesh", "model=x"], "'model=x' is not axis=size"),
        (["--dataset", "ag_news", "--mesh", "data=-1,model=3"], "3 does not divide the 8"),
        (["--dataset", "ag_news", "--mesh", "data=2,model=2"], "4 devices but 8 are visible"),
        (["--dataset", "ag_news", "--mesh", "data=2,data=4"], "axis 'data' is given twice"),
        (["--dataset", "ag_news", "--dtype", "float16"], "--dtype must be float32 or bfloat16"),
        (["--dataset", "ag_news", "--batch-size", "0"], "--batch-size must be positive"),
        (["--dataset", "ag_news", "--pooling", "max"], "invalid choice: 'max'"),
        (["--dataset", "iemocap", "--encoder", str(wavlm_folder(tmp_path / "w"))],
         "has no Session1..Session5 folders: place IEMOCAP_full_release there"),
        (["--dataset", "ag_news", "--encoder", str(no_tok)], "tokenizer.json does not exist"),
        (["--dataset", "cifar100", "--encoder", str(llama)], "pass --encoder with a beit"),
        (["--dataset", "cifar100", "--encoder", str(beit)], "tfds build cifar100"),
    ]  # fmt: skip
    for argv, message in cases:
        line = extract_cli_error([*argv, "--data-dir", data, "--no-progress"], capsys, tmp_path)
        assert message in line, (argv, line)
    (beit / "preprocessor_config.json").rename(beit.with_suffix(".json"))
    line = extract_cli_error(["--dataset", "cifar100", "--encoder", str(beit), "--data-dir", data],
                             capsys, tmp_path)  # fmt: skip
    assert "preprocessor_config.json does not exist: copy" in line
    with pytest.raises(FileNotFoundError):  # --debug: the traceback
        extract.main(["--dataset", "ag_news", "--encoder", str(no_tok), "--data-dir", data,
                      "--debug"])  # fmt: skip
