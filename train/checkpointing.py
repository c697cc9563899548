"""Orbax checkpoints of a training program, saved asynchronously, that prove their bytes.

No other module imports orbax.

Layout of a program's ``checkpoints/`` folder::

    steps/<step>/              orbax: the ``state`` and ``best`` pytrees (every run's, stacked)
                               and the JSON ``meta`` (the loop's progress and every run's history)
    checksums/<step>.json      SHA-256 of every file of that checkpoint

A checkpoint counts only once orbax has finalised it (orbax writes into a temporary folder and
renames it when complete; on an object store such as ``gs://`` it writes a commit marker
instead) *and* its checksum record has been committed (:func:`train.runs.write_json_atomic`:
renamed into place locally, one complete object upload on an object store). Restoring
verifies every file against the record and the restored state for finiteness; a checkpoint
that fails either (its record unreadable or altered included) is skipped with one line and
the next older one is tried. Nothing is deleted until a
newer checkpoint is committed.

Saves are orbax's own asynchronous saves: :meth:`Checkpoints.save` copies the state on device
(so the next donated step cannot clobber it) and returns while orbax writes. The checksum
record is the thin layer on top: it is written as soon as orbax reports the save finished
(:meth:`Checkpoints.poll`, called by the loop at every fetch point, or :meth:`wait`).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from gaam_jax import storage
from train.runs import write_json_atomic


def file_digests(folder: storage.AnyPath) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (local or remote), keyed by relative path."""
    digests = {}
    for name, path in storage.files(folder):
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 22), b""):
                h.update(block)
        digests[name] = h.hexdigest()
    return digests


def all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of ``tree`` is finite."""
    leaves = [
        x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
    ]
    return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


@jax.jit
def snapshot(tree: Any) -> Any:
    """A device copy of ``tree`` (one compiled call), which a later donation cannot clobber."""
    return jax.tree.map(jnp.copy, tree)


class CheckpointError(RuntimeError):
    """A checkpoint failed verification (its message is one line)."""


def _read_checksums(path: storage.AnyPath) -> dict[str, str]:
    """The ``{file: sha256}`` record of a checkpoint; any damage to it is a CheckpointError.

    A record that cannot be read, is not UTF-8 JSON, or does not map file names to 64-digit hex
    digests leaves its checkpoint unverified (skipped), like a changed checkpoint file.
    """
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError included
        raise CheckpointError(
            f"its checksum record {path} is unreadable ({type(err).__name__})"
        ) from None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in files.items()
    ):
        raise CheckpointError(f"its checksum record {path} is malformed")
    return files


class Checkpoints:
    """The periodic checkpoints of one training program (its state and its best states).

    Args:
      directory: the program's checkpoint folder.
      max_to_keep: how many committed checkpoints to keep.
      asynchronous: let orbax write in the background (False: every save blocks until
        committed).
    """

    def __init__(
        self, directory: str | pathlib.Path, max_to_keep: int = 2, *, asynchronous: bool = True
    ):
        self.directory = storage.absolute(directory)
        self.max_to_keep = max_to_keep
        self.asynchronous = asynchronous
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=True,  # a save killed midway leaves a temporary folder
        )  # fmt: skip
        self.manager = ocp.CheckpointManager(self.directory / "steps", options=options)
        self.sums_dir = self.directory / "checksums"
        self._unsealed: int | None = None  # saved by orbax, checksum record not yet written

    # -- writing -------------------------------------------------------------------------------

    def save(self, step: int, state: Any, best: Any, meta: dict) -> None:
        """Starts saving ``state``, ``best`` and ``meta`` as checkpoint ``step``.

        Returns once the arrays are copied on device; orbax writes in the background and the
        checkpoint counts once :meth:`poll` or :meth:`wait` has committed its checksum record.
        """
        self.wait()
        if step in self.steps():  # a replayed step after a resume: write it again
            self._delete(step)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(snapshot(state)),
            best=ocp.args.StandardSave(snapshot(best)),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, force=True)
        self._unsealed = step
        if not self.asynchronous:
            self.wait()

    def poll(self) -> None:
        """Commits the checksum record of a save orbax has finished (never waits)."""
        if self._unsealed is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until the last save is committed (record written, old ones rotated)."""
        self.manager.wait_until_finished()
        if self._unsealed is None:
            return
        step, self._unsealed = self._unsealed, None
        if jax.process_index() == 0:
            self.sums_dir.mkdir(exist_ok=True)
            digests = file_digests(self.directory / "steps" / str(step))
            write_json_atomic(self._sum_path(step), {"files": digests})
        kept = self.verified_steps()
        for old in kept[: -self.max_to_keep]:
            self._delete(old)

    def _delete(self, step: int) -> None:
        if jax.process_index() == 0:
            self._sum_path(step).unlink(missing_ok=True)
        self.manager.delete(step)

    # -- reading -------------------------------------------------------------------------------

    def _sum_path(self, step: int) -> storage.AnyPath:
        return self.sums_dir / f"{step}.json"

    def steps(self) -> list[int]:
        """Finalised checkpoint steps, oldest first."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def verified_steps(self) -> list[int]:
        """Steps whose checksum record is committed (contents not re-read)."""
        return [s for s in self.steps() if self._sum_path(s).exists()]

    def verify(self, step: int) -> None:
        """Checks every file of a checkpoint against its committed checksum record.

        Raises:
          CheckpointError: no record, a damaged record, a missing or extra file, changed bytes.
        """
        path = self._sum_path(step)
        if not path.exists():
            raise CheckpointError("no committed checksum (the save did not finish)")
        expected = _read_checksums(path)
        actual = file_digests(self.directory / "steps" / str(step))
        if actual.keys() != expected.keys():
            diff = sorted(actual.keys() ^ expected.keys())
            raise CheckpointError(f"files added or missing since it was written: {diff[:3]}")
        changed = [f for f in expected if actual[f] != expected[f]]
        if changed:
            raise CheckpointError(f"checksum mismatch in {changed[0]} (its bytes changed)")

    def _restore(self, step: int, abstract_state: Any) -> tuple[Any, Any, dict]:
        self.verify(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            best=ocp.args.StandardRestore(abstract),
            meta=ocp.args.JsonRestore(),
        )
        try:
            restored = self.manager.restore(step, args=args)
        except Exception as err:  # noqa: BLE001 - any failure makes this checkpoint unusable
            raise CheckpointError(f"unreadable ({type(err).__name__})") from err
        if not (all_finite(restored["state"]) and all_finite(restored["best"])):
            raise CheckpointError("its state holds NaN or Inf")
        if not isinstance(restored["meta"], dict):
            raise CheckpointError("its meta is not a JSON object")
        return restored["state"], restored["best"], restored["meta"]

    def restore(self, abstract_state: Any) -> tuple[Any, Any, dict] | None:
        """The newest good checkpoint: ``(state, best, meta)``, or None when there is none.

        Args:
          abstract_state: a pytree of arrays or ``jax.ShapeDtypeStruct`` (structure, shapes,
            dtypes and shardings to restore into); ``best`` has the same.
        """
        for step in reversed(self.steps()):
            try:
                return self._restore(step, abstract_state)
            except CheckpointError as err:
                print(f"warning: skipping checkpoint {self.directory / 'steps' / str(step)}: {err}")
        return None

    def close(self) -> None:
        """Commits the last save, then releases orbax's resources."""
        try:
            self.wait()
        finally:
            self.manager.close()
