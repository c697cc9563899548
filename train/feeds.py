"""How batches reach the programs: from a dataset held in device memory, or through grain.

A feed serves every run of a program at once. The runs' epoch orders come from
:func:`data.pipeline.epoch_order` (a pure function of seed and epoch), stacked as
``[runs, steps, batch]`` with an ``active`` mask for runs whose fold has fewer batches; their
validation sets are stacked the same way, padded, with a ``valid`` mask (:func:`eval_plan`).
So both feeds train on the same batches in the same order, and a program resumed mid-epoch
needs only its position to continue.

* :class:`DeviceFeed` places every example on the device once and runs a whole stretch of
  positions (and a whole evaluation) per jitted call: the host never waits on a step.
* :class:`GrainFeed` reads each position's batches from the tfds source with grain (threads,
  prefetch) for data larger than device memory; each process reads only its rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from data import pipeline
from train import splits
from train.steps import Steps, Sums, TrainState

# Datasets up to this many bytes of features go to device memory when ``data_on_device`` is
# "auto" (the offline sets are ~1 MB; CIFAR-100's BEiT-Large features are ~5 GB).
AUTO_DEVICE_BYTES = 1 << 30


def load_arrays(source: Any) -> dict[str, Any]:
    """Every example of ``source``: ``x`` float32 ``[n, N, d]``, ``label`` int32, ``id`` int64.

    A :class:`data.pipeline.ArraySource` (fine-tuning) gives its arrays: ``x`` is then a dict
    of model inputs.
    """
    if isinstance(source, pipeline.ArraySource):
        return source.arrays
    records = [source[i] for i in range(len(source))]
    return {
        "x": np.stack([np.asarray(r["features"], np.float32) for r in records]),
        "label": np.array([int(r["label"]) for r in records], np.int32),
        "id": np.array([int(r["id"]) for r in records], np.int64),
    }


def fits_on_device(source: Any, input_shape: tuple) -> bool:
    """Whether ``source``'s features stay under :data:`AUTO_DEVICE_BYTES` in float32."""
    if isinstance(source, pipeline.ArraySource):
        return True  # already in host memory as arrays: device memory holds them too
    if input_shape and not isinstance(input_shape[0], int):
        return False  # raw model inputs read batch by batch (train.finetune.RawSource)
    return len(source) * int(np.prod(input_shape)) * 4 <= AUTO_DEVICE_BYTES


@dataclasses.dataclass(frozen=True)
class Plan:
    """The host-side facts of one program's runs that the feeds need.

    Attributes:
      train: each run's training examples (indices into the feed's source).
      val: each run's validation examples.
      seeds: each run's data-order (and initialisation) seed.
      names: each run's name in messages (``"toy seed 0 fold 2"``).
      padding: how many of the last runs are padding (copies that never take a step), so
        that the run axis divides the devices it is split over.
    """

    train: tuple[np.ndarray, ...]
    val: tuple[np.ndarray, ...]
    seeds: tuple[int, ...]
    names: tuple[str, ...] = ()
    padding: int = 0

    @property
    def runs(self) -> int:
        """The length of the run axis."""
        return len(self.seeds)


def pad(plan: Plan, multiple: int) -> Plan:
    """``plan`` with padding runs appended so that its run axis is a multiple of ``multiple``."""
    extra = -plan.runs % multiple
    if not extra:
        return plan
    return dataclasses.replace(
        plan,
        train=plan.train + plan.train[-1:] * extra,
        val=plan.val + plan.val[-1:] * extra,
        seeds=plan.seeds + plan.seeds[-1:] * extra,
        names=plan.names + ("padding",) * extra if plan.names else (),
        padding=plan.padding + extra,
    )


