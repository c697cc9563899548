"""Input pipeline guarantees and cross-validation splits."""

import numpy as np
import pytest

from data import pipeline


class ToySource:
    """A random-access source shaped like encoder_features records."""

    def __init__(self, n=50, layers=3, dim=4, bad=None):
        self.n, self.shape, self.bad = n, (layers, dim), bad

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = np.full(self.shape, float(i), np.float32)
        if i == self.bad:
            x[0, 0] = np.nan
        return {"features": x, "label": i % 3, "id": 1000 + i, "group": i % 5}


SRC = ToySource()
IDX = np.arange(50)


def test_training_order_differs_per_epoch_and_replays():
    def order(seed, epoch):
        return pipeline.epoch_order(IDX, batch_size=8, seed=seed, epoch=epoch).tolist()

    e0, e1, again, other_seed = order(1, 0), order(1, 1), order(1, 0), order(2, 0)
    assert e0 == again and e0 != e1 and e0 != other_seed
    assert len(e0) == 6 and all(len(b) == 8 for b in e0)  # 50 // 8, remainder dropped
    flat = sum(e0, [])
    assert len(set(flat)) == 48 and set(flat) <= set(range(50))
    with pytest.raises(ValueError, match="do not fill one batch"):
        pipeline.epoch_order(IDX[:3], batch_size=8, seed=0, epoch=0)


def test_bad_records_name_the_example():
    view = pipeline.FeatureSource(ToySource(bad=7), IDX)
    assert view[3]["id"] == 1003
    with pytest.raises(ValueError, match="example id 1007: features contain NaN"):
        view[7]


def test_stratified_kfold():
    labels = np.array([0] * 30 + [1] * 12 + [2] * 8)
    folds = pipeline.stratified_kfold(labels, 5, seed=0)
    val = np.concatenate([v for _, v in folds])
    assert sorted(val.tolist()) == list(range(50))  # every example validated once
    for train, v in folds:
        assert not set(train) & set(v) and len(train) + len(v) == 50
        counts = np.bincount(labels[v], minlength=3)
        assert counts[0] == 6 and counts[1] in (2, 3) and counts[2] in (1, 2)  # per-class shares
        assert len(v) == 10  # dealt round-robin across classes, so folds are equal in size
    again = pipeline.stratified_kfold(labels, 5, seed=0)
    assert all((a[1] == b[1]).all() for a, b in zip(folds, again, strict=True))
    other = pipeline.stratified_kfold(labels, 5, seed=1)
    assert any((a[1] != b[1]).any() for a, b in zip(folds, other, strict=True))
    with pytest.raises(ValueError, match="k must be"):
        pipeline.stratified_kfold(labels, 1, seed=0)


def test_leave_one_group_out_in_group_order():
    groups = np.array([3, 1, 2, 1, 3, 2, 5])
    folds = pipeline.leave_one_group_out(groups)
    assert [groups[v][0] for _, v in folds] == [1, 2, 3, 5]
    for train, val in folds:
        assert len(set(groups[val])) == 1 and groups[val][0] not in set(groups[train])
    with pytest.raises(ValueError, match="at least 2 groups"):
        pipeline.leave_one_group_out([4, 4])
