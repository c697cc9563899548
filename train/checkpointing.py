"""Orbax checkpoints behind one small facade (no other module imports orbax).

Each checkpoint holds the train state (params, optimizer state, batch statistics, step) as a
pytree and a JSON ``meta`` item (epoch, data-iterator position, plateau state, metrics history).
Orbax writes into a temporary folder and renames it when complete, so a process killed during a
save leaves no checkpoint that looks finished. A checkpoint that still fails to restore (a
corrupt file) is skipped with a warning and the previous one is used.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpoints:
    """Periodic checkpoints of one training run, plus the best one by validation accuracy.

    Args:
      directory: the run's checkpoint folder (``latest/`` and ``best/`` go inside).
      max_to_keep: how many periodic checkpoints to keep.
    """

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2):
        directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
        )
        self.latest = ocp.CheckpointManager(directory / "latest", options=options)
        best_options = ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=False
        )
        self.best = ocp.CheckpointManager(directory / "best", options=best_options)

    @staticmethod
    def _args(state: Any, meta: dict) -> ocp.args.Composite:
        return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Saves a periodic checkpoint (blocking, so a later kill cannot lose it).

        An epoch-end save can land on the step of a mid-epoch save; the newer one replaces it.
        """
        if step in self.latest.all_steps():
            self.latest.delete(step)
        self.latest.save(step, args=self._args(state, meta), force=True)
        self.latest.wait_until_finished()

    def save_best(self, step: int, state: Any, meta: dict) -> None:
        """Replaces the kept best checkpoint.

        The new one is written before ``max_to_keep=1`` removes the old one, so a kill never
        leaves none. Only a replayed step (after a resume) is deleted first; the replay writes
        it again.
        """
        if step in self.best.all_steps():
            self.best.delete(step)
        self.best.save(step, args=self._args(state, meta), force=True)
        self.best.wait_until_finished()

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """Restores the newest readable checkpoint, or None if there is none.

        Args:
          abstract_state: a pytree of ``jax.ShapeDtypeStruct`` (or arrays) with the structure,
            shapes, dtypes and shardings to restore into.
        """
        return _restore_newest(self.latest, abstract_state)

    def restore_best(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """Restores the best checkpoint, or None."""
        return _restore_newest(self.best, abstract_state)

    def close(self) -> None:
        """Waits for pending writes and releases resources."""
        self.latest.close()
        self.best.close()


def _restore_newest(manager: ocp.CheckpointManager, abstract_state: Any):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as err:  # noqa: BLE001 - any failure means this checkpoint is unusable
            log.warning("skipping unreadable checkpoint %s/%s: %s", manager.directory, step, err)
            print(f"warning: skipping unreadable checkpoint {manager.directory}/{step}: {err}")
            continue
        return restored["state"], restored["meta"]
    return None
