"""Reduce-on-plateau on validation accuracy, with PyTorch's ``ReduceLROnPlateau`` semantics.

Once per epoch (the paper's schedule: mode 'max', factor 0.1, patience 10, relative threshold
1e-4). :func:`update` is pure ``jnp``, so the schedule runs on the device inside the training
loop without a host round trip; checkpoints keep the state as a small JSON dict
(:func:`to_host`, :func:`to_device`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def init() -> dict:
    """Fresh state: no best value yet (None, so the state stays valid JSON), scale 1."""
    return {"best": None, "bad_epochs": 0, "scale": 1.0}


def update(
    state: dict, value: jax.Array | float, *, factor: float = 0.1, patience: int = 10,
    threshold: float = 1e-4,
) -> dict:  # fmt: skip
    """The state after an epoch whose validation metric (higher is better) is ``value``.

    ``state['best']`` may be None (no epoch yet) or a number; the result's is a float32 array.
    """
    best = -jnp.inf if state["best"] is None else jnp.asarray(state["best"], jnp.float32)
    value = jnp.asarray(value, jnp.float32)
    better = value > best * (1.0 + threshold)  # PyTorch: mode='max', threshold_mode='rel'
    best = jnp.where(better, value, best)
    bad = jnp.where(better, 0, jnp.asarray(state["bad_epochs"], jnp.int32) + 1)
    cut = bad > patience
    scale = jnp.asarray(state["scale"], jnp.float32)
    return {
        "best": best,
        "bad_epochs": jnp.where(cut, 0, bad),
        "scale": jnp.where(cut, scale * factor, scale),
    }


def to_device(state: dict, best_run: dict | None) -> dict:
    """The loop's device tracker: the schedule's state and the best validation accuracy so far.

    Args:
      state: the schedule's JSON state (:func:`init` or a checkpoint's).
      best_run: the checkpoint's best epoch (``{'val_accuracy': ...}``) or None.
    """
    tracker = {
        "best": jnp.asarray(-np.inf if state["best"] is None else state["best"], jnp.float32),
        "bad_epochs": jnp.asarray(state["bad_epochs"], jnp.int32),
        "scale": jnp.asarray(state["scale"], jnp.float32),
    }
    best_val = -np.inf if best_run is None else best_run["val_accuracy"]
    tracker["best_val"] = jnp.asarray(best_val, jnp.float32)
    return tracker


def to_host(tracker: dict) -> dict:
    """The schedule's JSON state from a fetched tracker."""
    best = float(tracker["best"])
    return {
        "best": None if np.isinf(best) else best,
        "bad_epochs": int(tracker["bad_epochs"]),
        "scale": float(tracker["scale"]),
    }
