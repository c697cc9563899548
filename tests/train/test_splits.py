"""Datasets opened and folds cut (train/splits.py), and runs planned into programs."""

import numpy as np
import pytest
from train_helpers import mock_features, tiny_config

from train import config as config_lib
from train.splits import open_folds
from train.trainer import plan_programs


def _config(tmp_path, paths, **overrides):
    config = config_lib.load(tiny_config(tmp_path / "cfg.py", next(iter(paths.values()))))
    with config.unlocked():
        config.dataset_paths = dict(paths)
        config.seeds = (0, 1)
        for k, v in overrides.items():
            config[k] = v
    return config


def test_runs_of_one_shape_share_a_program(tmp_path):
    a = mock_features(tmp_path, "a", n=24, layers=4, dim=16, classes=2)
    b = mock_features(tmp_path, "b", n=30, layers=4, dim=16, classes=2, seed=1)
    c = mock_features(tmp_path, "c", n=24, layers=4, dim=16, classes=3)
    config = _config(tmp_path, {"a": a, "b": b, "c": c})
    datasets = [open_folds(config, n) for n in ("a", "b", "c")]
    programs = plan_programs(config, datasets)
    assert [p.name for p in programs] == ["a+b", "c"]
    ab = programs[0]
    assert len(ab.runs) == 8  # 2 datasets x 2 seeds x 2 folds
    # b's indices are offset past a's examples in the program's one source.
    source = ab.source()
    for run in ab.runs:
        ids = {int(source[int(i)]["id"]) for i in run.val}
        expected = {int(datasets[0 if run.dataset == "a" else 1].source[int(i)]["id"])
                    for i in run.val - (0 if run.dataset == "a" else 24)}  # fmt: skip
        assert ids == expected
    assert min(int(r.train.min()) for r in ab.runs if r.dataset == "b") >= 24
    assert [r.column for r in ab.runs[:4]] == ["s0F1", "s0F2", "s1F1", "s1F2"]
    chunked = plan_programs(_config(tmp_path, {"a": a, "b": b}, runs_per_program=3), datasets[:2])
    assert [p.name for p in chunked] == ["a+b-1of3", "a+b-2of3", "a+b-3of3"]
    assert [len(p.runs) for p in chunked] == [3, 3, 2]


def test_folds_cover_every_example_once(tmp_path):
    a = mock_features(tmp_path, "a", n=24, layers=4, dim=16, classes=2)
    folds = open_folds(_config(tmp_path, {"a": a}), "a").folds
    val = np.concatenate([v for _, v in folds])
    assert sorted(val.tolist()) == list(range(24))
    with pytest.raises(ValueError, match="group"):
        open_folds(_config(tmp_path, {"a": a}, cv={"kind": "leave_one_group_out"}), "a")
