"""Orbax checkpoints that prove their bytes, saved in the background.

No other module imports orbax.

Layout of a run's ``checkpoints/`` folder::

    latest/<step>/          periodic checkpoints (orbax: ``state`` pytree + JSON ``meta``)
    best/<step>/            the best state by validation accuracy, as of some periodic save
    checksums/<kind>_<step>.json   SHA-256 of every file of that checkpoint

A checkpoint counts only once orbax has finalised it (orbax writes into a temporary folder and
renames it when complete) *and* its checksum file has been committed (written to a temporary
file, fsynced, renamed). Restoring verifies every file against the checksum and the restored
state for finiteness; a checkpoint that fails either is skipped with one line and the next older
one is tried. Nothing is deleted until its successor is committed: a periodic checkpoint
beyond ``max_to_keep``, or a best checkpoint that no kept periodic checkpoint refers to.

Saves run on one background thread: :meth:`Checkpoints.save` snapshots the state on device
(an async copy, so the next donated step cannot clobber it) and returns; the thread writes,
hashes, commits and rotates. An error on the thread (a full disk) is raised by the next call.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from train.runs import write_json_atomic

KINDS = ("latest", "best")


def file_digests(folder: pathlib.Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, keyed by relative path."""
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 22), b""):
                h.update(block)
        digests[str(path.relative_to(folder))] = h.hexdigest()
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


