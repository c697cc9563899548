"""A config's datasets opened, and their cross-validation folds cut (no training here)."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from data import pipeline
from train import config as config_lib

CV_KINDS = ("stratified_kfold", "leave_one_group_out", "holdout")


@dataclasses.dataclass(frozen=True)
class DatasetFolds:
    """One dataset of a config, opened: its source, shape and ``(train, validation)`` pairs.

    (Not a tfds split: a tfds train split is cut here into cross-validation folds.)

    Attributes:
      name: the dataset's name in the config.
      source: random-access records (the training and held-out splits concatenated for
        ``holdout``).
      info: the tfds ``DatasetInfo`` of the training features.
      folds: ``(train_indices, validation_indices)`` pairs.
      num_classes: classes of the label feature.
      input_shape: ``(N, d)`` of one example.
      labels: every example's label, when they were read (k-fold) or None.
    """

    name: str
    source: Any
    info: Any
    folds: list[tuple[np.ndarray, np.ndarray]]
    num_classes: int
    input_shape: tuple
    labels: np.ndarray | None


def check_labels(labels: np.ndarray, ids: np.ndarray, num_classes: int) -> None:
    """Raises ValueError naming the first example whose label is outside ``[0, num_classes)``."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = bad[0]
        raise ValueError(
            f"example id {int(ids[i])} has label {int(labels[i])}, outside [0, {num_classes}): "
            "fix the dataset's labels or num_classes."
        )


def read_column(source: Any, key: str) -> np.ndarray:
    """One scalar feature of every record (``label``, ``group``) as int64."""
    return np.array([int(source[i][key]) for i in range(len(source))], np.int64)


def open_folds(config: ml_collections.ConfigDict, name: str) -> DatasetFolds:
    """Opens ``dataset_paths[name]`` and cuts the folds ``config.cv`` asks for.

    With ``cv.kind == 'holdout'`` (CIFAR-100, AG News: the official test split validates)
    ``validation_paths[name]`` holds the held-out features; there is one pair and the runs
    differ only by seed.

    Raises:
      FileNotFoundError: a dataset folder does not exist (the message has the build command).
      ValueError: the folds cannot be cut (k, groups, held-out features that disagree).
    """
    source, info = pipeline.load_features(config.dataset_paths[name])
    num_classes = info.features["label"].num_classes
    input_shape = tuple(info.features["features"].shape)
    kind = config.cv.kind
    if kind == "holdout":
        if name not in config_lib.setting(config, "validation_paths"):
            raise ValueError(
                f"cv.kind 'holdout' needs validation_paths.{name} (the held-out split)."
            )
        held_out, held_info = pipeline.load_features(config.validation_paths[name])
        for key in ("features", "label"):
            if repr(info.features[key]) != repr(held_info.features[key]):
                raise ValueError(
                    f"{name}: the training and validation features disagree on {key!r}: "
                    f"{info.features[key]!r} vs {held_info.features[key]!r}."
                )
        both = pipeline.ConcatSource([source, held_out])
        folds = [(both.indices(0), both.indices(1))]
        return DatasetFolds(name, both, info, folds, num_classes, input_shape, None)
    labels = read_column(source, "label")
    if kind == "stratified_kfold":
        folds = pipeline.stratified_kfold(labels, config.cv.k, config.cv.seed)
    elif kind == "leave_one_group_out":
        if "group" not in info.features:
            raise ValueError(
                f"{name} has no 'group' feature, so cv.kind 'leave_one_group_out' cannot split "
                "it; use cv.kind=stratified_kfold, or import the features with groups."
            )
        folds = pipeline.leave_one_group_out(read_column(source, "group"))
    else:
        raise ValueError(f"cv.kind must be one of {CV_KINDS}, got {kind!r}.")
    return DatasetFolds(name, source, info, folds, num_classes, input_shape, labels)
