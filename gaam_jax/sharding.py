"""Logical axis names, default sharding rules and meshes, for JAX's own SPMD (jit + NamedSharding).

Every parameter gets a tuple of *logical* axis names from its path and rank
(:func:`param_logical_axes`); rules map logical names to *mesh* axes (``data``, ``model``);
:func:`param_shardings` turns the two into ``NamedSharding`` s. Activations use the names
``batch``, ``layers``, ``embed``.

Multi-head GAAM splits the layer axis into contiguous groups, so sharding ``layers`` (and the
parameters' ``heads``) over ``model`` gives every device whole heads: the statistics never cross
devices and the input is never gathered. The batch is sharded over ``data``.

Rules are data: pass your own tuple of ``(logical, mesh_axis_or_None)`` pairs to change them.
A logical axis whose size the mesh axis does not divide is replicated instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, str | None], ...]

DEFAULT_RULES: Rules = (
    ("batch", "data"),
    ("layers", "model"),  # the GAAM head groups; also the decoder's conv channels
    ("heads", "model"),
    ("conv", "model"),
    ("mlp", "model"),
    ("embed", None),
    ("classes", None),
)

# (path regex, rank) -> logical axes. The first match wins; unmatched parameters are replicated.
_PARAM_PATTERNS: tuple[tuple[str, int, tuple[str | None, ...]], ...] = (
    (r"(^|/)(delta|xi)$", 2, ("heads", "embed")),
    (r"(^|/)(mean_offsets|c)$", 2, ("heads", None)),
    (r"(^|/)conv1/kernel$", 4, (None, None, "layers", "conv")),
    (r"(^|/)conv1/bias$", 1, ("conv",)),
    (r"(^|/)conv2/kernel$", 4, (None, None, "conv", "layers")),
    (r"(^|/)conv2/bias$", 1, ("layers",)),
    (r"(^|/)classifier/kernel$", 2, ("mlp", "classes")),
    (r"(^|/)classifier/bias$", 1, ("classes",)),
    (r"/(query|key|value)/kernel$", 3, ("embed", "heads", None)),
    (r"/(query|key|value)/bias$", 2, ("heads", None)),
    (r"/out/kernel$", 3, ("heads", None, "embed")),
    (r"/kernel$", 2, ("embed", "mlp")),
    (r"/bias$", 1, ("mlp",)),
)


def validate_rules(rules: Rules) -> None:
    """Raises ValueError if a logical axis is mapped twice."""
    seen: dict[str, str | None] = {}
    for logical, mesh_axis in rules:
        if logical in seen:
            raise ValueError(
                f"logical axis {logical!r} is mapped twice ({seen[logical]!r} and {mesh_axis!r})."
            )
        seen[logical] = mesh_axis


def make_mesh(
    shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """A mesh with named axes; one size may be -1 ("the remaining devices").

    Args:
      shape: axis name -> size, e.g. ``{'data': -1, 'model': 2}``.
      devices: devices to use (default: all).

    Returns:
      A ``Mesh`` with Auto axes (so unsharded inputs are accepted and resharded by XLA).

    Raises:
      ValueError: if the sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = dict(shape)
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {free}.")
    known = int(np.prod([v for v in sizes.values() if v != -1]))
    if free:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split by {known} for {shape}.")
        sizes[free[0]] = len(devices) // known
    if int(np.prod(list(sizes.values()))) != len(devices):
        need = int(np.prod(list(sizes.values())))
        raise ValueError(f"mesh {sizes} needs {need} devices, have {len(devices)}.")
    grid = np.array(devices).reshape(tuple(sizes.values()))
    return Mesh(grid, tuple(sizes))


def param_logical_axes(params: Any) -> Any:
    """A pytree like ``params`` of logical-axis tuples, from each parameter's path and rank."""
    flat = flatten_dict(dict(params))
    out = {}
    for path, leaf in flat.items():
        name = "/".join(path)
        axes: tuple[str | None, ...] = (None,) * len(leaf.shape)
        for pattern, rank, logical in _PARAM_PATTERNS:
            if len(leaf.shape) == rank and re.search(pattern, name):
                axes = logical
                break
        out[path] = axes
    return unflatten_dict(out)


def logical_to_spec(
    logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes and shape on ``mesh``.

    A mesh axis that is absent from the mesh, already used by an earlier dimension, or does not
    divide the dimension is dropped (that dimension is replicated).
    """
    mapping = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(logical, shape, strict=True):
        axis = mapping.get(name) if name is not None else None
        if axis is None or axis not in mesh.shape or axis in used or size % mesh.shape[axis]:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return PartitionSpec(*spec)


def param_shardings(params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """``NamedSharding`` for every leaf of ``params`` (arrays or ShapeDtypeStructs)."""
    validate_rules(rules)
    logical = param_logical_axes(params)
    return jax.tree.map(
        lambda leaf, axes: NamedSharding(mesh, logical_to_spec(axes, leaf.shape, mesh, rules)),
        params,
        logical,  # the tuples sit where params has leaves: passed whole
    )


def activation_sharding(
    logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> NamedSharding:
    """``NamedSharding`` of an activation, e.g. ``('batch', 'layers', 'embed')`` for GAAM input."""
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh, rules))