def _read_checksums(path: pathlib.Path) -> dict[str, str]:
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
    """Periodic and best checkpoints of one training run.

    Args:
      directory: the run's checkpoint folder.
      max_to_keep: how many verified periodic checkpoints to keep.
      asynchronous: write on a background thread (False: every save blocks until committed).
    """

    def __init__(
        self, directory: str | pathlib.Path, max_to_keep: int = 2, *, asynchronous: bool = True
    ):
        self.directory = pathlib.Path(directory).absolute()
        self.max_to_keep = max_to_keep
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, enable_async_checkpointing=False
        )
        self.managers = {
            k: ocp.CheckpointManager(self.directory / k, options=options) for k in KINDS
        }
        self.sums_dir = self.directory / "checksums"
        self._pool = concurrent.futures.ThreadPoolExecutor(1) if asynchronous else None
        self._pending: concurrent.futures.Future | None = None

    # -- writing -------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        meta: dict,
        best: tuple[int, Any, dict] | None = None,
    ) -> None:
        """Commits ``best`` (if given: ``(step, state, meta)``), then the periodic checkpoint.

        The best comes first, so a periodic checkpoint never refers to a best that is not on
        disk. Returns once the state is snapshotted; the write continues in the background.
        """
        self.wait()
        jobs = []
        if best is not None:
            jobs.append(("best", best[0], snapshot(best[1]), best[2]))
        jobs.append(("latest", step, snapshot(state), meta))
        if self._pool is None:
            self._write_all(jobs)
        else:
            self._pending = self._pool.submit(self._write_all, jobs)

    def wait(self) -> None:
        """Blocks until the background write is committed; re-raises its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write_all(self, jobs: list) -> None:
        for kind, step, state, meta in jobs:
            self._write(kind, step, state, meta)
        self._rotate()

    def _write(self, kind: str, step: int, state: Any, meta: dict) -> None:
        manager = self.managers[kind]
        manager.reload()
        if step in manager.all_steps():  # a replayed step after a resume: write it again
            self._sum_path(kind, step).unlink(missing_ok=True)
            manager.delete(step)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        manager.save(step, args=args, force=True)
        manager.wait_until_finished()
        if jax.process_index() == 0:
            self.sums_dir.mkdir(exist_ok=True)
            digests = file_digests(self.directory / kind / str(step))
            write_json_atomic(self._sum_path(kind, step), {"files": digests})

    def _rotate(self) -> None:
        latest = self.verified_steps("latest")
        keep = set(latest[-self.max_to_keep :])
        for step in latest[: -self.max_to_keep]:
            self._delete("latest", step)
        referenced = set()
        for step in keep:
            meta = self._read_meta("latest", step)
            if meta and meta.get("best"):
                referenced.add(meta["best"]["step"])
        best = self.verified_steps("best")
        for step in best[:-1]:
            if step not in referenced:
                self._delete("best", step)

    def _delete(self, kind: str, step: int) -> None:
        if jax.process_index() == 0:
            self._sum_path(kind, step).unlink(missing_ok=True)
        self.managers[kind].delete(step)

    # -- reading -------------------------------------------------------------------------------

    def _sum_path(self, kind: str, step: int) -> pathlib.Path:
        return self.sums_dir / f"{kind}_{step}.json"

    def steps(self, kind: str) -> list[int]:
        """Finalised checkpoint steps of ``kind``, oldest first."""
        self.managers[kind].reload()
        return sorted(self.managers[kind].all_steps())

    def verified_steps(self, kind: str) -> list[int]:
        """Steps of ``kind`` whose checksum file is committed (contents not re-read)."""
        return [s for s in self.steps(kind) if self._sum_path(kind, s).exists()]

    def verify(self, kind: str, step: int) -> None:
        """Checks every file of a checkpoint against its committed checksum.

        Raises:
          CheckpointError: no checksum, a missing or extra file, or changed bytes.
        """
        path = self._sum_path(kind, step)
        if not path.exists():
            raise CheckpointError("no committed checksum (the save did not finish)")
        expected = _read_checksums(path)
        actual = file_digests(self.directory / kind / str(step))
        if actual.keys() != expected.keys():
            diff = sorted(actual.keys() ^ expected.keys())
            raise CheckpointError(f"files added or missing since it was written: {diff[:3]}")
        changed = [f for f in expected if actual[f] != expected[f]]
        if changed:
            raise CheckpointError(f"checksum mismatch in {changed[0]} (its bytes changed)")

    def _read_meta(self, kind: str, step: int) -> dict | None:
        path = self.directory / kind / str(step) / "meta" / "metadata"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _restore(self, kind: str, step: int, abstract_state: Any) -> tuple[Any, dict]:
        self.verify(kind, step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        )
        try:
            restored = self.managers[kind].restore(step, args=args)
        except Exception as err:  # noqa: BLE001 - any failure makes this checkpoint unusable
            raise CheckpointError(f"unreadable ({type(err).__name__})") from err
        if not all_finite(restored["state"]):
            raise CheckpointError("its state holds NaN or Inf")
        return restored["state"], restored["meta"]

    def _skip(self, kind: str, step: int, err: CheckpointError) -> None:
        print(f"warning: skipping checkpoint {self.directory / kind / str(step)}: {err}")

    def restore(self, abstract_state: Any) -> tuple[Any, dict, Any | None] | None:
        """The newest good periodic checkpoint and the best state it refers to.

        A periodic checkpoint is good when it and the best checkpoint its ``meta['best']``
        names both verify and hold finite values.

        Args:
          abstract_state: a pytree of arrays or ``jax.ShapeDtypeStruct`` (structure, shapes,
            dtypes and shardings to restore into).

        Returns:
          ``(state, meta, best_state_or_None)``, or None when there is no good checkpoint.
        """
        for step in reversed(self.steps("latest")):
            try:
                state, meta = self._restore("latest", step, abstract_state)
            except CheckpointError as err:
                self._skip("latest", step, err)
                continue
            best_state = None
            if meta.get("best"):
                best_step = meta["best"]["step"]
                try:
                    best_state, _ = self._restore("best", best_step, abstract_state)
                except CheckpointError as err:
                    self._skip("best", best_step, err)
                    print(
                        f"warning: so skipping checkpoint {self.directory / 'latest' / str(step)}"
                    )
                    continue
            return state, meta, best_state
        return None

    def restore_best(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """The newest good best checkpoint, or None."""
        for step in reversed(self.steps("best")):
            try:
                return self._restore("best", step, abstract_state)
            except CheckpointError as err:
                self._skip("best", step, err)
        return None

    def close(self) -> None:
        """Waits for the background write, then releases resources."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            for manager in self.managers.values():
                manager.close()
