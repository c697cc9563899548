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

import concurrent.futures
import dataclasses
import json
import pathlib
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data import pipeline
from train import plateau
from train.checkpointing import Checkpoints
from train.runs import write_atomic
from train.steps import Steps, Sums, TrainState


class NonFiniteLossError(RuntimeError):
    """A training step produced a NaN or infinite loss (the message says which and where)."""


class StopRequested(Exception):
    """A run stopped because :attr:`Hooks.stop` said so (another run failed, or Ctrl-C)."""


@dataclasses.dataclass
class Hooks:
    """Callbacks of the loop; each optional.

    Attributes:
      progress: ``(steps_done, steps_total, last_record_or_None)`` at every fetch point.
      epoch_end: ``(record)`` after each epoch's evaluation, before its checkpoint.
      after_fetch: ``(global_step)`` after every fetch point's saves (tests stop runs here).
      dispatched: ``(epoch)`` once an epoch's programs are dispatched (and so compiled).
      stop: ``() -> bool``, asked before each epoch; True raises :class:`StopRequested` (the
        work since the last checkpoint is lost, as with a kill).
    """

    progress: Callable[[int, int, dict | None], None] | None = None
    epoch_end: Callable[[dict], None] | None = None
    after_fetch: Callable[[int], None] | None = None
    dispatched: Callable[[int], None] | None = None
    stop: Callable[[], bool] | None = None


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
      committed: when ``train_run`` was given a background executor, the future of the last
        checkpoint's commit; else None (already committed).
    """

    history: list[dict]
    best_state: TrainState
    final_state: TrainState
    best_epoch: int
    best_accuracy: float
    final_accuracy: float
    best_eval: dict
    committed: concurrent.futures.Future | None = None


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
    background: concurrent.futures.Executor | None = None,
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
      background: if given, the last checkpoint is committed (and the checkpoint managers
        closed) there while the caller goes on; ``RunResult.committed`` says when. Otherwise
        this call returns once everything is on disk.

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
    committed = None
    stop_orders, orders = threading.Event(), None
    try:
        state = steps.init_state(seed)
        meta = {"epoch": 0, "position": 0, "partial": None, "plateau": plateau.init(),
                "history": [], "best": None}  # fmt: skip
        best_state = None
        restored = ckpt.restore(state)
        if restored is not None:
            state, meta, best_state = restored
        # The epochs' orders are pure host work: compute them while the device compiles/trains.
        epochs = range(meta["epoch"], cfg.num_epochs)
        args = (np.asarray(train_idx), cfg.batch_size, seed, epochs)
        orders = threading.Thread(target=_prepare_orders, args=(*args, stop_orders), daemon=True)
        orders.start()
        best_saved = True  # the best (if any) is on disk as of the restored checkpoint
        next_order = None
        tracker = plateau.to_device(meta["plateau"], meta["best"])
        plateau_args = (cfg.optimizer.plateau_factor, cfg.optimizer.plateau_patience)
        pending: list = []  # finished epochs whose numbers are still on the device
        shown = time.monotonic()
        for epoch in range(meta["epoch"], cfg.num_epochs):
            if hooks.stop is not None and hooks.stop():
                raise StopRequested(f"{workdir} stopped at epoch {epoch + 1}")
            order = (
                next_order
                if next_order is not None
                else feed.order(train_idx, seed=seed, epoch=epoch)
            )
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
                if pending:  # earlier epochs' numbers, before anything of this one is saved
                    meta, changed = _flush(pending, meta, cfg, per_epoch, ckpt, workdir, hooks)
                    pending, best_saved = [], best_saved and not changed
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
            if epoch + 1 < cfg.num_epochs:  # on its way to the device while this epoch finishes
                next_order = feed.order(train_idx, seed=seed, epoch=epoch + 1)
            # The plateau schedule and the choice of the best state run on the device too, so
            # the next epoch is dispatched without waiting for this one's numbers.
            before = tracker
            state, tracker, improved = steps.epoch_end(state, tracker, evaluation, plateau_args)
            best_state = state_select(
                improved, state, best_state if best_state is not None else state
            )
            pending.append((epoch, sums, evaluation, before, tracker, improved))
            if hooks.dispatched:
                hooks.dispatched(epoch)
            due = (epoch + 1) % cfg.checkpoint_every_epochs == 0 or epoch + 1 == cfg.num_epochs
            if due or hooks.after_fetch:
                ready = len(pending)  # wait for the device: a checkpoint or a test's hook
            elif hooks.progress is not None and time.monotonic() - shown > 0.25:
                # The progress bar takes only epochs the device has finished, so showing
                # progress never drains the queue of dispatched work.
                ready = _ready_prefix(pending)
            else:
                ready = 0
            if not ready:
                continue
            meta, changed = _flush(pending[:ready], meta, cfg, per_epoch, ckpt, workdir, hooks)
            pending = pending[ready:]
            best_saved = best_saved and not changed
            if due:
                ckpt.save(meta["history"][-1]["step"], state, meta,
                          _unsaved(best_state, meta, best_saved))  # fmt: skip
                best_saved = True
            if jax.process_index() == 0:  # durable (fsynced) when a checkpoint was just taken
                text = "".join(json.dumps(r) + "\n" for r in meta["history"])
                write_atomic(workdir / "metrics.jsonl", text, durable=due)
            if hooks.progress:
                hooks.progress(meta["history"][-1]["step"], total, meta["history"][-1])
                shown = time.monotonic()
            if hooks.after_fetch:
                hooks.after_fetch(meta["history"][-1]["step"])
        if background is not None:
            committed = background.submit(ckpt.close)
    finally:
        if orders is not None:  # an error must not leave it inside grain at interpreter exit
            stop_orders.set()
            orders.join()
        if committed is None:
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
        committed=committed,
    )


def _ready_prefix(pending: list) -> int:
    """How many of the oldest ``pending`` epochs the device has finished (no waiting)."""
    for i, entry in enumerate(pending):
        if not all(x.is_ready() for x in jax.tree.leaves(entry) if isinstance(x, jax.Array)):
            return i
    return len(pending)


def _prepare_orders(
    indices: np.ndarray, batch_size: int, seed: int, epochs: range, stop: threading.Event
) -> None:
    """Fills :func:`data.pipeline.epoch_order`'s permutation cache for ``epochs``."""
    for epoch in epochs:
        if stop.is_set():
            return
        pipeline.epoch_order(indices, batch_size=batch_size, seed=seed, epoch=epoch)


