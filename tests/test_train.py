"""Training: the loop, resume after a kill, corrupt checkpoints, errors, reports, export."""

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
from train import __main__ as cli
from train import config as config_lib
from train import losses, plateau, report
from train.checkpointing import Checkpoints
from train.cross_validation import folds_for
from train.inference import Predictor, load_exported
from train.trainer import NonFiniteLossError, Trainer, train_run

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    return toy_features(folder)


def _setup(toy, tmp_path, **overrides):
    config = config_lib.load(tiny_config(tmp_path / "cfg.py", toy, **overrides))
    source, info = pipeline.load_features(toy)
    train_idx, val_idx = folds_for(config, source)[0]
    trainer = Trainer(config, 2, info.features["features"].shape)
    return config, source, info, trainer, train_idx, val_idx


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_training_learns_the_toy_task(toy, tmp_path):
    config, source, _, trainer, tr, va = _setup(toy, tmp_path, num_epochs=6)
    out = train_run(trainer, source, tr, va, tmp_path / "run", seed=0, progress=False)
    history = out["history"]
    assert len(history) == 6
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert out["best_accuracy"] >= 0.9
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 7))
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents*"))


def test_resume_mid_epoch_is_bit_exact(toy, tmp_path):
    config, source, _, trainer, tr, va = _setup(toy, tmp_path)
    full = train_run(trainer, source, tr, va, tmp_path / "full", seed=0, progress=False)
    with pytest.raises(KeyboardInterrupt):  # stop in epoch 3, after the checkpoint at step 12
        train_run(
            trainer, source, tr, va, tmp_path / "cut", seed=0, progress=False, stop_after_steps=13
        )
    resumed = train_run(trainer, source, tr, va, tmp_path / "cut", seed=0, progress=False)
    for a, b in zip(_leaves(full["final_state"]), _leaves(resumed["final_state"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert full["history"] == resumed["history"]


def _train_cli(config_path, workdir):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "train", "--config", str(config_path), "--workdir", str(workdir)]
    return subprocess.Popen(
        cmd + ["--no-progress"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _final_params(workdir, config, info):
    predictor = Predictor.from_run(workdir / "toy" / "seed0_fold2", config, info)
    ckpt = Checkpoints(workdir / "toy" / "seed0_fold2" / "checkpoints")
    trainer = Trainer(config, 2, info.features["features"].shape)
    state, meta = ckpt.restore_latest(trainer.init_state(0))
    ckpt.close()
    return state, meta, predictor


@pytest.mark.slow
def test_sigkill_and_restart_gives_the_same_result(toy, tmp_path):
    cfg = tiny_config(tmp_path / "cfg.py", toy, num_epochs=6)
    config = config_lib.load(cfg)
    _, info = pipeline.load_features(toy)
    reference = _train_cli(cfg, tmp_path / "ref")
    assert reference.wait(timeout=300) == 0, reference.stdout.read().decode()

    victim = _train_cli(cfg, tmp_path / "cut")
    # Kill it while it is training the second fold, at an arbitrary moment after a checkpoint.
    deadline = time.time() + 240
    fold2 = tmp_path / "cut" / "toy" / "seed0_fold2" / "checkpoints" / "latest"
    while time.time() < deadline and not (fold2.exists() and any(fold2.iterdir())):
        time.sleep(0.05)
    time.sleep(0.3)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "cut" / "results.json").exists(), "the run finished before the kill"

    again = _train_cli(cfg, tmp_path / "cut")
    assert again.wait(timeout=300) == 0, again.stdout.read().decode()
    ref_state, ref_meta, _ = _final_params(tmp_path / "ref", config, info)
    cut_state, cut_meta, _ = _final_params(tmp_path / "cut", config, info)
    for a, b in zip(_leaves(ref_state), _leaves(cut_state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert ref_meta["history"] == cut_meta["history"]
    ref_results = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert ref_results == json.loads((tmp_path / "cut" / "results.json").read_text())


def test_corrupt_latest_checkpoint_is_skipped(toy, tmp_path, capsys):
    config, source, _, trainer, tr, va = _setup(
        toy, tmp_path, num_epochs=2, checkpoint_every_steps=0
    )
    train_run(trainer, source, tr, va, tmp_path / "run", seed=0, progress=False)
    latest = tmp_path / "run" / "checkpoints" / "latest"
    steps = sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit())
    assert len(steps) == 2
    for f in (latest / str(steps[-1]) / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    ckpt = Checkpoints(tmp_path / "run" / "checkpoints")
    state, meta = ckpt.restore_latest(trainer.init_state(0))
    ckpt.close()
    assert meta["epoch"] == 1 and int(state.step) == steps[0]
    assert "skipping unreadable checkpoint" in capsys.readouterr().out


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(toy, tmp_path):
    config, source, _, trainer, tr, va = _setup(
        toy, tmp_path, num_epochs=1, checkpoint_every_steps=0
    )
    train_run(trainer, source, tr, va, tmp_path / "run", seed=0, progress=False)
    config.num_epochs = 3
    broken = Trainer(config, 2, trainer.input_shape)
    broken.loss_fn = lambda logits, labels: jnp.full(logits.shape[:1], jnp.nan)
    broken._train_steps.clear()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 6 \(epoch 2\)"):
        train_run(broken, source, tr, va, tmp_path / "run", seed=0, progress=False)
    ckpt = Checkpoints(tmp_path / "run" / "checkpoints")
    state, meta = ckpt.restore_latest(trainer.init_state(0))
    ckpt.close()
    assert meta["epoch"] == 1 and int(state.step) == 5
    chex.assert_tree_all_finite(state.params)


def test_cli_errors_name_the_cause(toy, tmp_path, capsys):
    cfg = tiny_config(tmp_path / "cfg.py", toy)
    assert (
        cli.main(["--config", str(cfg), "--workdir", str(tmp_path), "--config.optimizer.lr=1"]) == 2
    )
    err = capsys.readouterr().err
    assert "unknown config key 'optimizer.lr'" in err and "optimizer.learning_rate" in err
    assert (
        cli.main(["--config", str(cfg), "--workdir", str(tmp_path), "--config.batch_size=x"]) == 2
    )
    assert "cannot parse 'x' as int" in capsys.readouterr().err
    missing = tiny_config(tmp_path / "missing.py", tmp_path / "nowhere")
    assert cli.main(["--config", str(missing), "--workdir", str(tmp_path / "w")]) == 2
    assert "python -m data.extract" in capsys.readouterr().err
    (tmp_path / "broken.py").write_text("def get_config():\n    return {}\n")
    assert cli.main(["--config", str(tmp_path / "broken.py"), "--workdir", str(tmp_path)]) == 2
    assert "lacks the keys" in capsys.readouterr().err


def test_overrides_are_typed(toy, tmp_path):
    config = config_lib.load(tiny_config(tmp_path / "cfg.py", toy))
    config_lib.apply_overrides(
        config, ["optimizer.learning_rate=1e-3", "seeds=(1, 2)", "model.front=mha"]
    )
    assert config.optimizer.learning_rate == 1e-3 and config.seeds == (1, 2)
    assert config.model.front == "mha"


def test_report_table_uses_population_std():
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
        scales.append(state["scale"])
    assert scales == [1.0, 1.0, 1.0, 1.0, 0.1, 0.1]
    assert state["best"] == 0.7 and state["bad_epochs"] == 0


def test_export_round_trip_without_model_code(toy, tmp_path):
    config, source, info, trainer, tr, va = _setup(toy, tmp_path, num_epochs=1)
    train_run(trainer, source, tr, va, tmp_path / "run", seed=0, progress=False)
    predictor = Predictor.from_run(tmp_path / "run", config, info)
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


def test_training_loss_falls_on_real_minilm_features(tfds_dir, tmp_path):
    from data import extract

    path = extract.extract(
        "pang_lee_polarity", tfds_dir, encoder=extract.TextEncoder(max_length=64), progress=False,
        shards_dir=tmp_path / "shards",
    )  # fmt: skip
    config = config_lib.load(tiny_config(tmp_path / "cfg.py", path, num_epochs=5, k=5))
    config.model.num_heads = 2  # 6 MiniLM layers: 2 heads of 3
    source, info = pipeline.load_features(path)
    train_idx, val_idx = folds_for(config, source)[0]
    trainer = Trainer(config, 2, info.features["features"].shape)
    out = train_run(trainer, source, train_idx, val_idx, tmp_path / "run", seed=0, progress=False)
    losses_by_epoch = [r["train_loss"] for r in out["history"]]
    assert losses_by_epoch[-1] < 0.9 * losses_by_epoch[0], losses_by_epoch
    assert out["best_accuracy"] > 0.6  # above chance (0.5) on held-out sentences


def test_frozen_parameters_are_never_updated(toy, tmp_path):
    config = config_lib.load(tiny_config(tmp_path / "cfg.py", toy, num_epochs=2))
    config.optimizer.frozen = ("^attention/",)  # the frozen-GAAM baseline
    source, info = pipeline.load_features(toy)
    tr, va = folds_for(config, source)[0]
    trainer = Trainer(config, 2, info.features["features"].shape)
    first = trainer.init_state(0)
    out = train_run(trainer, source, tr, va, tmp_path / "run", seed=0, progress=False)
    params = out["final_state"].params
    np.testing.assert_array_equal(params["attention"]["delta"], 0.0)
    np.testing.assert_array_equal(params["attention"]["xi"], 2.0)
    assert not np.array_equal(params["conv1"]["kernel"], first.params["conv1"]["kernel"])
    config.optimizer.frozen = ("^nothing/",)
    with pytest.raises(ValueError, match="matches no parameter.*attention/delta"):
        Trainer(config, 2, info.features["features"].shape).init_state(0)


def test_config_argument_selects_a_variant():
    assert config_lib.load("configs/reproduce.py:frozen").optimizer.frozen == ("^attention/",)
    assert config_lib.load("configs/reproduce.py").model.front == "gaam"
    with pytest.raises(ValueError, match="variant must be one of"):
        config_lib.load("configs/reproduce.py:nope")
    with pytest.raises(ValueError, match="does not take 'x'"):
        config_lib.load("configs/default.py:x")


def test_concat_source_indexes_its_parts():
    both = pipeline.ConcatSource([[10, 11, 12], [20, 21]])
    assert len(both) == 5 and [both[i] for i in range(5)] == [10, 11, 12, 20, 21]
    np.testing.assert_array_equal(both.indices(1), [3, 4])
    with pytest.raises(IndexError):
        both[5]
