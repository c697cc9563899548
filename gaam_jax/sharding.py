"""Logical axis names, default sharding rules and meshes, for JAX's own SPMD (jit + NamedSharding).

Every parameter is annotated with a tuple of *logical* axis names where it is created
(:func:`with_logical_axes`, Flax's ``nn.with_logical_partitioning``: ``delta``/``xi`` are
``('heads', 'embed')``, conv kernels ``(None, None, 'layers', 'conv')``, ...).
:func:`param_logical_axes` reads those annotations (``nn.get_partition_spec`` of the boxed,
abstract init); rules map logical names to *mesh* axes (``data``, ``model``);
:func:`param_shardings` turns the two into ``NamedSharding`` s. Activations use the names
``batch``, ``layers``, ``embed``.

The annotations only become ``nn.LogicallyPartitioned`` boxes inside
:func:`logical_annotations` (or :func:`abstract_params`): ``init`` of every gaam_jax module, and
of any model that contains one, returns plain arrays, so :func:`param_shardings` needs the boxed
tree: :func:`abstract_params` (``jax.eval_shape`` of an annotated init, nothing allocated).

Multi-head GAAM splits the layer axis into contiguous groups, so sharding ``layers`` (and the
parameters' ``heads``) over ``model`` gives every device whole heads: the statistics never cross
devices and the input is never gathered. The batch is sharded over ``data``.

Rules are data: pass your own tuple of ``(logical, mesh_axis_or_None)`` pairs to change them.
A logical axis whose size the mesh axis does not divide is replicated instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, str | None], ...]
LogicalAxes = tuple[str | None, ...]

# One table for the decoders and the encoders. Tensor parallelism splits heads, feed-forward
# widths, the vocabulary and conv output channels over "model"; model widths ("embed") stay whole
# so that norms never cross devices. "stack" is the leading axis of an encoder's scanned layer
# parameters: every device holds every layer (the scan reads one layer per step).
DEFAULT_RULES: Rules = (
    ("batch", "data"),
    ("layers", "model"),  # the GAAM head groups; also the decoder's conv channels
    ("heads", "model"),
    ("kv_heads", "model"),
    ("conv", "model"),
    ("conv_out", "model"),
    ("conv_in", None),
    ("mlp", "model"),
    ("vocab", "model"),
    ("embed", None),
    ("classes", None),
    ("stack", None),
    ("runs", "runs"),  # training: independent runs of one program, spread over devices
)

_ANNOTATE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "gaam_jax_logical_annotations", default=False
)


@contextlib.contextmanager
def logical_annotations() -> Iterator[None]:
    """Within this context, gaam_jax parameters are created boxed with their logical axes.

    ``init`` then returns ``nn.LogicallyPartitioned`` leaves, as Flax's own
    ``nn.with_logical_partitioning`` does: read them with ``nn.get_partition_spec`` and strip
    them with ``nn.unbox``. Outside it (the default) ``init`` returns plain arrays.
    """
    token = _ANNOTATE.set(True)
    try:
        yield
    finally:
        _ANNOTATE.reset(token)


def with_logical_axes(init: Callable[..., Any], names: LogicalAxes) -> Callable[..., Any]:
    """``init`` annotated with logical axis names (one per dimension of the parameter).

    Inside :func:`logical_annotations` it is ``nn.with_logical_partitioning(init, names)``;
    outside, ``init`` itself.

    Args:
      init: a parameter initialiser ``(key, shape, dtype) -> array``.
      names: logical axis name (or None) of each dimension, e.g. ``('heads', 'embed')``.

    Returns:
      The annotated initialiser.
    """
    boxed = nn.with_logical_partitioning(init, tuple(names))

    @functools.wraps(init)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return boxed(*args, **kwargs) if _ANNOTATE.get() else init(*args, **kwargs)

    return wrapper


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _flat_axes(params: Any) -> dict[tuple[str, ...], LogicalAxes]:
    """Path -> logical axes of a (partly) boxed params tree; unboxed leaves are replicated."""
    specs = flatten_dict(dict(nn.get_partition_spec(params)))
    shapes = flatten_dict(dict(nn.meta.unbox(params)))
    out = {}
    for path, leaf in shapes.items():
        spec = tuple(specs[path])
        out[path] = spec if len(spec) == len(leaf.shape) else (None,) * len(leaf.shape)
    return out


class AnnotatedInit:
    """Mixin for gaam_jax's Linen modules: ``init`` returns plain arrays.

    ``init``/``init_with_output`` (and so ``lazy_init`` and the NNX bridge) run the module with
    :func:`logical_annotations` on and return the variables unboxed; the annotations are read
    from :func:`abstract_params`. Called inside
    :func:`logical_annotations`, they return the boxes (Flax's usual logical-partitioning flow).
    """

    def init_with_output(self, rngs: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """``nn.Module.init_with_output``, returning plain arrays (see the class docstring)."""
        if _ANNOTATE.get():
            return super().init_with_output(rngs, *args, **kwargs)  # type: ignore[misc]
        with logical_annotations():
            out, variables = super().init_with_output(rngs, *args, **kwargs)  # type: ignore[misc]
        return out, nn.meta.unbox(variables)


def abstract_params(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The boxed, abstract ``params`` of ``model`` (``jax.eval_shape`` of an annotated init).

    Args:
      model: a Linen module (a gaam_jax module, or any model containing gaam_jax modules).
      *args: example inputs of ``model.init`` (arrays or ``jax.ShapeDtypeStruct`` s).
      **kwargs: keyword arguments of ``model.init``.

    Returns:
      The ``params`` collection with ``nn.LogicallyPartitioned`` leaves around
      ``ShapeDtypeStruct`` s (annotated parameters) and bare ``ShapeDtypeStruct`` s (others,
      replicated). Nothing is allocated.
    """
    with logical_annotations():
        variables = jax.eval_shape(
            functools.partial(model.init, **kwargs), jax.random.key(0), *args
        )
    return variables["params"]


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
    """``jax.make_mesh`` with named axes, one size possibly -1 ("the remaining devices").

    The one mesh factory of the project (decoders, encoders, extraction, training).

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
    return jax.make_mesh(
        tuple(sizes.values()),
        tuple(sizes),
        axis_types=(jax.sharding.AxisType.Auto,) * len(sizes),
        devices=devices,
    )


def param_logical_axes(params: Any) -> Any:
    """A pytree like ``params`` of logical-axis tuples, from the annotations of the parameters.

    Args:
      params: a boxed tree (from :func:`abstract_params`, or an ``init`` run inside
        :func:`logical_annotations`): the names are ``nn.get_partition_spec`` of its boxes and
        unannotated leaves are replicated.

    Returns:
      The unboxed tree structure, with a tuple of logical names (or None) per dimension at each
      leaf.

    Raises:
      ValueError: for a plain tree (no annotations to read).
    """
    if not params:
        return {}
    if not any(_is_box(leaf) for leaf in jax.tree.leaves(params, is_leaf=_is_box)):
        raise ValueError(
            "these parameters carry no logical-axis annotations; pass the boxed tree: "
            "sharding.abstract_params(model, *example_inputs)."
        )
    return unflatten_dict(_flat_axes(params))


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
    """``NamedSharding`` for every parameter, from its logical axes and the rules.

    Args:
      params: as for :func:`param_logical_axes`: the boxed tree of :func:`abstract_params` (a
        plain tree of arrays carries no annotations and is refused).
      mesh: the device mesh.
      rules: logical-to-mesh axis rules.

    Returns:
      A tree like the unboxed ``params`` with a ``NamedSharding`` at each leaf.
    """
    validate_rules(rules)
    logical = param_logical_axes(params)
    return jax.tree.map(
        lambda leaf, axes: NamedSharding(mesh, logical_to_spec(axes, leaf.shape, mesh, rules)),
        nn.meta.unbox(params),
        logical,  # the tuples sit where params has leaves: passed whole
    )
