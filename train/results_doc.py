"""Renders ``docs/results.md`` from a finished :mod:`train.reproduce` work folder.

Everything numeric in the document is computed here from the runs' records
(:class:`train.runs.RunRecord`), so rerunning the command rewrites it. K-fold jobs get a
column per fold (averaged over seeds), held-out-split jobs a column per run (seed). The
hand-written reading between the markers ``<!-- reading:start -->`` and
``<!-- reading:end -->`` of an existing document is kept.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform

import numpy as np

from app import storage
from train import report
from train import runs as run_records

READING_START, READING_END = "<!-- reading:start -->", "<!-- reading:end -->"
PLACEHOLDER = "(Write the reading of these numbers here; regenerating keeps this section.)"

# The paper's mean +- std (docs/design.md, "Results"), for orientation only: other data,
# encoders and scale.
PAPER = {
    "IEMOCAP (WavLM)": {
        "daamv1": "67.4 ± 1.49", "daamv2": "64.6 ± 2.47", "gqdaam": "66.7 ± 1.18",
        "mixture": "67.9 ± 1.35", "mha": "62.3 ± 2.00", "mha_bn": "63.4 ± 2.50",
    },
    "CIFAR-100 (BEiT)": {
        "daamv1": "80.3 ± 0.32", "daamv2": "80.6 ± 0.36", "gqdaam": "80.1 ± 0.24",
        "mixture": "80.3 ± 0.3", "mha": "61.7 ± 0.75", "mha_bn": "66.1 ± 2.25",
    },
    "AG News (Llama 2)": {
        "daamv1": "94.6 ± 0.11", "daamv2": "94.5 ± 0.08", "gqdaam": "94.9 ± 0.06",
        "mixture": "94.6 ± 0.05", "mha": "94.6 ± 0.16", "mha_bn": "94.6 ± 0.11",
    },
}  # fmt: skip


def job_root(workdir: pathlib.Path, variant: str, dataset: str) -> pathlib.Path:
    """Where :mod:`train.reproduce` trains ``variant`` on ``dataset`` (its runs' parent)."""
    return workdir / variant / dataset


def load_runs(workdir: pathlib.Path, variant: str, dataset: str) -> dict:
    """One job's records as arrays.

    Returns:
      ``best``, ``final``, ``seeds``, ``folds`` (the column groups: the fold for k-fold, the run
      for a held-out split), the column ``prefix`` and ``gaussian_parameters``.
    """
    records = [
        r
        for r in run_records.load_records(job_root(workdir, variant, dataset))
        if r.dataset == dataset
    ]
    if not records:
        raise FileNotFoundError(f"no run records of {variant} on {dataset} under {workdir}.")
    records.sort(key=lambda r: (r.seed, r.fold or 0, r.run))
    holdout = records[0].fold is None
    return {
        "best": np.asarray([r.best_accuracy for r in records]),
        "final": np.asarray([r.final_accuracy for r in records]),
        "seeds": np.asarray([r.seed for r in records]),
        "folds": np.asarray([r.run for r in records]),
        "prefix": "R" if holdout else "F",
        "gaussian_parameters": [r.gaussian_parameters for r in records],
    }


def fold_means(runs: dict, metric: str) -> tuple[list[str], np.ndarray]:
    """Per-column accuracy (a fold averaged over seeds, or one held-out run): names, values."""
    folds = sorted(set(runs["folds"].tolist()))
    values = np.array([runs[metric][runs["folds"] == f].mean() for f in folds])
    return [f"{runs['prefix']}{f}" for f in folds], values


def paired(runs: dict, reference: dict, metric: str) -> str:
    """The paired comparison of two variants over the same (seed, fold) runs.

    Returns:
      ``'+d ± se (W/T/L)'``: mean difference in points, its standard error, and the counts of
      runs that win, tie and lose.
    """
    if not (
        np.array_equal(runs["seeds"], reference["seeds"])
        and np.array_equal(runs["folds"], reference["folds"])
    ):
        raise ValueError("paired comparison needs the same seeds and folds.")
    diff = 100 * (runs[metric] - reference[metric])
    se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    wins, ties = int(np.sum(diff > 1e-9)), int(np.sum(np.abs(diff) <= 1e-9))
    return f"{diff.mean():+.2f} ± {se:.2f} ({wins}/{ties}/{len(diff) - wins - ties})"


def accuracy_table(all_runs: dict[str, dict], metric: str, references: tuple[str, ...]) -> str:
    """A Markdown accuracy table with a row per variant.

    Columns: each fold (mean over seeds), the paper's mean ± std over the folds, mean ± std over
    every run, and the paired differences against each of ``references``.
    """
    first = next(iter(all_runs.values()))
    columns, _ = fold_means(first, metric)
    n = len(first[metric])
    refs = [r for r in references if r in all_runs]
    header = ["variant", *columns, "mean ± std (folds)", f"mean ± std ({n} runs)"]
    header += [f"Δ vs {r} (W/T/L)" for r in refs]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, runs in all_runs.items():
        _, values = fold_means(runs, metric)
        mean, std = report.mean_std(100 * values)
        all_mean, all_std = report.mean_std(100 * runs[metric])
        cells = [f"{100 * v:.1f}" for v in values]
        cells += [f"{mean:.2f} ± {std:.2f}", f"{all_mean:.2f} ± {all_std:.2f}"]
        cells += ["—" if r == variant else paired(runs, all_runs[r], metric) for r in refs]
        lines.append("| " + " | ".join([f"`{variant}`", *cells]) + " |")
    return "\n".join(lines)


def gaussian_ranges(all_runs: dict[str, dict]) -> str:
    """Min-max of the learned GAAM parameters over every run, per variant and module."""
    lines = ["| variant | module | mean offset (delta) | scaled variance (xi) or scale (c) |",
             "|---|---|---|---|"]  # fmt: skip
    for variant, runs in all_runs.items():
        merged: dict[str, dict[str, list]] = {}
        for summary in runs["gaussian_parameters"]:
            for module, ranges in summary.items():
                for key, (lo, hi) in ranges.items():
                    merged.setdefault(module, {}).setdefault(key, []).append((lo, hi))
        for module, ranges in merged.items():
            cells = []
            for key in ("mean_offset", "scaled_variance", "scale"):
                if key in ranges:
                    lo = min(r[0] for r in ranges[key])
                    hi = max(r[1] for r in ranges[key])
                    cells.append(f"[{lo:.4f}, {hi:.4f}]")
            lines.append(f"| `{variant}` | `{module}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heatmaps(workdir: pathlib.Path, figures: pathlib.Path, variant: str, dataset: str) -> str:
    """Saves the run-averaged IF heatmap of ``variant`` and returns its Markdown block."""
    from gaam_jax import importance

    gate = run_records.mean_gate(job_root(workdir, variant, dataset))
    if_map = importance.importance_factor(gate)
    name = f"if_{dataset}_{variant}.png"
    importance.plot_heatmap(
        if_map, figures / name, title=f"Importance Factor: {variant} on {dataset}, all runs"
    )
    shares = np.asarray(importance.layer_contribution(gate))
    ranking = [int(i) for i in importance.rank_layers(if_map)]
    per_layer = np.asarray(if_map).mean(axis=-1)
    rows = " | ".join(f"{v:.3f}" for v in per_layer)
    share_row = " | ".join(f"{v:.2f}" for v in shares)
    head = " | ".join(f"L{i}" for i in range(len(per_layer)))
    return (
        f"![IF {variant} {dataset}](figures/{name})\n\n"
        f"| {dataset}, `{variant}` | {head} |\n|---|" + "---|" * len(per_layer) + "\n"
        f"| mean IF over features | {rows} |\n"
        f"| layer contribution (%) | {share_row} |\n\n"
        f"Layers by mean IF, highest first (0-based): {ranking}.\n"
    )


def ablation_section(
    workdir: pathlib.Path, ablation: dict, source: str, dataset: str, full: dict
) -> list[str]:
    """The layer-ablation tables of ``source`` on ``dataset`` (``full``: its all-layer runs)."""
    layers = ablation["layers"][source][dataset]
    k = ablation["num_layers"]
    runs = {f"{source}_{w}_if": load_runs(workdir, f"{source}_{w}_if", dataset) for w in layers}
    runs[f"{source} (all layers)"] = full
    low = (f"{source}_low_if",)
    return [
        f"### Layer ablation from the IF of `{source}`",
        "",
        f"`{source}` retrained on its {k} highest-IF layers ({list(layers['high'])}, 0-based) "
        f"and on its {k} lowest-IF layers ({list(layers['low'])}), with "
        f"`{', '.join(ablation['overrides'])}`. The layers were ranked by the IF of `{source}` "
        "on these same validation folds, as the paper does.",
        "",
        "Best epoch:",
        "",
        accuracy_table(runs, "best", low),
        "",
        "Final epoch:",
        "",
        accuracy_table(runs, "final", low),
        "",
    ]


def machine() -> str:
    """One line naming the machine and the software."""
    import jax

    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, jax {jax.__version__} "
        f"on {jax.default_backend()} ({jax.device_count()} device(s))"
    )


def write(workdir: pathlib.Path, docs: pathlib.Path, summary: dict) -> None:
    """Writes ``docs`` (and its ``figures/``) from the runs under ``workdir``."""
    docs.parent.mkdir(parents=True, exist_ok=True)
    figures = docs.parent / "figures"
    reading = PLACEHOLDER
    if docs.exists():
        old = docs.read_text()
        if READING_START in old and READING_END in old:
            reading = old.split(READING_START, 1)[1].split(READING_END, 1)[0].strip()
    ablation = summary["ablation"]
    seeds, variants = summary["seeds"], summary["variants"]
    command = "python -m train.reproduce " + " ".join(
        [f"--config {summary['config']}", *(f"--config.{o}" for o in summary["overrides"])]
    )
    out = [
        "# Results: the paper's comparison, re-run offline",
        "",
        "Generated by `make reproduce` "
        f"(`{command}`) on {datetime.date.today().isoformat()}; "
        f"{sum(summary['job_seconds'].values()) / 60:.0f} min of job time (each job's seeds "
        "and folds trained as one vmapped program).",
        f"Machine: {machine()}.",
        "",
        "**Setup.** Frozen all-MiniLM-L6-v2 features (`[6, 384]`: the 6 layer outputs, "
        "mean-pooled over tokens) of the two offline real text datasets: `pang_lee_polarity` "
        "(200 movie-review sentences, positive/negative) and `mini_newsgroup` (200 newsgroup "
        "posts, 2 classes). Stratified 5-fold cross-validation (the same folds for every "
        f"variant) repeated over seeds {seeds} (initialisation and data order). Variants and "
        "recipe: `configs/reproduce.py`. Accuracy is on the validation fold (40 examples, so "
        "one example is 2.5 points).",
        "",
        "Tables: F1..F5 are per-fold accuracies averaged over the seeds; *mean ± std (folds)* is "
        "the paper's format over those 5 values (population std); *mean ± std (runs)* is over "
        "every (seed, fold) run. *Δ vs X* is the mean paired difference in points against "
        "variant X over the same (seed, fold) runs, ± its standard error, with wins/ties/losses.",
        "",
    ]
    for dataset in summary["datasets"]:
        all_runs = {v: load_runs(workdir, v, dataset) for v in variants}
        out += [
            f"## {dataset}",
            "",
            "Best-epoch validation accuracy (%), what the paper reports (the epoch is picked on "
            "the validation fold itself, so it is optimistic):",
            "",
            accuracy_table(all_runs, "best", ("none", "daamv1")),
            "",
            "Final-epoch validation accuracy (%), no selection on the validation fold:",
            "",
            accuracy_table(all_runs, "final", ("none", "daamv1")),
            "",
            "Learned Gaussian parameters, min-max over all runs (init: delta 0, xi 2; "
            "the mixture's c starts as exp(N(0, 1))):",
            "",
            gaussian_ranges({v: r for v, r in all_runs.items() if r["gaussian_parameters"][0]}),
            "",
            "### Importance Factor",
            "",
        ]
        for variant in summary["heatmaps"]:
            out += [heatmaps(workdir, figures, variant, dataset), ""]
        for source in ablation["sources"]:
            out += ablation_section(workdir, ablation, source, dataset, all_runs[source])
    out += [
        "## The paper's numbers, for orientation",
        "",
        "Mean ± std from the paper (docs/design.md): other datasets, far larger "
        "encoders (24-40 layers of 1024-5120 features) and 4,000-120,000 training examples, "
        "so only the *ordering* can be compared with the tables above.",
        "",
        "| paper | " + " | ".join(f"`{v}`" for v in PAPER["IEMOCAP (WavLM)"]) + " |",
        "|---|" + "---|" * len(PAPER["IEMOCAP (WavLM)"]),
    ]
    for name, row in PAPER.items():
        out.append(f"| {name} | " + " | ".join(row.values()) + " |")
    out += ["", "## Reading", "", READING_START, reading, READING_END, ""]
    storage.write_atomic(docs, "\n".join(out))
