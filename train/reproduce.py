"""``python -m train.reproduce``: the offline re-run of the paper's comparison, end to end.

Steps, each resumable (a finished run keeps its ``result.json`` and is not redone):

1. every variant of the experiment config (``configs/reproduce.py``: the paper's decoders, a
   no-attention baseline and a frozen GAAM) on every dataset, cross-validated over its seeds;
2. the Importance-Factor layer ablation: for each variant in ``ABLATION['sources']``, from its
   IF (averaged over all its runs) pick the ``num_layers`` highest-IF and lowest-IF layers and
   retrain that variant on each set alone (``<source>_high_if``, ``<source>_low_if``);
3. ``docs/results.md`` with the tables, the heatmaps of the ``HEATMAPS`` variants (default: the
   ablation sources) and the machine (:mod:`train.results_doc`).

The config file defines ``get_config(variant)``, ``VARIANTS`` (names), ``ABLATION``
(``sources``, ``num_layers``, ``overrides``) and optionally ``HEATMAPS``.

Jobs (one variant on one dataset) run one after another in this process; within a job every
seed and fold trains as one vmapped program (:mod:`train.cross_validation`).

Usage::

    python -m train.reproduce --workdir out/reproduce --docs docs/results.md
        [--config configs/reproduce.py] [--config.<key>=<value> ...]

``--config.*`` overrides apply to every variant (e.g. ``--config.num_epochs=2`` for a trial).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np

from train import config as config_lib
from train.results_doc import job_root as job_dir
from train.runs import mean_gate, write_atomic


def run_job(
    config_path: str,
    variant: str,
    dataset: str,
    overrides: Sequence[str],
    workdir: str,
) -> dict:
    """Trains ``variant`` on ``dataset`` (all seeds and folds).

    Returns:
      ``{'results': cross_validation.run's results, 'seconds': this call's time, 'fresh':
      whether the job had no finished results before}``.
    """
    from train import cross_validation, validate

    config = config_lib.load(f"{config_path}:{variant}", overrides)
    if dataset not in config.dataset_paths:
        raise ValueError(f"{config_path}:{variant} has no dataset {dataset!r}.")
    with config.unlocked():
        for name in list(config.dataset_paths):
            if name != dataset:
                del config.dataset_paths[name]
    fresh = not (pathlib.Path(workdir) / "results.json").exists()
    start = time.perf_counter()
    datasets = validate.prepare(config, workdir)
    results = cross_validation.run(config, workdir, datasets=datasets, progress=False)
    seconds = time.perf_counter() - start
    print(f"[reproduce] {variant} on {dataset}: {seconds:.0f} s", flush=True)
    return {"results": results, "seconds": seconds, "fresh": fresh}


def pick_layers(gate: np.ndarray, num_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ``num_layers`` highest- and lowest-IF layers (0-based, sorted) of a gate map."""
    from gaam_jax import importance

    order = [int(i) for i in importance.rank_layers(importance.importance_factor(gate))]
    if not 0 < num_layers <= len(order) // 2:
        raise ValueError(
            f"ablation.num_layers must be in [1, {len(order) // 2}], got {num_layers}."
        )
    return tuple(sorted(order[:num_layers])), tuple(sorted(order[-num_layers:]))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m train.reproduce", description=__doc__)
    parser.add_argument("--config", default="configs/reproduce.py", help="experiment config")
    parser.add_argument("--workdir", default="out/reproduce", help="runs and results")
    parser.add_argument("--docs", default="docs/results.md", help="the report to write")
    args, rest = parser.parse_known_args(argv)
    for item in rest:
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r} (overrides look like --config.key=value)")
    overrides = [item.removeprefix("--config.") for item in rest]
    try:  # fail before any work on a bad config, override or dataset
        module = config_lib.load_module(args.config)
        variants = list(module.VARIANTS)
        from train import validate

        for variant in variants:
            base = config_lib.load(f"{args.config}:{variant}", overrides)
            validate.check(base, args.workdir)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {config_lib.one_line(err)}", file=sys.stderr)
        return 2
    datasets = list(base.dataset_paths)
    workdir = pathlib.Path(args.workdir)
    ablation = dict(module.ABLATION)
    start = time.perf_counter()

    def job(variant, dataset, name, extra=()):
        path = str(job_dir(workdir, name, dataset))
        return run_job(args.config, variant, dataset, [*overrides, *extra], path)

    done = {(v, d): job(v, d, v) for v in variants for d in datasets}
    chosen = {}
    for source in ablation["sources"]:
        for d in datasets:
            gate = mean_gate(job_dir(workdir, source, d))
            high, low = pick_layers(gate, ablation["num_layers"])
            chosen.setdefault(source, {})[d] = {"high": high, "low": low}
            for which, layers in chosen[source][d].items():
                extra = [f"model.layers={layers}", *ablation["overrides"]]
                done[(f"{source}_{which}_if", d)] = job(source, d, f"{source}_{which}_if", extra)
    # Job times, kept from the invocation that trained each job (a resumed job costs ~0 s).
    timings_path = workdir / "job_seconds.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for (v, d), job in done.items():
        if job["fresh"] or f"{v}/{d}" not in timings:
            timings[f"{v}/{d}"] = job["seconds"]
    write_atomic(timings_path, json.dumps(timings, indent=1))
    summary = {
        "config": args.config,
        "overrides": overrides,
        "variants": variants,
        "datasets": datasets,
        "seeds": list(base.seeds),
        "ablation": {**ablation, "layers": chosen},
        "heatmaps": list(getattr(module, "HEATMAPS", ablation["sources"])),
        "wall_seconds": time.perf_counter() - start,
        "job_seconds": timings,
        "results": {f"{v}/{d}": job["results"] for (v, d), job in done.items()},
    }
    write_atomic(workdir / "summary.json", json.dumps(summary, indent=1))
    from train import results_doc

    results_doc.write(workdir, pathlib.Path(args.docs), summary)
    print(f"wrote {args.docs}; wall time {summary['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
