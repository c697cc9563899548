"""One training run: train state, jitted steps, the epoch loop with checkpoints and resume.

Phases, in order: model and optimiser -> initial state -> resume from the run's newest readable
checkpoint -> epochs (train steps, evaluation, plateau schedule, metrics, checkpoints) -> the
Importance Factor of the best model.

Determinism: the step's RNG is ``fold_in(key(seed), step)`` and each epoch's data order is a
pure function of ``(seed, epoch)``, so a run resumed from any checkpoint replays exactly what an
uninterrupted run computes (XLA on CPU is deterministic for a fixed program).
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import re
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from data import pipeline
from gaam_jax import GaussianAdaptiveTransformer, importance, sharding
from train import losses, plateau
from train.checkpointing import Checkpoints

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class NonFiniteLossError(RuntimeError):
    """Raised when a training step produces a NaN or infinite loss."""


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


def make_model(
    model_cfg: ml_collections.ConfigDict, num_classes: int
) -> GaussianAdaptiveTransformer:
    """The decoder described by ``config.model``."""
    if model_cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {model_cfg.dtype!r}.")
    return GaussianAdaptiveTransformer(
        num_classes=num_classes,
        front=model_cfg.front,
        num_heads=model_cfg.num_heads,
        num_gaussians=model_cfg.num_gaussians,
        attention_dim=model_cfg.attention_dim,
        query_heads=model_cfg.query_heads,
        kv_heads=model_cfg.kv_heads,
        gqa=model_cfg.gqa,
        conv_features=model_cfg.conv_features,
        map_shape=tuple(model_cfg.map_shape) or None,
        variance=model_cfg.variance,
        dtype=DTYPES[model_cfg.dtype],
        layers=tuple(model_cfg.get("layers", ())) or None,
    )


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
    The clipping norm is taken over the trained parameters only.
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


def create_state(
    model: GaussianAdaptiveTransformer, tx: optax.GradientTransformation, seed: int, x: Any
) -> TrainState:
    """Initial state for inputs shaped like ``x`` (an array or ``ShapeDtypeStruct``)."""
    variables = model.init(jax.random.key(seed), jnp.zeros(x.shape, jnp.float32))
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
    model: GaussianAdaptiveTransformer,
    tx: optax.GradientTransformation,
    loss_fn: Callable,
    seed: int,
) -> tuple[TrainState, dict]:
    """One optimisation step (pure; jit it with the state donated)."""
    rng = jax.random.fold_in(jax.random.key(seed), state.step)

    def objective(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["x"],
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": rng},
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
    correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"])
    metrics = {"loss": loss, "correct": correct, "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics


def eval_step(
    state: TrainState, batch: dict, *, model: GaussianAdaptiveTransformer, loss_fn: Callable
) -> dict:
    """Sums of loss and correct predictions over the batch's valid rows."""
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["x"])
    valid = batch["valid"].astype(jnp.float32)
    return {
        "loss": jnp.sum(loss_fn(logits, batch["label"]) * valid),
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * valid),
        "count": jnp.sum(valid),
    }


