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

A save that fails (the store answers malformed, the disk is full or read-only), in the
background or not, surfaces at the next save, poll, wait or close as one :class:`SaveError`
naming the store, the cause and the last verified checkpoint; orbax and tensorstore's own
reports of it are held back by :func:`quiet_failed_saves` (the command line's).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import pathlib
import re
import sys
import threading
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from app import cli, storage
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


class SaveError(RuntimeError, cli.UserError):
    """Saving a checkpoint failed; its message is one line that says what a rerun resumes from.

    Args:
      store: the checkpoint folder (a local path or a ``gs://`` URL).
      step: the step being saved.
      cause: one line, e.g. ``Error writing gs://.../manifest.ocdbt: Malformed StorageGeneration``.
      last_verified: the newest checkpoint whose checksum record is committed (None: none yet).
    """

    def __init__(self, store: str, step: int | None, cause: str, last_verified: int | None):
        self.store, self.step, self.cause, self.last_verified = store, step, cause, last_verified
        what = "a checkpoint" if step is None else f"checkpoint {step}"
        super().__init__(f"saving {what} to {store} failed: {cause}; {self.resumes()}")

    def line(self) -> str:
        """This message; for a full disk, what to free and what a rerun resumes from."""
        if not cli.disk_full(self):
            return str(self)
        where = (
            "starts over: no checkpoint was verified yet"
            if self.last_verified is None
            else f"resumes from the last verified checkpoint, step {self.last_verified}"
        )
        return (
            f"the disk holding {self.store} is full; free space and rerun the same command "
            f"(it {where})."
        )

    def resumes(self) -> str:
        """What rerunning the same command does: resume from the last verified checkpoint."""
        if self.last_verified is None:
            return "no checkpoint was verified yet, so rerunning the same command starts over."
        return (
            "rerunning the same command resumes from the last verified checkpoint, "
            f"step {self.last_verified}."
        )


def _cause(err: BaseException) -> str:
    """One short line for the root of ``err``'s chain (tensorstore's spec dumps left out)."""
    seen = set()
    while id(err) not in seen and (err.__cause__ or err.__context__) is not None:
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    if isinstance(err, OSError) and err.strerror:
        where = err.filename or ""
        return f"{err.strerror}{f' ({where})' if where else ''}"
    text = re.sub(r"\s*\[tensorstore_spec=.*$", "", " ".join(str(err).split()))
    # tensorstore nests "Error opening ...: Error writing <object>: <reason>"; the last two say
    # which object and why.
    text = ": ".join(text.split(": ")[-2:])
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


class _HeldBack(logging.Filter):
    """Keeps orbax's warnings and errors and asyncio's errors instead of writing them.

    orbax's warnings too: a failing store is slow first ("Waiting for previous save ...").
    """

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        orbax = f"{os.sep}orbax{os.sep}" in record.pathname
        level = logging.WARNING if orbax else logging.ERROR
        if (orbax or record.name == "asyncio") and record.levelno >= level:
            self.records.append(record)
            return False
        return True


class _Abandoned(logging.Filter):
    """Drops asyncio's "exception was never retrieved" for operations on a store that failed.

    tensorstore releases a failed save's futures whenever its threads let go of them (often at
    interpreter shutdown); each would log the failure that :class:`SaveError` already reported.
    Installed on the first SaveError and left installed: it matches only those stores' paths.
    """

    stores: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return "never retrieved" not in text or not any(s in text for s in self.stores)


_ABANDONED = _Abandoned()


def _loop_closed(args: Any) -> bool:
    """Whether an unraisable exception is tensorstore calling back into a closed asyncio loop.

    orbax runs each save's tensorstore futures on an asyncio loop of its own, and closes it
    when the first of them fails; the others then fail to post their results to it.
    """
    return isinstance(args.exc_value, RuntimeError) and "Event loop is closed" in str(
        args.exc_value
    )


@contextlib.contextmanager
def quiet_failed_saves() -> Iterator[None]:
    """Holds back orbax's, tensorstore's and asyncio's own reports of a failing save.

    They repeat in hundreds of lines (tracebacks from background threads, callbacks into closed
    event loops, abandoned tasks) the failure that :class:`SaveError` says in one. If the block
    ends in a SaveError they are dropped; otherwise they are written when it ends, so nothing
    else is lost. The command line's ``--debug`` does without this.
    """
    held = _HeldBack()
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    unraisable: list[Any] = []
    previous = sys.unraisablehook

    def hook(args: Any) -> None:
        (unraisable.append if _loop_closed(args) else previous)(args)

    for logger in loggers:
        logger.addFilter(held)
    sys.unraisablehook = hook
    failed = False
    try:
        yield
    except SaveError as err:
        failed = True
        # Its chain's tracebacks hold orbax's abandoned tasks; released and collected here,
        # they are not reported as "never retrieved" at interpreter shutdown.
        chained: BaseException | None = err
        while chained is not None:
            chained.__traceback__ = None
            chained = chained.__cause__ or chained.__context__
        _ABANDONED.stores.add(err.store)
        logging.getLogger("asyncio").addFilter(_ABANDONED)  # once: filters are a set
        gc.collect()
        raise
    finally:
        for logger in loggers:
            logger.removeFilter(held)
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous
        if not failed:
            for record in held.records:
                logging.getLogger(record.name).handle(record)
            for args in unraisable:
                previous(args)


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
        # Tracked as they are committed or restored, so a failure names it without asking a
        # store that is failing.
        self._last_verified: int | None = None
        self._failed: SaveError | None = None

    @contextlib.contextmanager
    def _saving(self, step: int | None) -> Iterator[None]:
        """Turns any failure of the enclosed save, wait or rotation into one SaveError."""
        if self._failed is not None:  # orbax's manager is unusable after a failed save
            raise self._failed
        try:
            yield
        except Exception as err:  # noqa: BLE001 - whatever the store or disk raised
            self._failed = SaveError(str(self.directory), step, _cause(err), self._last_verified)
            raise self._failed from err

    # -- writing -------------------------------------------------------------------------------

    def save(self, step: int, state: Any, best: Any, meta: dict) -> None:
        """Starts saving ``state``, ``best`` and ``meta`` as checkpoint ``step``.

        Returns once the arrays are copied on device; orbax writes in the background and the
        checkpoint counts once :meth:`poll` or :meth:`wait` has committed its checksum record.

        Raises:
          SaveError: this save or the previous one failed.
        """
        self.wait()
        with self._saving(step):
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
        """Commits the checksum record of a save orbax has finished (never waits).

        Raises:
          SaveError: the save failed.
        """
        with self._saving(self._unsealed):
            finished = self._unsealed is not None and not self.manager.is_saving_in_progress()
        if finished:
            self.wait()

    def wait(self) -> None:
        """Blocks until the last save is committed (record written, old ones rotated).

        Raises:
          SaveError: the save failed.
        """
        with self._saving(self._unsealed):
            self.manager.wait_until_finished()
            if self._unsealed is None:
                return
            step = self._unsealed
            if jax.process_index() == 0:
                self.sums_dir.mkdir(exist_ok=True)
                digests = file_digests(self.directory / "steps" / str(step))
                write_json_atomic(self._sum_path(step), {"files": digests})
            self._unsealed, self._last_verified = None, step
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
                restored = self._restore(step, abstract_state)
            except CheckpointError as err:
                print(f"warning: skipping checkpoint {self.directory / 'steps' / str(step)}: {err}")
            else:
                self._last_verified = step
                return restored
        return None

    def close(self) -> None:
        """Commits the last save, then releases orbax's resources.

        Raises:
          SaveError: the last save failed (and was not reported yet).
        """
        if self._failed is not None:  # reported already: only release what is left
            self._release()
            return
        try:
            self.wait()
        finally:
            self._release()

    def _release(self) -> None:
        try:
            self.manager.close()
        except Exception:  # noqa: BLE001 - after a failed save: that failure is the one to report
            if self._failed is None:
                raise
        if self._failed is not None:
            # The failed save's other background threads report their own failures (while the
            # command line holds such reports back): let them finish now rather than at exit.
            for thread in threading.enumerate():
                if thread is not threading.current_thread() and _orbax_save_thread(thread):
                    with contextlib.suppress(Exception):  # orbax's join re-raises the failure
                        thread.join(timeout=_JOIN_S)
            # Its abandoned coroutines, collected now rather than at interpreter shutdown, when
            # their cleanup can no longer import anything.
            gc.collect()


_JOIN_S = 30.0  # the most a failed save's background thread is waited for, each


def _orbax_save_thread(thread: threading.Thread) -> bool:
    """Whether ``thread`` is one of orbax's per-save threads (not its long-lived loops)."""
    return thread.name == "async_save" or (
        type(thread).__name__ == "_SignalingThread" and type(thread).__module__.startswith("orbax")
    )
