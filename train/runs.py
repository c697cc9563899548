"""Run records and run identity: what a workdir holds, as data.

* :func:`write_json_atomic` is the one writer of every JSON file under a workdir: a temporary
  file, fsynced, renamed over the target, and the folder fsynced, so a kill or a power cut
  leaves the old file or the new one, never half of one. On an object store (a ``gs://``
  workdir) the final object is written directly: an object appears only once its upload is
  complete, which gives the same guarantee without a rename (object stores have none).
* :class:`RunResult` is what training hands over for one run (states, history), and
  :class:`RunRecord` one training run's outcome (dataset, seed, fold or held-out run, best
  and final accuracy, the gate map's file). Reports and ``docs/results.md`` read records;
  nothing is parsed back from table columns.
* :func:`identity` is what a workdir was made by: the fully resolved config and a fingerprint
  of each dataset it trained on. A command whose identity differs from the recorded one is
  refused (:func:`differing_keys`), so no command reuses or deletes another config's work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any

import ml_collections
import numpy as np

from app import storage
from train import config as config_lib

RECORD = "record.json"  # one run's outcome
CONFIG = "config.json"  # a workdir's (or a run's) identity

# Keys that cannot change a run's results: how often state is saved or logged (a resumed run
# replays bit-identically whatever the interval) and how many old checkpoints are kept.
IGNORED_KEYS = frozenset({
    "checkpoint_every_epochs", "checkpoint_every_steps", "max_to_keep", "log_every_steps",
})  # fmt: skip


def write_json_atomic(path: str | pathlib.Path, obj: Any) -> None:
    """:func:`app.storage.write_atomic` of ``obj`` as indented JSON."""
    storage.write_atomic(path, json.dumps(obj, indent=1) + "\n")


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """The outcome of one training run (one dataset, seed and fold or held-out split).

    Attributes:
      dataset: the dataset's name in the config.
      seed: initialisation and data-order seed.
      fold: 1-based cross-validation fold, or None for a held-out-split run.
      run: 1-based index of the run in its table row (folds for k-fold; seeds for holdout).
      column: the table column (``F3``, ``R2``, ``s1F3``).
      best_accuracy: validation accuracy of the best epoch.
      best_epoch: that epoch (1-based; the first among ties).
      final_accuracy: validation accuracy after the last epoch.
      steps: optimisation steps taken.
      gaussian_parameters: ranges of the learned GAAM parameters of the best state.
      layer_contribution_percent: per-layer share of the best state's mean gate, or None.
      gate_mean: file name (in the run folder) of the mean gate map ``[N, d]``, or None.
      best_state_sha256: SHA-256 of the run folder's ``best_state.msgpack``.
    """

    dataset: str
    seed: int
    fold: int | None
    run: int
    column: str
    best_accuracy: float
    best_epoch: int
    final_accuracy: float
    steps: int
    gaussian_parameters: dict
    layer_contribution_percent: list | None = None
    gate_mean: str | None = None
    best_state_sha256: str | None = None

    def __post_init__(self):
        # JSON's own types (lists, not tuples), so a record computed now equals the same
        # record read back from disk.
        plain = json.loads(json.dumps(self.gaussian_parameters))
        object.__setattr__(self, "gaussian_parameters", plain)

    def save(self, run_dir: str | pathlib.Path) -> None:
        """Writes ``record.json`` into the run folder."""
        write_json_atomic(storage.path(run_dir) / RECORD, dataclasses.asdict(self))

    @classmethod
    def load(cls, run_dir: str | pathlib.Path) -> RunRecord:
        """Reads a run folder's ``record.json``."""
        return cls(**json.loads((storage.path(run_dir) / RECORD).read_text()))


