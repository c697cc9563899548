"""What each encoder layer emits: its hidden states, or the states pooled over the tokens.

Each function maps one layer's float32 ``[B, T, H]`` states and an optional bool ``[B, T]``
position mask to what that layer contributes to the encoder's output. They run inside the
scanned layer stack (:mod:`gaam_jax.encoders.stack`), so a pooled encoder never keeps more than
one layer's ``[B, T, H]`` states alive.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gaam_jax.encoders.stack import Collect

__all__ = ["POOLINGS", "identity", "pooling"]


def identity(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The hidden states themselves, float32 ``[B, T, H]``."""
    del mask
    return x.astype(jnp.float32)


def mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean over the positions ``mask`` marks (every position if None): float32 ``[B, H]``.

    A row with no marked position gives zeros.
    """
    x = x.astype(jnp.float32)
    if mask is None:
        return jnp.mean(x, axis=1)
    m = mask.astype(jnp.float32)[:, :, None]
    return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def mean_with_padding(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean over every position, padding included: float32 ``[B, H]``."""
    del mask
    return jnp.mean(x.astype(jnp.float32), axis=1)


def first(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The first position (BERT's ``[CLS]``, BEiT's class token): float32 ``[B, H]``."""
    del mask
    return x[:, 0].astype(jnp.float32)


def last(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The last marked position of each row (a causal LM's summary token): float32 ``[B, H]``.

    With right padding that is the last real token; with left padding, the last position. With
    no mask, the last position.
    """
    x = x.astype(jnp.float32)
    if mask is None:
        return x[:, -1]
    t = x.shape[1]
    positions = jnp.where(mask.astype(bool), jnp.arange(t)[None, :], -1)
    index = jnp.maximum(jnp.max(positions, axis=1), 0)
    return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]


_POOLINGS: dict[str, Collect] = {
    "mean": mean,
    "mean_with_padding": mean_with_padding,
    "first": first,
    "last": last,
}
POOLINGS = tuple(_POOLINGS)


def pooling(name: str) -> Collect:
    """The pooling called ``name`` (one of :data:`POOLINGS`).

    Raises:
      ValueError: for an unknown name.
    """
    if name not in _POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {name!r}.")
    return _POOLINGS[name]
