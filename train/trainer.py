"""The trainer: ``python -m train`` runs :func:`run`. Read it top to bottom.

1. **Config and checks** (:func:`check`): the config's values, the workdir, the mesh, every
   dataset against the config, and each program shape's model, optimiser and train state as
   abstract shapes. Nothing is trained, no weights are read and no file is written before the
   checks pass; a failure is one :class:`~train.config.ConfigError` line.
2. **Datasets and folds**: each dataset opened by the task (features for the decoders, raw
   inputs for fine-tuning) and cut into the folds of ``config.cv``.
3. **The programs of runs** (:func:`plan_programs`): the runs that share a class count and an
   example shape (every seed and fold of a dataset, and several datasets when their shapes
   agree) train together as one program, vmapped over a ``runs`` axis, at most
   ``runs_per_program`` at a time (0: all).
4. **Model, optimiser and state from abstract shapes**: one :class:`~train.steps.Steps` per
   program shape, built by the check and kept; a task that starts from pretrained weights
   reads them once, onto the mesh, before its first program trains.
5. **Restore** (:func:`train_program`): the program's newest verified checkpoint, if any.
6. **The loop**: stretches of jitted steps between *fetch points* (epoch ends, and the steps
   where a mid-epoch checkpoint or a log line is due), where the host fetches the sums, checks
   the loss is finite, checkpoints when due and writes the metrics; each epoch ends with an
   evaluation, the plateau schedule and the best state, chosen on the device.
7. **Records and reports**: each finished run's folder (:mod:`train.artefacts`), the task's own
   files (fine-tuning: the PEFT adapter), and the results table.

The task (:mod:`train.tasks`) is what differs between the decoders on features and
fine-tuning; everything above is the same code for both. The small utilities sit beneath this
module: steps, feeds, checkpointing, progress, plateau, losses.

Layout: a program's checkpoints live in ``<workdir>/programs/<name>/checkpoints``; each run
keeps its own folder ``<workdir>/<dataset>/seed<s>_fold<k>/``. A program whose runs all have a
record is read back, not retrained.

Determinism: each run's data order is a pure function of ``(seed, epoch)`` and a step of
``(state, batch)``, so a program resumed from any checkpoint replays exactly what an
uninterrupted one computes (XLA on CPU is deterministic for a fixed program; the fetch points,
which split the jitted stretches, depend only on the config). Every checkpoint holds the
state, every run's best state so far and the loop's :class:`~train.progress.Progress`; the
non-finite check runs at each fetch, before anything is saved, so no checkpoint ever holds a
state past a non-finite loss.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from app import storage
from data import pipeline
from train import artefacts, feeds, finetune, plateau, report, runs, splits, tasks, validate
from train import config as config_lib
from train.checkpointing import Checkpoints, snapshot
from train.config import ConfigError, one_line
from train.metrics import RunMetrics
from train.progress import Hooks, Progress, check_finite, fetch, fetch_points, train_line
from train.runs import RECORD, RunRecord, RunResult
from train.splits import DatasetFolds
from train.steps import Steps, Sums, select

# == 1-2. Config and checks; datasets and folds ===============================================


@dataclasses.dataclass
class Checked:
    """A config that passed every check, with what the checks built.

    Attributes:
      task: what kind of job it is (:func:`task_of`).
      datasets: every dataset opened, with its folds, in the config's order.
      steps: the programs of each shape ``(num_classes, input_shape)``, abstract until the
        task loads its weights (:func:`run`).
      mesh: the device mesh, or None.
    """

    task: tasks.Task
    datasets: list[DatasetFolds]
    steps: dict[tuple, Steps]
    mesh: Any


def task_of(config: ml_collections.ConfigDict) -> tasks.Task:
    """Fine-tuning for a config with an ``encoder`` section, else the decoders on features."""
    return finetune.TASK if "encoder" in config else DECODERS


def check(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, cache: dict | None = None
) -> Checked:
    """Validates everything a job needs, from shapes only: no training, no weights, no writes.

    Args:
      config: the config.
      workdir: the output folder (checked writable, or a reachable bucket).
      cache: programs kept from an earlier job of the same config (:func:`run`).

    Raises:
      ConfigError: the first problem found, in one line.
    """
    task = task_of(config)
    validate.check_values(config)
    if task.check is not None:
        task.check(config)
    validate.check_workdir(workdir)
    mesh = validate.check_mesh(config)
    datasets, steps = [], {}
    for name in config.dataset_paths:
        try:
            split = task.open_folds(config, name)
        except FileNotFoundError as err:
            raise ConfigError(one_line(err)) from err
        except ValueError as err:
            raise ConfigError(f"{name}: {one_line(err)}") from err
        task.check_data(config, split)
        datasets.append(split)
        key = (split.num_classes, split.input_shape)
        if key not in steps:
            kept = (cache or {}).get(_cache_key(key, mesh))
            steps[key] = kept or task.steps(config, split, mesh)
    return Checked(task, datasets, steps, mesh)


def claim(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, task: tasks.Task
) -> ml_collections.ConfigDict:
    """Makes ``workdir`` this config's (or confirms it already is); returns the resolved config.

    The workdir's ``config.json`` records the resolved config and the data fingerprints; a
    workdir recording another identity is refused before anything in it is touched, and so is
    one that another live job is training in (:func:`train.runs.claim`).

    Raises:
      ConfigError: naming the keys that differ from the recorded run, or the live job.
    """
    config = config if task.resolve is None else task.resolve(config)
    current = task.identity(config)
    primary = jax.process_index() == 0
    try:
        known = runs.check_identity(workdir, current)
        if primary:  # one job per workdir (a multi-host job is one job)
            runs.claim(workdir)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if not known and primary:
        storage.path(workdir).mkdir(parents=True, exist_ok=True)
        runs.write_json_atomic(storage.path(workdir) / runs.CONFIG, current)
    return config


# == 3. The programs of runs ===================================================================


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a program.

    Attributes:
      dataset: the dataset's name in the config.
      seed: initialisation and data-order seed.
      fold: 1-based fold (1 for a held-out split).
      column: its column in the results table (``F3``, ``R2``, ``s1F3``).
      run: 1-based index of the run in its table row (folds for k-fold; seeds for holdout).
      train: training examples, as indices into the program's source.
      val: validation examples, likewise.
    """

    dataset: str
    seed: int
    fold: int
    column: str
    run: int
    train: np.ndarray
    val: np.ndarray

    @property
    def folder(self) -> pathlib.Path:
        """The run's folder relative to the workdir."""
        return runs.run_folder(self.dataset, self.seed, self.fold)

    @property
    def name(self) -> str:
        """``"toy seed 0 fold 2"``."""
        return f"{self.dataset} seed {self.seed} fold {self.fold}"