@dataclasses.dataclass
class RunResult:
    """One run's outcome as training hands it over, before its folder is written.

    Attributes:
      history: one record per epoch.
      best_epoch: 1-based (the first among ties).
      best_accuracy: its validation accuracy.
      final_accuracy: the last epoch's validation accuracy.
      best_state: the state of the best epoch (a ``train.steps.TrainState`` of numpy leaves).
      final_state: the state after the last epoch (numpy leaves).
      best_eval: the evaluation sums of the best state (``gate_total``/``gate_count`` for gated
        fronts: the Importance Factor's input), as numpy.
    """

    history: list[dict]
    best_epoch: int
    best_accuracy: float
    final_accuracy: float
    best_state: Any
    final_state: Any
    best_eval: dict


def run_folder(dataset: str, seed: int, fold: int) -> pathlib.Path:
    """A run's folder relative to its workdir: ``<dataset>/seed<s>_fold<k>``.

    A held-out split has one fold, ``k = 1``.
    """
    return pathlib.Path(dataset) / f"seed{seed}_fold{fold}"


def load_records(root: str | pathlib.Path) -> list[RunRecord]:
    """Every record under ``root`` (``<root>/<dataset>/<run>/record.json``), in path order."""
    found = sorted(storage.path(root).glob(f"*/*/{RECORD}"), key=lambda p: p.parts)
    return [RunRecord.load(p.parent) for p in found]


def plain(value: Any) -> Any:
    """A config value as JSON data (tuples become lists, ConfigDicts dicts)."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def dataset_fingerprint(path: str | pathlib.Path) -> str:
    """SHA-256 of a built dataset's metadata (``dataset_info.json`` and ``features.json``)."""
    path = storage.path(path)
    h = hashlib.sha256()
    for name in ("dataset_info.json", "features.json"):
        file = path / name
        h.update(name.encode() + b"\0" + (file.read_bytes() if file.exists() else b""))
    return h.hexdigest()


