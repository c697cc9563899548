"""The paper's fine-tuning variants end to end through the CLI, on mock data and tiny encoders.

AG News (Llama) and CIFAR-100 (BEiT) come from ``tfds.testing.mock_data`` through tfds' own
builders, IEMOCAP (WavLM) from a generated manual-download tree, as in test_extract_paper.py;
the encoders are the tiny random parity fixtures. Each run writes its record and (with a LoRA)
its PEFT adapter; one is interrupted after its first checkpoint and resumed by rerunning the
same command.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_helpers import fake_iemocap
from model_folders import beit_folder, llama_folder, wavlm_folder
from train_helpers import Stop, stop_after

from train import __main__ as train_cli
from train import config as config_lib
from train import trainer


def _argv(config, variant, encoder, workdir, data_dir, *extra):
    return ["--config", f"configs/paper/{config}.py:{variant}", "--workdir", str(workdir),
            "--no-progress", f"--config.encoder.path={encoder}",
            f"--config.dataset_paths.{config}={data_dir}", *extra]  # fmt: skip


def _results(workdir) -> dict:
    return json.loads((workdir / "results.json").read_text())


@pytest.mark.usefixtures("mocked_sources")
def test_ag_news_lora_on_llama_killed_and_resumed(tmp_path):
    llama = llama_folder(tmp_path / "llama")
    argv = _argv("ag_news", "loraplus_r4,paper_faithful,runlocal", llama, tmp_path / "run",
                 tmp_path / "data", "--config.seeds=(1,)")  # fmt: skip
    config = config_lib.load(argv[1], [a[len("--config.") :] for a in argv[5:]])
    with pytest.raises(Stop):  # stopped after its first steps (a checkpoint is kept at epoch end)
        trainer.run(config, tmp_path / "run", progress=False, hooks=stop_after(1))
    assert train_cli.main(argv) == 0  # the same command resumes
    results = _results(tmp_path / "run")
    assert results["columns"] == ["R1"]
    run = tmp_path / "run" / "ag_news" / "seed1_fold1"
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["peft_type"] == "LORA"
    # raw alpha 16 is peft's lora_alpha / r = 16: lora_alpha = 64 at r = 4.
    assert adapter["lora_alpha"] / adapter["r"] == 16


@pytest.mark.usefixtures("mocked_sources")
def test_cifar100_lora_on_beit(tmp_path):
    beit = beit_folder(tmp_path / "beit")
    argv = _argv("cifar100", "lora_r8,runlocal", beit, tmp_path / "run", tmp_path / "data",
                 "--config.seeds=(1,)")  # fmt: skip
    assert train_cli.main(argv) == 0
    assert _results(tmp_path / "run")["columns"] == ["R1"]


def test_iemocap_daam_adapter_on_wavlm(tmp_path):
    wavlm = wavlm_folder(tmp_path / "wavlm")
    fake_iemocap(tmp_path / "manual")
    argv = _argv("iemocap", "daam_adapter,runlocal", wavlm, tmp_path / "run", tmp_path / "data",
                 f"--config.manual_dir={tmp_path / 'manual'}")  # fmt: skip
    assert train_cli.main(argv) == 0
    results = _results(tmp_path / "run")
    assert results["columns"] == ["F1", "F2"]  # leave one session out
    assert not (tmp_path / "run" / "iemocap" / "seed42_fold1" / "adapter").exists()  # no LoRA
    # The finished run predicts raw waveforms of any lengths (zero-padded to the longest).
    from train.inference import Predictor

    predictor = Predictor.from_run(tmp_path / "run" / "iemocap" / "seed42_fold1")
    waves = [np.zeros(1600, np.int16), (1000 * np.sin(np.arange(2400))).astype(np.int16)]
    inputs = predictor.preprocess(waves)
    assert inputs["input_values"].shape == (2, 2400)
    classes = predictor.predict_raw(waves)
    assert classes.shape == (2,) and (0 <= classes).all() and (classes < 4).all()
    with pytest.raises(ValueError, match="too short for one frame"):
        predictor.preprocess([np.zeros(10, np.int16)])
