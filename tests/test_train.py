"""Training: steps, the device-busy loop, resume after a kill, checkpoint integrity, export."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import tiny_config, toy_features

from data import pipeline
from train import config as config_lib
from train import cross_validation, feeds, loop, losses, plateau, report
from train.checkpointing import CheckpointError, Checkpoints
from train.inference import Predictor, load_exported
from train.steps import Steps, Sums

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_features(tmp_path_factory.mktemp("toy"))


_STEPS = {}


def _setup(toy, tmp_path, on_device=True, **overrides):
    """The toy config, its first fold and compiled steps (shared by tests whose model, optimiser,
    loss and batch sizes agree: the loop's schedule is passed to train_run as ``config``)."""
    config = config_lib.load(tiny_config(tmp_path / "cfg.py", toy, **overrides))
    split = cross_validation.open_split(config, "toy")
    key = repr((config.model, config.optimizer, config.loss, config.batch_size))
    if key not in _STEPS:
        _STEPS[key] = Steps(config, split.num_classes, split.input_shape)
    steps = _STEPS[key]
    feed = (feeds.DeviceFeed if on_device else feeds.GrainFeed)(steps, split.source, 2)
    tr, va = split.folds[0]
    return config, split, steps, feed, tr, va


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def _assert_same(a, b):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


class _Stop(Exception):
    pass


def _stop_after(step):
    def hook(done):
        if done >= step:
            raise _Stop(done)

    return loop.Hooks(after_fetch=hook)


def test_training_learns_the_toy_task(toy, tmp_path):
    config, _, steps, feed, tr, va = _setup(toy, tmp_path, num_epochs=6)
    out = loop.train_run(steps, feed, tr, va, tmp_path / "run", config=config, seed=0)
    assert len(out.history) == 6
    assert out.history[-1]["train_loss"] < 0.8 * out.history[0]["train_loss"]
    assert out.best_accuracy >= 0.9
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 7))
    assert out.best_eval["gate_total"].shape == (4, 16)  # the IF comes from the evaluation


@pytest.mark.slow
def test_device_feed_batches_like_grain(toy, tmp_path):
    """Both feeds see the same batches; the losses agree to float32 rounding."""
    config, _, steps, device, tr, va = _setup(toy, tmp_path, num_epochs=2)
    *_, g_steps, grain_feed, _, _ = _setup(toy, tmp_path, on_device=False, num_epochs=2)
    a = loop.train_run(steps, device, tr, va, tmp_path / "device", config=config, seed=3)
    b = loop.train_run(g_steps, grain_feed, tr, va, tmp_path / "grain", config=config, seed=3)
    for ra, rb in zip(a.history, b.history, strict=True):
        assert ra["val_accuracy"] == rb["val_accuracy"]
        np.testing.assert_allclose(ra["train_loss"], rb["train_loss"], rtol=1e-5)
    chex.assert_trees_all_close(a.final_state.params, b.final_state.params, atol=1e-5)


def test_epoch_order_equals_the_grain_epoch(toy):
    source, _ = pipeline.load_features(toy)
    idx = np.arange(3, 77)
    it = pipeline.train_epoch(source, idx, batch_size=8, seed=5, epoch=2)
    ids = np.stack([b["id"] for b in it])
    order = pipeline.epoch_order(idx, batch_size=8, seed=5, epoch=2)
    np.testing.assert_array_equal(ids, [[int(source[int(i)]["id"]) for i in row] for row in order])


@pytest.mark.slow
def test_fetch_interval_does_not_change_the_result(toy, tmp_path):
    """Mid-epoch fetch points split the jitted stretches; the arithmetic must not change."""
    config, _, steps, feed, tr, va = _setup(toy, tmp_path, num_epochs=2, checkpoint_every_steps=0)
    a = loop.train_run(steps, feed, tr, va, tmp_path / "a", config=config, seed=0)
    config, _, steps, feed, tr, va = _setup(toy, tmp_path, num_epochs=2, checkpoint_every_steps=2)
    b = loop.train_run(steps, feed, tr, va, tmp_path / "b", config=config, seed=0)
    _assert_same(a.final_state, b.final_state)
    assert a.history == b.history


