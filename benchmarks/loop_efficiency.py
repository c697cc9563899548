"""How busy the training loop keeps the device on the main job (``configs/default.py``).

Efficiency = (optimisation steps of every run x the time of one bare single-run step) / wall
time, where the bare step is the jitted, donated AdamW step of the same decoder on one run's
batch already on the device, timed back to back. Runs that share a vmapped program can exceed
1 (one program step advances several runs). Two figures:

* **end to end**: the training CLI (``python -m train``) in a fresh process and workdir,
  compile, data placement, evaluation, checkpoints, Importance Factor, reports and process
  start included; once per ``--per-program`` setting (``runs_per_program``: 1 trains each run
  as its own program, 0 every run of a shape as one);
* **steady state**: the folds of the first dataset trained again as one program in the same
  process after a warm-up, so compilation is excluded.

This machine's speed drifts by up to 2x over minutes, so every measured run is bracketed by
two bare-step timings and compared with their mean; the table gives the median over runs.

Usage (after ``make features``; about 4 minutes on 2 cores)::

    .venv/bin/python -m benchmarks.loop_efficiency [--config configs/default.py] [--out FILE]
        [--per-program 1,0]

``--quick`` runs the runlocal config (the smoke test). ``--synthetic`` (the device check, where
tfds is not installed) trains on random features of the same shape held in memory and reports
the steady state only.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

from data import pipeline
from train import config as config_lib
from train import feeds, trainer
from train.splits import open_folds
from train.steps import Steps, train_step


def bare_step_seconds(steps: Steps, shape: tuple, repeats: int = 100) -> float:
    """The fastest of 5 timings of ``repeats`` jitted single-run train steps on a batch on device.

    The minimum, not the median: on a shared machine interference only ever adds time, and the
    smaller bare step makes the efficiency figure conservative.
    """
    rng = np.random.default_rng(0)
    batch = jax.device_put(
        {
            "x": rng.normal(size=(steps.batch_size, *shape)).astype(np.float32),
            "label": (np.arange(steps.batch_size) % steps.num_classes).astype(np.int32),
        }
    )
    step = jax.jit(
        functools.partial(train_step, model=steps.model, tx=steps.tx, loss_fn=steps.loss_fn),
        donate_argnums=0,
    )
    state = jax.tree.map(lambda x: x[0], steps.init_state([0]))
    for _ in range(20):
        state, _ = step(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            state, _ = step(state, batch)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - start) / repeats)
    return float(np.min(times))


def program_only_seconds(
    steps: Steps, feed: Any, plan: feeds.Plan, epochs: int
) -> tuple[float, int]:
    """The training program alone over ``epochs`` epochs of ``plan``: (seconds, steps taken).

    The steps are every run's optimisation steps, counted on the state. The same
    ``train_steps`` calls as the loop, dispatched back to back: no evaluation, no epoch end, no
    fetch, no checkpoint. What the loop adds per epoch is the difference.
    """
    state = steps.init_state(np.array(plan.seeds, np.uint32))
    orders = [feed.orders(plan, e) for e in range(epochs)]
    positions = int(orders[0][0].shape[1])
    state, _ = feed.train(state, steps.zero_sums(plan.runs), orders[0], 0, positions)  # warm
    warm = np.asarray(state.step).copy()
    start = time.perf_counter()
    for order in orders:
        state, _ = feed.train(state, steps.zero_sums(plan.runs), order, 0, positions)
    jax.block_until_ready(state)
    wall = time.perf_counter() - start
    return wall, int((np.asarray(state.step) - warm).sum())


def main(argv: list[str] | None = None) -> int:
    """Prints the table; writes it as JSON with ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.py")
    parser.add_argument("--quick", action="store_true", help="the runlocal variant (smoke test)")
    parser.add_argument("--synthetic", action="store_true", help="random in-memory features")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument(
        "--per-program", default="1,0", help="runs_per_program settings to time end to end"
    )
    parser.add_argument(
        "--runs", default="", help="steady state: program sizes, e.g. 1,5,15 (default: the folds)"
    )
    parser.add_argument(
        "--vectorized", default="auto", help="runs_vectorized: auto, or runs vmapped at a time"
    )
    args = parser.parse_args(argv)
    spec = f"{args.config}:runlocal" if args.quick else args.config
    config = config_lib.load(spec)
    with config.ignore_type():  # "auto" (str) or a count (int)
        config.runs_vectorized = (
            args.vectorized if args.vectorized == "auto" else int(args.vectorized)
        )
    if args.synthetic:
        source, classes, shape, folds = synthetic_source()
    else:
        data = open_folds(config, next(iter(config.dataset_paths)))
        source, classes, shape, folds = data.source, data.num_classes, data.input_shape, data.folds
    steps = Steps(config, classes, shape)
    n = 20 if args.quick else 100
    repeats = 1 if args.quick else 3

    # Steady state: programs of the dataset's folds (repeated with new seeds up to each size),
    # trained again and again in this process (the first run compiles), each timed between two
    # bare-step timings.
    feed = feeds.make_feed(steps, source, classes, "auto")
    sizes = [int(r) for r in args.runs.split(",")] if args.runs else [len(folds)]
    rows: dict = {}
    steady = []
    for size in sizes:
        picked = [folds[i % len(folds)] for i in range(size)]
        plan = feeds.Plan(tuple(t for t, _ in picked), tuple(v for _, v in picked),
                          tuple(i // len(folds) for i in range(size)))  # fmt: skip
        measured = []
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(repeats + 1):  # the first run compiles
                before = bare_step_seconds(steps, shape, n) if i else 0.0
                start = time.perf_counter()
                out = trainer.train_program(steps, feed, plan, pathlib.Path(tmp) / f"run{i}")
                wall = time.perf_counter() - start
                if i:
                    bare = (before + bare_step_seconds(steps, shape, n)) / 2
                    total = sum(r.history[-1]["step"] for r in out)
                    measured.append((total * bare / wall, wall, bare))
        steady += measured
        label = f"steady state, {size} runs x {out[0].history[-1]['step']} steps"
        rows[f"{label}: wall (s)"] = float(np.median([w for _, w, _ in measured]))
        rows[f"{label}: efficiency"] = float(np.median([e for e, _, _ in measured]))
        # The same epochs' training programs alone: the loop's per-epoch cost is the rest.
        epochs = 2 if args.quick else 10
        alone = []
        for _ in range(repeats):
            before = bare_step_seconds(steps, shape, n)
            wall, total = program_only_seconds(steps, feed, plan, epochs)
            bare = (before + bare_step_seconds(steps, shape, n)) / 2
            alone.append((total * bare / wall, wall, bare))
        steady += alone
        rows[f"{label}: efficiency of the training program alone"] = float(
            np.median([e for e, _, _ in alone])
        )
    timings = list(steady)
    if not args.synthetic:
        modes = {
            f"runs_per_program={k}": [f"--config.runs_per_program={k}"]
            for k in args.per_program.split(",")
        }
        e2e: dict[str, list] = {mode: [] for mode in modes}
        for _ in range(1 if args.quick else 2):
            for mode, extra in modes.items():  # alternated, so both see the same drift
                before = bare_step_seconds(steps, shape, n)
                result = end_to_end(spec, extra)
                bare = (before + bare_step_seconds(steps, shape, n)) / 2
                e2e[mode].append((result["steps"] * bare / result["wall"], result["wall"], bare))
        rows["end to end: steps"] = result["steps"]
        for mode, runs in e2e.items():
            timings += runs
            rows[f"end to end, {mode}: CLI wall (s)"] = float(np.median([w for _, w, _ in runs]))
            rows[f"end to end, {mode}: efficiency"] = float(np.median([e for e, _, _ in runs]))
    rows["bare step (ms), mean of all timings"] = 1e3 * float(np.mean([b for *_, b in timings]))
    print(
        f"Loop efficiency on {spec} ({jax.default_backend()}, {jax.device_count()} device(s), "
        f"runs_vectorized={config.runs_vectorized})"
    )
    print("| measure | value |\n|---|---|")
    for key, value in rows.items():
        print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def synthetic_source(n: int = 200, shape: tuple = (6, 384)):
    """Random two-class features of the main job's shape, and its stratified 5 folds."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    source = [
        {"features": rng.normal(size=shape).astype(np.float32), "label": int(y), "id": i}
        for i, y in enumerate(labels)
    ]
    return source, 2, shape, pipeline.stratified_kfold(labels, 5, 0)


def end_to_end(spec: str, extra: list[str]) -> dict:
    """The training CLI in a fresh process and workdir: its steps and wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "train", "--config", spec, "--workdir", tmp, "--no-progress"]
        cmd += extra
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        cli_wall = time.perf_counter() - start
        results = json.loads((pathlib.Path(tmp) / "results.json").read_text())
    return {"steps": sum(r["steps"] for r in results["records"]), "wall": cli_wall}


if __name__ == "__main__":
    sys.exit(main())
