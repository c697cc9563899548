"""How busy the training loop keeps the device on the main job (``configs/default.py``).

Efficiency = (optimisation steps x the time of one bare jitted step) / wall time, where the bare
step is the jitted, donated AdamW step of the same decoder on a batch already on the device,
timed back to back. Two figures:

* **end to end**: the training CLI (``python -m train``) in a fresh process, compile, data
  placement, evaluation, checkpoints, Importance Factor, reports and process start included;
* **steady state**: one run (one fold) trained again in the same process after a warm-up run,
  so compilation is excluded.

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


def bare_step_seconds(steps: Steps, shape: tuple, repeats: int = 200) -> float:
    """Median-of-3 time of one jitted train step on a device-resident batch."""
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
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            state, _ = steps.train_step(state, batch)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - start) / repeats)
    return float(np.median(times))


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
    bare = bare_step_seconds(steps, shape, repeats=20 if args.quick else 200)

    # Steady state: a run of one fold, after a warm-up run of the same fold in this process.
    feed = feeds.make_feed(steps, source, classes, "auto")
    tr, va = folds[0]
    with tempfile.TemporaryDirectory() as tmp:
        loop.train_run(steps, feed, tr, va, pathlib.Path(tmp) / "warm", seed=0)
        start = time.perf_counter()
        out = loop.train_run(steps, feed, tr, va, pathlib.Path(tmp) / "run", seed=0)
        steady_wall = time.perf_counter() - start
    steady_steps = out.history[-1]["step"]

    rows = {
        "bare step (ms)": 1e3 * bare,
        "steady state: steps": steady_steps,
        "steady state: wall (s)": steady_wall,
        "steady state: efficiency": steady_steps * bare / steady_wall,
    }
    if not args.synthetic:
        rows.update(end_to_end(spec, bare))
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


def end_to_end(spec: str, bare: float) -> dict:
    """The training CLI in a fresh process: its wall time and efficiency."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "train", "--config", spec, "--workdir", tmp, "--no-progress"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        cli_wall = time.perf_counter() - start
        results = json.loads((pathlib.Path(tmp) / "results.json").read_text())
    total_steps = sum(r["steps"] for r in results["records"])
    return {
        "end to end: steps": total_steps,
        "end to end: CLI wall (s)": cli_wall,
        "end to end: efficiency": total_steps * bare / cli_wall,
    }


if __name__ == "__main__":
    sys.exit(main())
