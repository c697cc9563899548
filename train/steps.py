"""The pure pieces of training: model, optimiser, train state, and the jitted programs.

Nothing here touches files, the host clock or Python-side state: a step is a function of
``(state, batch)``. The paper's decoders have no stochastic layer (no dropout), so a step takes
no RNG; the seed enters only through the initial parameters (:func:`create_state`) and the data
order.

The programs (:class:`Steps`) work on a leading ``runs`` axis: the many small runs of a config
(seeds x folds x datasets of one shape) train as one vmapped program, each with its own state,
data order, plateau schedule and best epoch. Two ways to feed them, with the same arithmetic:

* :meth:`Steps.train_steps`: positions ``[start, stop)`` of an epoch in one jitted call,
  gathering each run's batch on device from a dataset placed there once and an
  ``[runs, steps, batch]`` order;
* :meth:`Steps.train_step`: one position on a batch read by the host (the grain path, for
  datasets too large for device memory).

Both accumulate the epoch's metric sums per run on device (:class:`Sums`); the host fetches
them only at log points.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from gaam_jax import COMPUTE_DTYPES, GaussianAdaptiveTransformer, importance, sharding
from train import config as config_lib
from train import losses, plateau

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

    The config holds plain values: ``dtype`` is a name from :data:`gaam_jax.COMPUTE_DTYPES`,
    and an empty ``map_shape`` or ``layers`` means the model's default (most square map, every
    layer).
    """
    kwargs = model_cfg.to_dict()
    if kwargs.get("dtype", "float32") not in COMPUTE_DTYPES:
        raise ValueError(
            f"model.dtype must be one of {sorted(COMPUTE_DTYPES)}, got {kwargs['dtype']!r}."
        )
    kwargs["dtype"] = COMPUTE_DTYPES[kwargs.get("dtype", "float32")]
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
    patterns = tuple(config_lib.setting(opt_cfg, "frozen", within="optimizer"))
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
# bit-identical values (tests/train/test_train.py::test_init_compiled_at_o1_is_bit_identical).
INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 1}}


def create_state(
    model: Any, tx: optax.GradientTransformation, seed: jax.Array | int, example: Any
) -> TrainState:
    """The initial state for inputs like ``example``; traceable in ``seed``.

    ``example`` is a pytree of ``jax.ShapeDtypeStruct`` of one example with a batch axis of 1
    (the decoders: float32 ``[1, N, d]``; a fine-tuned encoder: its model inputs).
    """
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example)
    variables = model.init(jax.random.key(seed), zeros)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        batch_stats=variables.get("batch_stats", {}),
        lr_scale=jnp.ones((), jnp.float32),
    )


def _variables(state: TrainState, frozen: Any) -> dict:
    """The model's variables: the trained ones, plus the frozen ones when there are any."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if frozen is not None:
        variables["frozen"] = frozen
    return variables


def train_step(
    state: TrainState,
    batch: dict,
    *,
    model: Any,
    tx: optax.GradientTransformation,
    loss_fn: Callable,
    frozen: Any = None,
) -> tuple[TrainState, dict]:
    """One optimisation step (pure; jit it with the state donated).

    Args:
      state: the train state.
      batch: ``x`` float ``[b, N, d]`` (or a dict of model inputs), ``label`` int32 ``[b]``.
      model: the decoder (or a fine-tuned encoder, :class:`train.finetune.FineTuneModel`).
      tx: the optimiser.
      loss_fn: per-example loss ``(logits, labels) -> [b]``.
      frozen: variables that are inputs, never trained (a fine-tuned encoder's base weights:
        never differentiated, nor held in the optimiser state), or None.

    Returns:
      The new state and ``{'loss': mean loss, 'correct': correct predictions}`` (float32
      scalars).
    """

    def objective(params):
        logits, updates = model.apply(
            _variables(state.replace(params=params), frozen),
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


def eval_batch(
    state: TrainState,
    batch: dict,
    *,
    model: Any,
    loss_fn: Callable,
    gated: bool,
    frozen: Any = None,
) -> dict:
    """Sums of loss, correct predictions and (for gated fronts) the gate over valid rows.

    Returns:
      ``loss``, ``correct``, ``count`` (float32 scalars) and, when ``gated``, ``gate_total`` and
      ``gate_count`` (float32 ``[N, d]``, :mod:`gaam_jax.importance`'s streaming state).
    """
    variables = _variables(state, frozen)
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


def _where(take_new: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``take_new`` (a scalar bool) else ``old``, leaf by leaf."""
    return jax.tree.map(lambda a, b: jnp.where(take_new, a, b), new, old)


def masked_step(
    state: TrainState, batch: dict, active: jax.Array, *, step: Callable
) -> tuple[TrainState, dict]:
    """``step``, or no change at all where ``active`` is False (a fold with fewer batches).

    The metrics of an inactive step are zeros with a finite loss, so the sums do not move.
    """
    new, metrics = step(state, batch)
    zeros = {"loss": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.float32)}
    return _where(active, new, state), _where(active, metrics, zeros)


