"""app.storage without a store: paths, atomic writes, and an unreachable ``gs://``."""

import pathlib
import socket
import time

import pytest

from app import storage


def test_paths_keep_urls_and_local_folders_apart(tmp_path):
    assert str(storage.path("gs://bkt/run/a")) == "gs://bkt/run/a"  # pathlib: gs:/bkt/run/a
    assert str(storage.absolute("gs://bkt/run")) == "gs://bkt/run"
    assert isinstance(storage.path(tmp_path), pathlib.Path)
    assert storage.absolute("rel").is_absolute()
    assert storage.endpoint("/local/folder") is None


def test_write_atomic_replaces_a_file_whole(tmp_path):
    target = tmp_path / "a.json"
    storage.write_atomic(target, "old")
    storage.write_atomic(target, b"new", durable=False)
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary left


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the test connects


def test_an_unreachable_store_is_one_line_at_once(monkeypatch, capsys, tmp_path):
    """Without a network gcsfs retries for about a minute; the endpoint is tried first, and
    the CLIs refuse a gs:// workdir or data folder in one line, before any work."""
    import train.__main__ as train_cli
    from data import extract, import_features

    port = _closed_port()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    assert storage.endpoint("gs://bkt/run") == ("127.0.0.1", port)
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port} cannot be reached") as err:
        storage.check_bucket("gs://bkt/run")
    assert "\n" not in str(err.value)

    cfg = "configs/default.py:runlocal"
    assert train_cli.main(["--config", cfg, "--workdir", "gs://bkt/run", "--no-progress"]) == 2
    npz = tmp_path / "f.npz"
    import numpy as np

    np.savez(npz, features=np.zeros((4, 2, 3), np.float32), label=np.array([0, 1, 0, 1]))
    code = import_features.main(["--npz", str(npz), "--name", "f", "--data-dir", "gs://bkt/d"])
    assert code == 2
    code = extract.main(["--dataset", "pang_lee_polarity", "--data-dir", "gs://bkt/d"])
    assert code == 2
    assert time.perf_counter() - start < 30  # not gcsfs's minute of retries per command
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), lines
    assert all("cannot be reached" in line for line in lines), lines
    assert not pathlib.Path("gs:").exists()
