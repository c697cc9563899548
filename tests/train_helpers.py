"""Shared helpers for the training tests: a small learnable feature dataset and a tiny config."""

import json
import pathlib
import textwrap

import numpy as np

from data.datasets import encoder_features


def toy_features(folder: pathlib.Path, n: int = 80, layers: int = 4, dim: int = 16, seed: int = 0):
    """Builds a 2-class encoder_features dataset whose class shifts one layer's mean."""
    shards = folder / "shards"
    shards.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    x = rng.normal(size=(n, layers, dim)).astype(np.float32)
    x[:, 1, :] += 1.5 * labels[:, None]
    np.savez(shards / encoder_features.shard_name(0), features=x, label=labels, id=np.arange(n))
    manifest = dict(encoder="toy", pooling="mean", num_layers=layers, dim=dim, dtype="float32",
                    label_names=["a", "b"], num_shards=1, source="toy/train")  # fmt: skip
    (shards / encoder_features.MANIFEST).write_text(json.dumps(manifest))
    builder = encoder_features.build(shards, folder / "data", "toy")
    return pathlib.Path(builder.data_dir)


def mock_features(
    folder: pathlib.Path,
    name: str,
    *,
    n: int,
    layers: int,
    dim: int,
    classes: int,
    groups: int = 0,
    seed: int = 0,
) -> pathlib.Path:
    """Builds an ``encoder_features`` dataset of random features of a paper's shape.

    Labels cycle through ``classes``; with ``groups`` > 0 the examples are dealt into groups
    1..groups (IEMOCAP sessions).
    """
    shards = folder / f"shards_{name}"
    shards.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    arrays = dict(
        features=rng.normal(size=(n, layers, dim)).astype(np.float32),
        label=np.arange(n) % classes,
        id=np.arange(n),
    )
    if groups:
        arrays["group"] = 1 + np.arange(n) % groups
    np.savez(shards / encoder_features.shard_name(0), **arrays)
    manifest = dict(encoder="mock", pooling="mean", num_layers=layers, dim=dim, dtype="float32",
                    label_names=[f"c{i}" for i in range(classes)], num_shards=1,
                    source=f"mock/{name}")  # fmt: skip
    (shards / encoder_features.MANIFEST).write_text(json.dumps(manifest))
    builder = encoder_features.build(shards, folder / "data", name)
    return pathlib.Path(builder.data_dir)


def tiny_config(path: pathlib.Path, dataset: pathlib.Path, **overrides) -> pathlib.Path:
    """Writes a config file for a tiny, fast run on ``dataset``."""
    values = dict(
        num_epochs=4, batch_size=8, checkpoint_every_epochs=1, checkpoint_every_steps=0,
        learning_rate=3e-3, k=2, front="gaam", loss="cross_entropy", data_on_device="auto",
        log_every_steps=0, runs_per_program=0, runs_vectorized="auto",
    )  # fmt: skip
    values.update(overrides)
    path.write_text(
        textwrap.dedent(
            f"""
            import ml_collections

            def get_config():
                c = ml_collections.ConfigDict()
                c.dataset_paths = ml_collections.ConfigDict({{"toy": "{dataset}"}})
                c.model = ml_collections.ConfigDict(dict(
                    front="{values["front"]}", num_heads=2, num_gaussians=2, attention_dim=16,
                    query_heads=4, kv_heads=2, gqa="paper_code", conv_features=8, map_shape=(),
                    variance="shifted", dtype="float32"))
                c.optimizer = ml_collections.ConfigDict(dict(
                    learning_rate={values["learning_rate"]}, weight_decay=0.01, grad_clip=1000.0,
                    plateau_factor=0.1, plateau_patience=1, frozen=()))
                c.loss = "{values["loss"]}"
                c.batch_size = {values["batch_size"]}
                c.eval_batch_size = 16
                c.num_epochs = {values["num_epochs"]}
                c.cv = ml_collections.ConfigDict(
                    dict(kind="stratified_kfold", k={values["k"]}, seed=0))
                c.seeds = (0,)
                c.checkpoint_every_epochs = {values["checkpoint_every_epochs"]}
                c.checkpoint_every_steps = {values["checkpoint_every_steps"]}
                c.log_every_steps = {values["log_every_steps"]}
                c.max_to_keep = 2
                c.data_on_device = {values["data_on_device"]!r}
                c.runs_per_program = {values["runs_per_program"]}
                c.runs_vectorized = {values["runs_vectorized"]!r}
                return c
            """
        )
    )
    return path


_STEPS: dict = {}


def toy_program(toy, tmp_path, *, folds=(0,), seeds=None, on_device=True, mesh=None, **overrides):
    """The toy config, a plan of some of its folds, compiled steps and a feed.

    Steps are shared by calls whose model, optimiser, loss and batch sizes agree (the loop's
    schedule is passed to ``train_program`` as ``config``).

    Returns:
      ``(config, dataset, steps, feed, plan)``.
    """
    from train import config as config_lib
    from train import feeds
    from train.splits import open_folds
    from train.steps import Steps

    config = config_lib.load(tiny_config(tmp_path / "cfg.py", toy, **overrides))
    dataset = open_folds(config, "toy")
    key = repr((config.model, config.optimizer, config.loss, config.batch_size, mesh,
                config.runs_vectorized))  # fmt: skip
    if key not in _STEPS:
        _STEPS[key] = Steps(config, dataset.num_classes, dataset.input_shape, mesh=mesh)
    steps = _STEPS[key]
    feed = (feeds.DeviceFeed if on_device else feeds.GrainFeed)(steps, dataset.source, 2)
    seeds = tuple(seeds) if seeds is not None else (0,) * len(folds)
    plan = feeds.Plan(
        train=tuple(dataset.folds[f][0] for f in folds),
        val=tuple(dataset.folds[f][1] for f in folds),
        seeds=seeds,
        names=tuple(f"toy seed {s} fold {f + 1}" for s, f in zip(seeds, folds, strict=True)),
    )
    return config, dataset, steps, feed, plan


class Stop(Exception):
    """Raised by :func:`stop_after`'s hook: a training interrupted at a known step."""


def stop_after(step: int):
    """Loop hooks that stop training at the first fetch point at or after ``step``."""
    from train import progress

    def hook(done):
        if done >= step:
            raise Stop(done)

    return progress.Hooks(after_fetch=hook)
