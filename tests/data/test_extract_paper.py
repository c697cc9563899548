"""The paper's three experiments end to end on mock data: extraction CLI, then one training epoch.

AG News (Llama) and CIFAR-100 (BEiT) come from ``tfds.testing.mock_data`` through tfds' own
builders; IEMOCAP (WavLM) from a generated manual-download tree built by
:mod:`data.datasets.iemocap`. The encoders are the tiny random parity fixtures (2 layers), so
each config's ``daamv1`` decoder is trained with ``num_heads`` 2 (its 8 heads need 8 layers).
"""

import json

import numpy as np
import pytest
from data_helpers import fake_iemocap
from model_folders import beit_folder, llama_folder, wavlm_folder

from data import extract, pipeline
from train import __main__ as train_cli


def _extract(tmp_path, encoder, dataset, *extra):
    argv = ["--encoder", str(encoder), "--encoder-name", "tiny", "--dataset", dataset,
            "--data-dir", str(tmp_path / "data"), "--batch-size", "4", "--no-progress",
            *extra]  # fmt: skip
    assert extract.main(argv) == 0


def _train(tmp_path, config, name, train_path, validation_path=None, seeds=None):
    argv = ["--config", f"configs/paper/{config}.py:daamv1,runlocal",
            "--workdir", str(tmp_path / "run"), "--no-progress", "--config.model.num_heads=2",
            "--config.model.conv_features=8",
            f"--config.dataset_paths.{name}={train_path}"]  # fmt: skip
    if validation_path:
        argv.append(f"--config.validation_paths.{name}={validation_path}")
    if seeds:
        argv.append(f"--config.seeds={seeds}")
    assert train_cli.main(argv) == 0
    return json.loads((tmp_path / "run" / "results.json").read_text())


def _features(path):
    source, info = pipeline.load_features(path)
    return np.stack([source[i]["features"] for i in range(len(source))]), source, info


@pytest.mark.slow
def test_ag_news_on_llama(tmp_path, mocked_sources):
    llama = llama_folder(tmp_path / "llama")
    _extract(tmp_path, llama, "ag_news", "--dtype", "bfloat16", "--max-length", "32")
    _extract(tmp_path, llama, "ag_news", "--split", "test", "--max-length", "32")
    root = tmp_path / "data" / "encoder_features"
    train, test = root / "ag_news_tiny_mean" / "1.0.0", root / "ag_news_tiny_mean_test" / "1.0.0"
    x, _, info = _features(train)
    assert x.shape == (8, 2, 64) and np.isfinite(x).all()
    assert (
        info.metadata["layers"] == "hidden_states[1:]" and info.features["label"].num_classes == 4
    )
    # The mock's train and test splits hold the same texts: bf16 compute is close to float32.
    y, _, _ = _features(test)
    np.testing.assert_allclose(x, y, atol=5e-2 * np.abs(y).max())  # bf16: 8 mantissa bits
    results = _train(tmp_path, "ag_news", "ag_news", train, test, seeds="(111,)")
    assert results["columns"] == ["R1"] and 0 <= results["best"]["ag_news"][0] <= 1


@pytest.mark.slow
def test_cifar100_on_beit(tmp_path, mocked_sources):
    beit = beit_folder(tmp_path / "beit")
    for split in ("train", "test"):
        _extract(tmp_path, beit, "cifar100", "--split", split)
    root = tmp_path / "data" / "encoder_features"
    train = root / "cifar100_tiny_mean" / "1.0.0"
    x, _, info = _features(train)
    assert x.shape == (8, 2, 48) and info.features["label"].num_classes == 100
    results = _train(
        tmp_path, "cifar100", "cifar100", train, root / "cifar100_tiny_mean_test" / "1.0.0",
        seeds="(42,)",
    )  # fmt: skip
    assert results["columns"] == ["R1"]


@pytest.mark.slow
def test_iemocap_on_wavlm(tmp_path):
    wavlm = wavlm_folder(tmp_path / "wavlm")
    fake_iemocap(tmp_path / "manual")
    _extract(tmp_path, wavlm, "iemocap", "--pooling", "mean_with_padding",
             "--manual-dir", str(tmp_path / "manual"))  # fmt: skip
    path = tmp_path / "data" / "encoder_features" / "iemocap_tiny_mean_with_padding" / "1.0.0"
    x, source, info = _features(path)
    assert x.shape == (10, 2, 32)  # 2 sessions x (2 + 1 + 1 + 1) chunks
    assert sorted({int(source[i]["group"]) for i in range(len(source))}) == [1, 2]
    assert "final LayerNorm on the last" in info.metadata["layers"]
    # transformers 5's last state (no final LayerNorm) differs in the last layer only.
    argv = ["--encoder", str(wavlm), "--encoder-name", "v5", "--dataset", "iemocap", "--data-dir",
            str(tmp_path / "data"), "--pooling", "mean_with_padding", "--limit", "2",
            "--no-wavlm-final-norm", "--no-progress"]  # fmt: skip
    assert extract.main(argv) == 0
    v5, _, _ = _features(path.parent.parent / "iemocap_v5_mean_with_padding" / "1.0.0")
    ids = [int(source[i]["id"]) for i in range(len(source))]
    first = x[[ids.index(0), ids.index(1)]]
    # Another batch size compiles another program: float32 sums differ by ~1e-6 relative.
    np.testing.assert_allclose(v5[:, 0], first[:, 0], atol=1e-5 * np.abs(first).max())
    assert np.abs(v5[:, 1] - first[:, 1]).max() > 0.1 * np.abs(first[:, 1]).max()
    results = _train(tmp_path, "iemocap", "iemocap", path)
    assert results["columns"] == ["F1", "F2"]  # leave-one-session-out
