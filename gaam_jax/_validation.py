"""Argument checks shared by the functional core and the modules; each raises one ValueError."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The compute dtypes configs and flags name (decoders, encoders, fine-tuning): the one table.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def positive_int(value: object, name: str) -> int:
    """Returns ``value`` if it is a positive int (not a bool), else raises ValueError."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return value


def canonical_axis(axis: object, ndim: int, name: str) -> int:
    """Returns ``axis`` in ``[0, ndim)``, raising ValueError if it is not a valid axis."""
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise ValueError(f"{name} must be an int, got {axis!r}.")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an input with {ndim} dimensions.")
    return axis % ndim


def floating_input(x: object) -> None:
    """Raises ValueError unless ``x`` is a floating array of rank >= 1."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"x must be an array, got {type(x).__name__}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must have a floating dtype, got {x.dtype}.")
    if x.ndim < 1:
        raise ValueError("x must have at least one dimension.")


def broadcast_mask(mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array | None:
    """Checks a boolean validity mask and broadcasts it to ``shape``."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise ValueError(
            f"mask must be boolean (True = valid), got dtype {mask.dtype}; padding is never "
            "inferred from values."
        )
    try:
        out_shape = jnp.broadcast_shapes(mask.shape, shape)
    except ValueError:
        out_shape = None
    if out_shape != tuple(shape):
        raise ValueError(
            f"mask of shape {mask.shape} does not broadcast to the input shape {shape}."
        )
    return jnp.broadcast_to(mask, shape)
