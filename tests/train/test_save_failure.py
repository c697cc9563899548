"""A failed save ends ``python -m train`` in one line: a store that answers malformed (the GCS
emulator leaving out ``x-goog-generation``, :mod:`gcs_emulator`) and a full local disk."""

import errno
import os
import pathlib
import re
import subprocess
import sys
import time

import gcs_emulator
import pytest
from train_helpers import tiny_config

from train import __main__ as cli
from train import checkpointing

ROOT = pathlib.Path(__file__).parents[2]
# tensorstore's C++ logging says once, at its first GCS request, which credentials it uses (here
# the emulator's test token); a healthy run prints it too, and Python cannot configure it.
TENSORSTORE_INFO = re.compile(r"I\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \w+\.cc:\d+\] ")


@pytest.fixture
def own_gcs():
    """A healthy GCS emulator of this test's own: the test turns it malformed, which must not
    reach the session's emulator (``gcs``) that other tests share."""
    with gcs_emulator.start() as found:
        yield found


@pytest.fixture
def malformed_gcs():
    """A GCS emulator whose downloads lack ``x-goog-generation``: orbax's second save fails."""
    with gcs_emulator.start(generation_header=False) as found:
        yield found


def _train(gcs, toy, tmp_path, *flags) -> subprocess.Popen:
    cfg = tiny_config(tmp_path / "cfg.py", toy, num_epochs=6)
    env = dict(os.environ, **gcs["env"], PYTHONPATH=str(ROOT), GAAM_JAX_CACHE=str(tmp_path / "c"))
    cmd = [sys.executable, "-m", "train", "--config", str(cfg), "--workdir",
           f"gs://{gcs_emulator.BUCKET}/runs/toy", "--no-progress", *flags]  # fmt: skip
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.slow
def test_a_store_that_answers_malformed_ends_in_one_line(own_gcs, toy, tmp_path):
    """The store turns malformed once the first checkpoint is verified: a later save fails."""
    gcs = own_gcs
    job = _train(gcs, toy, tmp_path)
    sums = "runs/toy/programs/toy/checkpoints/checksums/"
    deadline = time.time() + 120
    while time.time() < deadline and not gcs_emulator.objects(gcs, sums) and job.poll() is None:
        time.sleep(0.05)
    gcs_emulator.answer_malformed(gcs)
    out, err = job.communicate(timeout=300)
    lines = [line for line in err.splitlines() if not TENSORSTORE_INFO.match(line)]
    assert job.returncode != 0, out[-3000:]
    assert len(lines) == 1, err[-5000:]
    (line,) = lines
    assert line.startswith("error: saving checkpoint "), line
    assert "gs://bkt/runs/toy/programs/toy/checkpoints" in line  # the store
    assert "Malformed StorageGeneration" in line  # the cause
    records = gcs_emulator.objects(gcs, sums)
    verified = max(int(name.removeprefix(sums).removesuffix(".json")) for name in records)
    assert line.endswith(
        f"rerunning the same command resumes from the last verified checkpoint, step {verified}."
    ), line
    assert "wall time" not in out


@pytest.mark.slow
def test_debug_shows_the_failed_save_s_traceback(malformed_gcs, toy, tmp_path):
    job = _train(malformed_gcs, toy, tmp_path, "--debug")
    err = job.communicate(timeout=300)[1]
    assert job.returncode != 0
    assert "Traceback (most recent call last)" in err
    assert "train.checkpointing.SaveError: saving checkpoint" in err


def _full_after(calls: int):
    """A ``write_json_atomic`` whose first ``calls`` checksum records commit, then ENOSPC."""
    real = checkpointing.write_json_atomic
    count = [0]

    def write(*args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    return write


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line_naming_the_last_verified_step(
    toy, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(checkpointing, "write_json_atomic", _full_after(1))
    cfg = tiny_config(tmp_path / "cfg.py", toy, num_epochs=3)
    workdir = tmp_path / "w"
    assert cli.main(["--config", str(cfg), "--workdir", str(workdir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: the disk holding {workdir}/programs/toy/checkpoints is full;")
    assert re.search(r"resumes from the last verified checkpoint, step \d+\)\.$", err.strip())


def test_a_failed_save_names_the_store_cause_and_last_verified_step():
    err = ValueError(
        'Error opening "zarr" driver: Error writing gs://b/c/manifest.ocdbt: Malformed '
        'StorageGeneration [tensorstore_spec=\'{"driver": "zarr"}\']'
    )
    save = checkpointing.SaveError("gs://b/c", 10, checkpointing._cause(err), 5)
    assert str(save) == (
        "saving checkpoint 10 to gs://b/c failed: ValueError: Error writing "
        "gs://b/c/manifest.ocdbt: Malformed StorageGeneration; rerunning the same command "
        "resumes from the last verified checkpoint, step 5."
    )
    disk = OSError(errno.EROFS, "Read-only file system", "/w/checkpoints/steps")
    assert checkpointing._cause(disk) == "Read-only file system (/w/checkpoints/steps)"
    assert "starts over" in str(checkpointing.SaveError("/w", 5, "x", None))