def accumulate(
    sums: Sums, metrics: dict, step: jax.Array, active: jax.Array | bool = True, *, batch_size: int
) -> Sums:
    """Adds one step's metrics; remembers the first step whose loss is not finite."""
    bad = ~jnp.isfinite(metrics["loss"])
    return Sums(
        loss=sums.loss + metrics["loss"] * batch_size,
        correct=sums.correct + metrics["correct"],
        count=sums.count + jnp.where(active, batch_size, 0).astype(jnp.float32),
        first_bad_step=jnp.where(bad, jnp.minimum(sums.first_bad_step, step), sums.first_bad_step),
    )


def stacked_zeros(runs: int) -> Sums:
    """:meth:`Sums.zeros` for ``runs`` runs (each leaf ``[runs]``)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (runs,)), Sums.zeros())


class Steps:
    """The compiled programs of one model/optimiser configuration over a leading ``runs`` axis.

    Every array of the state (:class:`TrainState`), the metric sums (:class:`Sums`), the data
    orders and the evaluation sums has a leading axis of ``runs``: the independent runs (seeds,
    folds, datasets of one shape) that train together as one vmapped program. A run's
    arithmetic does not depend on the others (they share no value), and a step that is masked
    off for a run (its fold has fewer batches) leaves that run's state unchanged. A run axis of
    1 is the single-run case through the same code.

    With a ``mesh``, the logical axis ``runs`` is resolved by the ``rules`` (for example to a
    mesh axis ``runs``: runs spread over devices); parameters keep their own logical axes
    (``layers`` over ``model``) and batches their ``batch`` axis over ``data``.

    Args:
      config: the experiment config (``model``, ``optimizer``, ``loss``, ``batch_size``).
      num_classes: classes of the dataset.
      input_shape: ``(N, d)`` of one example.
      mesh: optional device mesh.
      rules: logical-to-mesh axis rules.
      model: a model object to train instead of the config's decoder, with ``init(key,
        example)``, ``apply(variables, x, train=, mutable=)``, ``example`` (one example's
        inputs, batch 1, as ``jax.ShapeDtypeStruct`` s), ``frozen`` (variables passed to every
        program, never trained; they reach ``apply`` as ``variables['frozen']``) and
        ``optimizer(opt_cfg)``: a fine-tuned encoder (:class:`train.finetune.FineTuneModel`).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        num_classes: int,
        input_shape: tuple,
        *,
        mesh: jax.sharding.Mesh | None = None,
        rules: sharding.Rules = sharding.DEFAULT_RULES,
        model: Any = None,
    ):
        self.config = config
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        if model is None:
            self.model = make_model(config.model, num_classes)
            self.tx = make_optimizer(config.optimizer)
            self.example = jax.ShapeDtypeStruct((1, *self.input_shape), jnp.float32)
            self.frozen = None
            self.gated = config.model.front in GATED_FRONTS
        else:
            self.model = model
            self.tx = model.optimizer(config.optimizer)
            self.example = model.example
            self.frozen = model.frozen
            self.gated = False
        self.loss_fn = losses.get(config.loss)
        self.mesh = mesh
        self.rules = rules
        self.batch_size = config.batch_size
        self._create = functools.partial(create_state, self.model, self.tx, example=self.example)
        self._init_compiled: dict[int, Any] = {}
        # The frozen variables are the first argument of every program (an input, not a
        # constant folded into it: a base model's weights).
        train_steps = jax.jit(self._train_steps, donate_argnums=(1, 2))
        train_step = jax.jit(self._train_step_host, donate_argnums=(1, 2))
        evaluate_on_device = jax.jit(self._evaluate_on_device)
        evaluate_batch = jax.jit(
            lambda f, s, b: self._replicate(self._over_runs(self._evaluate(f))(s, b))
        )
        # The jitted programs themselves (their compile caches), before binding ``frozen``.
        self.programs = {"train_steps": train_steps, "train_step": train_step,
                         "evaluate_on_device": evaluate_on_device,
                         "evaluate_batch": evaluate_batch}  # fmt: skip
        self._bind_frozen()
        self.epoch_end = jax.jit(self._epoch_end, static_argnums=3)

    def _bind_frozen(self) -> None:
        for name, program in self.programs.items():
            setattr(self, name, functools.partial(program, self.frozen))

    def bind(self, model: Any) -> None:
        """Makes ``model`` the one the programs train: the same model, its weights now read.

        A fine-tuning job's checks build the programs from an abstract model (its base weights
        as ``jax.ShapeDtypeStruct`` s); once they pass, the weights are read onto the mesh and
        bound here, so the programs are built once. ``model`` must have the shapes, optimiser
        and example of the model the programs were built with.
        """
        self.model = model
        self.frozen = model.frozen
        self._create = functools.partial(create_state, self.model, self.tx, example=self.example)
        self._init_compiled.clear()
        self._bind_frozen()

    def _step(self, frozen: Any) -> Callable:
        return functools.partial(
            train_step, model=self.model, tx=self.tx, loss_fn=self.loss_fn, frozen=frozen
        )

    def _evaluate(self, frozen: Any) -> Callable:
        return functools.partial(
            eval_batch, model=self.model, loss_fn=self.loss_fn, gated=self.gated, frozen=frozen
        )

    # -- shapes and shardings ------------------------------------------------------------------

    def abstract_state(self, runs: int = 1) -> TrainState:
        """The state of ``runs`` runs as ``jax.ShapeDtypeStruct`` s (no computation)."""
        seeds = jax.ShapeDtypeStruct((runs,), jnp.uint32)
        abstract = jax.eval_shape(jax.vmap(self._create), seeds)
        if self.mesh is None:
            return abstract
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract,
            self.state_sharding(runs),
        )

    def runs_multiple(self) -> int:
        """The number of devices the run axis is split over (a run axis must divide it)."""
        axis = dict(self.rules).get("runs")
        if self.mesh is None or axis not in self.mesh.shape:
            return 1
        return int(self.mesh.shape[axis])

    def runs_axis(self, runs: int) -> str | None:
        """The mesh axis the run axis is split over (None: replicated, or no mesh)."""
        if self.mesh is None:
            return None
        return sharding.logical_to_spec(("runs",), (runs,), self.mesh, self.rules)[0]

    def state_sharding(self, runs: int) -> TrainState:
        """``NamedSharding`` s of a state of ``runs`` runs (needs a mesh).

        Parameters follow the logical axes annotated where the model creates them, behind the
        run axis, and so do their optimiser moments; the rest is split over runs only.
        """
        mesh, axis = self.mesh, self.runs_axis(runs)
        params = sharding.param_shardings(
            sharding.abstract_params(self.model, self.example), mesh, self.rules
        )
        params = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, P(axis, *s.spec)), params)
        per_run = jax.sharding.NamedSharding(mesh, P(axis))
        single = jax.eval_shape(self._create, 0)

        def masked(v):  # optax.partition's placeholder for another group's parameters
            return isinstance(v, optax.MaskedNode)

        opt_state = optax.tree_map_params(
            self.tx, lambda v, s: v if masked(v) else s, single.opt_state, params,
            transform_non_params=lambda _: per_run, is_leaf=masked,
        )  # fmt: skip
        return TrainState(
            step=per_run,
            params=params,
            opt_state=opt_state,
            batch_stats=jax.tree.map(lambda _: per_run, single.batch_stats),
            lr_scale=per_run,
        )

    def batch_spec(self, runs: int, rows: int) -> P:
        """The PartitionSpec of examples ``[runs, rows, N, d]`` (needs a mesh).

        Model inputs of a fine-tuned encoder are split over runs and batch only.
        """
        if self.frozen is not None:
            return sharding.logical_to_spec(("runs", "batch"), (runs, rows), self.mesh, self.rules)
        return sharding.logical_to_spec(
            ("runs", "batch", "layers", "embed"), (runs, rows, *self.input_shape), self.mesh,
            self.rules,
        )  # fmt: skip

    def _over_runs(self, fn: Callable) -> Callable:
        """``fn`` of one run, applied to every run of the leading axis.

        ``runs_vectorized`` runs at a time are vmapped together and the groups follow one
        another inside the program (``jax.lax.map``); 0 vmaps all of them. On accelerators
        vmapping fills the chip; on a CPU one run's step already keeps the cores busy and
        vmapping many multiplies the working set past the caches (measured on 2 cores: 10 runs
        vmapped cost 2.7x per run what one costs; looped, 1.0x), so "auto" loops there. A run
        axis split over devices is always vmapped (each device holds its own runs).
        """
        per = config_lib.setting(self.config, "runs_vectorized")
        if per == "auto":
            per = 1 if jax.default_backend() == "cpu" else 0
        if per == 0 or self.runs_multiple() > 1:
            return jax.vmap(fn)
        return lambda *args: jax.lax.map(lambda a: fn(*a), args, batch_size=per)

    def _constrain(self, batch: dict) -> dict:
        if self.mesh is None:
            return batch
        spec = self.batch_spec(*batch["label"].shape[:2])
        return jax.tree.map(
            lambda v: jax.lax.with_sharding_constraint(
                v, jax.sharding.NamedSharding(self.mesh, P(*spec[: v.ndim]))
            ),
            batch,
        )

    # -- programs ------------------------------------------------------------------------------

    def init_state(self, seeds: Any) -> TrainState:
        """Fresh states for ``seeds`` (``[runs]``), created directly sharded over a mesh."""
        seeds = np.asarray(seeds, np.uint32)
        runs = len(seeds)
        if runs not in self._init_compiled:
            out = self._device if self.mesh is None else self.state_sharding(runs)
            lowered = jax.jit(jax.vmap(self._create), out_shardings=out).lower(seeds)
            options = INIT_COMPILER_OPTIONS.get(jax.default_backend())
            self._init_compiled[runs] = lowered.compile(compiler_options=options)
        return self._init_compiled[runs](seeds)

    @property
    def _device(self) -> jax.sharding.Sharding:
        # Without a mesh: the default device, committed, as every program's outputs are (an
        # uncommitted first input would compile each program a second time).
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def placed(self, tree: Any) -> Any:
        """``tree`` placed as the programs return their replicated outputs (sums, trackers).

        A first input placed otherwise (uncommitted) would compile each program a second time.
        """
        where = self._device if self.mesh is None else jax.sharding.NamedSharding(self.mesh, P())
        return jax.device_put(tree, where)

    def zero_sums(self, runs: int) -> Sums:
        """:func:`stacked_zeros`, :meth:`placed`."""
        return self.placed(stacked_zeros(runs))

    def _gather(self, data: dict, rows: jax.Array) -> dict:
        """Examples ``rows`` (``[runs, batch]`` indices) of the device dataset."""
        x = jax.tree.map(lambda a: a[rows], data["x"])  # a dict of model inputs, or features
        return self._constrain({"x": x, "label": data["label"][rows]})

    def _train_steps(
        self,
        frozen: Any,
        state: TrainState,
        sums: Sums,
        data: dict,
        order: jax.Array,
        active: jax.Array,
        start: jax.Array,
        stop: jax.Array,
    ) -> tuple[TrainState, Sums]:
        """Positions ``start..stop-1`` of the epoch, every run at once.

        Args:
          frozen: the frozen variables (None for the decoders).
          state: ``[runs]`` states (donated).
          sums: ``[runs]`` metric sums (donated).
          data: ``x [n, N, d]``, ``label [n]`` on device (every run's examples).
          order: int32 ``[runs, steps, batch]`` indices into ``data``.
          active: bool ``[runs, steps]``: whether the run takes that step.
          start: first position.
          stop: end position (exclusive).
        """
        step = self._over_runs(functools.partial(masked_step, step=self._step(frozen)))
        add = jax.vmap(functools.partial(accumulate, batch_size=self.batch_size))

        def body(i, carry):
            state, sums = carry
            on = active[:, i]
            state, metrics = step(state, self._gather(data, order[:, i]), on)
            return state, add(sums, metrics, state.step, on)

        state, sums = jax.lax.fori_loop(start, stop, body, (state, sums))
        return self._keep(state), self._replicate(sums)

    def _keep(self, state: TrainState) -> TrainState:
        """``state`` pinned to its sharding (so donated buffers are reused in place)."""
        if self.mesh is None:
            return state
        runs = state.step.shape[0]
        return jax.lax.with_sharding_constraint(state, self.state_sharding(runs))

    def _replicate(self, tree: Any) -> Any:
        """Metrics replicated over the mesh, so that every process can read them."""
        if self.mesh is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, jax.sharding.NamedSharding(self.mesh, P()))

    def _epoch_end(
        self, state: TrainState, tracker: dict, evaluation: dict, plateau_args: tuple
    ) -> tuple[TrainState, dict, jax.Array]:
        state, tracker, improved = jax.vmap(epoch_end, in_axes=(0, 0, 0, None))(
            state, tracker, evaluation, plateau_args
        )
        return self._keep(state), self._replicate(tracker), self._replicate(improved)

    def _train_step_host(
        self, frozen: Any, state: TrainState, sums: Sums, batch: dict, active: jax.Array
    ) -> tuple[TrainState, Sums]:
        """One position of every run on a batch the host read (``x [runs, batch, N, d]``)."""
        step = self._over_runs(functools.partial(masked_step, step=self._step(frozen)))
        state, metrics = step(state, self._constrain(batch), active)
        add = jax.vmap(functools.partial(accumulate, batch_size=self.batch_size))
        return self._keep(state), self._replicate(add(sums, metrics, state.step, active))

    def _evaluate_on_device(
        self, frozen: Any, state: TrainState, data: dict, order: jax.Array, valid: jax.Array
    ) -> dict:
        """Evaluation sums per run over ``order`` (``[runs, batches, rows]``; ``valid`` masks)."""
        evaluate = self._over_runs(self._evaluate(frozen))

        def batch(i):
            rows = self._gather(data, order[:, i])
            return {**rows, "valid": valid[:, i]}

        def body(i, totals):
            return jax.tree.map(jnp.add, totals, evaluate(state, batch(i)))

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(evaluate, state, batch(0)))
        return self._replicate(jax.lax.fori_loop(0, order.shape[1], body, zeros))


@jax.jit
def select(take_new: jax.Array, new: Any, old: Any) -> Any:
    """Per run: ``new`` where ``take_new`` (bool ``[runs]``) else ``old``, on the device."""
    return jax.vmap(_where)(take_new, new, old)
