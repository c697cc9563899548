"""How batches reach the steps: from a dataset held in device memory, or through grain.

Both feeds take an epoch's order from :func:`data.pipeline.epoch_order` (a pure function of
seed and epoch), so they train on the same batches in the same order, and a run resumed
mid-epoch needs only its step number to continue.

* :class:`DeviceFeed` places every example of the dataset on the device once and runs a whole
  stretch of steps (and a whole evaluation) per jitted call: the host never waits on a step.
* :class:`GrainFeed` reads batches from the tfds source with grain (threads, prefetch) for data
  larger than device memory; each process reads only its rows of every global batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data import pipeline
from train.steps import Steps, Sums, TrainState

# Datasets up to this many bytes of features go to device memory when ``data_on_device`` is
# "auto" (the offline sets are ~1 MB; CIFAR-100's BEiT-Large features are ~5 GB).
AUTO_DEVICE_BYTES = 1 << 30


def check_labels(labels: np.ndarray, ids: np.ndarray, num_classes: int) -> None:
    """Raises ValueError naming the first example whose label is outside ``[0, num_classes)``."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = bad[0]
        raise ValueError(
            f"example id {int(ids[i])} has label {int(labels[i])}, outside [0, {num_classes}): "
            "fix the dataset's labels or num_classes."
        )


def load_arrays(source: Any) -> dict[str, np.ndarray]:
    """Every example of ``source``: ``x`` float32 ``[n, N, d]``, ``label`` int32, ``id`` int64."""
    records = [source[i] for i in range(len(source))]
    return {
        "x": np.stack([np.asarray(r["features"], np.float32) for r in records]),
        "label": np.array([int(r["label"]) for r in records], np.int32),
        "id": np.array([int(r["id"]) for r in records], np.int64),
    }


def fits_on_device(source: Any, input_shape: tuple) -> bool:
    """Whether ``source``'s features stay under :data:`AUTO_DEVICE_BYTES` in float32."""
    return len(source) * int(np.prod(input_shape)) * 4 <= AUTO_DEVICE_BYTES


