"""Independent runs of a config trained side by side, when one run leaves the device idle.

A step of the paper's small decoders keeps a CPU only partly busy: on this project's 2-core
machine one stream of jitted steps uses about 1.1 cores, and two streams together run 1.8x as
many steps per second. The runs of a config (folds, seeds, datasets) are independent, so
:class:`RunPool` trains up to ``config.concurrent_runs`` of them at once on threads of one
process: the data, the compiled programs and the XLA client are shared, and every run computes
exactly what it computes alone (each has its own state, data order and checkpoints; tested bit
for bit).

``concurrent_runs = 0`` (auto) means 2 on a single-process CPU job without a mesh and 1
elsewhere: a multi-process job must dispatch the same programs in the same order on every
process, and the sharded programs of a mesh run their collectives on all devices, so both run
one at a time. With 1, runs execute inline in the caller's thread, as a plain loop would.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from train.loop import StopRequested


def concurrent_runs(config: ml_collections.ConfigDict, mesh: Any) -> int:
    """How many runs to train at once (``config.concurrent_runs``, 0 = auto)."""
    requested = config.get("concurrent_runs", 0)
    if requested:
        return requested
    single = jax.process_count() == 1 and mesh is None
    return 2 if single and jax.default_backend() == "cpu" else 1


class RunPool:
    """Runs jobs ``fn(slot, stop, compiled)`` up to ``workers`` at a time, results in order.

    Each distinct ``programs`` key (the compiled steps a job uses) is compiled by its first
    job alone: later jobs with the same key start once the first has set its ``compiled``
    event (or finished), so no program is compiled twice. ``slot`` is a number in
    ``[0, workers)`` unique among running jobs (a progress bar's row). On an error or
    interrupt the caller calls :meth:`cancel` (queued jobs are cancelled, running ones see
    ``stop`` set and stop at their next epoch) and then :meth:`close`, which waits for them.

    Args:
      workers: jobs at once; 1 runs each job in the caller's thread when it is submitted.
    """

    def __init__(self, workers: int):
        self.workers = workers
        self.stop = threading.Event()
        self._slots: queue.SimpleQueue = queue.SimpleQueue()
        for slot in range(workers):
            self._slots.put(slot)
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="run")
            if workers > 1
            else None
        )
        self._first: dict[Any, tuple[threading.Event, concurrent.futures.Future]] = {}

    def submit(self, programs: Any, fn: Callable[..., Any]) -> concurrent.futures.Future:
        """Queues ``fn(slot, stop, compiled)``; waits first if ``programs`` is being compiled."""
        if programs in self._first:
            compiled, first = self._first[programs]
            while not (compiled.wait(0.05) or first.done()):
                pass
        else:
            compiled = threading.Event()
        if self._pool is None:
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_result(fn(0, self.stop, compiled))
        else:
            future = self._pool.submit(self._run, fn, compiled)
        self._first.setdefault(programs, (compiled, future))
        return future

    def _run(self, fn: Callable[..., Any], compiled: threading.Event) -> Any:
        if self.stop.is_set():
            raise StopRequested("stopped before it started")
        slot = self._slots.get()
        try:
            return fn(slot, self.stop, compiled)
        finally:
            self._slots.put(slot)

    def cancel(self) -> None:
        """Cancels queued jobs and asks running ones to stop at their next epoch."""
        self.stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Waits for running jobs to finish (or stop)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
