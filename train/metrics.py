"""A run's metrics, written in one place: ``metrics.jsonl`` and its TensorBoard events.

``metrics.jsonl`` is rewritten whole from the checkpointed :class:`~train.progress.Progress`
at every fetch point, so it never disagrees with the checkpoints (a resumed run's file is the
one an uninterrupted run writes). TensorBoard gets each new line once, against the run's step;
when the run finishes, the resolved config as hyperparameters with its best and final
accuracy. Nothing is written when tensorboardX is not installed (it is optional).

A run folder on an object store gets its events written into a local temporary folder and
copied into ``<run>/tensorboard`` by :meth:`RunMetrics.close` (when the program finishes or
fails): tensorboardX's own ``gs://`` writer re-uploads the whole file on every flush through a
second client (google-cloud-storage, with its own credentials), and an object cannot be
appended to. A job killed outright loses that program's events of this session;
``metrics.jsonl`` is the record that survives.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile
from collections.abc import Sequence

from app import storage

METRICS = "metrics.jsonl"


class RunMetrics:
    """One run's ``metrics.jsonl`` and ``tensorboard/`` events.

    Args:
      run_dir: the run's folder (local or a URL).
      hparams: the run's config, flat (``{'optimizer.learning_rate': 0.001, ...}``): its
        TensorBoard hyperparameters.
    """

    def __init__(self, run_dir: storage.AnyPath, hparams: dict):
        self.file = storage.path(run_dir) / METRICS
        self.hparams = hparams
        self.remote = storage.path(run_dir) / "tensorboard" if storage.is_url(run_dir) else None
        self.local: pathlib.Path | None = None
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # TensorBoard logging is optional
            self.writer = None
            return
        if self.remote is None:
            self.writer = SummaryWriter(str(pathlib.Path(run_dir) / "tensorboard"))
        else:
            self.local = pathlib.Path(tempfile.mkdtemp(prefix="gaam_tensorboard_"))
            self.writer = SummaryWriter(str(self.local))

    def write(self, lines: Sequence[dict], new: dict, *, durable: bool) -> None:
        """Rewrites ``metrics.jsonl`` as ``lines`` and sends their ``new`` line to TensorBoard.

        Args:
          lines: every line of the run so far (:meth:`train.progress.Progress.lines`).
          new: the line added since the last call.
          durable: fsync the file (at checkpoints; a kill leaves a whole file either way).
        """
        text = "".join(json.dumps(line) + "\n" for line in lines)
        storage.write_atomic(self.file, text, durable=durable)
        if self.writer is not None:
            for key, value in new.items():
                if key not in ("epoch", "step") and value is not None:
                    self.writer.add_scalar(key, value, new["step"])

    def close(self, final: dict | None = None) -> None:
        """Writes the hyperparameters (with ``final`` metrics, when the run finished); flushes."""
        if self.writer is None:
            return
        if final is not None:
            hparams = {k: v if isinstance(v, int | float | str | bool) else json.dumps(v)
                       for k, v in self.hparams.items()}  # fmt: skip
            self.writer.add_hparams(hparams, final, name="hparams")
        self.writer.close()
        self.writer = None
        if self.local is not None:
            storage.upload(self.local, self.remote)
            shutil.rmtree(self.local, ignore_errors=True)
            self.local = None
