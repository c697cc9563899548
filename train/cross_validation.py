"""Every dataset x seed x fold of a config: folds, runs, records and the paper-style tables."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import pathlib
import sys
import threading
from typing import Any

import jax
import ml_collections
import numpy as np

from data import pipeline
from gaam_jax import importance, sharding
from train import loop, parallel_runs, report
from train.feeds import make_feed
from train.runs import CONFIG, RECORD, RunRecord, plain, run_folder, write_atomic, write_json_atomic
from train.steps import Steps

CV_KINDS = ("stratified_kfold", "leave_one_group_out", "holdout")


@dataclasses.dataclass(frozen=True)
class Split:
    """One dataset of a config, opened: its source, shape and ``(train, validation)`` pairs.

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


def read_column(source: Any, key: str) -> np.ndarray:
    """One scalar feature of every record (``label``, ``group``) as int64."""
    return np.array([int(source[i][key]) for i in range(len(source))], np.int64)


def open_split(config: ml_collections.ConfigDict, name: str) -> Split:
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
        if name not in config.get("validation_paths", {}):
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
        return Split(name, both, info, folds, num_classes, input_shape, None)
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
    return Split(name, source, info, folds, num_classes, input_shape, labels)


def column_name(config: ml_collections.ConfigDict, seed: int, fold: int) -> str:
    """``F<k>`` for folds, ``R<i>`` for the seeded runs of a holdout split, ``s<seed>F<k>``."""
    if config.cv.kind == "holdout":
        return f"R{list(config.seeds).index(seed) + 1}"
    return f"F{fold}" if len(config.seeds) == 1 else f"s{seed}F{fold}"


class Background(concurrent.futures.Executor):
    """One thread for the work after a run (commit, heatmap, record), in submission order.

    Unlike a bare executor it never drops an error: :meth:`check` (called between runs) and
    :meth:`drain` re-raise the first failure in the caller's thread.
    """

    def __init__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(1)
        self._futures: list[concurrent.futures.Future] = []
        self._lock = threading.Lock()  # runs trained side by side submit from their threads

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:  # noqa: D102
        with self._lock:
            future = self._pool.submit(fn, *args, **kwargs)
            self._futures.append(future)
        return future

    def check(self) -> None:
        """Re-raises the error of any finished task."""
        with self._lock:
            done = [f for f in self._futures if f.done()]
            self._futures = [f for f in self._futures if not f.done()]
        for future in done:
            future.result()

    def drain(self) -> None:
        """Waits for every task; re-raises the first error."""
        with self._lock:
            futures, self._futures = self._futures, []
        for future in futures:
            future.result()

    def close(self) -> None:
        """Waits for the thread to finish its queue."""
        self._pool.shutdown(wait=True)


@jax.jit
def _gate_summary(total: jax.Array, count: jax.Array) -> tuple[jax.Array, ...]:
    """The mean gate map ``DA``, its Importance Factor and the layer shares, in one call."""
    gate = importance.mean_gate(importance.ImportanceState(total, count))
    return gate, importance.importance_factor(gate), importance.layer_contribution(gate)


def run_config(config: ml_collections.ConfigDict, split: Split) -> dict:
    """What one run folder records: the config and its data (enough to rebuild the model)."""
    return {
        "config": plain(config),
        "data": {
            "name": split.name,
            "path": str(config.dataset_paths[split.name]),
            "num_classes": split.num_classes,
            "input_shape": list(split.input_shape),
            "pooling": split.info.metadata.get("pooling", "mean")
            if split.info.metadata
            else "mean",
        },
    }


class _Progress:
    """A tqdm bar per run, refreshed at most four times a second."""

    def __init__(self, desc: str, enabled: bool, position: int = 0):
        from tqdm import tqdm

        self.bar = tqdm(
            total=1, desc=desc, leave=False, mininterval=0.25, disable=not enabled,
            position=position,
        )  # fmt: skip

    def __call__(self, done: int, total: int, record: dict | None) -> None:
        self.bar.total = total
        self.bar.n = done
        if record is not None:
            self.bar.set_postfix(
                loss=f"{record['train_loss']:.4f}",
                val=f"{record['val_accuracy']:.3f}",
                refresh=False,
            )
        self.bar.refresh() if done == total else self.bar.update(0)

    def close(self) -> None:
        self.bar.close()


