"""Feeds (train/feeds.py): stacked epoch orders and evaluation plans, device vs grain, labels."""

import chex
import numpy as np
import pytest
from train_helpers import toy_program

from data import pipeline
from train import feeds, trainer
from train.steps import stacked_zeros


def test_epoch_orders_stack_runs_and_mask_the_short_ones():
    plan = feeds.Plan((np.arange(40), np.arange(100, 124)), (np.arange(3), np.arange(5)), (1, 2))
    order, active = feeds.epoch_orders(plan, 8, epoch=3)
    assert order.shape == (2, 5, 8) and order.dtype == np.int32
    np.testing.assert_array_equal(active, [[True] * 5, [True] * 3 + [False] * 2])
    for r in range(2):  # each run's rows are its own epoch order
        own = pipeline.epoch_order(plan.train[r], batch_size=8, seed=plan.seeds[r], epoch=3)
        np.testing.assert_array_equal(order[r, : len(own)], own)
    padded = feeds.pad(plan, 4)
    assert padded.runs == 4 and padded.padding == 2
    assert not feeds.epoch_orders(padded, 8, epoch=0)[1][2:].any()  # padding never steps
    ev, valid = feeds.eval_plan(plan, 64)
    assert ev.shape == (2, 1, 8) and valid.sum(axis=(1, 2)).tolist() == [3, 5]


@pytest.mark.parametrize("processes", [1, 2])
def test_evaluation_sees_every_example_exactly_once(processes):
    """The padded plan, split by rows over processes as the grain feed reads it."""
    plan = feeds.Plan((np.arange(40),) * 2, (np.arange(21), np.arange(30, 35)), (0, 1))
    order, valid = feeds.eval_plan(plan, 8, multiple=8)
    for r, expected in enumerate(plan.val):
        seen = []
        for p in range(processes):
            rows, ok = order[r, :, p::processes], valid[r, :, p::processes]
            seen += rows[ok].tolist()
        assert sorted(seen) == expected.tolist()


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    idx = np.arange(3, 77)
    a = pipeline.epoch_order(idx, batch_size=8, seed=5, epoch=2)
    np.testing.assert_array_equal(a, pipeline.epoch_order(idx, batch_size=8, seed=5, epoch=2))
    assert not np.array_equal(a, pipeline.epoch_order(idx, batch_size=8, seed=5, epoch=3))
    assert not np.array_equal(a, pipeline.epoch_order(idx, batch_size=8, seed=6, epoch=2))
    assert a.shape == (9, 8) and len(set(a.reshape(-1).tolist())) == 72


@pytest.mark.slow
def test_device_feed_batches_like_grain(toy, tmp_path):
    """Both feeds see the same batches; the losses agree to float32 rounding."""
    config, _, steps, device, plan = toy_program(toy, tmp_path, folds=(0, 1), num_epochs=2)
    *_, g_steps, grain_feed, _ = toy_program(toy, tmp_path, folds=(0, 1), on_device=False,
                                             num_epochs=2)  # fmt: skip
    a = trainer.train_program(steps, device, plan, tmp_path / "device", config=config)
    b = trainer.train_program(g_steps, grain_feed, plan, tmp_path / "grain", config=config)
    for ra, rb in zip(a, b, strict=True):
        for ha, hb in zip(ra.history, rb.history, strict=True):
            assert ha["val_accuracy"] == hb["val_accuracy"]
            np.testing.assert_allclose(ha["train_loss"], hb["train_loss"], rtol=1e-5)
        chex.assert_trees_all_close(ra.final_state.params, rb.final_state.params, atol=1e-5)


def test_labels_are_checked_through_the_api(toy, tmp_path):
    _, data, steps, _, plan = toy_program(toy, tmp_path)
    with pytest.raises(ValueError, match=r"label 1, outside \[0, 1\)"):
        feeds.DeviceFeed(steps, data.source, 1)
    bad = [dict(data.source[i]) for i in range(len(data.source))]
    bad[7]["label"] = -1
    with pytest.raises(ValueError, match=r"example id \d+ has label -1"):
        feeds.DeviceFeed(steps, bad, 2)
    grain_feed = feeds.GrainFeed(steps, bad, 2)
    orders = (np.full((1, 1, 8), 7), np.ones((1, 1), bool))
    with pytest.raises(ValueError, match="has label -1"):
        grain_feed.train(steps.init_state([0]), stacked_zeros(1), orders, 0, 1)
