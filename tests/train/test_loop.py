"""The training loop (train.trainer.train_program): learning, the run axis, fetch points,
resume, rollback."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import Stop, stop_after, toy_program

from gaam_jax import sharding
from train import feeds, losses, progress, trainer
from train.checkpointing import Checkpoints
from train.metrics import RunMetrics
from train.steps import Steps

# A run of a vmapped program against the same run alone: XLA batches the run axis into its
# matmuls and reductions, which changes float32 summation order (not the arithmetic). After
# 24 AdamW steps the parameters differ by a few ulps amplified by the optimiser: measured
# 2.7e-7 relative on the toy task; 1e-5 leaves a 40x margin and still catches any mixing of
# runs (which moves parameters by 1e-2 or more).
VMAP_RTOL = 1e-5


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def _assert_same(a, b):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_training_learns_the_toy_task(toy, tmp_path):
    # One checkpoint, at the end (a save costs more than an epoch here).
    config, _, steps, feed, plan = toy_program(toy, tmp_path, num_epochs=6,
                                               checkpoint_every_epochs=6)  # fmt: skip
    (out,) = trainer.train_program(
        steps, feed, plan, tmp_path / "ckpt", metrics=[RunMetrics(tmp_path, {})], config=config
    )
    assert len(out.history) == 6
    assert out.history[-1]["train_loss"] < 0.8 * out.history[0]["train_loss"]
    assert out.best_accuracy >= 0.9
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 7))
    assert out.best_eval["gate_total"].shape == (4, 16)  # the IF comes from the evaluation


@pytest.mark.slow
def test_each_run_of_a_program_equals_the_run_alone(toy, tmp_path):
    """Three runs (two folds, one cut to fewer batches, two seeds) vmapped as one program: each
    equals the same run trained alone, to float rounding; the short run's masked steps change
    nothing. (All three vmapped together, as on an accelerator; CPU's default loops them.)"""
    folds, seeds = (0, 1, 0), (0, 0, 7)
    config, data, steps, feed, plan = toy_program(toy, tmp_path, folds=folds, seeds=seeds,
                                                  num_epochs=2, checkpoint_every_epochs=2,
                                                  runs_vectorized=0)  # fmt: skip
    plan = feeds.Plan((plan.train[0], plan.train[1][:37], plan.train[2]), plan.val, seeds)
    assert [len(t) // 8 for t in plan.train] == [5, 4, 5]
    together = trainer.train_program(steps, feed, plan, tmp_path / "together", config=config)
    # Alone: a program of one run, as every one-run test compiles it (CPU's default).
    *_, alone_steps, alone_feed, _ = toy_program(toy, tmp_path, num_epochs=2)
    for r, seed in enumerate(seeds):
        alone_plan = feeds.Plan(plan.train[r : r + 1], plan.val[r : r + 1], (seed,))
        (alone,) = trainer.train_program(
            alone_steps, alone_feed, alone_plan, tmp_path / f"alone{r}", config=config
        )
        got = together[r]
        assert [h["step"] for h in got.history] == [h["step"] for h in alone.history]
        assert [h["val_accuracy"] for h in got.history] == [
            h["val_accuracy"] for h in alone.history
        ]
        assert got.best_epoch == alone.best_epoch
        np.testing.assert_allclose(
            [h["train_loss"] for h in got.history], [h["train_loss"] for h in alone.history],
            rtol=VMAP_RTOL,
        )  # fmt: skip
        for a, b in zip(_leaves(got.final_state.params), _leaves(alone.final_state.params),
                        strict=True):  # fmt: skip
            np.testing.assert_allclose(a, b, rtol=VMAP_RTOL, atol=VMAP_RTOL * np.abs(b).max())
        assert int(got.final_state.step) == 2 * (len(plan.train[r]) // 8)


@pytest.mark.slow
def test_fetch_interval_does_not_change_the_result(toy, tmp_path):
    """Mid-epoch fetch points split the jitted stretches; the arithmetic must not change."""
    config, _, steps, feed, plan = toy_program(toy, tmp_path, num_epochs=2)
    (a,) = trainer.train_program(steps, feed, plan, tmp_path / "a", config=config)
    config, _, steps, feed, plan = toy_program(
        toy, tmp_path, num_epochs=2, checkpoint_every_steps=2
    )
    (b,) = trainer.train_program(steps, feed, plan, tmp_path / "b", config=config)
    _assert_same(a.final_state, b.final_state)
    assert a.history == b.history


@pytest.mark.slow
@pytest.mark.parametrize("on_device", [True, False])
def test_resume_mid_epoch_is_bit_exact(toy, tmp_path, on_device):
    folds = (0, 1) if on_device else (0,)  # the run axis once; grain reads every row slowly
    # 4 epochs of 5 steps; checkpoints at step 12 (mid-epoch 3) and at the end only.
    config, _, steps, feed, plan = toy_program(
        toy, tmp_path, folds=folds, on_device=on_device, checkpoint_every_steps=12,
        checkpoint_every_epochs=4,
    )  # fmt: skip
    full = trainer.train_program(steps, feed, plan, tmp_path / "full", config=config)
    program = steps.programs["train_steps" if on_device else "train_step"]
    compiled = (program._cache_size(), steps.epoch_end._cache_size())
    with pytest.raises(Stop):  # in epoch 3, right after the mid-epoch checkpoint at step 12
        trainer.train_program(
            steps, feed, plan, tmp_path / "cut", config=config, hooks=stop_after(12)
        )
    resumed = trainer.train_program(steps, feed, plan, tmp_path / "cut", config=config)
    for f, r in zip(full, resumed, strict=True):
        _assert_same(f.final_state, r.final_state)
        _assert_same(f.best_state, r.best_state)
        assert f.history == r.history
    # Restored states and mid-epoch sums are placed (and typed) as the programs return them:
    # resuming compiles nothing new.
    assert (program._cache_size(), steps.epoch_end._cache_size()) == compiled


def test_non_finite_loss_stops_and_rolls_back(toy, tmp_path, monkeypatch):
    config, data, steps, feed, plan = toy_program(toy, tmp_path, num_epochs=1)
    trainer.train_program(steps, feed, plan, tmp_path / "ckpt", config=config)
    config.num_epochs = 3
    # Resume with a loss that is NaN from the first new step (6) on.
    monkeypatch.setattr(losses, "get", lambda name: lambda lg, lb: jnp.full(lg.shape[:1], jnp.nan))
    broken = Steps(config, 2, data.input_shape)
    feed.steps = broken
    with pytest.raises(
        progress.NonFiniteLossError, match=r"run 0 \(toy seed 0 fold 1\) at its step 6 .*step 5"
    ):
        trainer.train_program(broken, feed, plan, tmp_path / "ckpt")
    ckpt = Checkpoints(tmp_path / "ckpt", asynchronous=False)
    assert ckpt.verified_steps() == [5]
    state, _, meta = ckpt.restore(broken.abstract_state(1))
    ckpt.close()
    assert meta["epoch"] == 1 and int(state.step[0]) == 5
    assert all(np.isfinite(x).all() for x in _leaves(state.params))


def test_one_compile_serves_every_seed_and_fold(toy, tmp_path):
    config, _, steps, feed, plan = toy_program(toy, tmp_path, folds=(0, 1), num_epochs=1)
    trainer.train_program(steps, feed, plan, tmp_path / "a", config=config)
    before = steps.programs["train_steps"]._cache_size()
    other = feeds.Plan(plan.train[::-1], plan.val[::-1], (3, 4))
    trainer.train_program(steps, feed, other, tmp_path / "b", config=config)
    assert steps.programs["train_steps"]._cache_size() == before
    a = steps.init_state([0, 1])
    assert not np.array_equal(a.params["conv1"]["kernel"][0], a.params["conv1"]["kernel"][1])


@pytest.mark.slow
def test_ten_runs_split_over_eight_devices_equal_the_unsharded_program(toy, tmp_path):
    """The run axis on a mesh: 10 runs padded to 16 (2 per device, padding never steps).

    Equal to float rounding: split over devices, XLA sums each run's evaluation in another
    order (measured: validation losses 1 ulp apart); accuracies and steps are identical.
    """
    assert len(jax.devices()) == 8
    folds, seeds = (0, 1) * 5, tuple(range(10))
    config, _, steps, feed, plan = toy_program(toy, tmp_path, folds=folds, seeds=seeds,
                                               num_epochs=1)  # fmt: skip
    plain = trainer.train_program(steps, feed, plan, tmp_path / "plain", config=config)
    mesh = sharding.make_mesh({"runs": 8})
    config, _, sharded_steps, sharded_feed, plan = toy_program(
        toy, tmp_path, folds=folds, seeds=seeds, num_epochs=1, mesh=mesh
    )
    assert sharded_steps.runs_multiple() == 8
    state = sharded_steps.init_state(feeds.pad(plan, 8).seeds)
    assert state.params["conv1"]["kernel"].sharding.spec[0] == "runs"
    sharded = trainer.train_program(
        sharded_steps, sharded_feed, plan, tmp_path / "sh", config=config
    )
    assert len(sharded) == 10
    for a, b in zip(plain, sharded, strict=True):
        for ha, hb in zip(a.history, b.history, strict=True):
            assert ha["val_accuracy"] == hb["val_accuracy"] and ha["step"] == hb["step"]
            np.testing.assert_allclose(ha["val_loss"], hb["val_loss"], rtol=VMAP_RTOL)
            np.testing.assert_allclose(ha["train_loss"], hb["train_loss"], rtol=VMAP_RTOL)
        for x, y in zip(_leaves(a.final_state), _leaves(b.final_state), strict=True):
            np.testing.assert_allclose(x, y, rtol=VMAP_RTOL, atol=VMAP_RTOL * np.abs(y).max())


def test_log_every_steps_writes_training_lines(toy, tmp_path):
    """Training lines at the global steps ``log_every_steps`` divides (the epoch's running means),
    epoch lines after each evaluation; a resume keeps the lines it had checkpointed."""
    config, _, steps, feed, plan = toy_program(toy, tmp_path, num_epochs=2, log_every_steps=2)
    seen = []

    class Seen(RunMetrics):  # every new line, as TensorBoard gets it
        def write(self, lines, new, *, durable):
            seen.append(new)
            super().write(lines, new, durable=durable)

    (out,) = trainer.train_program(steps, feed, plan, tmp_path / "c",
                                   metrics=[Seen(tmp_path, {})], config=config)  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == seen
    assert [(x["step"], "val_accuracy" in x) for x in lines] == [
        (2, False), (4, False), (5, True), (6, False), (8, False), (10, True)
    ]  # fmt: skip
    assert lines[0]["steps_per_second"] is None and lines[1]["steps_per_second"] > 0
    assert lines[1]["learning_rate"] == config.optimizer.learning_rate
    assert out.history == [x for x in lines if "val_accuracy" in x]
