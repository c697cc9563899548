"""The pure pieces of training: model, optimiser, train state, and the jitted steps.

Nothing here touches files, the host clock or Python-side state: a step is a function of
``(state, batch)``. The paper's decoders have no stochastic layer (no dropout), so a step takes
no RNG; the seed enters only through the initial parameters (:func:`create_state`) and the data
order, so one compiled step serves every seed and fold of a config.

Two ways to drive the step, with the same arithmetic:

* :meth:`Steps.train_step`: one jitted, state-donating step on a batch held by the host (the
  grain path for datasets too large for device memory);
* :meth:`Steps.train_steps`: steps ``[start, stop)`` of an epoch in one jitted call, gathering
  each batch on device from a dataset placed there once and an ``[steps, batch]`` order.

Both accumulate the epoch's metric sums on device (:class:`Sums`); the host fetches them only
at log points.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gaam_jax import GaussianAdaptiveTransformer, importance, sharding
from train import losses, plateau

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
GATED_FRONTS = ("gaam", "gqgaam", "mixture")


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: step, parameters, optimiser and BatchNorm state.

    ``lr_scale`` is the plateau schedule's factor on the learning rate (1, 0.1, 0.01, ...).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    batch_stats: Any
    lr_scale: jax.Array


@flax.struct.dataclass
class Sums:
    """Training metrics of the steps since the last fetch, summed on device.

    ``first_bad_step`` is the global step (1-based, after the update) of the first non-finite
    loss, or ``int32 max`` when every loss was finite.
    """

    loss: jax.Array
    correct: jax.Array
    count: jax.Array
    first_bad_step: jax.Array

    @classmethod
    def zeros(cls) -> Sums:
        """Empty sums."""
        return cls(
            loss=jnp.zeros((), jnp.float32),
            correct=jnp.zeros((), jnp.float32),
            count=jnp.zeros((), jnp.float32),
            first_bad_step=jnp.asarray(np.iinfo(np.int32).max, jnp.int32),
        )


def make_model(model_cfg: ml_collections.ConfigDict, num_classes: int) -> Any:
    """``GaussianAdaptiveTransformer(num_classes, **config.model)``.

    The config holds plain values: ``dtype`` is a name from :data:`DTYPES`, and an empty
    ``map_shape`` or ``layers`` means the model's default (most square map, every layer).
    """
    kwargs = model_cfg.to_dict()
    if kwargs.get("dtype", "float32") not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {kwargs['dtype']!r}.")
    kwargs["dtype"] = DTYPES[kwargs.get("dtype", "float32")]
    for key in ("map_shape", "layers"):
        kwargs[key] = tuple(kwargs.get(key) or ()) or None
    return GaussianAdaptiveTransformer(num_classes, **kwargs)


def param_path(path: tuple) -> str:
    """``'attention/delta'`` for a parameter's key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def frozen_mask(params: Any, patterns: tuple[str, ...]) -> Any:
    """True for each parameter whose path (``'attention/delta'``) matches one of ``patterns``."""
    compiled = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(c.search(param_path(path)) for c in compiled), params
    )