def state_shardings(
    abstract: TrainState,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> TrainState:
    """Shardings of a train state.

    Parameters and their optimiser moments follow the rules; the rest (step, counts, BatchNorm
    statistics, LR scale) is replicated.
    """
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = sharding.param_shardings(abstract.params, mesh, rules)
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


class Trainer:
    """Compiled steps for one model/optimiser configuration, reusable across folds and seeds.

    With a ``mesh``, the state is initialised directly sharded (abstract shapes first, then a
    jitted init with output shardings from :mod:`gaam_jax.sharding` rules), the steps run
    under ``jax.jit`` with explicit input and output shardings, and batches are assembled from
    each process's local part into global arrays (batch over ``data``, the GAAM head groups of
    the layer axis over ``model``).

    Args:
      config: the experiment config.
      num_classes: classes of the dataset.
      input_shape: ``(N, d)`` of one example.
      mesh: optional device mesh with axes ``data`` and ``model``.
      rules: logical-to-mesh axis rules (default :data:`gaam_jax.sharding.DEFAULT_RULES`).
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
        self.model = make_model(config.model, num_classes)
        self.tx = make_optimizer(config.optimizer)
        self.loss_fn = losses.get(config.loss)
        self.input_shape = tuple(input_shape)
        self.mesh = mesh
        self._train_steps: dict[int, Callable] = {}
        evaluate = functools.partial(eval_step, model=self.model, loss_fn=self.loss_fn)
        if mesh is None:
            self.state_sharding = self.batch_sharding = None
            self.eval_step = jax.jit(evaluate)
        else:
            abstract = jax.eval_shape(lambda: self._create(0))
            self.state_sharding = state_shardings(abstract, self.tx, mesh, rules)
            x_spec = sharding.logical_to_spec(
                ("batch", "layers", "embed"), (config.batch_size, *self.input_shape), mesh, rules
            )
            rows = jax.sharding.PartitionSpec(x_spec[0])
            self.batch_sharding = {
                "x": jax.sharding.NamedSharding(mesh, x_spec),
                "label": jax.sharding.NamedSharding(mesh, rows),
                "valid": jax.sharding.NamedSharding(mesh, rows),
            }
            self.eval_step = jax.jit(
                evaluate, in_shardings=(self.state_sharding, self.batch_sharding)
            )

        def gates(state, x):
            _, inter = self.model.apply(
                {"params": state.params, "batch_stats": state.batch_stats},
                x,
                mutable=["intermediates"],
            )
            return importance.find_gate(inter)

        self.gates = jax.jit(gates)

    def train_step(self, seed: int) -> Callable:
        """The jitted, state-donating train step for ``seed``."""
        if seed not in self._train_steps:
            step = functools.partial(
                train_step, model=self.model, tx=self.tx, loss_fn=self.loss_fn, seed=seed
            )
            if self.mesh is None:
                self._train_steps[seed] = jax.jit(step, donate_argnums=0)
            else:
                batch = {k: self.batch_sharding[k] for k in ("x", "label")}
                replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
                self._train_steps[seed] = jax.jit(
                    step,
                    in_shardings=(self.state_sharding, batch),
                    out_shardings=(self.state_sharding, replicated),
                    donate_argnums=0,
                )
        return self._train_steps[seed]

    def _create(self, seed: int) -> TrainState:
        x = jax.ShapeDtypeStruct((1, *self.input_shape), jnp.float32)
        return create_state(self.model, self.tx, seed, x)

    def init_state(self, seed: int) -> TrainState:
        """A fresh state for ``seed`` (created directly sharded when there is a mesh)."""
        if self.mesh is None:
            return self._create(seed)
        return jax.jit(lambda: self._create(seed), out_shardings=self.state_sharding)()

    def put_batch(self, batch: dict) -> dict:
        """This process's part of a batch -> global (sharded) arrays; unchanged without a mesh."""
        if self.mesh is None:
            return batch
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding[k], np.asarray(v))
            for k, v in batch.items()
        }

    def evaluate(self, state: TrainState, source: Any, indices: np.ndarray) -> dict:
        """Loss and accuracy over ``indices`` (every example exactly once)."""
        totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        for batch in pipeline.eval_batches(
            source,
            indices,
            batch_size=self.config.eval_batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        ):
            out = self.eval_step(
                state, self.put_batch({k: batch[k] for k in ("x", "label", "valid")})
            )
            for key in totals:
                totals[key] += float(out[key])
        return {
            "loss": totals["loss"] / totals["count"],
            "accuracy": totals["correct"] / totals["count"],
        }

    def importance_map(
        self, state: TrainState, source: Any, indices: np.ndarray
    ) -> np.ndarray | None:
        """The mean gate map ``DA`` over ``indices``, or None for fronts without a gate."""
        if self.config.model.front not in ("gaam", "gqgaam", "mixture"):
            return None
        layers = self.model.layers
        n = len(layers) if layers is not None else self.input_shape[0]
        acc = importance.init_state((n, *self.input_shape[1:]))
        update = jax.jit(importance.update)
        for batch in pipeline.eval_batches(source, indices, batch_size=self.config.eval_batch_size):
            acc = update(acc, self.gates(state, batch["x"]), batch["valid"])
        return np.asarray(importance.mean_gate(acc))


