"""DAAM adapters: a Gaussian gate on each encoder layer's output, the identity at initialisation.

After a layer's output ``h`` ``[B, T, d]``::

    h <- h + g * (h * G(h) - h)

with ``G`` the paper-form Gaussian gate (:func:`gaam_jax.functional.gaussian_gate`) over the
token axis: one head, per-channel mean offset ``delta`` and scaled variance ``xi`` (``[1, d]``,
initialised 0 and 2 as in the paper), statistics over the real tokens only (padding is masked
out) and computed in float32. ``g`` ``[d]`` is a per-channel scale initialised to 0, so the
adapted encoder starts exactly as the frozen one and each channel learns how much gating it
takes. That is ``3 d`` parameters a layer.

The statistics span every real token of the sequence, the future ones included: in a causal
model (Llama) a position's gate depends on later tokens. That is harmless for the sequence
classification heads (they read the last position, which sees every token anyway) but makes an
adapted causal model unfit for generation.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaam_jax import sharding
from gaam_jax.adapters.lora import COLLECTION
from gaam_jax.functional import gaussian_gate

__all__ = ["DaamAdapter"]


class DaamAdapter(nn.Module):
    """``h + g * (h * G(h) - h)`` over the token axis (see the module docstring).

    Its variables (``delta``, ``xi`` ``[1, d]``, ``scale`` ``[d]``, float32) live in the
    adapter collection, beside the LoRA adapters.
    """

    @nn.compact
    def __call__(self, h: jax.Array, mask: jax.Array | None) -> jax.Array:
        """Gates a layer's output.

        Args:
          h: ``[B, T, d]`` in any floating dtype.
          mask: bool ``[B, T]``, True for real tokens, or None (all real).

        Returns:
          ``[B, T, d]`` in ``h``'s dtype.
        """
        d = h.shape[-1]

        def var(name, init, shape, axes):
            init = sharding.with_logical_axes(init, axes)
            return self.variable(COLLECTION, name, lambda: init(None, shape, jnp.float32)).value

        delta = var("delta", nn.initializers.zeros_init(), (1, d), (None, None))
        xi = var("xi", nn.initializers.constant(2.0), (1, d), (None, None))
        scale = var("scale", nn.initializers.zeros_init(), (d,), (None,))
        gate = gaussian_gate(
            h, delta, xi, axis=-2, feature_axis=-1, mask=None if mask is None else mask[..., None]
        )
        hf = h.astype(jnp.float32)
        scale = scale.reshape((1,) * (h.ndim - 1) + (d,))
        return (hf + scale * (hf * gate - hf)).astype(h.dtype)
