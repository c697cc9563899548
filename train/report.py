"""The paper-style results tables, from run records: a column per fold or run, then mean +- std."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from train.runs import RunRecord


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and *population* standard deviation (ddof=0), as the paper reports."""
    arr = np.asarray(values, np.float64)
    return float(arr.mean()), float(arr.std(ddof=0))


def table(
    rows: Mapping[str, Sequence[float]], columns: Sequence[str], *, scale: float = 100.0
) -> str:
    """A Markdown table: a row per model/dataset, a column per fold/run, then ``mean +- std``.

    Args:
      rows: row name -> one value per column (accuracies in [0, 1]).
      columns: column names (``F1``..``Fk`` or ``R1``..``Rn``).
      scale: multiply values by this (100 for percent).
    """
    header = ["", *columns, "mean ± std"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, values in rows.items():
        if len(values) != len(columns):
            raise ValueError(f"row {name!r} has {len(values)} values for {len(columns)} columns.")
        mean, std = mean_std([v * scale for v in values])
        cells = [f"{v * scale:.1f}" for v in values] + [f"{mean:.2f} ± {std:.2f}"]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def results(records: Sequence[RunRecord]) -> dict:
    """The tables' data from run records: ``columns``, ``best`` and ``final`` per dataset.

    Columns follow the records' order within a dataset (seeds, then folds); every dataset must
    have the same columns.

    Raises:
      ValueError: if the datasets' columns differ.
    """
    by_dataset: dict[str, list[RunRecord]] = {}
    for r in records:
        by_dataset.setdefault(r.dataset, []).append(r)
    columns = None
    best, final = {}, {}
    for name, runs in by_dataset.items():
        cols = [r.column for r in runs]
        if columns is not None and cols != columns:
            raise ValueError("every dataset of a config must have the same folds and seeds.")
        columns = cols
        best[name] = [r.best_accuracy for r in runs]
        final[name] = [r.final_accuracy for r in runs]
    return {
        "columns": columns or [],
        "best": best,
        "final": final,
        "records": [dataclasses.asdict(r) for r in records],
    }


def results_text(res: Mapping) -> str:
    """The printed report: the best-epoch table (what the paper reports) and the final one."""
    return (
        "Validation accuracy (%) at the best epoch (what the paper reports; the epoch is chosen "
        "on the validation fold itself, so it is optimistic):\n\n"
        + table(res["best"], res["columns"])
        + "\n\nValidation accuracy (%) after the final epoch:\n\n"
        + table(res["final"], res["columns"])
        + "\n"
    )
