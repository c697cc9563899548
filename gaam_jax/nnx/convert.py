"""Parameters between an NNX model and the variables of its Linen twin, both ways.

Generic: the NNX state's paths are the Linen paths (the layers here name their attributes as
Linen names its submodules, ``nnx.bridge`` models keep Linen's tree), so the conversion walks
``nnx.state(model, nnx.Param)`` (and ``nnx.BatchStat`` as ``batch_stats``) and maps each path to
the same keys. Nothing is specific to one layer.

Example::

    nnx_model = GaussianAdaptiveAttention(8, 1024, rngs=nnx.Rngs(0))
    y = linen_twin.apply(linen_variables(nnx_model), x)          # == nnx_model(x)
    load_linen_variables(nnx_model, linen_twin.init(key, x))     # the other way
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

__all__ = ["linen_variables", "load_linen_variables"]

# Linen collection <- NNX variable type. Intermediates (the gates) and RNG state are not
# parameters and are neither written nor read.
COLLECTIONS: dict[str, type[nnx.Variable]] = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


def _flat(state: nnx.State) -> dict[tuple[str, ...], nnx.Variable]:
    # Linen keys are strings; NNX paths may hold ints (nnx.List), which Linen spells as strings.
    return {tuple(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}


def linen_variables(model: nnx.Module) -> dict[str, Any]:
    """The model's parameters (and batch statistics, if any) as a Linen variables dict.

    Args:
      model: an NNX module whose state paths are Linen's (every layer in :mod:`gaam_jax.nnx`).

    Returns:
      ``{'params': {...}}`` (plus ``'batch_stats'`` when the model has some): nested dicts of the
      arrays themselves (not copies), for ``linen_module.apply(variables, ...)``.
    """
    out = {}
    for collection, kind in COLLECTIONS.items():
        flat = {path: var.get_value() for path, var in _flat(nnx.state(model, kind)).items()}
        if flat or collection == "params":
            out[collection] = unflatten_dict(flat)
    return out


def _path(collection: str, path: tuple[str, ...]) -> str:
    return "/".join((collection, *path))


def load_linen_variables(model: nnx.Module, variables: Mapping[str, Any]) -> None:
    """Sets the model's parameters (and batch statistics) from a Linen variables dict, in place.

    Every parameter of the model must be in ``variables`` with its shape, and nothing else may
    be; values are cast to the model's parameter dtypes. Collections other than ``params`` and
    ``batch_stats`` (e.g. ``intermediates``) are ignored.

    Args:
      model: an NNX module whose state paths are Linen's.
      variables: e.g. ``linen_module.init(key, x)``: ``{'params': ..., ...}``.

    Raises:
      ValueError: naming the first path that is missing, unexpected or of another shape; the
        model is left unchanged.
    """
    if "params" not in variables:
        raise ValueError(
            f"expected Linen variables {{'params': ...}}, got keys {sorted(variables)}."
        )
    states, updates = [], []
    for collection, kind in COLLECTIONS.items():
        state = nnx.state(model, kind)
        have = _flat(state)
        if not have and collection not in variables:
            continue
        given = flatten_dict(dict(variables.get(collection, {})))
        for path, var in have.items():
            if path not in given:
                raise ValueError(f"{_path(collection, path)} is missing from the Linen variables.")
            value = given[path]
            shape = tuple(jnp.shape(value))
            expected = tuple(var.get_value().shape)
            if shape != expected:
                raise ValueError(
                    f"{_path(collection, path)} has shape {shape} in the Linen variables, the "
                    f"model expects {expected}."
                )
            updates.append((var, jnp.asarray(value, var.get_value().dtype)))
        for path in given:
            if path not in have:
                raise ValueError(
                    f"{_path(collection, path)} in the Linen variables is not in the model."
                )
        states.append(state)
    # Everything is checked before anything is written: a mismatch leaves the model unchanged.
    for var, value in updates:
        var.set_value(value)
    nnx.update(model, *states)