def epoch_orders(plan: Plan, batch_size: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Every run's batches of ``epoch``: int32 ``[runs, steps, batch]`` and bool ``active``.

    ``steps`` is the largest run's; a shorter run's missing positions repeat its last batch
    and are inactive (the step leaves that run unchanged).
    """
    orders = [
        pipeline.epoch_order(idx, batch_size=batch_size, seed=seed, epoch=epoch)
        for idx, seed in zip(plan.train, plan.seeds, strict=True)
    ]
    steps = max(len(o) for o in orders)
    order = np.stack([np.concatenate([o, np.repeat(o[-1:], steps - len(o), 0)]) for o in orders])
    active = np.arange(steps)[None, :] < np.array([len(o) for o in orders])[:, None]
    active[plan.runs - plan.padding :] = False
    return order.astype(np.int32), active


def steps_per_epoch(plan: Plan, batch_size: int) -> np.ndarray:
    """Each run's optimisation steps per epoch, int64 ``[runs]``."""
    return np.array([len(idx) // batch_size for idx in plan.train])


def eval_plan(plan: Plan, batch_size: int, multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Every run's validation examples as int32 ``[runs, batches, rows]`` and bool ``valid``.

    The batches are as few as ``batch_size`` allows for the largest set and as even as
    possible, each padded only to a multiple of ``multiple`` (40 validation examples are one
    batch of 40, not of 64); padding rows repeat a run's first example and are not valid.
    """
    longest = max(len(v) for v in plan.val)
    batches = -(-longest // batch_size)
    rows = -(-longest // batches)
    rows = -(-rows // multiple) * multiple
    padded = batches * rows
    order = np.stack([np.concatenate([v, np.full(padded - len(v), v[0])]) for v in plan.val])
    valid = np.arange(padded)[None, :] < np.array([len(v) for v in plan.val])[:, None]
    shape = (plan.runs, batches, rows)
    return order.astype(np.int32).reshape(shape), valid.reshape(shape)


class DeviceFeed:
    """A dataset held in device memory (replicated over a mesh), batched there by indexing.

    Args:
      steps: the compiled programs.
      source: the data source (every example is loaded once).
      num_classes: labels must lie in ``[0, num_classes)``.
    """

    def __init__(self, steps: Steps, source: Any, num_classes: int):
        arrays = load_arrays(source)
        finite = np.ones(len(arrays["label"]), bool)
        for leaf in jax.tree.leaves(arrays["x"]):
            if np.issubdtype(leaf.dtype, np.floating):
                finite &= np.isfinite(leaf).reshape(len(leaf), -1).all(axis=1)
        if not finite.all():
            bad = int(arrays["id"][np.flatnonzero(~finite)[0]])
            raise ValueError(f"example id {bad}: features contain NaN or Inf.")
        splits.check_labels(arrays["label"], arrays["id"], num_classes)
        self.steps = steps
        self.data = self._put({"x": arrays["x"], "label": arrays["label"]})
        self._eval: dict[int, tuple] = {}

    def _put(self, tree: Any, runs_axis: str | None = None) -> Any:
        if self.steps.mesh is None:
            return jax.device_put(tree)
        where = jax.sharding.NamedSharding(self.steps.mesh, jax.sharding.PartitionSpec(runs_axis))
        return jax.tree.map(
            lambda a: jax.make_array_from_callback(a.shape, where, lambda i: a[i]), tree
        )

    def orders(self, plan: Plan, epoch: int) -> tuple[jax.Array, jax.Array]:
        """:func:`epoch_orders` on the device (split over runs like the state)."""
        host = epoch_orders(plan, self.steps.batch_size, epoch)
        return self._put(host, self.steps.runs_axis(plan.runs))

    def train(
        self, state: TrainState, sums: Sums, orders: tuple, start: int, stop: int
    ) -> tuple[TrainState, Sums]:
        """Positions ``start..stop-1`` of the epoch, in one jitted call (returns at once)."""
        order, active = orders
        return self.steps.train_steps(
            state, sums, self.data, order, active, np.int32(start), np.int32(stop)
        )

    def evaluate(self, state: TrainState, plan: Plan) -> dict:
        """Every run's metric (and gate) sums over its validation set; device arrays."""
        key = id(plan)
        if key not in self._eval:
            multiple = 8 if self.steps.mesh is None else self.steps.mesh.shape.get("data", 1)
            host = eval_plan(plan, self.steps.config.eval_batch_size, multiple)
            self._eval[key] = (plan, self._put(host, self.steps.runs_axis(plan.runs)))
        order, valid = self._eval[key][1]
        return self.steps.evaluate_on_device(state, self.data, order, valid)


class GrainFeed:
    """Batches read from the tfds source by grain, for datasets too large for device memory.

    Args:
      steps: the compiled programs.
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

    def orders(self, plan: Plan, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """:func:`epoch_orders` (host)."""
        return epoch_orders(plan, self.steps.batch_size, epoch)

    def _batches(self, rows: np.ndarray, keys: tuple[str, ...]):
        """Grain-read batches of ``rows`` (``[positions, runs, batch]``), this process's rows."""
        import grain

        local = rows[..., jax.process_index() :: jax.process_count()]
        shape = local.shape[1:]
        view = pipeline.FeatureSource(self.source, local.reshape(-1))
        per = int(np.prod(shape))

        def stack(values: list) -> Any:  # [runs * batch] records -> [runs, batch, ...]
            return jax.tree.map(lambda *v: np.stack(v).reshape(*shape, *np.shape(v[0])), *values)

        def read(i):
            records = [view[i * per + j] for j in range(per)]
            return {k: stack([r[k] for r in records]) for k in keys}

        ds = grain.MapDataset.range(len(local)).map(read)
        return ds.to_iter_dataset(grain.ReadOptions(**self.read))

    def _put(self, batch: dict) -> dict:
        splits.check_labels(batch["label"].reshape(-1), batch["id"].reshape(-1), self.num_classes)
        batch = {k: v for k, v in batch.items() if k != "id"}
        if self.steps.mesh is None:
            return batch
        runs, local = batch["label"].shape[:2]
        spec = self.steps.batch_spec(runs, local * jax.process_count())

        def put(v: np.ndarray) -> jax.Array:
            where = jax.sharding.NamedSharding(
                self.steps.mesh, jax.sharding.PartitionSpec(*spec[: v.ndim])
            )
            global_shape = (runs, local * jax.process_count(), *v.shape[2:])
            return jax.make_array_from_process_local_data(where, np.asarray(v), global_shape)

        return jax.tree.map(put, batch)  # x: features, or a dict of model inputs

    def train(
        self, state: TrainState, sums: Sums, orders: tuple, start: int, stop: int
    ) -> tuple[TrainState, Sums]:
        """Positions ``start..stop-1`` of the epoch; metrics stay on device."""
        order, active = orders
        rows = order[:, start:stop].transpose(1, 0, 2)  # [positions, runs, batch]
        for p, batch in enumerate(self._batches(rows, ("x", "label", "id"))):
            state, sums = self.steps.train_step(state, sums, self._put(batch), active[:, start + p])
        return state, sums

    def evaluate(self, state: TrainState, plan: Plan) -> dict:
        """Every run's metric (and gate) sums over its validation set; device arrays."""
        multiple = 8 if self.steps.mesh is None else self.steps.mesh.shape.get("data", 1)
        order, valid = eval_plan(plan, self.steps.config.eval_batch_size, multiple)
        totals = None
        batches = self._batches(order.transpose(1, 0, 2), ("x", "label", "id"))
        for i, batch in enumerate(batches):
            local = valid[:, i, jax.process_index() :: jax.process_count()]
            put = self._put({**batch, "valid": local})
            out = self.steps.evaluate_batch(state, put)
            totals = out if totals is None else jax.tree.map(np.add, totals, out)
        return self.steps.placed(totals)  # as DeviceFeed's: epoch_end compiles once


def make_feed(steps: Steps, source: Any, num_classes: int, on_device: str | bool) -> Any:
    """A :class:`DeviceFeed` or :class:`GrainFeed` as ``config.data_on_device`` asks.

    Args:
      steps: the compiled programs.
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
