"""Reduce-on-plateau on validation accuracy, with PyTorch's ``ReduceLROnPlateau`` semantics.

Evaluated once per epoch on the host (the paper's schedule: mode 'max', factor 0.1, patience 10,
relative threshold 1e-4). The state is a small dict saved in every checkpoint.
"""

from __future__ import annotations


def init() -> dict:
    """Fresh state: no best value yet (None, so the state stays valid JSON), scale 1."""
    return {"best": None, "bad_epochs": 0, "scale": 1.0}


def update(
    state: dict, value: float, *, factor: float = 0.1, patience: int = 10, threshold: float = 1e-4
) -> dict:
    """Returns the state after an epoch whose validation metric (higher is better) is ``value``."""
    best, bad, scale = state["best"], state["bad_epochs"], state["scale"]
    if best is None or value > best * (1.0 + threshold):  # PyTorch: mode='max', 'rel'
        best, bad = value, 0
    else:
        bad += 1
    if bad > patience:
        scale, bad = scale * factor, 0
    return {"best": best, "bad_epochs": bad, "scale": scale}
