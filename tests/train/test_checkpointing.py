"""Checkpoints (train/checkpointing.py): every changed byte is caught, damaged bookkeeping is
skipped in one line, and the replay from an older checkpoint is exact."""

import json
import shutil

import jax
import numpy as np
import pytest
from train_helpers import Stop, stop_after, toy_program

from train import trainer
from train.checkpointing import CheckpointError, Checkpoints


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def program(toy, tmp_path_factory):
    """A program of two runs trained 3 epochs, and a copy stopped after its epoch-2 checkpoint."""
    tmp = tmp_path_factory.mktemp("ckpt")
    config, _, steps, feed, plan = toy_program(toy, tmp, folds=(0, 1), num_epochs=3)
    full = trainer.train_program(steps, feed, plan, tmp / "full", config=config)
    with pytest.raises(Stop):
        trainer.train_program(steps, feed, plan, tmp / "cut", config=config, hooks=stop_after(10))
    return config, steps, feed, plan, full, tmp / "cut"


@pytest.fixture
def cut(program, tmp_path):
    """Each test's own copy of the stopped program's checkpoints."""
    shutil.copytree(program[-1], tmp_path / "cut")
    return (*program[:-1], tmp_path / "cut")


def _resume_equals(cut, capsys, expect):
    config, steps, feed, plan, full, root = cut
    resumed = trainer.train_program(steps, feed, plan, root, config=config)
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and expect in out, out
    for a, b in zip(full, resumed, strict=True):
        _assert_same(a.final_state, b.final_state)
        _assert_same(a.best_state, b.best_state)
        assert a.history == b.history


@pytest.mark.slow
def test_every_changed_file_is_caught_and_the_replay_is_exact(cut, capsys):
    """A same-size byte flip anywhere in the newest checkpoint: caught; the resume uses the
    older one and equals the uninterrupted program."""
    root = cut[-1]
    step = root / "steps" / "10"
    files = sorted(p for p in step.rglob("*") if p.is_file())
    assert len(files) >= 8
    pristine = {f: f.read_bytes() for f in files}
    for f in files:
        data = bytearray(pristine[f])
        lo = len(data) // 2
        for i in range(lo, min(len(data), lo + 2000)):
            data[i] ^= 0xFF
        f.write_bytes(bytes(data))
        assert len(f.read_bytes()) == len(pristine[f])
        ckpt = Checkpoints(root, asynchronous=False)
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            ckpt.verify(10)
        ckpt.close()
        f.write_bytes(pristine[f])
    largest = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(pristine[largest])
    data[len(data) // 2] ^= 0x01
    largest.write_bytes(bytes(data))
    try:
        _resume_equals(cut, capsys, "checksum mismatch")
    finally:
        largest.write_bytes(pristine[largest])


@pytest.mark.slow
def test_damaged_bookkeeping_leaves_a_checkpoint_unverified(cut, capsys, tmp_path):
    """Checksum records and orbax's metadata files unreadable, truncated or altered: that
    checkpoint is skipped with one line, never a traceback, and the replay is exact."""
    config, steps, feed, plan, full, root = cut
    record = root / "checksums" / "10.json"
    pristine = record.read_bytes()
    digest = json.loads(pristine)["files"]
    name, value = next(iter(digest.items()))
    altered = dict(digest, **{name: ("0" if value[0] != "0" else "1") + value[1:]})
    damages = {
        "not UTF-8": b"\xff\xfe" + pristine[2:],
        "truncated": pristine[: len(pristine) // 2],
        "not JSON": b"{" * len(pristine),
        "no file list": json.dumps({"other": 1}).encode(),
        "a list, not a mapping": json.dumps({"files": list(digest)}).encode(),
        "a digest altered": json.dumps({"files": altered}).encode(),
    }
    for what, data in damages.items():
        record.write_bytes(data)
        ckpt = Checkpoints(root, asynchronous=False)
        with pytest.raises(CheckpointError) as err:
            ckpt.verify(10)
        assert "\n" not in str(err.value), what
        ckpt.close()
    record.write_bytes(pristine)
    small = [
        f for f in (root / "steps" / "10").rglob("*") if f.is_file() and f.stat().st_size < 4096
    ]
    assert small
    for f in small:  # orbax's own small files: damaged, only a failed verify
        kept = f.read_bytes()
        f.write_bytes(b"\xff" * max(1, len(kept) // 2))
        ckpt = Checkpoints(root, asynchronous=False)
        assert 10 in ckpt.steps()
        with pytest.raises(CheckpointError, match="mismatch|added or missing"):
            ckpt.verify(10)
        ckpt.close()
        f.write_bytes(kept)
    record.write_bytes(b"\xff" * len(pristine))
    _resume_equals(cut, capsys, "unreadable (UnicodeDecodeError)")


def test_rotation_keeps_the_newest_committed(toy, tmp_path):
    config, _, steps, feed, plan = toy_program(toy, tmp_path, num_epochs=4)
    trainer.train_program(steps, feed, plan, tmp_path / "c", config=config)
    ckpt = Checkpoints(tmp_path / "c", asynchronous=False)
    assert ckpt.verified_steps() == ckpt.steps() == [15, 20]
    ckpt.verify(20)
    ckpt.close()
