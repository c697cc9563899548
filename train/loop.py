"""The epoch loop of one training program: every run of it at once, over a ``runs`` axis.

In big_vision's shape, read top to bottom: dispatch a stretch of steps, fetch the numbers at a
*fetch point* (epoch ends, and the steps where a mid-epoch checkpoint or a log line is due),
check them, checkpoint when due, log, go on. The non-finite check happens at each fetch,
before anything is saved, so no checkpoint ever holds a state past a non-finite loss.

Determinism: each run's data order is a pure function of ``(seed, epoch)`` and a step of
``(state, batch)``, so a program resumed from any checkpoint replays exactly what an
uninterrupted one computes (XLA on CPU is deterministic for a fixed program; the fetch points,
which split the jitted stretches, depend only on the config).

Every checkpoint holds the state, every run's best state so far (chosen on the device) and
the loop's :class:`Progress`; a resume restores all three.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from gaam_jax import storage
from train import config as config_lib
from train import feeds, plateau
from train.checkpointing import Checkpoints, snapshot
from train.steps import Steps, Sums, TrainState, select

NO_BAD_STEP = np.iinfo(np.int32).max


class NonFiniteLossError(RuntimeError):
    """A training step produced a NaN or infinite loss (the message says which and where)."""


@dataclasses.dataclass
class Hooks:
    """Callbacks of the loop; each optional.

    Attributes:
      progress: ``(steps_done, steps_total, mean_val_accuracy_or_None)`` at every fetch point
        (program steps: positions of the longest run).
      record: ``(run, record)`` for each run's new line of ``metrics.jsonl``: a training line
        every ``log_every_steps`` and an epoch line after each epoch's evaluation.
      after_fetch: ``(program_step)`` after every fetch point's saves (tests stop runs here).
    """

    progress: Callable[[int, int, float | None], None] | None = None
    record: Callable[[int, dict], None] | None = None
    after_fetch: Callable[[int], None] | None = None


@dataclasses.dataclass
class Progress:
    """Where a program stands: the JSON ``meta`` of every checkpoint.

    Attributes:
      epoch: epochs finished.
      position: positions of the current epoch done (a mid-epoch checkpoint), else 0.
      partial: each run's metric sums of the current epoch so far (mid-epoch), else None.
      plateau: each run's plateau-schedule state (:func:`train.plateau.init`).
      history: each run's epoch records.
      best: each run's best epoch (``step``, ``epoch``, ``val_accuracy``) or None.
      log: each run's training lines every ``log_every_steps`` (:func:`_train_line`).
    """

    epoch: int
    position: int
    partial: list[dict] | None
    plateau: list[dict]
    history: list[list[dict]]
    best: list[dict | None]
    log: list[list[dict]]

    @classmethod
    def start(cls, runs: int) -> Progress:
        """Nothing done yet."""
        empty = [[] for _ in range(runs)]
        return cls(0, 0, None, [plateau.init()] * runs, empty, [None] * runs, [[] for _ in empty])

    def lines(self, run: int) -> list[dict]:
        """A run's ``metrics.jsonl``: training and epoch lines by step (epoch lines last)."""
        both = self.log[run] + self.history[run]
        return sorted(both, key=lambda line: (line["step"], "val_accuracy" in line))

    @classmethod
    def from_json(cls, meta: dict) -> Progress:
        """The inverse of ``dataclasses.asdict``."""
        return cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls)})


def _train_line(sums: Sums, r: int, step: int, lr: float, per_second: float | None) -> dict:
    """A training line of ``metrics.jsonl``: the epoch's running means up to ``step``.

    ``steps_per_second`` is the host's wall-clock rate since the previous line (None for the
    first in a process), the only number of a run that a resume does not replay exactly.
    """
    count = float(sums.count[r])
    return {
        "step": step,
        "train_loss": float(sums.loss[r]) / count,
        "train_accuracy": float(sums.correct[r]) / count,
        "learning_rate": lr,
        "steps_per_second": per_second,
    }


@dataclasses.dataclass
class RunResult:
    """One run's outcome, as :func:`train_program` returns it.

    Attributes:
      history: one record per epoch.
      best_epoch: 1-based (the first among ties).
      best_accuracy: its validation accuracy.
      final_accuracy: the last epoch's validation accuracy.
      best_state: the state of the best epoch (numpy leaves).
      final_state: the state after the last epoch (numpy leaves).
      best_eval: the evaluation sums of the best state (``gate_total``/``gate_count`` for gated
        fronts: the Importance Factor's input), as numpy.
    """

    history: list[dict]
    best_epoch: int
    best_accuracy: float
    final_accuracy: float
    best_state: TrainState
    final_state: TrainState
    best_eval: dict


