"""Experiment configs: `configs/*.py` files with a `get_config()`, and command-line overrides."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections

REQUIRED = ("dataset_paths", "model", "optimizer", "cv", "batch_size", "num_epochs", "seeds")


def split_arg(path: str | pathlib.Path) -> tuple[pathlib.Path, str | None]:
    """``'configs/x.py:arg'`` -> ``(Path('configs/x.py'), 'arg')``; no argument gives None."""
    text = str(path)
    arg = None
    if not text.endswith(".py") and ":" in text:
        text, arg = text.rsplit(":", 1)
    return pathlib.Path(text), arg


def load_module(path: str | pathlib.Path) -> Any:
    """Imports a config file (any ``:arg`` suffix is ignored) and returns the module."""
    path, _ = split_arg(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist.")
    spec = importlib.util.spec_from_file_location(f"_gaam_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config().")
    return module


def load(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Imports a config file and returns its ``get_config()``.

    ``path`` may end in ``:<arg>`` (``configs/paper/iemocap.py:daamv1``) to pick a variant:
    the file's ``get_config(arg)`` receives the string, as with ml_collections' config flags.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file has no ``get_config``, rejects the argument, or the config lacks a
        required key.
    """
    module = load_module(path)
    file, arg = split_arg(path)
    try:
        config = module.get_config() if arg is None else module.get_config(arg)
    except TypeError as err:
        raise ValueError(f"{file}: get_config() does not take {arg!r} ({err}).") from err
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise ValueError(f"{file}: the config lacks the keys {missing}.")
    return config


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf key, dotted (``optimizer.learning_rate``)."""
    keys = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            keys += flat_keys(value, f"{name}.")
        else:
            keys.append(name)
    return sorted(keys)


def _parse_value(text: str, old: object) -> object:
    if isinstance(old, str) or old is None:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        return text if isinstance(old, str) and not isinstance(value, str) else value
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"cannot parse {text!r} as {type(old).__name__}.") from err
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    if type(value) is not type(old):
        raise ValueError(f"expected {type(old).__name__}, got {text!r}.")
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies ``key=value`` overrides (keys dotted, values Python literals) in place.

    Raises:
      ValueError: for an unknown key (the message lists the valid ones) or a value of the
        wrong type.
    """
    valid = flat_keys(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value.")
        if key not in valid:
            raise ValueError(f"unknown config key {key!r}. Valid keys: {', '.join(valid)}.")
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        try:
            node[leaf] = _parse_value(text, node[leaf])
        except (ValueError, TypeError) as err:
            raise ValueError(f"config key {key!r}: {err}") from err


def parse_args_with_overrides(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> tuple[argparse.Namespace, list[str]]:
    """Parses ``argv``; every argument the parser does not know must be ``--config.key=value``.

    Returns:
      The parsed arguments and the overrides without their ``--config.`` prefix.
    """
    args, rest = parser.parse_known_args(argv)
    for item in rest:
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r} (overrides look like --config.key=value)")
    return args, [item.removeprefix("--config.") for item in rest]
