"""Input pipelines over tfds data sources: epoch orders, evaluation batches, CV splits.

Guarantees (each tested in tests/data/test_data_pipeline.py):

* **Training** batches come from a seeded shuffle that differs per epoch and replays exactly
  (the order is a pure function of ``(seed, epoch)``), with ``drop_remainder``; a run resumed
  mid-epoch needs only its position in the epoch.
* **Cross-validation**: stratified k-fold and leave-one-group-out (e.g. IEMOCAP sessions),
  deterministic for a seed.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "ConcatSource",
    "FeatureSource",
    "epoch_order",
    "leave_one_group_out",
    "load_features",
    "stratified_kfold",
]


def load_features(path: str | pathlib.Path, split: str = "train") -> tuple[Any, Any]:
    """Opens a built ``encoder_features`` dataset folder: returns ``(data_source, info)``.

    Args:
      path: the dataset version folder, e.g.
        ``<data_dir>/encoder_features/pang_lee_polarity_minilm_mean/1.0.0``, or its URL on an
        object store (``gs://...``), which is copied once into a local cache and read there
        (:func:`app.storage.local_copy`: the array_record reader reads local files only).
      split: the split to open.

    Raises:
      FileNotFoundError: with the command that builds it, if it does not exist.
    """
    import tensorflow_datasets as tfds

    from app import storage

    path = storage.path(path)
    if not (path / "dataset_info.json").exists():
        raise FileNotFoundError(
            f"no feature dataset at {path}. Build it with: python -m data.extract --dataset "
            "<name> --data-dir <data_dir>"
        )
    if storage.is_url(path):
        path = storage.local_copy(path)
    builder = tfds.builder_from_directory(str(path))
    return builder.as_data_source(split=split), builder.info


class ConcatSource:
    """Random access over several data sources, one after another (a train and a test split).

    Index ``i`` of the concatenation is index ``i - offsets[k]`` of source ``k``.
    """

    def __init__(self, sources: Sequence[Any]):
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> Any:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} examples.")
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.sources[k][i - int(self.offsets[k])]

    def indices(self, k: int) -> np.ndarray:
        """The indices of source ``k`` inside the concatenation."""
        return np.arange(self.offsets[k], self.offsets[k + 1])


class ArraySource:
    """Examples held as arrays: preprocessed model inputs (fine-tuning), labels and ids.

    ``arrays`` is what :class:`train.feeds.DeviceFeed` places on the device: ``x`` (a dict of
    model inputs, each ``[n, ...]``), ``label`` int32 ``[n]``, ``id`` int64 ``[n]``. Indexing
    gives ``{'label', 'id'}`` (what fold cutting and reports read).
    """

    def __init__(self, inputs: dict[str, np.ndarray], labels: np.ndarray, ids: np.ndarray):
        n = len(labels)
        bad = {k: v.shape for k, v in inputs.items() if len(v) != n}
        if bad or len(ids) != n:
            raise ValueError(f"inputs {bad} and {len(ids)} ids must all have {n} rows.")
        self.arrays = {
            "x": {k: np.asarray(v) for k, v in inputs.items()},
            "label": np.asarray(labels, np.int32),
            "id": np.asarray(ids, np.int64),
        }

    def __len__(self) -> int:
        return len(self.arrays["label"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"label": int(self.arrays["label"][i]), "id": int(self.arrays["id"][i])}


def concatenate(sources: Sequence[Any]) -> Any:
    """Several sources one after another (one source is returned as it is).

    Returns an :class:`ArraySource` of concatenated arrays when every source is one, else a
    :class:`ConcatSource` view.
    """
    if len(sources) == 1:
        return sources[0]
    if all(isinstance(s, ArraySource) for s in sources):
        parts = [s.arrays for s in sources]
        inputs = {k: np.concatenate([p["x"][k] for p in parts]) for k in parts[0]["x"]}
        return ArraySource(
            inputs,
            np.concatenate([p["label"] for p in parts]),
            np.concatenate([p["id"] for p in parts]),
        )
    return ConcatSource(sources)


@dataclasses.dataclass(frozen=True)
class FeatureSource:
    """A random-access view of ``source`` restricted to ``indices``, yielding model inputs.

    Each record becomes ``{'x': float32 [N, d], 'label': int32, 'id': int64}``; a record whose
    features are not finite raises a ValueError naming its id. Features that are a dict of model
    inputs (raw examples, :class:`train.finetune.RawSource`) are kept as they are, their
    floating-point inputs checked the same way.
    """

    source: Any
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        record = self.source[int(self.indices[i])]
        x = record["features"]
        if isinstance(x, dict):  # model inputs (token ids and mask, pixels, waveform)
            for v in x.values():
                if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.all(np.isfinite(v)):
                    raise ValueError(f"example id {record['id']}: inputs contain NaN or Inf.")
        else:
            x = np.asarray(x, np.float32)
            if not np.all(np.isfinite(x)):
                raise ValueError(f"example id {record['id']}: features contain NaN or Inf.")
        return {"x": x, "label": np.int32(record["label"]), "id": np.int64(record["id"])}


def epoch_order(indices: Sequence[int], *, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """The global training batches of one epoch as example indices: int64 ``[steps, batch]``.

    A seeded shuffle of ``indices`` (a pure function of ``(seed, epoch)``), then
    ``drop_remainder``, computed without reading any example: a dataset held in device memory is
    batched there by indexing, and the grain feed reads its batches in this order.
    """
    indices = np.asarray(indices)
    steps = len(indices) // batch_size
    if batch_size <= 0 or steps == 0:
        raise ValueError(f"{len(indices)} training examples do not fill one batch of {batch_size}.")
    # PCG64 from the (seed, epoch) pair: microseconds per epoch, stable across platforms and
    # numpy versions (numpy's stream compatibility policy for Generator.permutation).
    perm = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return indices[perm.permutation(len(indices))[: steps * batch_size]].reshape(steps, batch_size)


def stratified_kfold(
    labels: Sequence[int], k: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold: each class is shuffled and dealt round-robin into ``k`` folds.

    Returns:
      ``k`` pairs ``(train_indices, val_indices)`` (sorted); every index is validated once.
    """
    labels = np.asarray(labels)
    if k < 2 or k > len(labels):
        raise ValueError(f"k must be in [2, {len(labels)}], got {k}.")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), np.int64)
    offset = 0
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        fold_of[members] = (offset + np.arange(len(members))) % k
        offset += len(members)  # continue the deal so fold sizes stay balanced
    return [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(k)]


def leave_one_group_out(groups: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """One fold per group, in increasing group order (IEMOCAP: fold k = Session k)."""
    groups = np.asarray(groups)
    values = np.unique(groups)
    if len(values) < 2:
        raise ValueError(f"leave-one-group-out needs at least 2 groups, got {values.tolist()}.")
    return [(np.flatnonzero(groups != g), np.flatnonzero(groups == g)) for g in values]
