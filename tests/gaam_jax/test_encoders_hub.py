"""Hugging Face hub ids as encoders: ``from_pretrained("org/name")`` and ``--encoder org/name``.

Offline and real: a hub cache is laid out in tmp_path as huggingface_hub lays it out
(``models--org--name/snapshots/<commit>/`` and ``refs/main``), with the tiny Llama fixture of
:mod:`model_folders` as the snapshot's files, and ``HF_HUB_OFFLINE=1``; every resolution
goes through ``huggingface_hub.snapshot_download`` reading that cache (nothing is mocked).
huggingface_hub reads ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` once, when it is imported, so the
in-process tests also set the two constants it reads; a fresh process sees the variables alone.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from data_helpers import extract_cli_error
from model_folders import FIXTURES, llama_folder

from data import extract, feature_encoder
from data.datasets import encoder_features
from gaam_jax.encoders import checkpoint, from_pretrained, open_host_params

REPO = "org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
FETCH = (
    "--include 'config.json' --include '*.safetensors' --include 'model.safetensors.index.json' "
    "--include 'tokenizer.json' --include 'preprocessor_config.json' --exclude '*/*'"
)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> pathlib.Path:
    """An offline hub cache holding ``org/tiny-llama`` at COMMIT (= main): its snapshot folder."""
    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--org--tiny-llama"
    snapshot = llama_folder(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)  # huggingface_hub reads it without stripping
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot.resolve()


def _message(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_a_hub_id_loads_its_snapshot_as_the_local_folder_does(hub):
    assert checkpoint.is_hub_id(REPO) and checkpoint.resolve(REPO) == hub
    assert checkpoint.resolve(REPO, revision=COMMIT) == hub
    assert checkpoint.resolve(REPO, revision="main") == hub
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 128, (2, 8)).astype(np.int32)
    mask = np.array([[1] * 8, [1] * 5 + [0] * 3], np.int32)
    local = from_pretrained(FIXTURES / "llama" / "base").hidden_states(
        input_ids=ids, attention_mask=mask
    )
    by_id = from_pretrained(REPO).hidden_states(input_ids=ids, attention_mask=mask)
    assert local.shape == (2, 3, 8, 64)
    np.testing.assert_array_equal(np.asarray(by_id), np.asarray(local))  # the same weights
    _, host, _ = open_host_params(REPO, revision=COMMIT)
    _, want, _ = open_host_params(FIXTURES / "llama" / "base")
    np.testing.assert_array_equal(
        host["embed_tokens"]["embedding"], want["embed_tokens"]["embedding"]
    )


def test_an_unknown_id_or_revision_offline_is_one_line_with_the_fix(hub):
    cache = hub.parents[2]
    with pytest.raises(FileNotFoundError) as err:
        checkpoint.resolve("microsoft/wavlm-large")
    assert _message(err) == (
        f"microsoft/wavlm-large (revision main) is not in the Hugging Face cache {cache} "
        "(HF_HUB_OFFLINE=1) and is not a local folder: download it (online) with: hf download "
        f"microsoft/wavlm-large {FETCH}"
    )
    with pytest.raises(FileNotFoundError) as err:
        from_pretrained(REPO, revision="v2")
    assert "org/tiny-llama (revision v2) is not in the Hugging Face cache" in _message(err)
    assert "hf download org/tiny-llama --revision v2 --include" in _message(err)
    with pytest.raises(FileNotFoundError, match="revision f{40}. is not in the"):
        checkpoint.resolve(REPO, revision="f" * 40)
    # A cached snapshot without safetensors weights (a PyTorch-only repository).
    bin_only = cache / "models--org--bin-only"
    (bin_only / "snapshots" / COMMIT).mkdir(parents=True)
    shutil.copy(hub / "config.json", bin_only / "snapshots" / COMMIT)
    (bin_only / "refs").mkdir()
    (bin_only / "refs" / "main").write_text(COMMIT)
    with pytest.raises(FileNotFoundError) as err:
        from_pretrained("org/bin-only")
    assert "has no safetensors weights" in _message(err)
    assert "hf download org/bin-only --local-dir ~/hf/bin-only, convert it once" in _message(err)


def test_an_existing_folder_that_looks_like_an_id_is_a_folder(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(FIXTURES / "llama" / "base", tmp_path / "org" / "tiny-llama")
    assert not checkpoint.is_hub_id(REPO)
    assert checkpoint.resolve(REPO) == pathlib.Path(REPO)  # the folder, not the snapshot
    assert checkpoint.read_config(checkpoint.resolve(REPO))["model_type"] == "llama"
    with pytest.raises(ValueError) as err:
        checkpoint.resolve(REPO, revision="main")
    assert _message(err).startswith("revision 'main' is for a Hugging Face hub id, but org/")
    # Paths, never ids: missing ones are reported by read_config as missing folders.
    for path in ("./tiny-llama", "../tiny-llama", "/org/tiny-llama", "org/a/b", "name"):
        assert not checkpoint.is_hub_id(path) and checkpoint.resolve(path) == pathlib.Path(path)
    with pytest.raises(FileNotFoundError, match="model folder ../tiny-llama does not exist"):
        from_pretrained("../tiny-llama")


def test_the_extraction_cli_takes_a_hub_id(hub, tfds_dir, tmp_path, capsys):
    assert feature_encoder.default_encoder_name(hub) == "tiny_llama"
    encoder = feature_encoder.FeatureEncoder(REPO, revision=COMMIT)  # validates, loads nothing
    assert (encoder.hub_id, encoder.commit, encoder.model_dir) == (REPO, COMMIT, hub)
    argv = ["--encoder", REPO, "--dataset", "pang_lee_polarity", "--data-dir", str(tfds_dir),
            "--limit", "8", "--batch-size", "4", "--no-progress"]  # fmt: skip
    assert extract.main(argv) == 0
    out, _ = capsys.readouterr()
    name = "pang_lee_polarity_tiny_llama_mean"  # as the snapshot folder's name
    assert f"wrote {tfds_dir / 'encoder_features' / name / '1.0.0'}" in out
    manifest = json.loads((tfds_dir / "shards" / name / encoder_features.MANIFEST).read_text())
    assert manifest["encoder_id"] == REPO and manifest["encoder_revision"] == COMMIT
    assert "encoder_dir" not in manifest  # the cache path is this machine's
    assert manifest["num_examples"] == 8 and manifest["encoder"] == "tiny_llama"
    # User errors: one line, exit 2, nothing written.
    data = str(tmp_path / "data")
    line = extract_cli_error(["--encoder", "org/nope", "--dataset", "pang_lee_polarity",
                              "--data-dir", data], capsys, tmp_path)  # fmt: skip
    assert line.startswith("error: org/nope (revision main) is not in the Hugging Face cache ")
    assert line.endswith(f"hf download org/nope {FETCH}")
    line = extract_cli_error(["--encoder", str(hub), "--revision", "main", "--dataset",
                              "pang_lee_polarity", "--data-dir", data],
                             capsys, tmp_path)  # fmt: skip
    assert "--revision is for a hub id --encoder (org/name)" in line
    line = extract_cli_error(["--encoder", "no/such/folder", "--dataset", "pang_lee_polarity",
                              "--data-dir", data], capsys, tmp_path)  # fmt: skip
    assert "--encoder no/such/folder is not a folder" in line


def test_a_fresh_process_reads_the_cache_and_offline_variables(hub):
    """No constants patched: huggingface_hub reads HF_HUB_CACHE/HF_HUB_OFFLINE at import."""
    code = (
        "import sys\n"
        "from gaam_jax.encoders import checkpoint\n"
        f"checkpoint.resolve({str(FIXTURES / 'llama' / 'base')!r})\n"
        "assert 'huggingface_hub' not in sys.modules  # imported only for a hub id\n"
        f"print(checkpoint.resolve({REPO!r}))\n"
        "checkpoint.resolve('org/nope')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 1, done.stderr
    assert pathlib.Path(done.stdout.strip()) == hub
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("FileNotFoundError: org/nope (revision main) is not in the Hugging Face")
    assert "(HF_HUB_OFFLINE=1)" in last
