"""The processes of a (possibly multi-host) extraction: who computes which shard, and barriers.

A failure on one process reaches every process at the next barrier, as one message, instead of
leaving the others waiting (:meth:`Processes.step`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

# The errors main() reports as one line (exit 2): user errors, on any process.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ConnectionError)
_MESSAGE_CHARS = 1024  # of a failed process's message, exchanged at the next barrier


class Processes:
    """This process's share of a (possibly multi-host) extraction, and its barriers.

    The default is the one-process run: it owns every shard and its barriers do nothing.
    :meth:`current` describes ``jax.distributed``'s processes: process ``i`` of ``P`` owns
    the shards ``index % P == i``.

    Args:
      index: this process's index.
      count: the number of processes.
    """

    def __init__(self, index: int = 0, count: int = 1):
        self.index, self.count = index, count

    @classmethod
    def current(cls) -> Processes:
        """``jax.process_index()`` of ``jax.process_count()``."""
        return cls(jax.process_index(), jax.process_count())

    def owns(self, shard: int) -> bool:
        """Whether this process computes shard ``shard``."""
        return shard % self.count == self.index

    def step(self, name: str, work: Callable[[], Any] | None) -> Any:
        """Runs ``work`` (None: nothing) and waits at barrier ``name`` for every process.

        Each process brings its outcome to the barrier, so an exception on one process ends
        the step on all of them: the failed one re-raises its own, the others raise one naming
        the failed process and its message (a ``ValueError`` for a user error, otherwise a
        ``RuntimeError``). KeyboardInterrupt is not caught (a scheduler interrupts every
        process).

        Returns:
          what ``work`` returned.
        """
        try:
            result = None if work is None else work()
        except Exception as err:
            self._barrier(name, err)
            raise
        self._barrier(name, None)
        return result

    def _barrier(self, name: str, failure: Exception | None) -> None:
        if self.count == 1:
            return
        from jax.experimental import multihost_utils

        # int32 rows [barrier hash, outcome (0 ok, 1 user error, 2 other), length, chars...]:
        # one all-gather is the barrier and carries every process's outcome.
        row = np.zeros(3 + _MESSAGE_CHARS, np.int32)
        row[0] = zlib.crc32(name.encode()) & 0x7FFFFFFF
        if failure is not None:
            user = isinstance(failure, USER_ERRORS)
            row[1] = 1 if user else 2
            text = str(failure) if user else f"{type(failure).__name__}: {failure}"
            text = " ".join(text.split())  # one line, as main() prints it
            codes = np.frombuffer(text.encode()[:_MESSAGE_CHARS], np.uint8)
            row[2], row[3 : 3 + len(codes)] = len(codes), codes
        rows = np.asarray(multihost_utils.process_allgather(row))  # [processes, row]
        if len(set(rows[:, 0].tolist())) != 1:
            raise RuntimeError(f"processes reached different barriers at {name!r} (a bug).")
        if failure is not None:
            return  # the caller re-raises its own exception
        for index, other in enumerate(rows):
            if other[1]:
                message = bytes(other[3 : 3 + other[2]].astype(np.uint8)).decode(errors="replace")
                error = ValueError if other[1] == 1 else RuntimeError
                raise error(f"process {index} of {self.count} failed: {message}")