def fetch(tree: Any) -> Any:
    """Device values -> numpy (arrays split over processes are gathered first)."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


def fetch_points(start: int, per_epoch: int, first_step: int, every: Sequence[int]) -> list[int]:
    """The in-epoch positions (exclusive ends) where the host fetches, after ``start``.

    ``first_step`` is the program step of the epoch's position 0; a position ``p`` is a fetch
    point when ``first_step + p`` is a multiple of a positive interval in ``every``, and the
    epoch's end always is.
    """
    points = {per_epoch}
    for interval in every:
        if interval > 0:
            points.update(
                p for p in range(start + 1, per_epoch) if (first_step + p) % interval == 0
            )
    return sorted(p for p in points if p > start)


def _stack(trees: list) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def train_program(
    steps: Steps,
    feed: Any,
    plan: feeds.Plan,
    directory: str | pathlib.Path,
    *,
    run_dirs: Sequence[pathlib.Path | None] | None = None,
    config: Any = None,
    hooks: Hooks | None = None,
) -> list[RunResult]:
    """Trains every run of ``plan`` as one program, resuming from ``directory``'s checkpoints.

    Args:
      steps: the compiled programs.
      feed: a :class:`~train.feeds.DeviceFeed` or :class:`~train.feeds.GrainFeed`.
      plan: the runs (training and validation examples, seeds).
      directory: the program's checkpoint folder.
      run_dirs: a folder per run for its ``metrics.jsonl`` (rewritten from the checkpointed
        history, so it never disagrees with the checkpoints), or None.
      config: the schedule (epochs, checkpoint and log intervals, plateau); default
        ``steps.config``. Its model, optimiser, loss and batch sizes must be those ``steps``
        was compiled for.
      hooks: progress, logging and test callbacks.

    Returns:
      One :class:`RunResult` per run of ``plan``.

    Raises:
      NonFiniteLossError: naming the run and the first step with a non-finite loss; the newest
        checkpoint on disk is the last good state.
    """
    cfg = config if config is not None else steps.config
    hooks = hooks or Hooks()
    runs = plan.runs
    padded = feeds.pad(plan, steps.runs_multiple())
    per_epoch = feeds.steps_per_epoch(padded, cfg.batch_size)
    positions = int(per_epoch.max())  # the longest run's steps per epoch
    total = positions * cfg.num_epochs
    every = (cfg.checkpoint_every_steps, config_lib.setting(cfg, "log_every_steps"))
    plateau_args = (cfg.optimizer.plateau_factor, cfg.optimizer.plateau_patience)
    primary = jax.process_index() == 0
    ckpt = Checkpoints(
        directory,
        max_to_keep=cfg.max_to_keep,
        asynchronous=config_lib.setting(cfg, "async_checkpoints"),
    )
    try:
        state = steps.init_state(padded.seeds)
        best = snapshot(state)  # its own buffers: the state's are donated to every step
        progress = Progress.start(padded.runs)
        restored = ckpt.restore(steps.abstract_state(padded.runs))
        if restored is not None:
            state, best, meta = restored
            progress = Progress.from_json(meta)
        schedules = zip(progress.plateau, progress.best, strict=True)
        tracker = steps.placed(_stack([plateau.to_device(p, b) for p, b in schedules]))

        def check(host_sums: Sums, upto: int, epoch: int) -> None:
            bad = np.asarray(host_sums.first_bad_step)[:runs]
            if (bad != NO_BAD_STEP).any():
                first = int(np.argmax(bad != NO_BAD_STEP))
                raise _non_finite(ckpt, directory, first, bad, upto, epoch, plan.names)

        log_every = config_lib.setting(cfg, "log_every_steps")
        logged = None  # (program step, wall time) of the last training line in this process

        def write_metrics(r: int, durable: bool) -> None:
            if primary and run_dirs is not None and run_dirs[r] is not None:
                text = "".join(json.dumps(line) + "\n" for line in progress.lines(r))
                storage.write_atomic(
                    storage.path(run_dirs[r]) / "metrics.jsonl", text, durable=durable
                )

        for epoch in range(progress.epoch, cfg.num_epochs):
            orders = feed.orders(padded, epoch)
            first_step = epoch * positions
            position, sums = progress.position, steps.zero_sums(padded.runs)
            if progress.partial is not None:  # resumed mid-epoch
                partial = _stack([Sums(**p) for p in progress.partial])
                # The zeros' dtypes and placement (not weak types): no second compile.
                sums = steps.placed(
                    jax.tree.map(lambda z, p: jnp.asarray(p, z.dtype), sums, partial)
                )
            for stop in fetch_points(position, positions, first_step, every):
                state, sums = feed.train(state, sums, orders, position, stop)
                position = stop
                if stop == positions:
                    break  # the epoch end fetches together with the evaluation
                host = fetch(sums)
                check(host, first_step + stop, epoch)
                if log_every and (first_step + stop) % log_every == 0:
                    now, scale = time.perf_counter(), fetch(tracker["scale"])
                    rate = None if logged is None else (first_step + stop - logged[0]) / (
                        now - logged[1])  # fmt: skip
                    logged = (first_step + stop, now)
                    lines = []
                    for r in range(runs):
                        step_r = epoch * int(per_epoch[r]) + min(stop, int(per_epoch[r]))
                        lr = cfg.optimizer.learning_rate * float(scale[r])
                        lines.append(_train_line(host, r, step_r, lr, rate))
                    log = [[*old, line] for old, line in zip(progress.log, lines, strict=False)]
                    progress = dataclasses.replace(progress, log=log + progress.log[runs:])
                    for r, line in enumerate(lines):
                        if hooks.record:
                            hooks.record(r, line)
                        write_metrics(r, durable=False)
                every_steps = cfg.checkpoint_every_steps
                if every_steps and (first_step + stop) % every_steps == 0:
                    partial = [
                        {k: np.asarray(v)[r].item() for k, v in dataclasses.asdict(host).items()}
                        for r in range(padded.runs)
                    ]
                    mid = dataclasses.replace(progress, epoch=epoch, position=stop, partial=partial)
                    ckpt.save(first_step + stop, state, best, dataclasses.asdict(mid))
                ckpt.poll()
                if hooks.progress:
                    hooks.progress(first_step + stop, total, None)
                if hooks.after_fetch:
                    hooks.after_fetch(first_step + stop)

            evaluation = feed.evaluate(state, padded)
            scale = tracker["scale"]  # this epoch's learning-rate factor
            state, tracker, improved = steps.epoch_end(state, tracker, evaluation, plateau_args)
            best = select(improved, state, best)
            host_sums, host_eval, scale, improved, host_tracker = fetch(
                (sums, evaluation, scale, improved, tracker)
            )
            check(host_sums, first_step + positions, epoch)
            progress = _after_epoch(progress, epoch, per_epoch, host_sums, host_eval, scale,
                                    improved, host_tracker, cfg)  # fmt: skip
            step = first_step + positions
            due = (epoch + 1) % cfg.checkpoint_every_epochs == 0 or epoch + 1 == cfg.num_epochs
            if due:
                ckpt.save(step, state, best, dataclasses.asdict(progress))
            ckpt.poll()
            for r in range(runs):
                if hooks.record:
                    hooks.record(r, progress.history[r][-1])
                write_metrics(r, durable=due)
            if hooks.progress:
                mean_val = float(np.mean([h[-1]["val_accuracy"] for h in progress.history[:runs]]))
                hooks.progress(step, total, mean_val)
            if hooks.after_fetch:
                hooks.after_fetch(step)
    finally:
        ckpt.close()
    best_eval = fetch(feed.evaluate(best, padded))
    best_host, final_host = fetch(best), fetch(state)
    results = []
    for r in range(runs):
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


def _after_epoch(
    progress: Progress, epoch: int, per_epoch: np.ndarray, sums: Sums, ev: dict,
    scale: np.ndarray, improved: np.ndarray, tracker: dict, cfg: Any,
) -> Progress:  # fmt: skip
    """The progress after an epoch: every run's record, best epoch and schedule state."""
    history, best, schedules = [], [], []
    for r in range(len(progress.history)):
        step = (epoch + 1) * int(per_epoch[r])
        val_acc = float(ev["correct"][r] / ev["count"][r])
        count = max(float(sums.count[r]), 1.0)  # a padding run takes no step
        record = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": float(sums.loss[r]) / count,
            "train_accuracy": float(sums.correct[r]) / count,
            "val_loss": float(ev["loss"][r] / ev["count"][r]),
            "val_accuracy": val_acc,
            "learning_rate": cfg.optimizer.learning_rate * float(scale[r]),
        }
        history.append([*progress.history[r], record])
        chosen = progress.best[r]
        if bool(improved[r]):
            chosen = {"step": step, "epoch": epoch + 1, "val_accuracy": val_acc}
        best.append(chosen)
        schedules.append(plateau.to_host({k: v[r] for k, v in tracker.items()}))
    return Progress(epoch + 1, 0, None, schedules, history, best, progress.log)


def _non_finite(
    ckpt: Checkpoints, directory: Any, run: int, bad: np.ndarray, upto: int, epoch: int,
    names: Sequence[str],
) -> NonFiniteLossError:  # fmt: skip
    name = f"{run} ({names[run]})" if names else str(run)
    ckpt.wait()
    good = ckpt.verified_steps()
    where = f"the newest checkpoint (step {good[-1]})" if good else "the start (no checkpoint yet)"
    return NonFiniteLossError(
        f"non-finite loss in run {name} at its step {int(bad[run])} (found when fetching program "
        f"steps up to {upto}, epoch {epoch + 1}) in {directory}; training stopped and rolled "
        f"back: nothing after {where} was saved, so a rerun resumes there."
    )