def write_atomic(path: pathlib.Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file, so a kill never leaves half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def train_run(
    trainer: Trainer,
    source: Any,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    workdir: str | pathlib.Path,
    *,
    seed: int,
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> dict:
    """Trains one model (one fold and seed), resuming from ``workdir`` if it has checkpoints.

    Writes ``metrics.jsonl`` (one line per epoch, rewritten from the checkpointed history, so
    it never disagrees with the checkpoints), TensorBoard events and checkpoints under
    ``workdir``.

    Args:
      trainer: compiled steps.
      source: ``encoder_features`` data source.
      train_idx: training examples.
      val_idx: validation examples.
      workdir: the run's folder.
      seed: initialisation, step-RNG and data-order seed.
      progress: show a progress bar.
      stop_after_steps: stop (as if killed) after this global step; for tests.

    Returns:
      ``{'best_accuracy', 'best_epoch', 'final_accuracy', 'history', 'state'}``; ``state`` is
      the best state (by validation accuracy).
    """
    cfg = trainer.config
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoints(workdir / "checkpoints", max_to_keep=cfg.max_to_keep)
    state = trainer.init_state(seed)
    meta = {"epoch": 0, "iterator": None, "plateau": plateau.init(), "history": [], "partial": None}
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, meta = restored
    step_fn = trainer.train_step(seed)
    primary = jax.process_index() == 0  # the process that writes logs
    writer = _tensorboard(workdir) if primary else None
    from tqdm import tqdm

    try:
        for epoch in range(meta["epoch"], cfg.num_epochs):
            it = pipeline.train_epoch(
                source, train_idx, batch_size=cfg.batch_size, seed=seed, epoch=epoch
            )
            sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
            if meta["iterator"] is not None and meta["iterator"]["epoch"] == epoch:
                it.set_state(meta["iterator"])
                sums = dict(meta["partial"])
            bar = tqdm(
                total=it.steps, initial=int(sums["count"]) // cfg.batch_size, leave=False,
                desc=f"{workdir.name} epoch {epoch + 1}/{cfg.num_epochs}", disable=not progress,
            )  # fmt: skip
            for batch in it:
                state, m = step_fn(state, trainer.put_batch({k: batch[k] for k in ("x", "label")}))
                loss = float(m["loss"])
                step = int(state.step)
                if not math.isfinite(loss):
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss}) at step {step} (epoch {epoch + 1}) of "
                        f"{workdir}; training stopped and the last good checkpoint in "
                        f"{workdir / 'checkpoints'} was kept."
                    )
                n = cfg.batch_size
                sums = {
                    "loss": sums["loss"] + loss * n,
                    "correct": sums["correct"] + float(m["correct"]),
                    "count": sums["count"] + n,
                }
                bar.update(1)
                bar.set_postfix(loss=f"{sums['loss'] / sums['count']:.4f}")
                if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0:
                    mid = dict(meta, epoch=epoch, iterator=it.get_state(), partial=sums)
                    ckpt.save(step, state, mid)
                if stop_after_steps is not None and step >= stop_after_steps:
                    raise KeyboardInterrupt(f"stopped after step {step}")
            bar.close()
            val = trainer.evaluate(state, source, val_idx)
            new_plateau = plateau.update(
                meta["plateau"],
                val["accuracy"],
                factor=cfg.optimizer.plateau_factor,
                patience=cfg.optimizer.plateau_patience,
            )
            record = {
                "epoch": epoch + 1,
                "step": int(state.step),
                "train_loss": sums["loss"] / sums["count"],
                "train_accuracy": sums["correct"] / sums["count"],
                "val_loss": val["loss"],
                "val_accuracy": val["accuracy"],
                "learning_rate": cfg.optimizer.learning_rate * meta["plateau"]["scale"],
            }
            history = [*meta["history"], record]
            state = state.replace(lr_scale=jnp.asarray(new_plateau["scale"], jnp.float32))
            meta = {
                "epoch": epoch + 1,
                "iterator": None,
                "plateau": new_plateau,
                "history": history,
                "partial": None,
            }
            best_so_far = max(r["val_accuracy"] for r in history[:-1]) if len(history) > 1 else -1.0
            if val["accuracy"] > best_so_far:
                ckpt.save_best(int(state.step), state, meta)
            if (epoch + 1) % cfg.checkpoint_every_epochs == 0 or epoch + 1 == cfg.num_epochs:
                ckpt.save(int(state.step), state, meta)
            if primary:
                _write_metrics(workdir, history)
            if writer is not None:
                for key, value in record.items():
                    if key not in ("epoch", "step"):
                        writer.add_scalar(key, value, record["epoch"])
                writer.flush()
        best = ckpt.restore_best(state)
    finally:
        if writer is not None:
            writer.close()
        ckpt.close()
    history = meta["history"]
    best_state = best[0] if best is not None else state
    best_record = max(history, key=lambda r: r["val_accuracy"])  # first epoch among ties
    return {
        "best_accuracy": best_record["val_accuracy"],
        "best_epoch": best_record["epoch"],
        "final_accuracy": history[-1]["val_accuracy"],
        "history": history,
        "state": best_state,
        "final_state": state,
    }


def _write_metrics(workdir: pathlib.Path, history: list[dict]) -> None:
    write_atomic(workdir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def _tensorboard(workdir: pathlib.Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # TensorBoard logging is optional
        return None
    return SummaryWriter(str(workdir / "tensorboard"))