def make_optimizer(opt_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Gradient clipping, then AdamW (the authors' code: weight decay 0.01).

    Parameters whose path matches a regular expression in ``opt_cfg.frozen`` (e.g.
    ``'^attention/'``: the frozen-GAAM baseline) get no update at all, weight decay included.
    With ``optax.multi_transform`` the clipping sits inside the trained branch, so the clipping
    norm is taken over the trained parameters only.
    """
    tx = optax.chain(
        optax.clip_by_global_norm(opt_cfg.grad_clip),
        optax.adamw(opt_cfg.learning_rate, weight_decay=opt_cfg.weight_decay),
    )
    patterns = tuple(opt_cfg.get("frozen", ()))
    if not patterns:
        return tx

    def labels(params):
        mask = frozen_mask(params, patterns)
        if not any(jax.tree.leaves(mask)):
            raise ValueError(
                f"optimizer.frozen {patterns} matches no parameter; parameters are "
                f"{[param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]}."
            )
        return jax.tree.map(lambda m: "frozen" if m else "trained", mask)

    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


# The initial state runs once per run, but XLA:CPU's default LLVM pipeline (-O3) spends over a
# second on its threefry and truncated-normal kernels; -O1 compiles them in 40% of the time to
# bit-identical values (tests/test_train.py::test_init_compiled_at_o1_is_bit_identical).
INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 1}}


def create_state(
    model: Any, tx: optax.GradientTransformation, seed: jax.Array | int, input_shape: tuple
) -> TrainState:
    """The initial state for examples of ``input_shape`` (``(N, d)``); traceable in ``seed``."""
    variables = model.init(jax.random.key(seed), jnp.zeros((1, *input_shape), jnp.float32))
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        batch_stats=variables.get("batch_stats", {}),
        lr_scale=jnp.ones((), jnp.float32),
    )


def train_step(
    state: TrainState,
    batch: dict,
    *,
    model: Any,
    tx: optax.GradientTransformation,
    loss_fn: Callable,
) -> tuple[TrainState, dict]:
    """One optimisation step (pure; jit it with the state donated).

    Args:
      state: the train state.
      batch: ``x`` float ``[b, N, d]``, ``label`` int32 ``[b]``.
      model: the decoder.
      tx: the optimiser.
      loss_fn: per-example loss ``(logits, labels) -> [b]``.

    Returns:
      The new state and ``{'loss': mean loss, 'correct': correct predictions}`` (float32
      scalars).
    """

    def objective(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["x"],
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean(loss_fn(logits, batch["label"])), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    deltas, opt_state = tx.update(grads, state.opt_state, state.params)
    deltas = jax.tree.map(lambda d: d * state.lr_scale.astype(d.dtype), deltas)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, deltas),
        opt_state=opt_state,
        batch_stats=updates.get("batch_stats", state.batch_stats),
    )
    correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return new_state, {"loss": loss.astype(jnp.float32), "correct": correct}


def accumulate(sums: Sums, metrics: dict, step: jax.Array, batch_size: int) -> Sums:
    """Adds one step's metrics; remembers the first step whose loss is not finite."""
    bad = ~jnp.isfinite(metrics["loss"])
    return Sums(
        loss=sums.loss + metrics["loss"] * batch_size,
        correct=sums.correct + metrics["correct"],
        count=sums.count + batch_size,
        first_bad_step=jnp.where(bad, jnp.minimum(sums.first_bad_step, step), sums.first_bad_step),
    )


def eval_batch(
    state: TrainState, batch: dict, *, model: Any, loss_fn: Callable, gated: bool
) -> dict:
    """Sums of loss, correct predictions and (for gated fronts) the gate over valid rows.

    Returns:
      ``loss``, ``correct``, ``count`` (float32 scalars) and, when ``gated``, ``gate_total`` and
      ``gate_count`` (float32 ``[N, d]``, :mod:`gaam_jax.importance`'s streaming state).
    """
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if gated:
        logits, inter = model.apply(variables, batch["x"], mutable=["intermediates"])
    else:
        logits, inter = model.apply(variables, batch["x"]), None
    valid = batch["valid"].astype(jnp.float32)
    out = {
        "loss": jnp.sum(loss_fn(logits, batch["label"]) * valid),
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * valid),
        "count": jnp.sum(valid),
    }
    if gated:
        gate = importance.find_gate(inter)
        acc = importance.update(importance.init_state(gate.shape[1:]), gate, batch["valid"])
        out["gate_total"], out["gate_count"] = acc.total, acc.count
    return out


def epoch_end(
    state: TrainState, tracker: dict, evaluation: dict, plateau_args: tuple
) -> tuple[TrainState, dict, jax.Array]:
    """The plateau schedule and the best-epoch test after an epoch's evaluation, on the device.

    Args:
      state: the state after the epoch.
      tracker: :func:`train.plateau.to_device`'s schedule state and best accuracy so far.
      evaluation: the epoch's evaluation sums (``correct``, ``count``).
      plateau_args: ``(factor, patience)``.

    Returns:
      The state with the next epoch's learning-rate scale, the updated tracker, and whether
      this epoch's accuracy beats every earlier one (strictly: the first among ties is best).
    """
    factor, patience = plateau_args
    val = evaluation["correct"] / evaluation["count"]
    new = plateau.update(tracker, val, factor=factor, patience=patience)
    improved = val > tracker["best_val"]
    new["best_val"] = jnp.where(improved, val, tracker["best_val"])
    return state.replace(lr_scale=new["scale"]), new, improved


def state_shardings(
    abstract: TrainState,
    model: Any,
    input_shape: tuple,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> TrainState:
    """Shardings of a train state.

    Parameters follow the logical axes annotated where the model creates them, resolved by the
    rules, and so do their optimiser moments; the rest (step, counts, BatchNorm statistics, LR
    scale) is replicated.
    """
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    example = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    params = sharding.param_shardings(sharding.abstract_params(model, example), mesh, rules)
    opt_state = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract.opt_state,
        params,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(
        step=replicated,
        params=params,
        opt_state=opt_state,
        batch_stats=jax.tree.map(lambda _: replicated, abstract.batch_stats),
        lr_scale=replicated,
    )


class Steps:
    """The compiled steps of one model/optimiser configuration, shared by every seed and fold.

    With a ``mesh``, the state is created directly sharded (parameters by the logical-axis
    rules of :mod:`gaam_jax.sharding`), and batches are laid out with the batch over ``data``
    and the GAAM head groups of the layer axis over ``model``.

    Args:
      config: the experiment config (``model``, ``optimizer``, ``loss``, ``batch_size``).
      num_classes: classes of the dataset.
      input_shape: ``(N, d)`` of one example.
      mesh: optional device mesh with axes ``data`` and ``model``.
      rules: logical-to-mesh axis rules.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        num_classes: int,
        input_shape: tuple,
        *,
        mesh: jax.sharding.Mesh | None = None,
        rules: sharding.Rules = sharding.DEFAULT_RULES,
    ):
        self.config = config
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.model = make_model(config.model, num_classes)
        self.tx = make_optimizer(config.optimizer)
        self.loss_fn = losses.get(config.loss)
        self.gated = config.model.front in GATED_FRONTS
        self.mesh = mesh
        self.batch_size = config.batch_size
        step = functools.partial(train_step, model=self.model, tx=self.tx, loss_fn=self.loss_fn)
        evaluate = functools.partial(
            eval_batch, model=self.model, loss_fn=self.loss_fn, gated=self.gated
        )
        self._step, self._evaluate = step, evaluate
        self._create_compiled = None
        self._create_lock = threading.Lock()
        create = functools.partial(create_state, self.model, self.tx, input_shape=self.input_shape)
        if mesh is None:
            self.state_sharding = self.batch_sharding = self.replicated = None
            self._create = jax.jit(create)
            self.train_step = jax.jit(step, donate_argnums=0)
        else:
            abstract = jax.eval_shape(create, 0)
            self.state_sharding = state_shardings(
                abstract, self.model, self.input_shape, self.tx, mesh, rules
            )
            self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            x_spec = sharding.logical_to_spec(
                ("batch", "layers", "embed"), (config.batch_size, *self.input_shape), mesh, rules
            )
            rows = jax.sharding.PartitionSpec(x_spec[0])
            self.batch_sharding = {
                "x": jax.sharding.NamedSharding(mesh, x_spec),
                "label": jax.sharding.NamedSharding(mesh, rows),
                "valid": jax.sharding.NamedSharding(mesh, rows),
            }
            self._create = jax.jit(create, out_shardings=self.state_sharding)
            train_batch = {k: self.batch_sharding[k] for k in ("x", "label")}
            self.train_step = jax.jit(
                step,
                in_shardings=(self.state_sharding, train_batch),
                out_shardings=(self.state_sharding, self.replicated),
                donate_argnums=0,
            )
        # Metrics come back replicated, so every process can read them.
        metrics = self.replicated
        state_metrics = None if mesh is None else (self.state_sharding, metrics)
        add = functools.partial(accumulate, batch_size=self.batch_size)
        self.accumulate = jax.jit(add, out_shardings=metrics)
        self.train_steps = jax.jit(
            self._train_steps, donate_argnums=(0, 1), out_shardings=state_metrics
        )
        self.evaluate_on_device = jax.jit(self._evaluate_on_device, out_shardings=metrics)
        self.epoch_end = jax.jit(
            epoch_end,
            out_shardings=None if mesh is None else (self.state_sharding, metrics, metrics),
        )
        self.evaluate_batch = jax.jit(evaluate, out_shardings=metrics)

    def init_state(self, seed: int) -> TrainState:
        """A fresh state for ``seed`` (created directly sharded when there is a mesh)."""
        if isinstance(seed, jax.core.Tracer):  # traced (jax.eval_shape): nothing to compile
            return self._create(seed)
        with self._create_lock:  # runs trained side by side compile it once
            if self._create_compiled is None:
                options = INIT_COMPILER_OPTIONS.get(jax.default_backend())
                lowered = self._create.lower(jnp.asarray(0, jnp.uint32))
                self._create_compiled = lowered.compile(compiler_options=options)
        return self._create_compiled(jnp.asarray(seed, jnp.uint32))

    def _constrain(self, batch: dict) -> dict:
        if self.batch_sharding is None:
            return batch
        return {
            k: jax.lax.with_sharding_constraint(v, self.batch_sharding[k]) for k, v in batch.items()
        }

    def _train_steps(
        self,
        state: TrainState,
        sums: Sums,
        data: dict,
        order: jax.Array,
        start: jax.Array,
        stop: jax.Array,
    ) -> tuple[TrainState, Sums]:
        """Rows ``start..stop-1`` of ``order`` (``[steps, batch]`` indices into ``data``)."""

        def body(i, carry):
            state, sums = carry
            rows = order[i]
            batch = self._constrain({"x": data["x"][rows], "label": data["label"][rows]})
            state, metrics = self._step(state, batch)
            return state, accumulate(sums, metrics, state.step, self.batch_size)

        return jax.lax.fori_loop(start, stop, body, (state, sums))

    def _evaluate_on_device(
        self, state: TrainState, data: dict, order: jax.Array, valid: jax.Array
    ) -> dict:
        """Evaluation over ``order`` (``[batches, eval_batch]``, padded; ``valid`` masks)."""

        def body(i, totals):
            rows = order[i]
            batch = {"x": data["x"][rows], "label": data["label"][rows], "valid": valid[i]}
            out = self._evaluate(state, self._constrain(batch))
            return jax.tree.map(jnp.add, totals, out)

        first = {"x": data["x"][order[0]], "label": data["label"][order[0]], "valid": valid[0]}
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(self._evaluate, state, first))
        return jax.lax.fori_loop(0, order.shape[0], body, zeros)
