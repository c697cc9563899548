"""Initialisers that reproduce PyTorch defaults where the paper's code relies on them."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def torch_default_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default ``nn.Linear``/``nn.Conv2d`` init: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

    Used for biases (and the weights of layers the paper's code leaves at their default);
    PyTorch's kaiming-uniform weight init with ``a=sqrt(5)`` reduces to the same bound.

    Args:
      fan_in: input features (times the kernel area for a convolution).

    Returns:
      A Flax initialiser.
    """
    bound = 1.0 / fan_in**0.5

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init