@dataclasses.dataclass(frozen=True)
class Program:
    """Runs that train as one vmapped program.

    Attributes:
      name: its folder under ``<workdir>/programs``.
      datasets: the datasets its runs read (one source, concatenated in this order).
      runs: the runs, in dataset, seed, fold order.
    """

    name: str
    datasets: tuple[DatasetFolds, ...]
    runs: tuple[RunSpec, ...]

    @property
    def key(self) -> tuple:
        """``(num_classes, input_shape)``: programs with the same key share compiled steps."""
        return self.datasets[0].num_classes, self.datasets[0].input_shape

    def source(self) -> Any:
        """The examples of every dataset of the program, one after another."""
        return pipeline.concatenate([d.source for d in self.datasets])

    def plan(self) -> feeds.Plan:
        """What the feeds need of the runs."""
        return feeds.Plan(
            train=tuple(r.train for r in self.runs),
            val=tuple(r.val for r in self.runs),
            seeds=tuple(r.seed for r in self.runs),
            names=tuple(r.name for r in self.runs),
        )


def column_name(config: ml_collections.ConfigDict, seed: int, fold: int) -> str:
    """``F<k>`` for folds, ``R<i>`` for the seeded runs of a holdout split, ``s<seed>F<k>``."""
    if config.cv.kind == "holdout":
        return f"R{list(config.seeds).index(seed) + 1}"
    return f"F{fold}" if len(config.seeds) == 1 else f"s{seed}F{fold}"


