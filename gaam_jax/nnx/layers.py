"""NNX building blocks with the numerics, parameter names and initialisation of Linen's.

The GQA blocks and GQGAAM are built from ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.LayerNorm`` on
the Linen side. Flax's NNX layers (``nnx.Linear``, ``nnx.LayerNorm``) change their constructor
options and metadata handling between releases; these two small layers spell out Linen's
computation instead (the same ``lax.dot_general``, the same float32 ``E[x^2] - E[x]^2``
statistics), so an NNX model and its Linen twin are the same program on every Flax version.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from gaam_jax.nnx.sharding import param

Dtype = Any
Initializer = nn.initializers.Initializer

__all__ = ["Dense", "LayerNorm"]

ZEROS: Initializer = nn.initializers.zeros_init()
ONES: Initializer = nn.initializers.ones_init()


def _shape(n: int | Sequence[int]) -> tuple[int, ...]:
    return (n,) if isinstance(n, int) else tuple(n)


def _flat_init(init: Initializer, flat: tuple[int, ...]) -> Initializer:
    # Linen's DenseGeneral draws its parameters at their 2-D (kernel) or 1-D (bias) shape and
    # reshapes them, so fan-in and fan-out (Xavier, PyTorch's default) are those of the matrix.
    def wrapped(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return jnp.reshape(init(key, flat, dtype), shape)

    return wrapped


class Dense(nnx.Module):
    """``nn.Dense`` / ``nn.DenseGeneral`` over trailing axes: ``y = x . kernel + bias``.

    Contracts the last ``len(in_shape)`` axes of ``x`` with ``kernel [*in_shape, *out_shape]`` and
    adds ``bias [*out_shape]``; an int for either shape is one axis (``nn.Dense``).

    Args:
      in_shape: contracted input axes, e.g. ``512`` or ``(heads, head_dim)``.
      out_shape: output axes, e.g. ``512`` or ``(heads, head_dim)``.
      rngs: NNX random streams; the ``params`` stream draws the parameters.
      kernel_init: kernel initialiser, called at the flattened ``[prod(in), prod(out)]`` shape.
      bias_init: bias initialiser, called at ``[prod(out)]``.
      kernel_axes: logical axes of the kernel (one per dimension).
      bias_axes: logical axes of the bias.
      use_bias: add a bias.
      dtype: computation dtype; None promotes the input's and the parameters'.
      param_dtype: storage dtype of the parameters.
    """

    def __init__(
        self,
        in_shape: int | Sequence[int],
        out_shape: int | Sequence[int],
        *,
        rngs: nnx.Rngs,
        kernel_init: Initializer,
        bias_init: Initializer = ZEROS,
        kernel_axes: Sequence[str | None],
        bias_axes: Sequence[str | None],
        use_bias: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
    ):
        self.in_shape, self.out_shape = _shape(in_shape), _shape(out_shape)
        self.dtype = dtype
        n_in, n_out = math.prod(self.in_shape), math.prod(self.out_shape)
        self.kernel = param(
            _flat_init(kernel_init, (n_in, n_out)),
            rngs.params(),
            self.in_shape + self.out_shape,
            param_dtype,
            kernel_axes,
        )
        bias_init = _flat_init(bias_init, (n_out,))
        self.bias = (
            param(bias_init, rngs.params(), self.out_shape, param_dtype, bias_axes)
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., *in_shape] -> [..., *out_shape]`` in the promoted (or given) dtype."""
        n_in = len(self.in_shape)
        if x.shape[x.ndim - n_in :] != self.in_shape:
            raise ValueError(f"expected inputs [..., {self.in_shape}], got shape {x.shape}.")
        kernel = self.kernel[...]
        bias = None if self.bias is None else self.bias[...]
        args = [a for a in (x, kernel, bias) if a is not None]
        dtype = self.dtype or jnp.result_type(*args)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (contract, ((), ())))
        if bias is not None:
            y = y + bias.astype(dtype).reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
        return y


class LayerNorm(nnx.Module):
    """``nn.LayerNorm`` over the last axis: Linen's float32 ``E[x^2] - E[x]^2`` statistics.

    Args:
      num_features: size of the last axis.
      rngs: NNX random streams (the ``params`` stream).
      epsilon: added to the variance.
      dtype: output dtype; None promotes the input's and the parameters'. Statistics are at least
        float32.
      param_dtype: storage dtype of ``scale`` and ``bias``.
      scale_init: initialiser of ``scale``.
      bias_init: initialiser of ``bias``.
      scale_axes: logical axes of ``scale``.
      bias_axes: logical axes of ``bias``.
    """

    def __init__(
        self,
        num_features: int,
        *,
        rngs: nnx.Rngs,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        scale_init: Initializer = ONES,
        bias_init: Initializer = ZEROS,
        scale_axes: Sequence[str | None] = (None,),
        bias_axes: Sequence[str | None] = (None,),
    ):
        self.epsilon, self.dtype = epsilon, dtype
        shape = (num_features,)
        self.scale = param(scale_init, rngs.params(), shape, param_dtype, scale_axes)
        self.bias = param(bias_init, rngs.params(), shape, param_dtype, bias_axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises ``x [..., num_features]``; same shape."""
        scale, bias = self.scale[...], self.bias[...]
        stat_dtype = jnp.promote_types(self.dtype or x.dtype, jnp.float32)
        xs = x.astype(stat_dtype)
        mean = jnp.mean(xs, axis=-1, keepdims=True)
        # Linen's fast variance, clipped at 0 against round-off.
        var = jnp.maximum(0.0, jnp.mean(jnp.square(xs), axis=-1, keepdims=True) - jnp.square(mean))
        feature_shape = (1,) * (x.ndim - 1) + scale.shape
        mul = jax.lax.rsqrt(var + self.epsilon) * scale.reshape(feature_shape)
        y = (x - mean) * mul + bias.reshape(feature_shape)
        return y.astype(self.dtype or jnp.result_type(x, scale, bias))