def _eval_order(
    indices: np.ndarray, batch_size: int, multiple: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """``indices`` as ``[batches, rows]`` (padded with its first example) and the valid mask.

    The batches are as few as ``batch_size`` allows and as even as possible, each padded only
    to a multiple of ``multiple`` (40 validation examples are one batch of 40, not of 64).
    """
    batches = -(-len(indices) // batch_size)
    rows = -(-len(indices) // batches)
    rows = -(-rows // multiple) * multiple
    padded = batches * rows
    order = np.concatenate([indices, np.full(padded - len(indices), indices[0])])
    valid = np.arange(padded) < len(indices)
    return order.reshape(batches, rows), valid.reshape(batches, rows)


class DeviceFeed:
    """A dataset held in device memory (replicated over a mesh), batched there by indexing.

    Args:
      steps: the compiled steps.
      source: the data source (every example is loaded once).
      num_classes: labels must lie in ``[0, num_classes)``.
    """

    def __init__(self, steps: Steps, source: Any, num_classes: int):
        arrays = load_arrays(source)
        finite = np.isfinite(arrays["x"]).reshape(len(arrays["x"]), -1).all(axis=1)
        if not finite.all():
            bad = int(arrays["id"][np.flatnonzero(~finite)[0]])
            raise ValueError(f"example id {bad}: features contain NaN or Inf.")
        check_labels(arrays["label"], arrays["id"], num_classes)
        self.steps = steps
        self.data = self._put({"x": arrays["x"], "label": arrays["label"]})

    def _put(self, tree: Any) -> Any:
        if self.steps.mesh is None:
            return jax.device_put(tree)
        return jax.tree.map(
            lambda a: jax.make_array_from_callback(a.shape, self.steps.replicated, lambda i: a[i]),
            tree,
        )

    def order(self, indices: np.ndarray, *, seed: int, epoch: int) -> jax.Array:
        """The epoch's ``[steps, batch]`` order, on device."""
        order = pipeline.epoch_order(
            indices, batch_size=self.steps.batch_size, seed=seed, epoch=epoch
        )
        return self._put(order.astype(np.int32))

    def train(
        self, state: TrainState, sums: Sums, order: jax.Array, start: int, stop: int
    ) -> tuple[TrainState, Sums]:
        """Steps ``start..stop-1`` of the epoch, in one jitted call (returns without waiting)."""
        return self.steps.train_steps(
            state, sums, self.data, order, jnp.int32(start), jnp.int32(stop)
        )

    def evaluate(self, state: TrainState, indices: np.ndarray) -> dict:
        """Metric (and gate) sums over ``indices``, in one jitted call; device arrays."""
        multiple = 8 if self.steps.mesh is None else self.steps.mesh.shape["data"]
        order, valid = _eval_order(np.asarray(indices), self.steps.config.eval_batch_size, multiple)
        return self.steps.evaluate_on_device(
            state, self.data, self._put(order.astype(np.int32)), self._put(valid)
        )


class GrainFeed:
    """Batches read from the tfds source by grain, for datasets too large for device memory.

    Args:
      steps: the compiled steps.
      source: the data source.
      num_classes: labels must lie in ``[0, num_classes)`` (checked per batch on the host).
      num_threads: grain read threads.
      prefetch: batches read ahead.
    """

    def __init__(
        self,
        steps: Steps,
        source: Any,
        num_classes: int,
        *,
        num_threads: int = 4,
        prefetch: int = 4,
    ):
        self.steps = steps
        self.source = source
        self.num_classes = num_classes
        self.read = dict(num_threads=num_threads, prefetch_buffer_size=prefetch)

    def order(self, indices: np.ndarray, *, seed: int, epoch: int) -> np.ndarray:
        """The epoch's ``[steps, batch]`` order (host)."""
        return pipeline.epoch_order(
            indices, batch_size=self.steps.batch_size, seed=seed, epoch=epoch
        )

    def _batches(self, rows: np.ndarray):
        import grain

        local = rows[:, jax.process_index() :: jax.process_count()]
        view = pipeline.FeatureSource(self.source, local.reshape(-1))
        per = local.shape[1]
        ds = grain.MapDataset.range(len(local)).map(
            lambda i: {
                k: np.stack([view[i * per + j][k] for j in range(per)])
                for k in ("x", "label", "id")
            }
        )
        return ds.to_iter_dataset(grain.ReadOptions(**self.read))

    def _put(self, batch: dict) -> dict:
        check_labels(batch["label"], batch["id"], self.num_classes)
        batch = {k: v for k, v in batch.items() if k != "id"}
        if self.steps.mesh is None:
            return batch
        return {
            k: jax.make_array_from_process_local_data(self.steps.batch_sharding[k], np.asarray(v))
            for k, v in batch.items()
        }

    def train(
        self, state: TrainState, sums: Sums, order: np.ndarray, start: int, stop: int
    ) -> tuple[TrainState, Sums]:
        """Steps ``start..stop-1`` of the epoch; metrics stay on device."""
        for batch in self._batches(order[start:stop]):
            state, metrics = self.steps.train_step(state, self._put(batch))
            sums = self.steps.accumulate(sums, metrics, state.step)
        return state, sums

    def evaluate(self, state: TrainState, indices: np.ndarray) -> dict:
        """Metric (and gate) sums over ``indices``; device arrays."""
        totals = None
        for batch in pipeline.eval_batches(
            self.source,
            indices,
            batch_size=self.steps.config.eval_batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        ):
            check_labels(batch["label"], batch["id"], self.num_classes)
            put = {k: batch[k] for k in ("x", "label", "valid")}
            if self.steps.mesh is not None:
                put = {
                    k: jax.make_array_from_process_local_data(self.steps.batch_sharding[k], v)
                    for k, v in put.items()
                }
            out = self.steps.evaluate_batch(state, put)
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        return totals


def make_feed(steps: Steps, source: Any, num_classes: int, on_device: str | bool) -> Any:
    """A :class:`DeviceFeed` or :class:`GrainFeed` as ``config.data_on_device`` asks.

    Args:
      steps: the compiled steps.
      source: the data source.
      num_classes: labels must lie in ``[0, num_classes)``.
      on_device: True, False or ``"auto"`` (device memory when the features take at most
        :data:`AUTO_DEVICE_BYTES`).
    """
    if on_device == "auto":
        on_device = fits_on_device(source, steps.input_shape)
    if on_device:
        return DeviceFeed(steps, source, num_classes)
    return GrainFeed(steps, source, num_classes)