def plan_programs(config: ml_collections.ConfigDict, datasets: list[DatasetFolds]) -> list[Program]:
    """Groups the runs of every dataset by shape into programs of at most ``runs_per_program``."""
    groups: dict[tuple, list[DatasetFolds]] = {}
    for d in datasets:
        groups.setdefault((d.num_classes, d.input_shape), []).append(d)
    holdout = config.cv.kind == "holdout"
    programs = []
    for members in groups.values():
        specs, offset = [], 0
        for d in members:
            for seed in config.seeds:
                for fold, (tr, va) in enumerate(d.folds, start=1):
                    index = list(config.seeds).index(seed) + 1 if holdout else fold
                    column = column_name(config, seed, fold)
                    tr, va = tr + offset, va + offset
                    specs.append(RunSpec(d.name, seed, fold, column, index, tr, va))
            offset += len(d.source)
        size = config_lib.setting(config, "runs_per_program") or len(specs)
        chunks = [specs[i : i + size] for i in range(0, len(specs), size)]
        base = "+".join(d.name for d in members)
        for i, chunk in enumerate(chunks):
            name = base if len(chunks) == 1 else f"{base}-{i + 1}of{len(chunks)}"
            programs.append(Program(name, tuple(members), tuple(chunk)))
    return programs


# == 4. Model, optimiser and state from abstract shapes =======================================


def decoder_steps(config: ml_collections.ConfigDict, split: DatasetFolds, mesh: Any) -> Steps:
    """The config's decoder on ``split``'s examples, its train state traced abstractly.

    Raises:
      ConfigError: frozen-parameter patterns that match nothing, or a model that rejects the
        examples' shape (heads that do not divide a layer axis, ...).
    """
    try:
        steps = Steps(config, split.num_classes, split.input_shape, mesh=mesh)
        steps.abstract_state()
    except (ValueError, TypeError) as err:
        raise validate.model_error(split, err) from err
    return steps


# The paper's decoders on frozen encoder features; fine-tuning is :data:`train.finetune.TASK`.
DECODERS = tasks.Task(
    identity=runs.identity,
    open_folds=splits.open_folds,
    check_data=validate.check_data,
    steps=decoder_steps,
)


# == The job: sections 1 to 7 in order ==========================================================


def run(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    progress: bool = True,
    hooks: Hooks | None = None,
    cache: dict | None = None,
    checked: Checked | None = None,
) -> dict:
    """Checks ``config``, claims ``workdir``, trains every unfinished run, and reports.

    With a ``mesh`` entry in the config (e.g. ``{'runs': -1}`` or ``{'data': -1, 'model': 2}``)
    every program is sharded over that device mesh. The tables are printed and saved as
    ``<workdir>/results.md`` and ``results.json``.

    Args:
      config: the config.
      workdir: the output folder (a local folder or an object-store URL).
      progress: progress bars and a line per finished run.
      hooks: loop callbacks (tests).
      cache: a dict kept between calls with the same config (a notebook, tests): the programs
        of each shape, with any weights they read, are reused instead of built again.
      checked: what :func:`check` returned for this config and workdir (else it runs here).

    Returns:
      ``results.json``'s content: ``columns``, ``best``/``final`` accuracy per dataset and the
      ``records``.

    Raises:
      ConfigError: a check failed (nothing was written).
    """
    checked = checked or check(config, workdir, cache=cache)
    task, workdir = checked.task, storage.path(workdir)
    config = claim(config, workdir, task)
    cache = {} if cache is None else cache
    primary = jax.process_index() == 0
    records = []
    for program in plan_programs(config, checked.datasets):
        dirs = [workdir / r.folder for r in program.runs]
        if all((d / RECORD).exists() for d in dirs):
            records += [RunRecord.load(d) for d in dirs]
            continue
        key = _cache_key(program.key, checked.mesh)
        if key not in cache:  # the weights a model starts from: read once, onto the mesh
            steps = checked.steps[program.key]
            if task.load is not None:
                task.load(steps, config)
            cache[key] = steps
        records += train(config, workdir, program, cache[key], progress and primary, hooks)
    if primary and task.finish is not None:
        for record in records:
            task.finish(config, workdir / runs.run_folder(record.dataset, record.seed,
                                                          record.fold or 1))  # fmt: skip
    results = report.results(records)
    text = report.results_text(results)
    if primary:
        storage.write_atomic(workdir / "results.md", text)
        runs.write_json_atomic(workdir / "results.json", results)
    print(text)
    return results


