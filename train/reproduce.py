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
seed and fold trains as one vmapped program (:mod:`train.trainer`).

Usage::

    python -m train.reproduce --workdir out/reproduce --docs docs/results.md
        [--config configs/reproduce.py] [--config.<key>=<value> ...]

``--config.*`` overrides apply to every variant (e.g. ``--config.num_epochs=2`` for a trial).
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from app import cli, storage
from train import config as config_lib
from train.results_doc import job_root as job_dir
from train.runs import mean_gate


def run_job(
    config_path: str,
    variant: str,
    dataset: str,
    overrides: Sequence[str],
    workdir: str,
    mesh: dict | None = None,
) -> dict:
    """Trains ``variant`` on ``dataset`` (all seeds and folds).

    Returns:
      ``{'results': train.trainer.run's results, 'seconds': this call's time, 'fresh':
      whether the job had no finished results before}``.
    """
    from train import trainer

    config = _load(f"{config_path}:{variant}", overrides, mesh)
    if dataset not in config.dataset_paths:
        raise ValueError(f"{config_path}:{variant} has no dataset {dataset!r}.")
    with config.unlocked():
        for name in list(config.dataset_paths):
            if name != dataset:
                del config.dataset_paths[name]
    fresh = not (storage.path(workdir) / "results.json").exists()
    start = time.perf_counter()
    results = trainer.run(config, workdir, progress=False)
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
    """Command-line entry point (the convention of :mod:`app.cli`)."""
    parser = cli.Parser("python -m train.reproduce", __doc__.split("\n")[0], config_overrides=True)
    parser.add_argument("--config", default="configs/reproduce.py", help="experiment config")
    parser.add_argument("--workdir", default="out/reproduce", help="runs and results")
    parser.add_argument("--docs", default="docs/results.md", help="the report to write")
    parser.add_argument("--mesh", default=None, help="device mesh, e.g. runs=-1")
    args, overrides = parser.parse(argv)

    def work() -> int:
        try:
            mesh = None if args.mesh is None else cli.parse_mesh(args.mesh)
        except ValueError as err:
            raise config_lib.ConfigError(str(err)) from None
        return _reproduce(args, overrides, mesh)

    return cli.run(work, debug=args.debug, user_error=lambda err: cli.user_error(err, args.workdir))


def _load(spec: str, overrides: Sequence[str], mesh: dict | None) -> Any:
    config = config_lib.load(spec, overrides)
    if mesh is not None:
        with config.unlocked():
            config.mesh = mesh
    return config


def _reproduce(args: Any, overrides: list[str], mesh: dict | None) -> int:
    # Fail before any work on a bad config, override or dataset.
    from train import trainer

    try:
        module = config_lib.load_module(args.config)
        variants = list(module.VARIANTS)
        for variant in variants:
            base = _load(f"{args.config}:{variant}", overrides, mesh)
            trainer.check(base, args.workdir)
    except ValueError as err:  # ConfigError included
        raise config_lib.ConfigError(cli.one_line(err)) from err
    datasets = list(base.dataset_paths)
    workdir = storage.path(args.workdir)  # a local folder or a gs:// URL
    ablation = dict(module.ABLATION)
    start = time.perf_counter()

    def job(variant, dataset, name, extra=()):
        path = str(job_dir(workdir, name, dataset))
        return run_job(args.config, variant, dataset, [*overrides, *extra], path, mesh)

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
    storage.write_atomic(timings_path, json.dumps(timings, indent=1))
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
    storage.write_atomic(workdir / "summary.json", json.dumps(summary, indent=1))
    from train import results_doc

    results_doc.write(workdir, pathlib.Path(args.docs), summary)
    print(f"wrote {args.docs}; wall time {summary['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
