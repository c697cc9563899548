"""Classification losses: cross-entropy, and the paper's focal loss (alpha 0.25, gamma 2.5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example cross-entropy, float32 ``[batch]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def focal_loss(
    logits: jax.Array, labels: jax.Array, *, alpha: float = 0.25, gamma: float = 2.5
) -> jax.Array:
    """Per-example focal loss as in the authors' code: ``alpha (1 - p_t + 1e-6)^gamma CE``.

    The ``1e-6`` keeps the gradient of the modulating term finite when ``p_t = 1``.
    """
    ce = cross_entropy(logits, labels)
    p_t = jnp.exp(-ce)
    return alpha * (1.0 - p_t + 1e-6) ** gamma * ce


LOSSES = {"cross_entropy": cross_entropy, "focal": focal_loss}


def get(name: str):
    """The per-example loss called ``name`` (a key of :data:`LOSSES`)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {sorted(LOSSES)}.")
    return LOSSES[name]
