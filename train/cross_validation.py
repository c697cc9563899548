"""Runs every fold and seed of a config and reports them in the paper's format."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from data import pipeline
from gaam_jax import importance, sharding
from train import report
from train.trainer import Trainer, train_run, write_atomic

CV_KINDS = ("stratified_kfold", "leave_one_group_out", "holdout")


def folds_for(
    config: ml_collections.ConfigDict, source: Any
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The cross-validation folds of one ``source`` that ``config.cv`` asks for."""
    labels = np.array([int(source[i]["label"]) for i in range(len(source))])
    if config.cv.kind == "stratified_kfold":
        return pipeline.stratified_kfold(labels, config.cv.k, config.cv.seed)
    if config.cv.kind == "leave_one_group_out":
        groups = np.array([int(source[i]["group"]) for i in range(len(source))])
        return pipeline.leave_one_group_out(groups)
    raise ValueError(f"cv.kind must be one of {CV_KINDS}, got {config.cv.kind!r}.")


def splits_for(
    config: ml_collections.ConfigDict, name: str
) -> tuple[Any, Any, list[tuple[np.ndarray, np.ndarray]]]:
    """The data source, its tfds info and the ``(train, validation)`` index pairs of ``name``.

    With ``cv.kind == 'holdout'`` (CIFAR-100, AG News: the official test split is the
    validation set) ``dataset_paths[name]`` holds the training features and
    ``validation_paths[name]`` the held-out ones; there is one pair and the runs differ only by
    seed. Otherwise the folds are cut from ``dataset_paths[name]`` alone.
    """
    source, info = pipeline.load_features(config.dataset_paths[name])
    if config.cv.kind != "holdout":
        return source, info, folds_for(config, source)
    if name not in config.get("validation_paths", {}):
        raise ValueError(f"cv.kind 'holdout' needs validation_paths.{name} (the held-out split).")
    held_out, held_info = pipeline.load_features(config.validation_paths[name])
    for key in ("features", "label"):
        if repr(info.features[key]) != repr(held_info.features[key]):
            raise ValueError(
                f"{name}: the training and validation features disagree on {key!r}: "
                f"{info.features[key]!r} vs {held_info.features[key]!r}."
            )
    both = pipeline.ConcatSource([source, held_out])
    return both, info, [(both.indices(0), both.indices(1))]


def column_name(config: ml_collections.ConfigDict, seed: int, fold: int) -> str:
    """``F<k>`` for folds, ``R<i>`` for the seeded runs of a holdout split, ``s<seed>F<k>``."""
    if config.cv.kind == "holdout":
        return f"R{list(config.seeds).index(seed) + 1}"
    return f"F{fold}" if len(config.seeds) == 1 else f"s{seed}F{fold}"


def run(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, progress: bool = True
) -> dict:
    """Trains every dataset x seed x fold of ``config`` (skipping finished runs) and reports.

    Folds come from ``config.cv`` (:func:`splits_for`): stratified k-fold, leave one group out
    (IEMOCAP sessions), or ``holdout`` (one train/validation pair; the runs differ by seed).

    With a ``mesh`` entry in the config (e.g. ``{'data': -1, 'model': 2}``) every run is
    sharded over that device mesh (see :class:`~train.trainer.Trainer`).

    Each run lives in ``<workdir>/<dataset>/seed<s>_fold<k>/`` with its checkpoints, metrics,
    ``result.json``, and (for GAAM fronts) ``importance.png`` and ``gate_mean.npy``. The tables
    are printed and saved as ``<workdir>/results.md`` and ``results.json``.

    Returns:
      ``{'best': {dataset: [acc...]}, 'final': {...}, 'columns': [...], 'gaussian_parameters':
      {...}}``.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    best, final, params_summary, columns = {}, {}, {}, None
    if config.cv.kind not in CV_KINDS:
        raise ValueError(f"cv.kind must be one of {CV_KINDS}, got {config.cv.kind!r}.")
    for name in config.dataset_paths:
        source, info, folds = splits_for(config, name)
        num_classes = info.features["label"].num_classes
        input_shape = info.features["features"].shape
        mesh = sharding.make_mesh(dict(config.mesh)) if "mesh" in config else None
        trainer = Trainer(config, num_classes, input_shape, mesh=mesh)
        runs, cols = [], []
        for seed in config.seeds:
            for k, (train_idx, val_idx) in enumerate(folds):
                run_dir = workdir / name / f"seed{seed}_fold{k + 1}"
                result_path = run_dir / "result.json"
                if result_path.exists():
                    result = json.loads(result_path.read_text())
                else:
                    out = train_run(
                        trainer, source, train_idx, val_idx, run_dir, seed=seed, progress=progress
                    )
                    result = {k: out[k] for k in ("best_accuracy", "best_epoch", "final_accuracy")}
                    result["gaussian_parameters"] = importance.gaussian_parameter_summary(
                        jax.device_get(out["state"].params)
                    )
                    gate = trainer.importance_map(out["state"], source, val_idx)
                    if gate is not None and jax.process_index() == 0:
                        np.save(run_dir / "gate_mean.npy", gate)
                        importance.plot_heatmap(
                            importance.importance_factor(gate),
                            run_dir / "importance.png",
                            title=f"Importance Factor: {name}, seed {seed}, fold {k + 1}",
                        )
                        result["layer_contribution_percent"] = np.round(
                            np.asarray(importance.layer_contribution(gate)), 2
                        ).tolist()
                    if jax.process_index() == 0:
                        write_atomic(result_path, json.dumps(result, indent=1))
                runs.append(result)
                cols.append(column_name(config, seed, k + 1))
                if progress:
                    print(
                        f"{name} seed {seed} fold {k + 1}: best-epoch accuracy "
                        f"{100 * result['best_accuracy']:.1f} (epoch {result['best_epoch']}), "
                        f"final {100 * result['final_accuracy']:.1f}"
                    )
        columns = columns or cols
        if cols != columns:
            raise ValueError("every dataset of a config must have the same number of folds.")
        best[name] = [r["best_accuracy"] for r in runs]
        final[name] = [r["final_accuracy"] for r in runs]
        params_summary[name] = [r.get("gaussian_parameters", {}) for r in runs]
    text = (
        "Validation accuracy (%) at the best epoch (what the paper reports; the epoch is chosen "
        "on the validation fold itself, so it is optimistic):\n\n"
        + report.table(best, columns)
        + "\n\nValidation accuracy (%) after the final epoch:\n\n"
        + report.table(final, columns)
        + "\n"
    )
    (workdir / "results.md").write_text(text)
    results = {
        "columns": columns,
        "best": best,
        "final": final,
        "gaussian_parameters": params_summary,
    }
    write_atomic(workdir / "results.json", json.dumps(results, indent=1))
    print(text)
    return results
