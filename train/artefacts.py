"""What a finished run leaves in its folder, besides the program's checkpoints.

``<workdir>/<dataset>/seed<s>_fold<k>/`` holds:

* ``config.json``: the config and the data shape (enough to rebuild the model);
* ``metrics.jsonl`` and ``tensorboard/`` events (:mod:`train.metrics`, during training);
* ``best_state.msgpack``: the best epoch's parameters and BatchNorm statistics, whose SHA-256
  the record holds (:func:`load_best_variables` verifies it);
* ``gate_mean.npy`` and ``importance.png`` for gated fronts: the mean gate map of the best
  state over the validation set, and its Importance Factor heatmap;
* ``record.json`` last: the run's :class:`~train.runs.RunRecord`. It is the commit marker: a
  run folder without it is retrained (from its program's checkpoints).
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import Any

import flax.serialization
import jax
import ml_collections
import numpy as np

from app import storage
from gaam_jax import importance
from train.runs import RECORD, RunRecord, RunResult, plain
from train.splits import DatasetFolds

BEST_STATE = "best_state.msgpack"


def run_config(config: ml_collections.ConfigDict, dataset: DatasetFolds) -> dict:
    """What one run folder records: the config and its data (enough to rebuild the model).

    ``data.extraction`` is the feature dataset's record of the encoder that made it
    (:meth:`data.feature_encoder.FeatureEncoder.record`), which raw-input inference rebuilds;
    features extracted before datasets recorded it (and imported ones) have none.
    """
    metadata = dataset.info.metadata or {}
    data = {
        "name": dataset.name,
        "path": str(config.dataset_paths[dataset.name]),
        "num_classes": dataset.num_classes,
        "input_shape": list(dataset.input_shape),
        "pooling": metadata.get("pooling", "mean"),
    }
    if "extraction" in metadata:
        data["extraction"] = plain(dict(metadata["extraction"]))
    return {"config": plain(config), "data": data}


@jax.jit
def _gate_summary(total: jax.Array, count: jax.Array) -> tuple[jax.Array, ...]:
    """The mean gate map ``DA``, its Importance Factor and the layer shares, in one call."""
    gate = importance.mean_gate(importance.ImportanceState(total, count))
    return gate, importance.importance_factor(gate), importance.layer_contribution(gate)


def finish_run(identity: dict, result: RunResult, run_dir: pathlib.Path, title: str) -> RunRecord:
    """Writes a trained run's best state, gate map and heatmap, then its record (last).

    Args:
      identity: the record's ``dataset``, ``seed``, ``fold``, ``run`` and ``column``.
      result: the run's outcome from :func:`train.trainer.train_program`.
      run_dir: the run's folder.
      title: the heatmap's title.

    Returns:
      The run's record.
    """
    best = {"params": result.best_state.params, "batch_stats": result.best_state.batch_stats}
    data = flax.serialization.to_bytes(best)
    gate_file, shares = None, None
    if "gate_total" in result.best_eval:
        summary = _gate_summary(result.best_eval["gate_total"], result.best_eval["gate_count"])
        gate, if_map, shares = map(np.asarray, summary)
        shares = np.round(shares, 2).tolist()
        gate_file = "gate_mean.npy"
    record = RunRecord(
        **identity,
        best_accuracy=result.best_accuracy,
        best_epoch=result.best_epoch,
        final_accuracy=result.final_accuracy,
        steps=result.history[-1]["step"],
        gaussian_parameters=importance.gaussian_parameter_summary(result.best_state.params),
        layer_contribution_percent=shares,
        gate_mean=gate_file,
        best_state_sha256=hashlib.sha256(data).hexdigest(),
    )
    run_dir = storage.path(run_dir)
    if jax.process_index() == 0:
        storage.write_atomic(run_dir / BEST_STATE, data)
        if gate_file is not None:
            with (run_dir / gate_file).open("wb") as f:
                np.save(f, gate)
            importance.plot_heatmap(if_map, run_dir / "importance.png", title=title)
        record.save(run_dir)
    return record


def load_best_variables(run_dir: str | pathlib.Path) -> dict[str, Any]:
    """The best state's ``{'params', 'batch_stats'}`` of a finished run, verified.

    Raises:
      FileNotFoundError: the run has no record or no best state (it did not finish).
      ValueError: the file's bytes differ from the digest in the record.
    """
    run_dir = storage.path(run_dir)
    if not (run_dir / RECORD).exists() or not (run_dir / BEST_STATE).exists():
        raise FileNotFoundError(f"{run_dir} holds no finished run (no {RECORD} or {BEST_STATE}).")
    record = RunRecord.load(run_dir)
    data = (run_dir / BEST_STATE).read_bytes()
    if hashlib.sha256(data).hexdigest() != record.best_state_sha256:
        raise ValueError(f"{run_dir / BEST_STATE} does not match its digest in {RECORD}.")
    return flax.serialization.msgpack_restore(data)
