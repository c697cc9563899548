"""The config checked against its data before any work (train/validate.py, run by
train.trainer.check), called directly; tests/train/test_cli.py checks the same errors as the CLI's
one-line messages."""

import json

import pytest
from train_helpers import tiny_config

from train import config as config_lib
from train import trainer, validate
from train.config import ConfigError


def _config(toy, tmp_path, *overrides):
    return config_lib.load(tiny_config(tmp_path / "cfg.py", toy), list(overrides))


@pytest.mark.parametrize(
    "override,message",
    [
        ("runs_per_program=-1", "runs_per_program must be at least 0"),
        ("optimizer.plateau_factor=1.5", "plateau_factor must be in"),
        ("seeds=()", "seeds is empty"),
        ("runs_vectorized=all", "runs_vectorized must be 'auto' or a count"),
        ("model.front=foo", "model.front must be one of ['gaam', 'gqgaam', 'mixture'"),
    ],
)
def test_values_are_checked_without_data(toy, tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        validate.check_values(_config(toy, tmp_path, override))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_data_and_model_shape_are_checked(toy, tmp_path):
    config = _config(toy, tmp_path, "model.num_heads=3")
    with pytest.raises(ConfigError, match=r"does not fit toy's \[4, 16\] examples"):
        trainer.check(config, tmp_path / "w")
    assert not (tmp_path / "w").exists()  # nothing written before the checks pass


def test_workdir_checks(toy, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        validate.check_workdir(tmp_path / "file")
    validate.check_workdir(tmp_path / "new" / "deeper")  # creatable


def _claim(config, workdir):
    return trainer.claim(config, workdir, trainer.task_of(config))


def test_check_builds_one_steps_per_shape_and_claim_takes_the_workdir_once(toy, tmp_path):
    config = _config(toy, tmp_path)
    checked = trainer.check(config, tmp_path / "w")
    assert [d.name for d in checked.datasets] == ["toy"] and len(checked.datasets[0].folds) == 2
    assert list(checked.steps) == [(2, (4, 16))]  # kept for training: built once
    assert not (tmp_path / "w").exists()
    _claim(config, tmp_path / "w")
    recorded = json.loads((tmp_path / "w" / "config.json").read_text())
    assert recorded["config"]["runs_per_program"] == 0
    _claim(config, tmp_path / "w")  # the same identity: accepted
    with pytest.raises(ConfigError, match=r"differing: config\.num_epochs"):
        _claim(_config(toy, tmp_path, "num_epochs=9"), tmp_path / "w")
    # How often a run checkpoints cannot change its results: not part of the identity.
    _claim(_config(toy, tmp_path, "checkpoint_every_epochs=2"), tmp_path / "w")
