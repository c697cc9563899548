"""Training end to end: the CLI killed and restarted, programs vs runs alone, inference.

The loop, checkpoints, feeds and splits have their own files (test_loop, test_checkpointing,
test_feeds, test_splits).
"""

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
from train_helpers import tiny_config

from train import __main__ as train_cli
from train import config as config_lib
from train import feeds, losses, plateau, progress, report, trainer
from train.checkpointing import Checkpoints
from train.inference import Predictor, load_exported
from train.splits import open_folds
from train.steps import Steps

ROOT = pathlib.Path(__file__).parents[2]


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class _Stop(Exception):
    pass


def _train_cli(config_path, workdir, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "train", "--config", str(config_path), "--workdir", str(workdir)]
    return subprocess.Popen(
        [*cmd, "--no-progress", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip


def _final(workdir, steps):
    ckpt = Checkpoints(workdir / "programs" / "toy" / "checkpoints", asynchronous=False)
    state, best, meta = ckpt.restore(steps.abstract_state(2))
    ckpt.close()
    return state, best, meta


# Dies on the n-th checkpoint save: "during" right after orbax started writing in the
# background, "before_checksum" once orbax finalised it but before its checksum record.
_DIE_IN_SAVE = """
import os, sys
from train import checkpointing, __main__ as cli
save, wait, calls = checkpointing.Checkpoints.save, checkpointing.Checkpoints.wait, []
def dying_save(self, *args):
    save(self, *args)
    calls.append(1)
    if len(calls) == {n} and "{when}" == "during":
        os._exit(9)
def dying_wait(self):
    if len(calls) == {n} and "{when}" == "before_checksum" and self._unsealed is not None:
        self.manager.wait_until_finished()
        os._exit(9)
    wait(self)
checkpointing.Checkpoints.save, checkpointing.Checkpoints.wait = dying_save, dying_wait
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_runs_restart_to_the_same_result(toy, tmp_path, library_init_options):
    """SIGKILL at an arbitrary moment, a death while orbax writes a checkpoint in the
    background, and one after orbax finalised a checkpoint but before its checksum record:
    each rerun of the same command ends bit-identical to an uninterrupted run."""
    cfg = tiny_config(tmp_path / "cfg.py", toy, num_epochs=3, checkpoint_every_steps=3)
    steps = Steps(config_lib.load(cfg), 2, (4, 16))
    # The uninterrupted run in this process: the command, XLA flags and programs of the CLI
    # processes below (initial states compiled with train.steps' own options, as they do).
    ref_args = ["--config", str(cfg), "--workdir", str(tmp_path / "ref"), "--no-progress"]
    assert train_cli.main(ref_args) == 0
    ref_state, ref_best, ref_meta = _final(tmp_path / "ref", steps)
    ref_results = json.loads((tmp_path / "ref" / "results.json").read_text())

    victim = _train_cli(cfg, tmp_path / "cut")
    # Kill it at an arbitrary moment after its first checkpoint.
    deadline = time.time() + 240
    sums = tmp_path / "cut" / "programs" / "toy" / "checkpoints" / "checksums"
    while time.time() < deadline and not (sums.exists() and any(sums.iterdir())):
        time.sleep(0.02)
    time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "cut" / "results.json").exists(), "the run finished before the kill"

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = ["--config", str(cfg), "--no-progress", "--workdir", str(tmp_path / "cut")]
    for when in ("during", "before_checksum"):
        script = tmp_path / f"die_{when}.py"
        script.write_text(_DIE_IN_SAVE.replace("{n}", "2").replace("{when}", when))
        died = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env,
                              capture_output=True)  # fmt: skip
        assert died.returncode == 9, died.stderr.decode()[-2000:]

    again = _train_cli(cfg, tmp_path / "cut")
    out = again.communicate(timeout=300)[0].decode()
    assert again.returncode == 0, out
    assert "no committed checksum" in out
    state, best, meta = _final(tmp_path / "cut", steps)
    _assert_same(ref_state, state)
    _assert_same(ref_best, best)
    assert ref_meta["history"] == meta["history"]
    assert ref_results == json.loads((tmp_path / "cut" / "results.json").read_text())
    for run in ("seed0_fold1", "seed0_fold2"):
        metrics = [
            (tmp_path / w / "toy" / run / "metrics.jsonl").read_bytes() for w in ("ref", "cut")
        ]
        assert metrics[0] == metrics[1]


@pytest.mark.slow
def test_a_program_equals_its_runs_one_at_a_time(toy, tmp_path):
    """Two runs as one program or as programs of one run: the same table (accuracies are
    identical; parameters agree to float rounding, tests/train/test_loop.py); an error stops the
    program and the same command then resumes to the same results."""

    def train(workdir, per_program, hooks=None):
        cfg = tiny_config(tmp_path / f"cfg{per_program}.py", toy, num_epochs=2,
                          runs_per_program=per_program)  # fmt: skip
        config = config_lib.load(cfg)
        return trainer.run(config, workdir, progress=False, hooks=hooks)

    alone = train(tmp_path / "alone", 1)
    assert sorted(p.name for p in (tmp_path / "alone" / "programs").iterdir()) == [
        "toy-1of2", "toy-2of2"
    ]  # fmt: skip
    failed = []

    def fail_once(step):
        if not failed:
            failed.append(step)
            raise _Stop

    with pytest.raises(_Stop):
        train(tmp_path / "both", 0, progress.Hooks(after_fetch=fail_once))
    both = train(tmp_path / "both", 0)
    for a, b in zip(alone["records"], both["records"], strict=True):
        assert a["best_accuracy"] == b["best_accuracy"] and a["best_epoch"] == b["best_epoch"]
        assert a["final_accuracy"] == b["final_accuracy"]
    assert alone["best"] == both["best"] and alone["final"] == both["final"]


@pytest.mark.slow
def test_predictor_reads_the_recorded_config_and_exports(toy, tmp_path):
    cfg = tiny_config(tmp_path / "cfg.py", toy, num_epochs=1)
    config = config_lib.load(cfg)
    datasets = trainer.check(config, tmp_path / "w").datasets
    trainer.run(config, tmp_path / "w", progress=False)
    run_dir = tmp_path / "w" / "toy" / "seed0_fold1"
    predictor = Predictor.from_run(run_dir)
    source = datasets[0].source
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
    best = run_dir / "best_state.msgpack"
    data = bytearray(best.read_bytes())
    data[len(data) // 2] ^= 1
    best.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its digest"):
        Predictor.from_run(run_dir)


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
    data = open_folds(config, "toy")
    steps = Steps(config, 2, data.input_shape)
    first = steps.init_state([0])
    first_conv = np.asarray(first.params["conv1"]["kernel"])
    feed = feeds.DeviceFeed(steps, data.source, 2)
    plan = feeds.Plan((data.folds[0][0],), (data.folds[0][1],), (0,))
    (out,) = trainer.train_program(steps, feed, plan, tmp_path / "run")
    params = out.final_state.params
    np.testing.assert_array_equal(params["attention"]["delta"], 0.0)
    np.testing.assert_array_equal(params["attention"]["xi"], 2.0)
    assert not np.array_equal(params["conv1"]["kernel"], first_conv[0])


@pytest.mark.slow  # one -O3 compile (~15 s): started first
def test_init_compiled_at_o1_is_bit_identical(library_init_options):
    """The initial states, compiled at -O1 on CPU to save a second per process, equal the
    default (-O3) compile bit for bit (so results do not depend on the option)."""
    config = config_lib.load("configs/default.py")
    steps = Steps(config, 2, (6, 384))
    seeds = np.array([0, 1, 12345], np.uint32)
    lowered = jax.jit(jax.vmap(steps._create)).lower(seeds)
    # As in a user's process: XLA's default emitters, which the test flags (conftest.py) turn off
    # where XLA has the option.
    has_option = os.environ.get("GAAM_TEST_HAS_XLA_CPU_USE_FUSION_EMITTERS") == "1"
    user = {"xla_cpu_use_fusion_emitters": True} if has_option else {}
    library_init_options["cpu"] = {**library_init_options["cpu"], **user}
    default = lowered.compile(compiler_options={"xla_backend_optimization_level": 3, **user})
    _assert_same(steps.init_state(seeds), default(seeds))
