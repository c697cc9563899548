"""What a kind of job changes in the trainer: its inputs, model, identity and last writes.

The trainer (:mod:`train.trainer`) runs every job the same way: check, claim the workdir, plan
the runs into programs, build the programs from abstract shapes, restore, loop, record. A
:class:`Task` says what differs. Two exist: :data:`train.trainer.DECODERS` (the paper's
decoders on frozen encoder features, the default) and :data:`train.finetune.TASK` (an encoder
trained through its adapters, for a config with an ``encoder`` section).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import ml_collections

Config = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class Task:
    """What a kind of job changes in the trainer.

    Attributes:
      identity: ``config -> dict``: what a workdir was made by (:func:`train.runs.identity`).
      open_folds: ``(config, dataset name) -> DatasetFolds``: its inputs, with their folds
        (:mod:`train.splits`).
      check_data: ``(config, DatasetFolds) -> None``: checks of the config against a dataset.
      steps: ``(config, DatasetFolds, mesh) -> Steps``: the model, its trainable parameters
        and optimiser (:class:`train.steps.Steps`), from abstract shapes only (raise
        ``ConfigError`` when they do not fit).
      resolve: ``config -> config`` with what its identity needs filled in (fine-tuning: the
        base weights' fingerprint); run before the workdir is claimed (None: nothing).
      check: ``config -> None``: checks of its own config keys, raising ``ConfigError``
        (None: none).
      load: ``(steps, config) -> None``: reads the weights a model starts from onto the mesh,
        once, before training (None: nothing to read).
      finish: ``(config, run folder) -> None``: what a finished run writes besides the common
        artefacts (None: nothing).
    """

    identity: Callable[[Config], dict]
    open_folds: Callable[[Config, str], Any]
    check_data: Callable[[Config, Any], None]
    steps: Callable[[Config, Any, Any], Any]
    resolve: Callable[[Config], Config] | None = None
    check: Callable[[Config], None] | None = None
    load: Callable[[Any, Config], None] | None = None
    finish: Callable[[Config, pathlib.Path], Any] | None = None
