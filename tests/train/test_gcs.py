"""Training on Google Cloud Storage, for real, against a local GCS emulator (``gcs`` fixture,
:mod:`gcs_emulator`): the CLI runs in subprocesses pointed at it by environment variables."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import gcs_emulator
import pytest
from train_helpers import tiny_config

ROOT = pathlib.Path(__file__).parents[2]
BUCKET = gcs_emulator.BUCKET


def _cli(gcs, cfg, workdir, cwd, cache):
    env = dict(os.environ, **gcs["env"], PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
               GAAM_JAX_CACHE=str(cache))  # fmt: skip
    cmd = [sys.executable, "-m", "train", "--config", str(cfg), "--workdir", str(workdir),
           "--no-progress"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip


# A log record (absl/logging "WARNING:absl:...", glog "W1206 ..."): stderr is merged into the
# output, and orbax's warnings of a healthy run are written when training ends (see
# checkpointing.quiet_failed_saves), between the table and the wall time.
_LOG_LINE = re.compile(r"^((DEBUG|INFO|WARNING|ERROR|CRITICAL):[\w.]*:|[IWEF]\d{4} )")


def _table(out: str) -> str:
    """The printed results table (the lines from the first ``|``-row to the wall time)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next(i for i, line in enumerate(lines) if line.startswith("wall time"))
    return "\n".join(line for line in lines[start:end] if not _LOG_LINE.match(line)).rstrip()


@pytest.mark.slow
def test_training_on_gcs_resumes_after_sigkill_to_the_local_result(gcs, toy, tmp_path):
    """Features and workdir on gs://: killed with SIGKILL after its first committed checkpoint,
    the same command resumes from the bucket and ends with the table, records and best-state
    bytes of an uninterrupted run on local disk; nothing lands in a local folder ``gs:``."""
    from etils import epath

    features = f"gs://{BUCKET}/features/toy/1.0.0"
    gcs_emulator.upload(toy, features)
    workdir = f"gs://{BUCKET}/runs/toy"
    # A checkpoint at each epoch end: the emulator takes seconds a save (pure-Python HTTP), so
    # the killed job is still in its second epoch when the first checkpoint's record appears.
    overrides = dict(num_epochs=3, checkpoint_every_epochs=1, checkpoint_every_steps=0)
    local_cfg = tiny_config(tmp_path / "local.py", toy, **overrides)
    gcs_cfg = tiny_config(tmp_path / "gcs.py", features, **overrides)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cache = tmp_path / "cache"

    ref = _cli(gcs, local_cfg, tmp_path / "ref", cwd, cache)
    victim = _cli(gcs, gcs_cfg, workdir, cwd, cache)
    sums = "runs/toy/programs/toy/checkpoints/checksums/"
    deadline = time.time() + 120
    while time.time() < deadline and not gcs_emulator.objects(gcs, sums) and victim.poll() is None:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    out = victim.communicate()[0].decode()
    assert victim.returncode == -signal.SIGKILL, out[-3000:]
    assert gcs_emulator.objects(gcs, sums), "no checksum record was committed before the deadline"
    assert not gcs_emulator.objects(gcs, "runs/toy/results.json"), (
        "the run finished before the kill"
    )
    assert gcs_emulator.objects(gcs, "runs/toy/.lock"), (
        "the killed job's lock object is left behind"
    )

    ref_out = ref.communicate(timeout=240)[0].decode()
    assert ref.returncode == 0, ref_out[-3000:]
    again = _cli(gcs, gcs_cfg, workdir, cwd, cache)
    out = again.communicate(timeout=240)[0].decode()
    assert again.returncode == 0, out[-3000:]

    assert _table(out) == _table(ref_out)
    remote = epath.Path(workdir)
    local = tmp_path / "ref"
    assert json.loads((remote / "results.json").read_text()) == json.loads(
        (local / "results.json").read_text()
    )
    for run in ("seed0_fold1", "seed0_fold2"):
        for name in ("best_state.msgpack", "record.json", "metrics.jsonl", "gate_mean.npy"):
            assert (remote / "toy" / run / name).read_bytes() == (
                local / "toy" / run / name
            ).read_bytes(), f"{run}/{name} differs"
        assert (remote / "toy" / run / "importance.png").exists()
        assert any((remote / "toy" / run / "tensorboard").iterdir()), "no TensorBoard events"
    assert not gcs_emulator.objects(gcs, "runs/toy/.lock"), (
        "a finished job releases its lock object"
    )
    assert not any(p.name.startswith("gs:") for p in cwd.rglob("*")), list(cwd.rglob("*"))
    assert not (ROOT / "gs:").exists()
