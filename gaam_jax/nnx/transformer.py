"""The paper's decoder (:class:`gaam_jax.GaussianAdaptiveTransformer`) as an NNX module.

It is the Linen decoder wrapped by ``nnx.bridge.ToNNX`` rather than a native port: its fronts
include Linen's ``MultiHeadDotProductAttention`` and ``BatchNorm`` (batch statistics, a ``train``
flag), and the bridge runs that tested Linen code unchanged, with Linen's parameter paths, so only
this thin wrapper has to hold on every Flax version (training code stays Linen).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gaam_jax import sharding
from gaam_jax import transformer as linen_transformer

__all__ = ["GaussianAdaptiveTransformer"]


class GaussianAdaptiveTransformer(nnx.bridge.ToNNX):
    """The Linen decoder through ``nnx.bridge.ToNNX``, initialised on a sample input's shape.

    The parameters are those of the Linen decoder at the same paths (``attention/...``,
    ``conv1``, ``conv2``, ``classifier``), as ``nnx.Param`` s carrying the Linen logical axes in
    ``out_sharding`` (so :func:`gaam_jax.nnx.param_shardings` places them); ``mha_bn``'s running
    statistics are ``nnx.BatchStat`` s. Calls take the Linen keywords: ``model(x)``,
    ``model(x, train=True, mutable=['batch_stats'])`` (``mha_bn``), and
    ``model(x, mutable=['intermediates'])`` to keep the GAAM gate, as Linen sows it, in
    ``nnx.state(model, nnx.Intermediate)`` (``attention/gate``, a tuple).

    Example::

        model = GaussianAdaptiveTransformer(4, x, rngs=nnx.Rngs(0), num_heads=8)  # x: [B, 24, 1024]
        logits = model(x)                                                         # [B, 4]

    Args:
      num_classes: output classes.
      sample_input: an array or ``jax.ShapeDtypeStruct`` ``[batch, N, d]``; only its shape and
        dtype are used (the initialisers do not read the input).
      rngs: NNX random streams (``params`` draws the parameters).
      **kwargs: the other attributes of :class:`gaam_jax.GaussianAdaptiveTransformer`
        (``front``, ``num_heads``, ``conv_features``, ...).
    """

    def __init__(
        self,
        num_classes: int,
        sample_input: jax.Array | jax.ShapeDtypeStruct,
        *,
        rngs: nnx.Rngs,
        **kwargs: Any,
    ):
        # The decoder draws no random numbers once initialised: `rngs` serves the init alone and
        # the model keeps no RNG state (its state is its parameters and batch statistics).
        super().__init__(linen_transformer.GaussianAdaptiveTransformer(num_classes, **kwargs))
        x = jnp.zeros(sample_input.shape, sample_input.dtype)
        # Boxed Linen init: the bridge turns the logical axes into `out_sharding` metadata; eager
        # sharding off, since the names are logical axes, not those of a mesh.
        with sharding.logical_annotations(), nnx.use_eager_sharding(False):
            nnx.bridge.lazy_init(self, x, rngs=rngs)
