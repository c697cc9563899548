"""Experiment configs: ``configs/*.py`` files with a ``get_config()``, and ``--config.*`` overrides.

Loading and overriding go through ``ml_collections.config_flags``, as in flax's examples and
big_vision: ``path.py:arg`` passes ``arg`` to ``get_config``, and ``--config.a.b=value`` sets
a key, typed like its current value. Every failure becomes a :class:`ConfigError` with a
one-line message (an unknown key names its nearest valid key and lists the valid ones).
"""

from __future__ import annotations

import difflib
import importlib.util
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from app import cli
from app.cli import one_line  # noqa: F401 - re-exported for train's modules

REQUIRED = ("dataset_paths", "model", "optimizer", "cv", "batch_size", "num_epochs", "seeds")


# What an optional key means when a config leaves it out (configs, and the configs recorded with
# runs, written before the key existed): each default stated once, read with setting().
DEFAULTS: dict[str, Any] = {
    "log_every_steps": 0,
    "async_checkpoints": True,
    "data_on_device": "auto",
    "runs_per_program": 0,
    "runs_vectorized": "auto",
    "validation_paths": {},
    "manual_dir": "",
    "model.head_kwargs": {},
    "optimizer.frozen": (),
    "optimizer.loraplus_ratio": 0.0,
    "encoder.revision": "",
    "encoder.max_length": 0,
    "encoder.pooling": "mean",
    "encoder.fingerprint": "",
    "adapters.use_dora": False,
    "adapters.rank_pattern": (),
    "adapters.alpha_pattern": (),
}


def setting(config: ml_collections.ConfigDict, key: str, within: str = "") -> Any:
    """``config``'s value at the dotted ``key``, or :data:`DEFAULTS`' when it leaves it out.

    Args:
      config: a config, or its sub-config ``within`` (``config.optimizer``: ``within='optimizer'``).
      key: the dotted key below ``config``.
      within: the dotted path of ``config`` in the whole config, for the defaults table.
    """
    node = config
    for part in key.split("."):
        if part not in node:
            return DEFAULTS[f"{within}.{key}" if within else key]
        node = node[part]
    return node


class ConfigError(ValueError, cli.UserError):
    """A config that cannot be loaded or used; the message is one line naming cause and fix."""


def split_arg(spec: str | pathlib.Path) -> tuple[pathlib.Path, str | None]:
    """``'configs/x.py:arg'`` -> ``(Path('configs/x.py'), 'arg')``; no argument gives None."""
    text = str(spec)
    arg = None
    if not text.endswith(".py") and ":" in text:
        text, arg = text.rsplit(":", 1)
    return pathlib.Path(text), arg


def load_module(spec: str | pathlib.Path) -> Any:
    """Imports a config file (any ``:arg`` suffix is ignored) for its module-level names.

    :mod:`train.reproduce` configs define ``VARIANTS`` and ``ABLATION`` there.

    Raises:
      ConfigError: the file does not exist.
    """
    path, _ = split_arg(spec)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist.")
    module_spec = importlib.util.spec_from_file_location(f"_gaam_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


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


def _parse(spec: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    argv = ["train", f"--config={spec}", *(f"--config.{o}" for o in overrides)]
    values = flags.FlagValues()
    # sys_argv: the nested --config.* flags are declared from this list, not from sys.argv.
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                    lock_config=True, sys_argv=argv)  # fmt: skip
    values(argv)
    return values.config


def load(spec: str | pathlib.Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Imports a config file, calls its ``get_config([arg])`` and applies overrides.

    Args:
      spec: ``path.py`` or ``path.py:arg`` (``configs/paper/iemocap.py:daamv1``).
      overrides: ``key=value`` items (dotted keys, values as on the command line).

    Raises:
      ConfigError: the file is missing or broken, ``get_config`` rejects the argument or does
        not return a ``ConfigDict``, a required key is missing, or an override names an unknown
        key or a value of the wrong type.
    """
    file, arg = split_arg(spec)
    if not file.exists():
        raise ConfigError(f"config file {file} does not exist.")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like --config.key=value.")
    try:
        base = _parse(str(spec), ())
    except Exception as err:  # noqa: BLE001 - the user's file: any failure is a config error
        # config_flags wraps get_config's exception in a traceback text: keep its last line.
        cause = str(err).strip().splitlines()[-1].strip()
        if arg is not None and ("get_config()" in cause or "variant" in cause):
            raise ConfigError(f"{file}: get_config({arg!r}) failed: {cause}") from err
        raise ConfigError(f"{file}: {cause}") from err
    if not isinstance(base, ml_collections.ConfigDict):
        raise ConfigError(
            f"{file}: get_config() returned a {type(base).__name__}; return an "
            "ml_collections.ConfigDict."
        )
    missing = [k for k in REQUIRED if k not in base]
    if missing:
        raise ConfigError(f"{file}: the config lacks the keys {missing}.")
    valid = flat_keys(base)
    for item in overrides:
        key = item.split("=", 1)[0]
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"unknown config key {key!r}{hint}. Valid keys: {', '.join(valid)}.")
    if not overrides:
        return base
    try:
        return _parse(str(spec), overrides)
    except Exception as err:  # noqa: BLE001 - a value absl or ml_collections refused
        raise ConfigError(f"config override: {one_line(err)}") from err