def train(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    program: Program,
    steps: Steps,
    show: bool,
    hooks: Hooks | None,
) -> list[RunRecord]:
    """Trains one program (resuming it) and writes every run's folder and record."""
    by_name = {d.name: d for d in program.datasets}
    dirs = [workdir / r.folder for r in program.runs]
    primary = jax.process_index() == 0
    for r, d in zip(program.runs, dirs, strict=True):
        d.mkdir(parents=True, exist_ok=True)
        if primary:
            run_config = artefacts.run_config(config, by_name[r.dataset])
            runs.write_json_atomic(d / runs.CONFIG, run_config)
    feed = feeds.make_feed(steps, program.source(), steps.num_classes,
                           config_lib.setting(config, "data_on_device"))  # fmt: skip
    hparams = runs.flatten(runs.plain(config))  # TensorBoard's, with each finished run
    metrics = [RunMetrics(d, hparams) if primary else None for d in dirs]
    bar = _ProgressBar(f"{program.name} ({len(program.runs)} runs)", show)
    hooks = hooks or Hooks()
    if show and hooks.progress is None:
        hooks = dataclasses.replace(hooks, progress=bar.show)
    try:
        results = train_program(
            steps, feed, program.plan(), workdir / "programs" / program.name / "checkpoints",
            metrics=metrics, hooks=hooks,
        )  # fmt: skip
    except BaseException:
        for m in metrics:
            if m is not None:
                m.close()
        raise
    finally:
        bar.close()
    return [
        _finish_run(config, r, result, d, m, show)
        for r, result, d, m in zip(program.runs, results, dirs, metrics, strict=True)
    ]


def _cache_key(shape_key: tuple, mesh: Any) -> tuple:
    """A program shape on a mesh (programs built for one mesh do not run on another)."""
    return (*shape_key, None if mesh is None else tuple(mesh.shape.items()))


# == 5-6. Restore, and the loop ================================================================


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The fixed facts of one program's loop.

    Attributes:
      config: epochs, batch size, checkpoint and log intervals, learning rate, plateau.
      plan: the real runs.
      padded: the runs with the padding runs that fill the run axis out.
      per_epoch: each run's steps per epoch (the longest run sets the program's positions).
    """

    config: Any
    plan: feeds.Plan
    padded: feeds.Plan
    per_epoch: np.ndarray

    @property
    def positions(self) -> int:
        """Program steps per epoch: the longest run's."""
        return int(self.per_epoch.max())

    @property
    def every(self) -> tuple[int, int]:
        """The intervals (program steps) of mid-epoch checkpoints and training lines."""
        return (self.config.checkpoint_every_steps,
                config_lib.setting(self.config, "log_every_steps"))  # fmt: skip


def train_program(
    steps: Steps,
    feed: Any,
    plan: feeds.Plan,
    directory: str | pathlib.Path,
    *,
    metrics: Sequence[RunMetrics | None] | None = None,
    config: Any = None,
    hooks: Hooks | None = None,
) -> list[RunResult]:
    """Trains every run of ``plan`` as one program, resuming from ``directory``'s checkpoints.

    Args:
      steps: the compiled programs.
      feed: a :class:`~train.feeds.DeviceFeed` or :class:`~train.feeds.GrainFeed`.
      plan: the runs (training and validation examples, seeds).
      directory: the program's checkpoint folder.
      metrics: each run's :class:`~train.metrics.RunMetrics` (or None for none).
      config: the schedule (epochs, checkpoint and log intervals, plateau); default
        ``steps.config``. Its model, optimiser, loss and batch sizes must be those ``steps``
        was compiled for.
      hooks: progress and test callbacks.

    Returns:
      One :class:`~train.runs.RunResult` per run of ``plan``.

    Raises:
      NonFiniteLossError: naming the run and the first step with a non-finite loss; the newest
        checkpoint on disk is the last good state.
    """
    cfg = config if config is not None else steps.config
    padded = feeds.pad(plan, steps.runs_multiple())
    s = Schedule(cfg, plan, padded, feeds.steps_per_epoch(padded, cfg.batch_size))
    loop = _Loop(s, steps, feed, metrics or [None] * plan.runs, hooks or Hooks())
    ckpt = Checkpoints(directory, max_to_keep=cfg.max_to_keep,
                       asynchronous=config_lib.setting(cfg, "async_checkpoints"))  # fmt: skip
    try:
        # Restore: the newest verified checkpoint, else fresh states. ``best`` gets its own
        # buffers: the state's are donated to every step.
        state = steps.init_state(padded.seeds)
        best, progress = snapshot(state), Progress.start(padded.runs)
        restored = ckpt.restore(steps.abstract_state(padded.runs))
        if restored is not None:
            state, best, meta = restored
            progress = Progress.from_json(meta)
        schedules = zip(progress.plateau, progress.best, strict=True)
        tracker = steps.placed(_stack([plateau.to_device(p, b) for p, b in schedules]))
        # The loop.
        for epoch in range(progress.epoch, cfg.num_epochs):
            orders, first = feed.orders(padded, epoch), epoch * s.positions
            position, sums = progress.position, loop.epoch_sums(progress)
            for stop in fetch_points(position, s.positions, first, s.every):
                state, sums = feed.train(state, sums, orders, position, stop)
                position = stop
                if stop < s.positions:  # the epoch's end fetches with the evaluation
                    progress = loop.mid_epoch(ckpt, epoch, stop, state, best, sums, tracker,
                                              progress)  # fmt: skip
            state, best, tracker, progress = loop.end_epoch(ckpt, epoch, state, best, sums,
                                                            tracker, progress)  # fmt: skip
    finally:
        ckpt.close()
    return loop.results(state, best, progress)


