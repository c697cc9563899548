"""The README's Python examples run as written (from the repository root, as the README says)."""

import pathlib
import re

import numpy as np
import pytest
from train_helpers import tiny_config, toy_features

ROOT = pathlib.Path(__file__).parent.parent
README = ROOT / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the repository root
    blocks = _python_blocks()
    assert len(blocks) >= 5
    namespace: dict = {}
    ran = 0
    for code in blocks:
        if "torch_block" in code:  # needs PyTorch and a trained package model
            continue
        if "Predictor.from_run" in code:  # needs a finished run: test_inference_example
            continue
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
        ran += 1
    assert ran >= 3
    assert namespace["y"].shape == (32, 24, 1024)
    assert namespace["y2"].shape == (10, 128)
    assert namespace["hs"].shape == (1, 3, 5, 64)  # the tiny Llama: embeddings + 2 layers


@pytest.mark.slow
def test_inference_example(tmp_path, monkeypatch):
    """The Inference block, on a run of [6, 384] features like the main job's (``make run``)."""
    from train import config as config_lib
    from train import cross_validation, validate

    data = toy_features(tmp_path / "toy", n=40, layers=6, dim=384)
    config = config_lib.load(tiny_config(tmp_path / "cfg.py", data, num_epochs=1))
    workdir = tmp_path / "out" / "default"
    splits = validate.prepare(config, workdir)
    cross_validation.run(config, workdir, splits=splits, progress=False)
    (block,) = [b for b in _python_blocks() if "Predictor.from_run" in b]
    block = block.replace("out/default/pang_lee_polarity/", "out/default/toy/")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    assert namespace["logits"].shape == (3, 2)
    np.testing.assert_allclose(
        namespace["logits"], namespace["predictor"].logits(np.zeros((3, 6, 384))), atol=1e-6
    )
