"""How busy the training loop keeps the device on the main job (``configs/default.py``).

Efficiency = (optimisation steps x the time of one bare jitted step) / wall time, where the bare
step is the jitted, donated AdamW step of the same decoder on a batch already on the device,
timed back to back. Two figures:

* **end to end**: the training CLI (``python -m train``) in a fresh process and workdir,
  compile, data placement, evaluation, checkpoints, Importance Factor, reports and process
  start included;
* **steady state**: one run (one fold) trained again in the same process after a warm-up run,
  so compilation is excluded; as in the CLI, the run's last checkpoint is committed on a
  background thread (awaited after the timing, before the next run).

End to end is measured twice: with runs trained one at a time (``--config.concurrent_runs=1``,
the like-for-like figure for the loop's overhead) and with the config's default (two runs side
by side on a CPU, :mod:`train.parallel_runs`), which can exceed 1 because one stream of steps
leaves part of the CPU idle.

This machine's speed drifts by up to 2x over minutes, so every measured run is bracketed by
two bare-step timings and compared with their mean; the table gives the median over runs.

Usage (after ``make features``; about 3 minutes on 2 cores)::

    .venv/bin/python -m benchmarks.loop_efficiency [--config configs/default.py] [--out FILE]

``--quick`` runs the runlocal config (the smoke test). ``--synthetic`` (the device check, where
tfds is not installed) trains on random features of the same shape held in memory and reports
the steady state only.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from data import pipeline
from train import config as config_lib
from train import cross_validation, feeds, loop
from train.steps import Steps


def bare_step_seconds(steps: Steps, shape: tuple, repeats: int = 100) -> float:
    """The fastest of 5 timings of ``repeats`` jitted train steps on a device-resident batch.

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
    state = steps.init_state(0)
    for _ in range(20):
        state, _ = steps.train_step(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            state, _ = steps.train_step(state, batch)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - start) / repeats)
    return float(np.min(times))


def main(argv: list[str] | None = None) -> int:
    """Prints the table; writes it as JSON with ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.py")
    parser.add_argument("--quick", action="store_true", help="the runlocal variant (smoke test)")
    parser.add_argument("--synthetic", action="store_true", help="random in-memory features")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    spec = f"{args.config}:runlocal" if args.quick else args.config
    config = config_lib.load(spec)
    if args.synthetic:
        source, classes, shape, folds = synthetic_source()
    else:
        split = cross_validation.open_split(config, next(iter(config.dataset_paths)))
        source, classes, shape, folds = (
            split.source,
            split.num_classes,
            split.input_shape,
            split.folds,
        )
    steps = Steps(config, classes, shape)
    n = 20 if args.quick else 100
    repeats = 1 if args.quick else 3

    # Steady state: one fold trained again and again in this process (the first run compiles),
    # each run timed between two bare-step timings, so both see the same machine speed.
    feed = feeds.make_feed(steps, source, classes, "auto")
    tr, va = folds[0]
    steady = []
    background = cross_validation.Background()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats + 1):  # the first run compiles
            before = bare_step_seconds(steps, shape, n) if i else 0.0
            start = time.perf_counter()
            out = loop.train_run(
                steps, feed, tr, va, pathlib.Path(tmp) / f"run{i}", seed=0, background=background
            )
            wall = time.perf_counter() - start
            out.committed.result()
            if i:
                bare = (before + bare_step_seconds(steps, shape, n)) / 2
                steady.append((out.history[-1]["step"] * bare / wall, wall, bare))
    background.close()
    rows = {
        "steady state: steps per run": out.history[-1]["step"],
        "steady state: wall (s)": float(np.median([w for _, w, _ in steady])),
        "steady state: efficiency": float(np.median([e for e, _, _ in steady])),
    }
    timings = list(steady)
    if not args.synthetic:
        modes = {"one run at a time": ["--config.concurrent_runs=1"], "default": []}
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
    print(f"Loop efficiency on {spec} ({jax.default_backend()}, {jax.device_count()} device(s))")
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