def identity(config: ml_collections.ConfigDict) -> dict:
    """The resolved config and a fingerprint of every dataset it reads."""
    paths = dict(config.dataset_paths)
    for name, path in dict(config_lib.setting(config, "validation_paths")).items():
        paths[f"{name} (validation)"] = path
    data = {
        name: {"path": str(p), "fingerprint": dataset_fingerprint(p)} for name, p in paths.items()
    }
    return {"config": plain(config), "data": data}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{'a.b.c': leaf}`` (an empty dict is a leaf)."""
    if isinstance(tree, dict) and tree:
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def differing_keys(recorded: dict, current: dict) -> list[str]:
    """Dotted keys (``config.model.front``, ``data.toy.fingerprint``) whose values differ.

    Keys in :data:`IGNORED_KEYS` are left out.
    """
    a, b = flatten(recorded), flatten(current)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))
    return [k for k in keys if k.split(".")[-1] not in IGNORED_KEYS]


def check_identity(workdir: str | pathlib.Path, current: dict) -> bool:
    """Compares ``current`` with the identity recorded in ``workdir``.

    Returns:
      True when the workdir already records this identity, False when it records none.

    Raises:
      ValueError: in one line naming the differing keys, when it records another.
    """
    path = storage.path(workdir) / CONFIG
    if not path.exists():
        return False
    try:
        recorded = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); it is not this project's.") from err
    keys = differing_keys(recorded, current)
    if keys:
        shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        raise ValueError(
            f"{workdir} holds runs of another config (differing: {shown}); use a new --workdir, "
            "or the command that made it."
        )
    return True


LOCK = ".lock"  # held by the job that trains in a workdir
_HELD: dict = {}  # path -> open lock file: released when the process ends, however it ends
# An object-store lock whose heartbeat is older than this is stale (its holder died on
# another host); the holder rewrites it every LOCK_TTL_S / 5 seconds.
LOCK_TTL_S = 300.0


def claim(workdir: str | pathlib.Path) -> None:
    """Makes this process the one job training in ``workdir`` until it exits.

    An exclusive ``flock`` on ``<workdir>/.lock`` (the kernel drops it when the process dies,
    SIGKILL included, so a stale lock never blocks a rerun); the file names the holder.

    On an object store (no ``flock``) the lock is an object naming the holder (host, pid, a
    job id) with a heartbeat the holder rewrites while it lives (:func:`_claim_object`).

    Raises:
      ValueError: in one line, when another live process holds the workdir.
    """
    import fcntl
    import socket
    import time

    if storage.is_url(workdir):
        _claim_object(workdir)
        return
    path = (pathlib.Path(workdir) / LOCK).absolute()
    if path in _HELD:  # this process already holds it (a second run in one session)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(
            f"{workdir} is in use by {holder}; wait for that job to finish (then rerun the same "
            "command to resume or read its results), or use another --workdir."
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}")
    f.flush()
    _HELD[path] = f


def _claim_object(workdir: str | pathlib.Path) -> None:
    """:func:`claim` on an object store: an advisory lock object with a heartbeat.

    The workdir is refused while ``<workdir>/.lock`` names another process that is alive on
    this host, or one on another host whose heartbeat is younger than :data:`LOCK_TTL_S`; a
    lock left by a killed job is taken over (at once on its own host, after the TTL elsewhere).
    Object stores have no atomic test-and-set through fsspec, so two jobs started within the
    same second may both pass the check; the re-read after writing narrows that window. The
    lock object is deleted when the process exits normally.
    """
    import atexit
    import socket
    import threading
    import time
    import uuid

    path = storage.path(workdir) / LOCK
    if str(path) in _HELD:
        return
    host, pid = socket.gethostname(), os.getpid()
    if path.exists():
        try:
            held = json.loads(path.read_text())
            other = (held["host"], int(held["pid"]), float(held["heartbeat"]))
        except (OSError, ValueError, KeyError, TypeError):
            other = None  # unreadable: not a live holder's record
        if other is not None and (other[0], other[1]) != (host, pid):
            if other[0] == host:
                live = _pid_alive(other[1])
            else:
                live = time.time() - other[2] < LOCK_TTL_S
            if live:
                raise ValueError(
                    f"{workdir} is in use by pid {other[1]} on {other[0]} (lock object {path}, "
                    f"heartbeat {time.time() - other[2]:.0f} s ago); wait for that job to finish "
                    "(then rerun the same command to resume or read its results), or use "
                    "another --workdir."
                )
    job = uuid.uuid4().hex
    since = time.strftime("%H:%M:%S")

    def beat() -> None:
        record = dict(host=host, pid=pid, job=job, since=since, heartbeat=time.time())
        path.write_text(json.dumps(record))

    beat()
    time.sleep(0.2)  # a job that wrote at the same moment: the last writer wins, the other sees
    if json.loads(path.read_text()).get("job") != job:
        raise ValueError(f"{workdir} was claimed by another job at the same moment; rerun later.")
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(LOCK_TTL_S / 5):
            try:
                beat()
            except Exception:  # noqa: BLE001 - a missed beat only ages the lock
                pass

    def release() -> None:
        stop.set()
        try:
            if json.loads(path.read_text()).get("job") == job:
                path.unlink()
        except Exception:  # noqa: BLE001 - best effort at exit; a stale lock is taken over
            pass

    threading.Thread(target=heartbeat, name="workdir-lock", daemon=True).start()
    atexit.register(release)
    _HELD[str(path)] = release


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def mean_gate(root: str | pathlib.Path) -> np.ndarray:
    """The mean gate map ``[N, d]`` averaged over every run recorded under ``root``.

    Raises:
      FileNotFoundError: no record under ``root`` has a gate map (a front without a gate).
    """
    root = storage.path(root)
    gates = [
        _load_npy(root / run_folder(r.dataset, r.seed, r.fold or 1) / r.gate_mean)
        for r in load_records(root)
        if r.gate_mean is not None
    ]
    if not gates:
        raise FileNotFoundError(f"no run under {root} recorded a gate map: the front has none.")
    return np.mean(gates, axis=0)


def _load_npy(path: storage.AnyPath) -> np.ndarray:
    """``np.load`` of a local or remote ``.npy`` file."""
    with path.open("rb") as f:
        return np.load(f)