def _tensorboard(run_dir: pathlib.Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # TensorBoard logging is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def train_one(
    config: ml_collections.ConfigDict,
    split: Split,
    steps: Steps,
    feed: Any,
    run_dir: pathlib.Path,
    *,
    seed: int,
    fold: int,
    progress: bool = True,
    hooks: loop.Hooks | None = None,
    background: concurrent.futures.Executor | None = None,
    position: int = 0,
) -> RunRecord:
    """Trains one run (resuming it), then writes its gate map, heatmap and record.

    With a (single-threaded) ``background`` executor, the last checkpoint's commit, the
    heatmap (a derived picture of the saved gate map) and then the record are written there,
    in that order, while the next run trains; the caller waits for it before reporting.
    ``position`` is the progress bar's row (runs trained side by side).
    """
    train_idx, val_idx = split.folds[fold - 1]
    primary = jax.process_index() == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    if primary:
        write_json_atomic(run_dir / CONFIG, run_config(config, split))
    bar = _Progress(f"{split.name} seed {seed} fold {fold}", progress and primary, position)
    writer = _tensorboard(run_dir) if primary else None

    def epoch_end(record: dict) -> None:
        if writer is not None:
            for key, value in record.items():
                if key not in ("epoch", "step"):
                    writer.add_scalar(key, value, record["epoch"])

    hooks = hooks or loop.Hooks()
    shown = bar if progress and primary else None  # no bar: no reason to fetch mid-run
    hooks = dataclasses.replace(hooks, progress=hooks.progress or shown, epoch_end=epoch_end)
    try:
        out = loop.train_run(
            steps, feed, train_idx, val_idx, run_dir, seed=seed, hooks=hooks, background=background
        )
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    holdout = config.cv.kind == "holdout"
    gate_file, shares = None, None
    if "gate_total" in out.best_eval:
        summary = _gate_summary(out.best_eval["gate_total"], out.best_eval["gate_count"])
        gate, if_map, shares = map(np.asarray, summary)
        shares = np.round(shares, 2).tolist()
        gate_file = "gate_mean.npy"
        if primary:
            np.save(run_dir / gate_file, gate)
            plot = functools.partial(
                importance.plot_heatmap, if_map, run_dir / "importance.png",
                title=f"Importance Factor: {split.name}, seed {seed}, fold {fold}",
            )  # fmt: skip
            background.submit(plot) if background is not None else plot()
    record = RunRecord(
        dataset=split.name,
        seed=seed,
        fold=None if holdout else fold,
        run=list(config.seeds).index(seed) + 1 if holdout else fold,
        column=column_name(config, seed, fold),
        best_accuracy=out.best_accuracy,
        best_epoch=out.best_epoch,
        final_accuracy=out.final_accuracy,
        steps=out.history[-1]["step"],
        gaussian_parameters=importance.gaussian_parameter_summary(
            jax.device_get(loop.fetch(out.best_state.params))
        ),
        layer_contribution_percent=shares,
        gate_mean=gate_file,
    )
    if primary:  # after the last checkpoint's commit (the background executor runs in order)
        background.submit(record.save, run_dir) if background is not None else record.save(run_dir)
    return record