class _Loop:
    """The host's side of one program's loop: what happens at each fetch point."""

    def __init__(self, s: Schedule, steps: Steps, feed: Any, metrics: Sequence, hooks: Hooks):
        self.s, self.steps, self.feed, self.metrics, self.hooks = s, steps, feed, metrics, hooks
        self.logged: tuple[int, float] | None = None  # (step, wall time) of the last log line

    def epoch_sums(self, progress: Progress) -> Sums:
        """Zero sums, or those of a checkpoint taken mid-epoch."""
        sums = self.steps.zero_sums(self.s.padded.runs)
        if progress.partial is None:
            return sums
        partial = _stack([Sums(**p) for p in progress.partial])
        # The zeros' dtypes and placement (not weak types): no second compile.
        return self.steps.placed(jax.tree.map(lambda z, p: jnp.asarray(p, z.dtype), sums, partial))

    def mid_epoch(self, ckpt, epoch, stop, state, best, sums, tracker, progress) -> Progress:
        """A fetch point inside an epoch: check, log, checkpoint when due."""
        s, step = self.s, epoch * self.s.positions + stop
        host = fetch(sums)
        self.check(host, ckpt, step, epoch)
        log_every, ckpt_every = s.every[1], s.every[0]
        if log_every and step % log_every == 0:
            progress = self.log(progress, host, epoch, stop, fetch(tracker["scale"]))
        if ckpt_every and step % ckpt_every == 0:
            ckpt.save(step, state, best, progress.mid_epoch(epoch, stop, host).to_json())
        ckpt.poll()
        self.after_fetch(step, None)
        return progress

    def end_epoch(self, ckpt, epoch, state, best, sums, tracker, progress) -> tuple:
        """The epoch's end: evaluate, step the schedules, keep the best, checkpoint when due."""
        s, cfg = self.s, self.s.config
        evaluation = self.feed.evaluate(state, s.padded)
        scale = tracker["scale"]  # this epoch's learning-rate factor
        plateau_args = (cfg.optimizer.plateau_factor, cfg.optimizer.plateau_patience)
        state, tracker, improved = self.steps.epoch_end(state, tracker, evaluation, plateau_args)
        best = select(improved, state, best)
        host_sums, host_eval, scale, improved, host_tracker = fetch(
            (sums, evaluation, scale, improved, tracker)
        )
        step = (epoch + 1) * s.positions
        self.check(host_sums, ckpt, step, epoch)
        progress = progress.after_epoch(epoch, s.per_epoch, host_sums, host_eval, scale, improved,
                                        host_tracker, cfg.optimizer.learning_rate)  # fmt: skip
        due = (epoch + 1) % cfg.checkpoint_every_epochs == 0 or epoch + 1 == cfg.num_epochs
        if due:
            ckpt.save(step, state, best, progress.to_json())
        ckpt.poll()
        for r in range(s.plan.runs):
            self.write(r, progress, progress.history[r][-1], durable=due)
        mean_val = float(np.mean([h[-1]["val_accuracy"] for h in progress.history[: s.plan.runs]]))
        self.after_fetch(step, mean_val)
        return state, best, tracker, progress

    def check(self, host: Sums, ckpt: Checkpoints, upto: int, epoch: int) -> None:
        """Stops on a non-finite loss, before anything of this stretch is saved."""
        check_finite(host, self.s.plan.runs, upto, epoch, self.s.plan.names, ckpt)

    def log(self, progress: Progress, host: Sums, epoch: int, stop: int, scale: np.ndarray):
        """Each run's training line at a log point."""
        s, now = self.s, time.perf_counter()
        step = epoch * s.positions + stop
        rate = None if self.logged is None else (step - self.logged[0]) / (now - self.logged[1])
        self.logged = (step, now)
        lines = []
        for r in range(s.plan.runs):
            own = epoch * int(s.per_epoch[r]) + min(stop, int(s.per_epoch[r]))
            lr = s.config.optimizer.learning_rate * float(scale[r])
            lines.append(train_line(host, r, own, lr, rate))
        progress = progress.with_train_lines(lines)
        for r, line in enumerate(lines):
            self.write(r, progress, line, durable=False)
        return progress

    def write(self, r: int, progress: Progress, new: dict, *, durable: bool) -> None:
        if self.metrics[r] is not None:
            self.metrics[r].write(progress.lines(r), new, durable=durable)

    def after_fetch(self, step: int, mean_val: float | None) -> None:
        if self.hooks.progress:
            total = self.s.positions * self.s.config.num_epochs
            self.hooks.progress(step, total, mean_val)
        if self.hooks.after_fetch:
            self.hooks.after_fetch(step)

    def results(self, state: Any, best: Any, progress: Progress) -> list[RunResult]:
        """Each real run's outcome, with its best and final states on the host."""
        best_eval = fetch(self.feed.evaluate(best, self.s.padded))
        best_host, final_host = fetch(best), fetch(state)
        results = []
        for r in range(self.s.plan.runs):
            history, chosen = progress.history[r], progress.best[r]
            results.append(
                RunResult(
                    history=history,
                    best_epoch=chosen["epoch"],
                    best_accuracy=chosen["val_accuracy"],
                    final_accuracy=history[-1]["val_accuracy"],
                    best_state=jax.tree.map(lambda x, r=r: x[r], best_host),
                    final_state=jax.tree.map(lambda x, r=r: x[r], final_host),
                    best_eval={k: v[r] for k, v in best_eval.items()},
                )
            )
        return results