@jax.jit
def state_select(take_new: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``take_new`` else ``old``, leaf by leaf, on the device."""
    return jax.tree.map(lambda a, b: jnp.where(take_new, a, b), new, old)


def _flush(
    pending: list, meta: dict, cfg: Any, per_epoch: int, ckpt: Checkpoints,
    workdir: pathlib.Path, hooks: Hooks,
) -> tuple[dict, bool]:  # fmt: skip
    """Fetches the finished epochs' numbers in one transfer and turns them into records.

    Returns:
      The updated ``meta`` and whether the best epoch changed.

    Raises:
      NonFiniteLossError: an epoch had a non-finite loss (before anything of it is saved).
    """
    changed = False
    for epoch, sums, ev, before, after, improved in fetch(pending):
        epoch = int(epoch)
        step = (epoch + 1) * per_epoch
        _check_finite(sums, step, epoch, ckpt, workdir)
        val_acc = float(ev["correct"] / ev["count"])
        record = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": float(sums.loss / sums.count),
            "train_accuracy": float(sums.correct / sums.count),
            "val_loss": float(ev["loss"] / ev["count"]),
            "val_accuracy": val_acc,
            "learning_rate": cfg.optimizer.learning_rate * float(before["scale"]),
        }
        best = meta["best"]
        if bool(improved):
            best, changed = {"step": step, "epoch": epoch + 1, "val_accuracy": val_acc}, True
        meta = {"epoch": epoch + 1, "position": 0, "partial": None,
                "plateau": plateau.to_host(after), "history": [*meta["history"], record],
                "best": best}  # fmt: skip
        if hooks.epoch_end:
            hooks.epoch_end(record)
    return meta, changed


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