def run(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    splits: list[Split] | None = None,
    progress: bool = True,
    hooks: loop.Hooks | None = None,
) -> dict:
    """Trains every dataset x seed x fold of ``config`` (skipping finished runs) and reports.

    With a ``mesh`` entry in the config (e.g. ``{'data': -1, 'model': 2}``) every run is
    sharded over that device mesh. Each run lives in ``<workdir>/<dataset>/seed<s>_fold<k>/``
    with its ``config.json``, checkpoints, ``metrics.jsonl``, ``record.json`` and, for gated
    fronts, ``gate_mean.npy`` and ``importance.png``. The tables are printed and saved as
    ``<workdir>/results.md`` and ``results.json``.

    Args:
      config: a validated config.
      workdir: the output folder.
      splits: the opened datasets, if the caller already has them.
      progress: progress bars and a line per finished run.
      hooks: loop callbacks (tests).

    Returns:
      ``results.json``'s content: ``columns``, ``best``/``final`` accuracy per dataset and the
      ``records``.
    """
    workdir = pathlib.Path(workdir)
    splits = splits or [open_split(config, name) for name in config.dataset_paths]
    mesh = sharding.make_mesh(dict(config.mesh)) if "mesh" in config else None
    background = Background()
    try:
        records = _train_all(config, workdir, splits, mesh, progress, hooks, background)
        background.drain()  # every checkpoint, heatmap and record is written
    finally:
        background.close()
    results = report.results(records)
    text = report.results_text(results)
    if jax.process_index() == 0:
        write_atomic(workdir / "results.md", text)
        write_json_atomic(workdir / "results.json", results)
    print(text)
    return results


def _train_all(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    splits: list[Split],
    mesh: jax.sharding.Mesh | None,
    progress: bool,
    hooks: loop.Hooks | None,
    background: Background,
) -> list[RunRecord]:
    """Every dataset x seed x fold, in that order; finished runs are read back, not retrained.

    Up to ``concurrent_runs`` of them train at once (:mod:`train.parallel_runs`).
    """
    by_shape: dict[tuple, Steps] = {}  # datasets of one shape and class count share the steps
    placed: dict[str, tuple[Steps, Any]] = {}  # each dataset's data is placed once

    def prepare(split: Split) -> tuple[Steps, Any]:
        if split.name not in placed:
            key = (split.num_classes, split.input_shape)
            if key not in by_shape:
                by_shape[key] = Steps(config, *key, mesh=mesh)
            feed = make_feed(by_shape[key], split.source, split.num_classes,
                             config.get("data_on_device", "auto"))  # fmt: skip
            placed[split.name] = (by_shape[key], feed)
        return placed[split.name]

    def make_job(split, steps, feed, run_dir, seed, fold):
        def job(slot: int, stop: threading.Event, compiled: threading.Event) -> RunRecord:
            run_hooks = dataclasses.replace(
                hooks or loop.Hooks(), dispatched=lambda _: compiled.set(), stop=stop.is_set
            )
            return train_one(
                config, split, steps, feed, run_dir, seed=seed, fold=fold, progress=progress,
                hooks=run_hooks, background=background, position=slot,
            )  # fmt: skip

        return job

    pool = parallel_runs.RunPool(parallel_runs.concurrent_runs(config, mesh))
    jobs: list[tuple[Split, int, int, concurrent.futures.Future]] = []
    try:
        for split in splits:
            for seed in config.seeds:
                for fold in range(1, len(split.folds) + 1):
                    run_dir = workdir / run_folder(split.name, seed, fold)
                    if (run_dir / RECORD).exists():
                        future = concurrent.futures.Future()
                        future.set_result(RunRecord.load(run_dir))
                    else:
                        steps, feed = prepare(split)
                        job = make_job(split, steps, feed, run_dir, seed, fold)
                        future = pool.submit(steps, job)
                    jobs.append((split, seed, fold, future))
        records = []
        futures = [future for *_, future in jobs]
        for split, seed, fold, future in jobs:
            record = _result(future, futures)
            records.append(record)
            background.check()
            if progress and jax.process_index() == 0:
                print(
                    f"{split.name} seed {seed} fold {fold}: best-epoch accuracy "
                    f"{100 * record.best_accuracy:.1f} (epoch {record.best_epoch}), "
                    f"final {100 * record.final_accuracy:.1f}",
                    file=sys.stderr,
                )
    except BaseException:
        pool.cancel()  # running runs stop at their next epoch; nothing saved is lost
        raise
    finally:
        pool.close()
    return records


def _result(future: concurrent.futures.Future, futures: list) -> Any:
    """``future``'s result; or the error of any other run as soon as one fails.

    So the runs still training stop at their next epoch instead of finishing first.
    """
    while not future.done():
        running = [f for f in futures if not f.done()]
        concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
        for other in futures:
            if other.done() and not other.cancelled() and other.exception() is not None:
                other.result()
    return future.result()
