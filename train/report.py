"""The paper-style results table: one column per fold or run, then mean +- population std."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


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
