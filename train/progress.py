"""Where a program stands, as data: the JSON ``meta`` of every checkpoint, and its fetches.

The trainer (:mod:`train.trainer`) dispatches stretches of steps and fetches the numbers at
*fetch points* (epoch ends, and the steps where a mid-epoch checkpoint or a log line is due).
Everything it then decides from host numbers lives here: whether a loss went non-finite
(:func:`check_finite`), a run's training and epoch lines of ``metrics.jsonl``, its best epoch
and its plateau schedule (:meth:`Progress.after_epoch`). A resume restores a
:class:`Progress` from the checkpoint and carries on from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from app import cli
from train import plateau
from train.steps import Sums

NO_BAD_STEP = np.iinfo(np.int32).max


class NonFiniteLossError(RuntimeError, cli.UserError):
    """A training step produced a NaN or infinite loss (the message says which and where)."""


@dataclasses.dataclass
class Hooks:
    """Callbacks of the trainer's loop; each optional.

    Attributes:
      progress: ``(steps_done, steps_total, mean_val_accuracy_or_None)`` at every fetch point
        (program steps: positions of the longest run).
      after_fetch: ``(program_step)`` after every fetch point's saves (tests stop runs here).
    """

    progress: Callable[[int, int, float | None], None] | None = None
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
      log: each run's training lines every ``log_every_steps`` (:func:`train_line`).
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

    @classmethod
    def from_json(cls, meta: dict) -> Progress:
        """The inverse of :meth:`to_json`."""
        return cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls)})

    def to_json(self) -> dict:
        """The checkpoint's ``meta``."""
        return dataclasses.asdict(self)

    def lines(self, run: int) -> list[dict]:
        """A run's ``metrics.jsonl``: training and epoch lines by step (epoch lines last)."""
        both = self.log[run] + self.history[run]
        return sorted(both, key=lambda line: (line["step"], "val_accuracy" in line))

    def mid_epoch(self, epoch: int, position: int, sums: Sums) -> Progress:
        """The progress of a checkpoint taken at ``position`` of ``epoch`` (host ``sums``)."""
        fields = dataclasses.asdict(sums)
        runs = len(np.asarray(sums.count))
        partial = [{k: np.asarray(v)[r].item() for k, v in fields.items()} for r in range(runs)]
        return dataclasses.replace(self, epoch=epoch, position=position, partial=partial)

    def with_train_lines(self, lines: Sequence[dict]) -> Progress:
        """A training line appended to each of the first ``len(lines)`` runs' logs."""
        log = [[*old, line] for old, line in zip(self.log, lines, strict=False)]
        return dataclasses.replace(self, log=log + self.log[len(lines) :])

    def after_epoch(
        self, epoch: int, per_epoch: np.ndarray, sums: Sums, ev: dict, scale: np.ndarray,
        improved: np.ndarray, tracker: dict, learning_rate: float,
    ) -> Progress:  # fmt: skip
        """The progress after an epoch: every run's record, best epoch and schedule state.

        Args:
          epoch: the 0-based epoch that ended.
          per_epoch: each run's steps per epoch.
          sums: the epoch's training sums (host).
          ev: the evaluation's ``loss``/``correct``/``count`` per run (host).
          scale: each run's learning-rate factor during the epoch.
          improved: whether each run's validation accuracy improved (its new best).
          tracker: the plateau schedules after the epoch (host).
          learning_rate: the base learning rate.
        """
        history, best, schedules = [], [], []
        for r in range(len(self.history)):
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
                "learning_rate": learning_rate * float(scale[r]),
            }
            history.append([*self.history[r], record])
            chosen = self.best[r]
            if bool(improved[r]):
                chosen = {"step": step, "epoch": epoch + 1, "val_accuracy": val_acc}
            best.append(chosen)
            schedules.append(plateau.to_host({k: v[r] for k, v in tracker.items()}))
        return Progress(epoch + 1, 0, None, schedules, history, best, self.log)


def train_line(sums: Sums, r: int, step: int, lr: float, per_second: float | None) -> dict:
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


def check_finite(
    sums: Sums, runs: int, upto: int, epoch: int, names: Sequence[str], ckpt: Any
) -> None:
    """Raises :class:`NonFiniteLossError` when a real run's loss went non-finite.

    Args:
      sums: fetched sums (``first_bad_step`` per run).
      runs: the real runs (the padding runs after them are not checked).
      upto: the program step fetched up to.
      epoch: the 0-based epoch.
      names: each run's name in messages.
      ckpt: the program's :class:`~train.checkpointing.Checkpoints`; when a loss is
        non-finite, its pending saves are committed and its newest verified step named.
    """
    bad = np.asarray(sums.first_bad_step)[:runs]
    if not (bad != NO_BAD_STEP).any():
        return
    run = int(np.argmax(bad != NO_BAD_STEP))
    name = f"{run} ({names[run]})" if names else str(run)
    ckpt.wait()
    directory, good = ckpt.directory, ckpt.verified_steps()
    where = f"the newest checkpoint (step {good[-1]})" if good else "the start (no checkpoint yet)"
    raise NonFiniteLossError(
        f"non-finite loss in run {name} at its step {int(bad[run])} (found when fetching program "
        f"steps up to {upto}, epoch {epoch + 1}) in {directory}; training stopped and rolled "
        f"back: nothing after {where} was saved, so a rerun resumes there."
    )
