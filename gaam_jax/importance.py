r"""The Importance Factor (IF): which encoder layers and features the GAAM gate favours.

The paper averages the Gaussian attention map ``DA`` (the gate ``G``, not ``x * G``) over the
validation set and min-max normalises it:

.. math::

    IF_{ij} = \frac{DA_{ij} - \min(DA)}{\max(DA) - \min(DA)} \in [0, 1]

with ``i`` the encoder layer and ``j`` the feature. Here the average is over *samples* (the
authors' code averaged per-batch means, which over-weights a smaller last batch), it is
accumulated in a jit-friendly state, and masked (padding) samples are left out. In this
library's layout the heads split the layer axis, so the gate is already ``[N, d]`` per sample:
the heads are concatenated back along the layer axis by construction.

Typical use::

    state = importance.init_state((24, 1024))
    for batch in evaluation_batches:  # x [b, N, d] and a valid mask [b]
        _, inter = model.apply(variables, batch["x"], mutable=["intermediates"])
        state = update(state, importance.find_gate(inter), batch["valid"])   # jitted
    if_map = importance.importance_factor(importance.mean_gate(state))
    importance.plot_heatmap(if_map, "if.png")
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax.traverse_util import flatten_dict

__all__ = [
    "ImportanceState",
    "find_gate",
    "gaussian_parameter_summary",
    "importance_factor",
    "init_state",
    "layer_contribution",
    "mean_gate",
    "plot_heatmap",
    "rank_layers",
    "update",
]


@flax.struct.dataclass
class ImportanceState:
    """Running sums for the mean gate map.

    Attributes:
      total: float32 ``[N, d]``, the sum of the gate over the valid samples seen.
      count: float32 ``[N, d]``, how many valid samples contributed to each element.
    """

    total: jax.Array
    count: jax.Array


def init_state(shape: tuple[int, ...]) -> ImportanceState:
    """An empty state for gate maps of ``shape`` (``[N, d]``)."""
    return ImportanceState(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))


def update(
    state: ImportanceState, gate: jax.Array, mask: jax.Array | None = None
) -> ImportanceState:
    """Adds a batch of gates. Pure and jit-friendly.

    Args:
      state: the running state.
      gate: ``[batch, N, d]``.
      mask: optional boolean, True = valid: ``[batch]`` (padded evaluation examples) or anything
        broadcastable to ``gate`` (per-element validity).

    Returns:
      The updated state.
    """
    if gate.ndim != state.total.ndim + 1 or gate.shape[1:] != state.total.shape:
        raise ValueError(
            f"gate must be [batch, {', '.join(map(str, state.total.shape))}], got {gate.shape}."
        )
    gate = gate.astype(jnp.float32)
    if mask is None:
        valid = jnp.ones_like(gate)
    else:
        mask = jnp.asarray(mask)
        if mask.ndim == 1:
            mask = mask.reshape((-1,) + (1,) * (gate.ndim - 1))
        valid = jnp.broadcast_to(mask, gate.shape).astype(jnp.float32)
    return ImportanceState(
        state.total + jnp.sum(jnp.where(valid > 0, gate, 0.0), axis=0),
        state.count + jnp.sum(valid, axis=0),
    )


def mean_gate(state: ImportanceState) -> jax.Array:
    """The mean gate map ``DA`` (``[N, d]``); elements never seen are 0."""
    return state.total / jnp.maximum(state.count, 1.0)


def importance_factor(density_attention: jax.Array) -> jax.Array:
    """Min-max normalisation over the whole map: ``(DA - min) / (max - min)``; 0 if constant."""
    da = jnp.asarray(density_attention, jnp.float32)
    lo, hi = jnp.min(da), jnp.max(da)
    span = hi - lo
    return jnp.where(span > 0, (da - lo) / jnp.where(span > 0, span, 1.0), 0.0)


def layer_contribution(density_attention: jax.Array) -> jax.Array:
    """Per-layer share of the map, in percent (row sums / total * 100); sums to 100.

    The paper's Figure 3 ("percentage contribution of each layer to attention weights") is not
    defined further; this row-share reading is documented in docs/design.md section 8. Pass the
    mean gate map (the attention weights) for the paper's figure.
    """
    da = jnp.asarray(density_attention, jnp.float32)
    rows = jnp.sum(da, axis=-1)
    return 100.0 * rows / jnp.sum(rows)


def rank_layers(importance: jax.Array) -> np.ndarray:
    """Layer indices (0-based) from most to least important by mean IF over features."""
    return np.argsort(-np.asarray(jnp.mean(importance, axis=-1)), kind="stable")


def find_gate(intermediates: Mapping[str, Any]) -> jax.Array:
    """The single gate sown under ``intermediates`` (as returned by ``mutable=['intermediates']``).

    Raises:
      ValueError: if there is no gate or more than one (e.g. a multi-layer ``GaussianBlock``;
        then pick one from ``flax.traverse_util.flatten_dict`` yourself).
    """
    tree = intermediates.get("intermediates", intermediates)
    gates = {k: v for k, v in flatten_dict(dict(tree)).items() if k[-1] == "gate"}
    if len(gates) != 1:
        names = ["/".join(k) for k in gates]
        raise ValueError(f"expected exactly one sown gate, found {len(gates)}: {names}.")
    (value,) = gates.values()
    return value[0] if isinstance(value, tuple) else value


def gaussian_parameter_summary(params: Mapping[str, Any]) -> dict[str, dict[str, tuple]]:
    """Ranges of the learned Gaussian parameters (the paper's "Gaussian parameters" table).

    Args:
      params: a ``params`` tree containing GAAM modules.

    Returns:
      ``{module_path: {'mean_offset': (min, max), 'scaled_variance': (min, max)}}`` for paper-form
      modules (``delta``/``xi``) and ``{'mean_offset', 'scale'}`` for mixture modules
      (``mean_offsets``/``c``).
    """
    kinds = {
        ("delta", "xi"): ("mean_offset", "scaled_variance"),
        ("c", "mean_offsets"): ("mean_offset", "scale"),
    }
    modules: dict[tuple[str, ...], dict[str, Any]] = {}
    for path, value in flatten_dict(dict(params)).items():
        modules.setdefault(path[:-1], {})[path[-1]] = value
    out: dict[str, dict[str, tuple]] = {}
    for module, leaves in modules.items():
        for (a, b), labels in kinds.items():
            if set(leaves) == {a, b}:
                # (delta, xi) -> (mean_offset, scaled_variance); (mean_offsets, c) -> offsets, scale
                values = (leaves[a], leaves[b]) if a == "delta" else (leaves[b], leaves[a])
                out["/".join(module)] = {
                    label: (float(np.min(v)), float(np.max(v)))
                    for label, v in zip(labels, values, strict=True)
                }
    return out


def plot_heatmap(
    importance: jax.Array,
    path: str | pathlib.Path,
    *,
    title: str = "Importance Factor",
    figsize: tuple[float, float] = (10.0, 4.0),
    dpi: int = 100,
) -> pathlib.Path:
    """Saves the IF map as a heatmap PNG (layers on the y axis, features on the x axis).

    The image is exactly ``figsize * dpi`` pixels (1000 x 400 by default).

    Args:
      importance: ``[N, d]`` map, normally :func:`importance_factor` of :func:`mean_gate`.
      path: output file.
      title: figure title.
      figsize: inches.
      dpi: dots per inch.

    Returns:
      The path written.
    """
    # The object-oriented API renders to a file without pyplot: the caller's backend is left
    # as it is (no matplotlib.use, no global figure state).
    from matplotlib.figure import Figure

    data = np.asarray(importance, np.float32)
    if data.ndim != 2:
        raise ValueError(f"importance must be [layers, features], got shape {data.shape}.")
    fig = Figure(figsize=figsize, dpi=dpi)
    ax = fig.subplots()
    image = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest", origin="lower")
    ax.set_xlabel("feature")
    ax.set_ylabel("encoder layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="IF")
    path = epath.Path(str(path))  # a local file or an object-store URL
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        fig.savefig(f, dpi=dpi, format="png")
    return path
