"""One table of config defaults: train/config.py's DEFAULTS, read through config.setting."""

import ast
import pathlib

import ml_collections
import pytest

from train import config as config_lib

TRAIN = pathlib.Path(__file__).resolve().parents[2] / "train"


def test_a_key_left_out_takes_the_tables_default_and_a_set_key_its_own_value():
    config = ml_collections.ConfigDict({"runs_per_program": 1, "optimizer": {"lr": 1.0}})
    assert config_lib.setting(config, "runs_per_program") == 1
    assert config_lib.setting(config, "runs_vectorized") == "auto"
    assert config_lib.setting(config, "optimizer.loraplus_ratio") == 0.0
    assert config_lib.setting(config.optimizer, "frozen", within="optimizer") == ()
    with pytest.raises(KeyError):  # an optional key must be in the table
        config_lib.setting(config, "nope")


def test_no_train_module_states_a_default_of_its_own():
    # config.get(key, default) / cfg.get(key, default) would state a second default.
    found = []
    for path in sorted(TRAIN.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            receiver = ast.unparse(node.func.value)
            is_config = "config" in receiver or "cfg" in receiver
            if node.func.attr == "get" and is_config and len(node.args) == 2:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert found == []
