"""Feature datasets written to ``gs://`` by ``data.extract`` and ``data.import_features``, for
real against the local GCS emulator (``gcs`` fixture, :mod:`gcs_emulator`), in-process.

Each test stages in its own ``$GAAM_JAX_CACHE`` (wiping it is moving to another machine) and
uses its own prefix of the session's bucket.
"""

import shutil

import gcs_emulator
import numpy as np
import pytest

from app import storage
from data import extract, feature_encoder, import_features, pipeline

pytestmark = pytest.mark.slow  # gs:// tests run in make test-slow (and CI)

BUCKET = gcs_emulator.BUCKET
NAME = "pang_lee_polarity_minilm_mean"
SOURCE = "pang_lee_polarity/1.0.0"
ARGS = ["--dataset", "pang_lee_polarity", "--limit", "24", "--shard-size", "8", "--batch-size",
        "8", "--no-progress"]  # fmt: skip


def _files(folder) -> dict[str, bytes]:
    """Every file under a local or remote folder, by relative path."""
    return {name: p.read_bytes() for name, p in storage.files(folder)}


def _no_gs_folder(*roots) -> None:
    for root in roots:
        assert not [p for p in root.rglob("*") if p.name.startswith("gs:")], root


@pytest.fixture(scope="module")
def reference(tfds_dir, tmp_path_factory):
    """The dataset the CLI extracts into a local data folder: its files, by relative path."""
    from data.datasets import registry

    registry.load_offline("pang_lee_polarity", tfds_dir)  # built once per session
    data = tmp_path_factory.mktemp("local")
    (data / "pang_lee_polarity").symlink_to(tfds_dir / "pang_lee_polarity")
    assert extract.main(["--data-dir", str(data), *ARGS]) == 0
    return _files(data / "encoder_features" / NAME / "1.0.0")


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """This test's cache and staging root (``GAAM_JAX_CACHE``), and a clean working folder."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _one_line_error(main, argv, capsys) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_extract_to_gcs_equals_the_local_extraction(gcs, reference, machine, tmp_path, capsys):
    """The source is built in staging (not in the bucket); the CLI prints the URL."""
    url = f"gs://{BUCKET}/extract-test/data"
    capsys.readouterr()
    assert extract.main(["--data-dir", url, *ARGS]) == 0
    (out,) = capsys.readouterr().out.splitlines()  # tfds' own lines go to stderr
    assert out.startswith(f"wrote {url}/encoder_features/{NAME}/1.0.0: "), out
    remote = f"{url}/encoder_features/{NAME}/1.0.0"
    # Byte for byte: nothing in the dataset names the data folder or the staging folder.
    assert _files(remote) == reference
    objects = gcs_emulator.objects(gcs, "extract-test/data/")
    names = ("extraction.json", "manifest.json", *(f"shard-0000{i}.npz" for i in range(3)))
    shards = [f"extract-test/data/shards/{NAME}/{n}" for n in names]
    assert sorted(o for o in objects if "/shards/" in o) == shards
    assert not [o for o in objects if o.startswith(f"extract-test/data/{SOURCE}")]  # not uploaded
    staged = storage.staging(url)
    assert staged.is_relative_to(machine / "staging")
    assert (staged / SOURCE / "dataset_info.json").is_file()  # built from the package
    _no_gs_folder(tmp_path)
    source, info = pipeline.load_features(remote)  # the trainer's read
    assert len(source) == 24 and info.metadata["extraction"]["encoder"] == "minilm"


def test_extract_resumes_from_the_buckets_shards_on_another_machine(
    gcs, reference, tfds_dir, machine, tmp_path
):
    """Killed after shard 0, restarted with an empty cache: downloads it, computes 1 and 2."""
    url = f"gs://{BUCKET}/extract-resume/data"
    gcs_emulator.upload(tfds_dir / SOURCE, f"{url}/{SOURCE}")  # the source read from the bucket
    encoder = feature_encoder.FeatureEncoder(batch_size=8)
    common = dict(encoder=encoder, shard_size=8, limit=24, progress=False)

    def stop(index):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract.extract("pang_lee_polarity", url, on_shard=stop, **common)
    prefix = f"extract-resume/data/shards/{NAME}/"
    assert sorted(gcs_emulator.objects(gcs, prefix)) == [
        prefix + n for n in ("extraction.json", "manifest.json", "shard-00000.npz")
    ]
    assert not gcs_emulator.objects(gcs, "extract-resume/data/encoder_features/")
    first = storage.path(f"{url}/shards/{NAME}/shard-00000.npz").read_bytes()

    shutil.rmtree(machine)  # another machine
    written = []
    path = extract.extract("pang_lee_polarity", url, on_shard=written.append, **common)
    assert written == [1, 2]  # shard 0 came from the bucket
    assert str(path) == f"{url}/encoder_features/{NAME}/1.0.0" and storage.is_url(path)
    staged_shard = storage.staging(url) / "shards" / NAME / "shard-00000.npz"
    assert staged_shard.read_bytes() == first
    assert (storage.staging(url) / SOURCE).is_symlink()  # to its local_copy, not rebuilt
    assert _files(path) == reference

    shutil.rmtree(machine)  # a third machine reruns the finished command: reused as it is
    written = []
    assert extract.extract("pang_lee_polarity", url, on_shard=written.append, **common) == path
    assert written == [] and not (storage.staging(url) / "shards").exists()
    assert _files(path) == reference
    _no_gs_folder(tmp_path)


def test_import_features_to_gcs_equals_the_local_import(gcs, machine, tmp_path, capsys):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 3, 4)).astype(np.float32)
    label = np.arange(40) % 3
    npz = tmp_path / "f.npz"
    np.savez(npz, features=features, label=label, group=np.arange(40) % 4)
    local = tmp_path / "local"
    url = f"gs://{BUCKET}/import-test/data"
    for data_dir in (str(local), url):
        assert (
            import_features.main(["--npz", str(npz), "--name", "mine", "--data-dir", data_dir]) == 0
        )
    out = capsys.readouterr().out.splitlines()
    remote = f"{url}/encoder_features/mine/1.0.0"
    assert out == [str(local / "encoder_features" / "mine" / "1.0.0"), remote]
    assert _files(remote) == _files(local / "encoder_features" / "mine" / "1.0.0")
    source, info = pipeline.load_features(remote)  # the trainer's read, through local_copy
    assert len(source) == 40 and info.features["features"].shape == (3, 4)
    ids = [source[i]["id"] for i in range(40)]
    np.testing.assert_array_equal(np.stack([source[i]["features"] for i in range(40)]),
                                  features[ids])  # fmt: skip

    # Again: reused (the fingerprint is read from the bucket). Other arrays: refused.
    shutil.rmtree(machine)
    assert import_features.main(["--npz", str(npz), "--name", "mine", "--data-dir", url]) == 0
    assert capsys.readouterr().out.strip() == remote
    assert not storage.staging(url).exists()
    np.savez(npz, features=features * 2, label=label)
    line = _one_line_error(
        import_features.main, ["--npz", str(npz), "--name", "mine", "--data-dir", url], capsys
    )
    assert "already holds a different dataset" in line and remote in line
    _no_gs_folder(tmp_path)


def test_bad_inputs_to_gcs_are_one_line_and_write_nothing(gcs, machine, tmp_path, capsys):
    features = np.zeros((6, 2, 3), np.float32)
    features[4, 1, 2] = np.nan
    npz = tmp_path / "bad.npz"
    np.savez(npz, features=features, label=np.arange(6) % 2)
    url = f"gs://{BUCKET}/import-bad/data"
    argv = ["--npz", str(npz), "--name", "bad", "--data-dir", url]
    assert "features[4, 1, 2] is nan" in _one_line_error(import_features.main, argv, capsys)
    np.savez(npz, features=np.ones((6, 2, 3), np.float32), label=np.arange(6) % 2)
    argv = ["--npz", str(npz), "--name", "bad", "--data-dir", "gs://no-such-bucket/data"]
    assert "does not exist" in _one_line_error(import_features.main, argv, capsys)
    argv = ["--data-dir", "gs://no-such-bucket/data", *ARGS]
    assert "no-such-bucket does not exist" in _one_line_error(extract.main, argv, capsys)
    argv = ["--data-dir", url, "--distributed", *ARGS]
    assert "--distributed with an object-store" in _one_line_error(extract.main, argv, capsys)
    assert gcs_emulator.objects(gcs, "import-bad/") == []
    assert not machine.exists()  # nothing staged either
    _no_gs_folder(tmp_path)


def test_a_dataset_upload_replaces_what_an_interrupted_one_left(gcs, tmp_path):
    """An upload cut before ``dataset_info.json`` leaves objects a rebuilt dataset may not
    have (other shard files); publishing prunes them, while a plain upload keeps them."""
    old, new = tmp_path / "old", tmp_path / "new"
    for folder, names in (
        (old, ["a-00000-of-00002", "a-00001-of-00002"]),
        (new, ["a-00000-of-00001"]),
    ):
        folder.mkdir()
        for name in names:
            (folder / name).write_text(f"{folder.name} {name}")
        (folder / "dataset_info.json").write_text(folder.name)
    url = f"gs://{BUCKET}/prune/ds/1.0.0"
    for name, p in storage.files(old):
        if name != "dataset_info.json":  # interrupted before its last file
            storage.copy_file(p, storage.path(url) / name)
    storage.upload(new, url, last="dataset_info.json")
    assert "a-00001-of-00002" in _files(url)  # upload alone leaves the other build's shards
    storage.upload(new, url, last="dataset_info.json", prune=True)
    assert _files(url) == _files(new)