def _stack(trees: list) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


# == 7. Records and reports ====================================================================


def _finish_run(
    config: ml_collections.ConfigDict,
    r: RunSpec,
    result: RunResult,
    run_dir: pathlib.Path,
    metrics: RunMetrics | None,
    show: bool,
) -> RunRecord:
    """Writes a trained run's folder (its record last) and closes its metrics."""
    identity = {
        "dataset": r.dataset,
        "seed": r.seed,
        "fold": None if config.cv.kind == "holdout" else r.fold,
        "run": r.run,
        "column": r.column,
    }
    title = f"Importance Factor: {r.dataset}, seed {r.seed}, fold {r.fold}"
    record = artefacts.finish_run(identity, result, run_dir, title)
    if metrics is not None:
        metrics.close({"best_accuracy": record.best_accuracy,
                       "final_accuracy": record.final_accuracy})  # fmt: skip
    if show:
        print(
            f"{r.name}: best-epoch accuracy {100 * record.best_accuracy:.1f} (epoch "
            f"{record.best_epoch}), final {100 * record.final_accuracy:.1f}",
            file=sys.stderr,
        )
    return record


class _ProgressBar:
    """A tqdm bar over a program's steps, with the mean validation accuracy."""

    def __init__(self, desc: str, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=1, desc=desc, leave=False, mininterval=0.25, disable=not enabled)

    def show(self, done: int, total: int, mean_val: float | None) -> None:
        self.bar.total, self.bar.n = total, done
        if mean_val is not None:
            self.bar.set_postfix(mean_val=f"{mean_val:.3f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
