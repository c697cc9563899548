"""The epoch loop of one training run: steps, evaluation, plateau schedule, checkpoints.

The loop keeps the device busy: steps are dispatched a stretch at a time (see
:mod:`train.feeds`) and the host fetches metrics only at *fetch points*: epoch ends, and the
steps where a mid-epoch checkpoint is due (``checkpoint_every_steps``) or a log line is due
(``log_every_steps``). The non-finite check happens at each fetch, before anything is saved, so
no checkpoint ever holds a state past a non-finite loss.

Determinism: the data order is a pure function of ``(seed, epoch)`` and a step of
``(state, batch)``, so a run resumed from any checkpoint replays exactly what an uninterrupted
run computes (XLA on CPU is deterministic for a fixed program; the fetch points, which split
the jitted stretches, depend only on the config).

The best state (by validation accuracy) is kept in device memory and committed together with
the next periodic checkpoint, which records the best's step: a resume restores both.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train import plateau
from train.checkpointing import Checkpoints, snapshot
from train.runs import write_atomic
from train.steps import Steps, Sums, TrainState


class NonFiniteLossError(RuntimeError):
    """A training step produced a NaN or infinite loss (the message says which and where)."""


@dataclasses.dataclass
class Hooks:
    """Callbacks of the loop; each optional.

    Attributes:
      progress: ``(steps_done, steps_total, last_record_or_None)`` at every fetch point.
      epoch_end: ``(record)`` after each epoch's evaluation, before its checkpoint.
      after_fetch: ``(global_step)`` after every fetch point's saves (tests stop runs here).
    """

    progress: Callable[[int, int, dict | None], None] | None = None
    epoch_end: Callable[[dict], None] | None = None
    after_fetch: Callable[[int], None] | None = None


@dataclasses.dataclass
class RunResult:
    """What :func:`train_run` returns.

    Attributes:
      history: one record per epoch.
      best_state: the state of the best epoch.
      final_state: the state after the last epoch.
      best_epoch: 1-based (the first among ties).
      best_accuracy: its validation accuracy.
      final_accuracy: the last epoch's validation accuracy.
      best_eval: the evaluation sums of the best state (``gate_total``/``gate_count`` for gated
        fronts: the Importance Factor's input), as numpy.
    """

    history: list[dict]
    best_state: TrainState
    final_state: TrainState
    best_epoch: int
    best_accuracy: float
    final_accuracy: float
    best_eval: dict


def fetch(tree: Any) -> Any:
    """Device values -> numpy (replicated global arrays are read from this process's copy)."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(get, tree)


def fetch_points(start: int, steps_per_epoch: int, first_step: int, every: tuple[int, ...]):
    """The in-epoch positions (exclusive ends) where the host fetches, after ``start``.

    ``first_step`` is the global step of the epoch's position 0; a position ``p`` is a fetch
    point when ``first_step + p`` is a multiple of a positive interval in ``every``, and the
    epoch's end always is.
    """
    points = {steps_per_epoch}
    for interval in every:
        if interval > 0:
            points.update(
                p for p in range(start + 1, steps_per_epoch) if (first_step + p) % interval == 0
            )
    return sorted(p for p in points if p > start)


def train_run(
    steps: Steps,
    feed: Any,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    workdir: str | pathlib.Path,
    *,
    seed: int,
    config: Any = None,
    hooks: Hooks | None = None,
) -> RunResult:
    """Trains one model (one fold and seed), resuming from ``workdir``'s checkpoints.

    Writes ``metrics.jsonl`` (one line per epoch, rewritten from the checkpointed history, so
    it never disagrees with the checkpoints) and ``checkpoints/`` under ``workdir``.

    Args:
      steps: the compiled steps.
      feed: a :class:`~train.feeds.DeviceFeed` or :class:`~train.feeds.GrainFeed`.
      train_idx: training examples (indices into the feed's source).
      val_idx: validation examples.
      workdir: the run's folder.
      seed: initialisation and data-order seed.
      config: the schedule (epochs, checkpoint and log intervals, plateau); default
        ``steps.config``. Its model, optimiser, loss and batch sizes must be those ``steps``
        was compiled for.
      hooks: progress, logging and test callbacks.

    Raises:
      NonFiniteLossError: naming the first step with a non-finite loss; the newest checkpoint
        on disk is the last good state.
    """
    cfg = config if config is not None else steps.config
    hooks = hooks or Hooks()
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    per_epoch = len(train_idx) // cfg.batch_size
    total = per_epoch * cfg.num_epochs
    every = (cfg.checkpoint_every_steps, cfg.get("log_every_steps", 0))
    ckpt = Checkpoints(
        workdir / "checkpoints",
        max_to_keep=cfg.max_to_keep,
        asynchronous=cfg.get("async_checkpoints", True),
    )
    try:
        state = steps.init_state(seed)
        meta = {"epoch": 0, "position": 0, "partial": None, "plateau": plateau.init(),
                "history": [], "best": None}  # fmt: skip
        best_state = None
        restored = ckpt.restore(state)
        if restored is not None:
            state, meta, best_state = restored
        best_saved = True  # the best (if any) is on disk as of the restored checkpoint
        for epoch in range(meta["epoch"], cfg.num_epochs):
            order = feed.order(train_idx, seed=seed, epoch=epoch)
            position, sums = 0, Sums.zeros()
            if meta["partial"] is not None:  # resumed mid-epoch
                position = meta["position"]
                sums = Sums(**{k: jnp.asarray(v) for k, v in meta["partial"].items()})
            first_step = epoch * per_epoch
            for stop in fetch_points(position, per_epoch, first_step, every):
                state, sums = feed.train(state, sums, order, position, stop)
                position = stop
                if stop == per_epoch:
                    break  # the epoch end fetches together with the evaluation
                host = fetch(sums)
                _check_finite(host, first_step + stop, epoch, ckpt, workdir)
                if (
                    cfg.checkpoint_every_steps
                    and (first_step + stop) % cfg.checkpoint_every_steps == 0
                ):
                    partial = {k: v.item() for k, v in dataclasses.asdict(host).items()}
                    mid = dict(meta, epoch=epoch, position=stop, partial=partial)
                    ckpt.save(first_step + stop, state, mid, _unsaved(best_state, meta, best_saved))
                    best_saved = True
                if hooks.progress:
                    hooks.progress(first_step + stop, total, None)
                if hooks.after_fetch:
                    hooks.after_fetch(first_step + stop)
            evaluation = feed.evaluate(state, val_idx)
            host, ev = fetch((sums, evaluation))
            _check_finite(host, first_step + per_epoch, epoch, ckpt, workdir)
            val_acc = float(ev["correct"] / ev["count"])
            new_plateau = plateau.update(
                meta["plateau"], val_acc,
                factor=cfg.optimizer.plateau_factor, patience=cfg.optimizer.plateau_patience,
            )  # fmt: skip
            record = {
                "epoch": epoch + 1,
                "step": first_step + per_epoch,
                "train_loss": float(host.loss / host.count),
                "train_accuracy": float(host.correct / host.count),
                "val_loss": float(ev["loss"] / ev["count"]),
                "val_accuracy": val_acc,
                "learning_rate": cfg.optimizer.learning_rate * meta["plateau"]["scale"],
            }
            history = [*meta["history"], record]
            state = state.replace(lr_scale=jnp.asarray(new_plateau["scale"], jnp.float32))
            best = meta["best"]
            if best is None or val_acc > best["val_accuracy"]:
                best = {"step": record["step"], "epoch": epoch + 1, "val_accuracy": val_acc}
                best_state, best_saved = snapshot(state), False
            meta = {"epoch": epoch + 1, "position": 0, "partial": None, "plateau": new_plateau,
                    "history": history, "best": best}  # fmt: skip
            if hooks.epoch_end:
                hooks.epoch_end(record)
            if (epoch + 1) % cfg.checkpoint_every_epochs == 0 or epoch + 1 == cfg.num_epochs:
                ckpt.save(record["step"], state, meta, _unsaved(best_state, meta, best_saved))
                best_saved = True
            if jax.process_index() == 0:
                write_atomic(
                    workdir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history)
                )
            if hooks.progress:
                hooks.progress(record["step"], total, record)
            if hooks.after_fetch:
                hooks.after_fetch(record["step"])
        ckpt.wait()
    finally:
        ckpt.close()
    history = meta["history"]
    best = meta["best"]
    best_eval = fetch(feed.evaluate(best_state, val_idx))
    return RunResult(
        history=history,
        best_state=best_state,
        final_state=state,
        best_epoch=best["epoch"],
        best_accuracy=best["val_accuracy"],
        final_accuracy=history[-1]["val_accuracy"],
        best_eval=best_eval,
    )


def _unsaved(best_state: Any, meta: dict, saved: bool) -> tuple[int, Any, dict] | None:
    """The best checkpoint to commit with the next periodic one, if it is not on disk yet."""
    if saved or best_state is None:
        return None
    return meta["best"]["step"], best_state, dict(meta["best"])


def _check_finite(host: Sums, step: int, epoch: int, ckpt: Checkpoints, workdir: pathlib.Path):
    bad = int(host.first_bad_step)
    if bad == np.iinfo(np.int32).max:
        return
    ckpt.wait()
    good = ckpt.verified_steps("latest")
    where = f"the newest checkpoint (step {good[-1]})" if good else "the start (no checkpoint yet)"
    raise NonFiniteLossError(
        f"non-finite loss at step {bad} (found when fetching steps up to {step}, epoch "
        f"{epoch + 1}) in {workdir}; training stopped and rolled back: nothing after {where} "
        "was saved, so a rerun resumes there."
    )
