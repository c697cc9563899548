"""Logical-axis annotations of the NNX parameters, and the shardings the rules give them.

Every parameter of a gaam_jax NNX layer is an ``nnx.Param`` whose ``out_sharding`` metadata holds
the logical axis names its Linen twin is annotated with (``delta``/``xi``: ``('heads', 'embed')``,
...; docs/design.md section 12). They are created with ``eager_sharding=False``: the names are
logical, not mesh axes, and Flax's default (eager sharding) raises when a Param with
``out_sharding`` is created outside a mesh. :func:`param_shardings` maps the names to
``NamedSharding`` s through the same rules as :func:`gaam_jax.sharding.param_shardings`, so a model
and its Linen twin are placed alike.

Example::

    shardings = param_shardings(model, mesh)                 # an nnx.State of NamedShardings
    params = jax.device_put(nnx.state(model, nnx.Param), shardings)
    nnx.update(model, params)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from gaam_jax.sharding import DEFAULT_RULES, Rules, logical_to_spec, validate_rules

Dtype = Any
LogicalAxes = tuple[str | None, ...]

__all__ = ["logical_axes", "param", "param_shardings"]


def param(
    init: Callable[..., jax.Array],
    key: jax.Array,
    shape: Sequence[int],
    dtype: Dtype,
    axes: Sequence[str | None],
) -> nnx.Param:
    """An ``nnx.Param`` drawn from ``init(key, shape, dtype)``, annotated with logical axes.

    Args:
      init: a Flax initialiser ``(key, shape, dtype) -> array``.
      key: its PRNG key.
      shape: the parameter's shape.
      dtype: its storage dtype.
      axes: one logical axis name (or None) per dimension, e.g. ``('heads', 'embed')``.

    Returns:
      The Param, with ``out_sharding=axes`` metadata and eager sharding off.
    """
    axes = tuple(axes)
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match the parameter shape {tuple(shape)}.")
    return nnx.Param(init(key, tuple(shape), dtype), out_sharding=axes, eager_sharding=False)


def logical_axes(variable: nnx.Variable) -> LogicalAxes:
    """The logical axes of one variable: its ``out_sharding`` metadata, or all None (replicated)."""
    ndim = len(variable.get_value().shape)
    names = variable.get_metadata().get("out_sharding")
    if names is None or len(names) != ndim:
        return (None,) * ndim
    return tuple(names)


def param_shardings(tree: nnx.Module | nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """``NamedSharding`` of every parameter, from its logical axes and the rules.

    Args:
      tree: an NNX module (its ``nnx.Param`` s are taken), or an ``nnx.State`` (every variable in
        it; a variable without ``out_sharding`` metadata is replicated). Abstract states, from
        ``nnx.eval_shape``, work too.
      mesh: the device mesh.
      rules: logical-to-mesh axis rules (default :data:`gaam_jax.sharding.DEFAULT_RULES`).

    Returns:
      An ``nnx.State`` with the structure of the parameters' state and a ``NamedSharding`` in each
      variable, ready for ``jax.device_put(state, shardings)`` or ``jax.jit``'s ``in_shardings``;
      ``nnx.to_pure_dict`` gives the nested dict ``gaam_jax.sharding.param_shardings`` gives
      for the Linen twin.
    """
    validate_rules(rules)
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree, nnx.Param)

    def sharding(variable: nnx.Variable) -> nnx.Variable:
        shape = variable.get_value().shape
        spec = logical_to_spec(logical_axes(variable), shape, mesh, rules)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
