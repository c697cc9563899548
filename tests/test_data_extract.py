"""Feature extraction: pooling, resumable shards, the encoder_features dataset and bad data."""

import json

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from data import extract, pipeline
from data.datasets import encoder_features


@pytest.fixture(scope="module")
def encoder():
    return extract.TextEncoder(max_length=64)


def test_pooling_is_mask_aware_by_default():
    hidden = jnp.arange(2 * 1 * 4 * 3, dtype=jnp.float32).reshape(2, 1, 4, 3)  # [L, B, T, d]
    mask = jnp.array([[1, 1, 0, 0]])
    mean = extract.pool_layers(hidden, mask, "mean")
    chex.assert_shape(mean, (1, 2, 3))
    chex.assert_trees_all_close(mean[0, 0], hidden[0, 0, :2].mean(0))
    chex.assert_trees_all_close(
        extract.pool_layers(hidden, mask, "mean_with_padding")[0, 1], hidden[1, 0].mean(0)
    )
    with pytest.raises(ValueError, match="pooling must be one of"):
        extract.pool_layers(hidden, mask, "max")


def test_extraction_resumes_after_an_interruption(tfds_dir, tmp_path, encoder):
    shards = tmp_path / "shards"

    def stop_after_two(index):
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract.extract(
            "pang_lee_polarity", tfds_dir, encoder=encoder, shards_dir=shards, shard_size=16,
            limit=56, on_shard=stop_after_two, progress=False, encoder_name="resume",
        )  # fmt: skip
    done = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.npz")}
    assert sorted(done) == ["shard-00000.npz", "shard-00001.npz"]
    written = []
    path = extract.extract(
        "pang_lee_polarity", tfds_dir, encoder=encoder, shards_dir=shards, shard_size=16,
        limit=56, on_shard=written.append, progress=False, encoder_name="resume",
    )  # fmt: skip
    assert written == [2, 3]  # only the unfinished shards were computed
    assert {p: shards.joinpath(p).stat().st_mtime_ns for p in done} == done

    # The result equals an uninterrupted extraction of the same examples.
    source, info = pipeline.load_features(path)
    assert len(source) == 56
    assert info.metadata["pooling"] == "mean" and info.metadata["num_layers"] == 6
    by_id = {source[i]["id"]: source[i]["features"] for i in range(len(source))}
    from data.datasets import registry

    texts, _ = registry.load_text("pang_lee_polarity", tfds_dir)
    direct = encoder([texts[i]["text"] for i in range(8)])
    for i in range(8):
        chex.assert_trees_all_close(by_id[texts[i]["id"]], direct[i], atol=1e-5)


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
         "--shard-size", "4", "--max-length", "32", "--pooling", "mean_with_padding",
         "--dtype", "float16"]
    )  # fmt: skip
    assert code == 0
    assert "features [6, 384] per example" in capsys.readouterr().out
    folder = tmp_path / "encoder_features" / "mini_newsgroup_minilm_mean_with_padding" / "1.0.0"
    source, info = pipeline.load_features(folder)
    assert (
        source[0]["features"].dtype == np.float16
        and info.metadata["pooling"] == "mean_with_padding"
    )