@pytest.mark.slow
@pytest.mark.parametrize("on_device", [True, False])
def test_resume_mid_epoch_is_bit_exact(toy, tmp_path, on_device):
    config, _, steps, feed, tr, va = _setup(
        toy, tmp_path, on_device=on_device, checkpoint_every_steps=3
    )
    full = loop.train_run(steps, feed, tr, va, tmp_path / "full", config=config, seed=0)
    with pytest.raises(_Stop):  # in epoch 3, right after the mid-epoch checkpoint at step 12
        loop.train_run(
            steps, feed, tr, va, tmp_path / "cut", config=config, seed=0, hooks=_stop_after(12)
        )
    resumed = loop.train_run(steps, feed, tr, va, tmp_path / "cut", config=config, seed=0)
    _assert_same(full.final_state, resumed.final_state)
    _assert_same(full.best_state, resumed.best_state)
    assert full.history == resumed.history


@pytest.mark.slow
def test_every_changed_file_of_the_latest_checkpoint_is_caught(toy, tmp_path, capsys):
    """A same-size byte flip anywhere in the newest checkpoint: skipped, and the resumed run
    equals the uninterrupted one."""
    config, _, steps, feed, tr, va = _setup(toy, tmp_path, num_epochs=3, checkpoint_every_steps=0)
    full = loop.train_run(steps, feed, tr, va, tmp_path / "full", config=config, seed=0)
    with pytest.raises(_Stop):
        loop.train_run(
            steps, feed, tr, va, tmp_path / "cut", config=config, seed=0, hooks=_stop_after(10)
        )
    latest = tmp_path / "cut" / "checkpoints" / "latest" / "10"
    files = sorted(p for p in latest.rglob("*") if p.is_file())
    assert len(files) >= 4
    pristine = {f: f.read_bytes() for f in files}
    for f in files:
        data = bytearray(pristine[f])
        lo = len(data) // 2
        for i in range(lo, min(len(data), lo + 2000)):
            data[i] ^= 0xFF
        f.write_bytes(bytes(data))
        assert len(f.read_bytes()) == len(pristine[f])
        ckpt = Checkpoints(tmp_path / "cut" / "checkpoints", asynchronous=False)
        with pytest.raises(Exception, match="checksum mismatch"):
            ckpt.verify("latest", 10)
        ckpt.close()
        f.write_bytes(pristine[f])
    # Corrupt the largest file for real and resume: checkpoint 5 is used, the replay is exact.
    largest = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(pristine[largest])
    data[len(data) // 2] ^= 0x01
    largest.write_bytes(bytes(data))
    resumed = loop.train_run(steps, feed, tr, va, tmp_path / "cut", config=config, seed=0)
    assert "skipping checkpoint" in capsys.readouterr().out
    _assert_same(full.final_state, resumed.final_state)
    assert full.history == resumed.history


@pytest.mark.slow
def test_damaged_bookkeeping_leaves_a_checkpoint_unverified(toy, tmp_path, capsys):
    """Checksum records and orbax's metadata files unreadable, truncated or altered: that
    checkpoint is skipped with one line, never a traceback, and the resumed run equals the
    uninterrupted one."""
    config, _, steps, feed, tr, va = _setup(toy, tmp_path, num_epochs=3, checkpoint_every_steps=0)
    full = loop.train_run(steps, feed, tr, va, tmp_path / "full", config=config, seed=0)
    with pytest.raises(_Stop):
        loop.train_run(
            steps, feed, tr, va, tmp_path / "cut", config=config, seed=0, hooks=_stop_after(10)
        )
    root = tmp_path / "cut" / "checkpoints"
    record = root / "checksums" / "latest_10.json"
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
            ckpt.verify("latest", 10)
        assert "\n" not in str(err.value), what
        ckpt.close()
    record.write_bytes(pristine)
    # orbax's own small files (checkpoint and array metadata): damaged, only a failed verify.
    step = root / "latest" / "10"
    small = [f for f in step.rglob("*") if f.is_file() and f.stat().st_size < 4096]
    assert small
    for f in small:
        kept = f.read_bytes()
        f.write_bytes(b"\xff" * max(1, len(kept) // 2))
        ckpt = Checkpoints(root, asynchronous=False)
        assert 10 in ckpt.steps("latest")
        with pytest.raises(CheckpointError, match="mismatch|added or missing"):
            ckpt.verify("latest", 10)
        ckpt.close()
        f.write_bytes(kept)
    # Resume with the record not UTF-8: checkpoint 5 is used, the replay is exact.
    record.write_bytes(b"\xff" * len(pristine))
    resumed = loop.train_run(steps, feed, tr, va, tmp_path / "cut", config=config, seed=0)
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "unreadable (UnicodeDecodeError)" in out
    _assert_same(full.final_state, resumed.final_state)
    assert full.history == resumed.history


@pytest.mark.slow
def test_best_is_kept_until_its_successor_is_committed(toy, tmp_path):
    config, _, steps, feed, tr, va = _setup(toy, tmp_path, num_epochs=4, checkpoint_every_steps=0)
    loop.train_run(steps, feed, tr, va, tmp_path / "run", config=config, seed=0)
    ckpt = Checkpoints(tmp_path / "run" / "checkpoints", asynchronous=False)
    best = ckpt.verified_steps("best")
    assert best and set(best) <= set(ckpt.steps("best"))
    # Every kept periodic checkpoint's best is on disk and verifies.
    for step in ckpt.verified_steps("latest"):
        meta = json.loads((ckpt.directory / "latest" / str(step) / "meta" / "metadata").read_text())
        ckpt.verify("best", meta["best"]["step"])
    ckpt.close()


def test_non_finite_loss_stops_and_rolls_back(toy, tmp_path, monkeypatch):
    config, split, steps, feed, tr, va = _setup(
        toy, tmp_path, num_epochs=1, checkpoint_every_steps=0
    )
    loop.train_run(steps, feed, tr, va, tmp_path / "run", config=config, seed=0)
    config.num_epochs = 3
    # Resume with a loss that is NaN from the first new step (6) on.
    monkeypatch.setattr(losses, "get", lambda name: lambda lg, lb: jnp.full(lg.shape[:1], jnp.nan))
    broken = Steps(config, 2, split.input_shape)
    feed.steps = broken
    with pytest.raises(loop.NonFiniteLossError, match=r"non-finite loss at step 6 .*step 5"):
        loop.train_run(broken, feed, tr, va, tmp_path / "run", seed=0)
    ckpt = Checkpoints(tmp_path / "run" / "checkpoints", asynchronous=False)
    assert ckpt.verified_steps("latest") == [5]
    state, meta, _ = ckpt.restore(broken.init_state(0))
    ckpt.close()
    assert meta["epoch"] == 1 and int(state.step) == 5
    chex.assert_tree_all_finite(state.params)


def test_labels_are_checked_through_the_api(toy, tmp_path):
    config, split, steps, *_ = _setup(toy, tmp_path)
    with pytest.raises(ValueError, match=r"label 1, outside \[0, 1\)"):
        feeds.DeviceFeed(steps, split.source, 1)
    bad = [dict(split.source[i]) for i in range(len(split.source))]
    bad[7]["label"] = -1
    with pytest.raises(ValueError, match=r"example id \d+ has label -1"):
        feeds.DeviceFeed(steps, bad, 2)
    grain_feed = feeds.GrainFeed(steps, bad, 2)
    with pytest.raises(ValueError, match="has label -1"):
        grain_feed.train(steps.init_state(0), Sums.zeros(), np.full((1, 8), 7), 0, 1)


def _train_cli(config_path, workdir, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "train", "--config", str(config_path), "--workdir", str(workdir)]
    return subprocess.Popen(
        [*cmd, "--no-progress", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip


def _final(workdir, steps):
    ckpt = Checkpoints(workdir / "toy" / "seed0_fold2" / "checkpoints", asynchronous=False)
    state, meta, _ = ckpt.restore(steps.init_state(0))
    ckpt.close()
    return state, meta


_KILL_DURING_SAVE = """
import os, sys, threading
import orbax.checkpoint as ocp
from train import checkpointing, __main__ as cli
original = checkpointing.Checkpoints._write
calls, lock = [], threading.Lock()  # runs side by side save from two threads
def write(self, kind, step, state, meta):
    with lock:
        calls.append(kind)
        nth = calls.count("latest")
    # The n-th periodic save: orbax finalises it, then the process dies before the checksum.
    if nth == {n} and kind == "latest":
        manager = self.managers[kind]
        manager.reload()
        if step in manager.all_steps():  # left by the SIGKILL, as _write would clear it
            manager.delete(step)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        manager.save(step, args=args, force=True)
        manager.wait_until_finished()
        os._exit(9)
    return original(self, kind, step, state, meta)
checkpointing.Checkpoints._write = write
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_runs_restart_to_the_same_result(toy, tmp_path):
    """SIGKILL at an arbitrary moment, and a death on the save thread after orbax finalised a
    checkpoint but before its checksum was committed: each rerun of the same command ends
    bit-identical to an uninterrupted run."""
    cfg = tiny_config(tmp_path / "cfg.py", toy, num_epochs=3, checkpoint_every_steps=3)
    steps = Steps(config_lib.load(cfg), 2, (4, 16))
    reference = _train_cli(cfg, tmp_path / "ref")
    assert reference.wait(timeout=300) == 0, reference.stdout.read().decode()
    ref_state, ref_meta = _final(tmp_path / "ref", steps)
    ref_results = json.loads((tmp_path / "ref" / "results.json").read_text())

    victim = _train_cli(cfg, tmp_path / "cut")
    # Kill it while it trains the second fold, at an arbitrary moment after a checkpoint.
    deadline = time.time() + 240
    fold2 = tmp_path / "cut" / "toy" / "seed0_fold2" / "checkpoints" / "latest"
    while time.time() < deadline and not (fold2.exists() and any(fold2.iterdir())):
        time.sleep(0.02)
    time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "cut" / "results.json").exists(), "the run finished before the kill"

    # Resume the killed run, and die this time on the save thread after orbax finalised a
    # checkpoint but before its checksum was committed.
    script = tmp_path / "kill.py"
    script.write_text(_KILL_DURING_SAVE.replace("{n}", "2"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = ["--config", str(cfg), "--no-progress", "--workdir", str(tmp_path / "cut")]
    died = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env,
                          capture_output=True)  # fmt: skip
    assert died.returncode == 9, died.stderr.decode()[-2000:]

    again = _train_cli(cfg, tmp_path / "cut")
    out = again.communicate(timeout=300)[0].decode()
    assert again.returncode == 0, out
    assert "no committed checksum" in out
    state, meta = _final(tmp_path / "cut", steps)
    _assert_same(ref_state, state)
    assert ref_meta["history"] == meta["history"]
    assert ref_results == json.loads((tmp_path / "cut" / "results.json").read_text())


@pytest.mark.slow
def test_runs_side_by_side_equal_runs_one_at_a_time(toy, tmp_path):
    """Two runs trained at once compute exactly what they compute one at a time; an error in
    one stops both, and the same command then resumes to the same results."""
    from train import validate

    def train(workdir, concurrent, hooks=None):
        cfg = tiny_config(tmp_path / f"cfg{concurrent}.py", toy, num_epochs=3,
                          concurrent_runs=concurrent)  # fmt: skip
        config = config_lib.load(cfg)
        splits = validate.prepare(config, workdir)
        return cross_validation.run(config, workdir, splits=splits, progress=False, hooks=hooks)

    alone = train(tmp_path / "alone", 1)
    failed = []

    def fail_once(step):
        if not failed:
            failed.append(step)
            raise _Stop

    with pytest.raises(_Stop):
        train(tmp_path / "both", 2, loop.Hooks(after_fetch=fail_once))
    assert alone == train(tmp_path / "both", 2)
    for run in ("seed0_fold1", "seed0_fold2"):
        metrics = [
            (tmp_path / w / "toy" / run / "metrics.jsonl").read_text() for w in ("alone", "both")
        ]
        assert metrics[0] == metrics[1]
    config = config_lib.load(tiny_config(tmp_path / "cfg.py", toy, concurrent_runs=2))
    with config.unlocked():
        config.mesh = {"data": -1}
    with pytest.raises(config_lib.ConfigError, match="cannot be combined with a mesh"):
        validate.check_values(config)


@pytest.mark.slow
def test_predictor_reads_the_recorded_config_and_exports(toy, tmp_path):
    cfg = tiny_config(tmp_path / "cfg.py", toy, num_epochs=1)
    config = config_lib.load(cfg)
    from train import validate

    splits = validate.prepare(config, tmp_path / "w")
    cross_validation.run(config, tmp_path / "w", splits=splits, progress=False)
    run_dir = tmp_path / "w" / "toy" / "seed0_fold1"
    predictor = Predictor.from_run(run_dir)
    source = splits[0].source
    x = np.stack([source[i]["features"] for i in range(12)])
    path = predictor.export(tmp_path / "model.jaxexport")
    chex.assert_trees_all_close(load_exported(path)(x), predictor.logits(x), atol=1e-6)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, jax, numpy as np\n"
        f"e = jax.export.deserialize(bytearray(open({str(path)!r}, 'rb').read()))\n"
        f"out = np.asarray(e.call(np.load({str(tmp_path / 'x.npy')!r})))\n"
        "assert not any(m.startswith(('gaam_jax', 'train', 'flax')) for m in sys.modules)\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, out)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), predictor.logits(x), atol=1e-6)
    assert predictor.predict(x).shape == (12,)
    with pytest.raises(FileNotFoundError, match="records no run"):
        Predictor.from_run(tmp_path / "w")


def test_report_table():
    # The paper's IEMOCAP DAAMv1 folds give 67.36 +- 1.49 (population std).
    mean, std = report.mean_std([67.2, 64.6, 68.1, 67.9, 69.0])
    assert (round(mean, 2), round(std, 2)) == (67.36, 1.49)
    text = report.table(
        {"DAAMv1": [0.672, 0.646, 0.681, 0.679, 0.690]}, ["F1", "F2", "F3", "F4", "F5"]
    )
    assert text.splitlines()[2] == "| DAAMv1 | 67.2 | 64.6 | 68.1 | 67.9 | 69.0 | 67.36 ± 1.49 |"
    with pytest.raises(ValueError, match="2 values for 5 columns"):
        report.table({"x": [0.1, 0.2]}, ["F1", "F2", "F3", "F4", "F5"])


def test_focal_loss_and_plateau():
    logits = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    labels = jnp.array([0, 0])
    p = jax.nn.softmax(logits)[jnp.arange(2), labels]
    expected = 0.25 * (1 - p + 1e-6) ** 2.5 * -jnp.log(p)
    chex.assert_trees_all_close(losses.focal_loss(logits, labels), expected, rtol=1e-6)
    state = plateau.init()
    scales = []
    for acc in [0.5, 0.6, 0.6, 0.6, 0.59, 0.7]:  # patience 2: the 3rd non-improvement cuts
        state = plateau.update(state, acc, patience=2)
        scales.append(float(state["scale"]))
    np.testing.assert_allclose(scales, [1.0, 1.0, 1.0, 1.0, 0.1, 0.1], rtol=1e-7)
    host = plateau.to_host(state)
    assert host["best"] == pytest.approx(0.7) and host["bad_epochs"] == 0
    # a relative improvement under the 1e-4 threshold is not an improvement (PyTorch 'rel')
    assert int(plateau.update(state, 0.70001, patience=2)["bad_epochs"]) == 1
    assert plateau.to_host(plateau.to_device(plateau.init(), None)) == plateau.init()


def test_frozen_parameters_are_never_updated(toy, tmp_path):
    config = config_lib.load(tiny_config(tmp_path / "cfg.py", toy, num_epochs=2),
                             ["optimizer.frozen=('^attention/',)"])  # fmt: skip
    split = cross_validation.open_split(config, "toy")
    steps = Steps(config, 2, split.input_shape)
    first = steps.init_state(0)
    first_conv = np.asarray(first.params["conv1"]["kernel"])
    feed = feeds.DeviceFeed(steps, split.source, 2)
    out = loop.train_run(steps, feed, *split.folds[0], tmp_path / "run", seed=0)
    params = out.final_state.params
    np.testing.assert_array_equal(params["attention"]["delta"], 0.0)
    np.testing.assert_array_equal(params["attention"]["xi"], 2.0)
    assert not np.array_equal(params["conv1"]["kernel"], first_conv)


def test_init_compiled_at_o1_is_bit_identical():
    """The initial state, compiled at -O1 on CPU to save a second per process, equals the
    default (-O3) compile bit for bit (so results do not depend on the option)."""
    config = config_lib.load("configs/default.py")
    steps = Steps(config, 2, (6, 384))
    lowered = steps._create.lower(jnp.uint32(0))
    default = lowered.compile(compiler_options={"xla_backend_optimization_level": 3})
    for seed in (0, 1, 12345):
        _assert_same(steps.init_state(seed), default(jnp.uint32(seed)))


def test_one_compile_serves_every_seed(toy, tmp_path):
    config, _, steps, feed, tr, va = _setup(toy, tmp_path, num_epochs=1)
    loop.train_run(steps, feed, tr, va, tmp_path / "a", config=config, seed=0)
    before = steps.train_steps._cache_size()
    loop.train_run(steps, feed, tr, va, tmp_path / "b", config=config, seed=1)
    assert steps.train_steps._cache_size() == before
    a, b = steps.init_state(0), steps.init_state(1)
    assert not np.array_equal(a.params["conv1"]["kernel"], b.params["conv1"]["kernel"])
