"""The checks of a config against its data, made before any training or any file is written.

The trainer (:func:`train.trainer.check`) runs them. Each raises
:class:`~train.config.ConfigError` with one line naming the cause and the fix: unknown fronts,
dtypes, losses or CV kinds; counts that must be positive; a batch larger than a training split;
more folds than the smallest class has examples; labels outside ``[0, num_classes)``; a mesh
the devices cannot form; a workdir that is a file or not writable. A model that rejects the
examples' shape, or frozen-parameter patterns that match nothing, are found by tracing its
state abstractly (:func:`model_error` words them).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import ml_collections
import numpy as np

from app import storage
from gaam_jax import COMPUTE_DTYPES
from gaam_jax.transformer import FRONTS
from train import config as config_lib
from train import losses
from train.config import ConfigError, one_line
from train.splits import CV_KINDS, DatasetFolds, check_labels

CHOICES = {
    "model.front": FRONTS,  # typing.get_args of the model's Front
    "model.dtype": tuple(COMPUTE_DTYPES),
    "model.gqa": ("paper_code", "textbook"),
    "model.variance": ("shifted", "one_pass"),
    "loss": tuple(losses.LOSSES),
    "cv.kind": CV_KINDS,
    "data_on_device": ("auto", True, False),
}
# key -> smallest allowed value
MINIMUM = {
    "num_epochs": 1, "batch_size": 1, "eval_batch_size": 1, "checkpoint_every_epochs": 1,
    "checkpoint_every_steps": 0, "log_every_steps": 0, "max_to_keep": 1,
    "model.num_heads": 1, "model.num_gaussians": 1, "model.conv_features": 1,
    "model.attention_dim": 1, "model.query_heads": 1, "model.kv_heads": 1,
    "optimizer.plateau_patience": 0, "optimizer.weight_decay": 0.0, "runs_per_program": 0,
}  # fmt: skip


def get(config: ml_collections.ConfigDict, key: str) -> Any:
    """The value at a dotted ``key`` (``'optimizer.learning_rate'``) of ``config``."""
    node = config
    for part in key.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


def check_values(config: ml_collections.ConfigDict) -> None:
    """Checks choices and ranges that need no data."""
    for key, allowed in CHOICES.items():
        value = get(config, key)
        if value is not None and value not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}.")
    for key, low in MINIMUM.items():
        value = get(config, key)
        if value is not None and not value >= low:
            raise ConfigError(f"{key} must be at least {low}, got {value!r}.")
    opt = config.optimizer
    for key in ("learning_rate", "grad_clip"):
        if not opt[key] > 0:
            raise ConfigError(f"optimizer.{key} must be positive, got {opt[key]!r}.")
    if not 0 < opt.plateau_factor < 1:
        raise ConfigError(f"optimizer.plateau_factor must be in (0, 1), got {opt.plateau_factor}.")
    per = config_lib.setting(config, "runs_vectorized")
    if per != "auto" and not (isinstance(per, int) and per >= 0):
        raise ConfigError(f"runs_vectorized must be 'auto' or a count >= 0, got {per!r}.")
    if not config.seeds:
        raise ConfigError("seeds is empty: give at least one, e.g. --config.seeds=(0,).")
    if config.cv.kind == "stratified_kfold" and config.cv.k < 2:
        raise ConfigError(f"cv.k must be at least 2 folds, got {config.cv.k}.")
    if not config.dataset_paths:
        raise ConfigError("dataset_paths is empty: name at least one dataset.")


def check_workdir(workdir: str | pathlib.Path) -> None:
    """The workdir is a folder (or can become one) that this process may write.

    A URL (``gs://bucket/run``) is checked by reading it: a store that cannot be reached (no
    credentials, no such bucket) is refused here, before anything is written.
    """
    if storage.is_url(workdir):
        _check_remote_workdir(workdir)
        return
    path = pathlib.Path(workdir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"workdir {path} is a file; give a folder.")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"workdir {path}: {existing} is not writable; choose another folder.")


def _check_remote_workdir(workdir: str | pathlib.Path) -> None:
    try:
        storage.check_bucket(workdir)
        if storage.path(workdir).is_file():
            raise ConfigError(f"workdir {workdir} is an object, not a folder; give a folder.")
    except OSError as err:  # unreachable, no such bucket, unreadable: one line each
        raise ConfigError(f"workdir {one_line(err)}") from None


def check_data(config: ml_collections.ConfigDict, split: DatasetFolds) -> None:
    """Checks the config against one opened dataset."""
    name = split.name
    train_sizes = [len(tr) for tr, _ in split.folds]
    if config.batch_size > min(train_sizes):
        raise ConfigError(
            f"batch_size {config.batch_size} exceeds the {min(train_sizes)} training examples of "
            f"{name}'s smallest split; use --config.batch_size={min(train_sizes)} or less."
        )
    if split.labels is not None:
        ids = np.arange(len(split.labels))
        try:
            check_labels(split.labels, ids, split.num_classes)
        except ValueError as err:
            raise ConfigError(f"{name}: {err}") from err
        if config.cv.kind == "stratified_kfold":
            counts = np.bincount(split.labels, minlength=split.num_classes)
            smallest = int(counts[counts > 0].min())
            if config.cv.k > smallest:
                raise ConfigError(
                    f"cv.k {config.cv.k} exceeds {smallest}, the size of {name}'s smallest "
                    f"class, so some folds would miss it; use --config.cv.k={smallest} or less."
                )


def model_error(split: DatasetFolds, err: BaseException) -> ConfigError:
    """The one line for a model that cannot be built for ``split``'s examples."""
    if one_line(err).startswith("optimizer.frozen"):  # the parameter paths are listed
        return ConfigError(one_line(err))
    shape = ", ".join(map(str, split.input_shape))
    return ConfigError(f"the model does not fit {split.name}'s [{shape}] examples: {one_line(err)}")


def check_mesh(config: ml_collections.ConfigDict) -> Any:
    """The requested mesh, formed from the devices (None when the config asks for none)."""
    if "mesh" not in config:
        return None
    from gaam_jax import sharding

    try:
        return sharding.make_mesh(dict(config.mesh))
    except ValueError as err:
        raise ConfigError(f"mesh {dict(config.mesh)}: {one_line(err)}") from err
