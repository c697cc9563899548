"""The layer stack shared by the encoders: one scanned layer, per-layer collection, options.

Every encoder runs its ``num_hidden_layers`` identical layers as one ``nn.scan`` over a single
layer module, so the program (and its compile time) does not grow with depth. The layer's
parameters are stacked ``[layers, ...]`` under ``params['layers']``, with the logical axis
``stack`` on the leading dimension (``gaam_jax.sharding.DEFAULT_RULES`` keeps it whole: each scan
step reads one layer).

A scanned layer returns ``(x, collect(x, pool_mask))``: what each layer emits is decided by the
caller. :func:`gaam_jax.encoders.pooling.identity` emits the hidden state itself
(``hidden_states``, ``[B, L+1, T, H]``); a pooling emits ``[B, H]`` as soon as the layer has run,
so pooled features never hold more than one layer's ``[B, T, H]`` states.

Checkpoints store one tensor per layer; :class:`StackedTensor` presents them as one lazy
``[layers, ...]`` array, so loading copies each device's slice straight from the memory-mapped
files into the stacked (and sharded) array, without assembling the model on the host first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from gaam_jax.adapters.lora import COLLECTION
from gaam_jax.encoders.attention import BLOCK_SIZE, IMPLEMENTATIONS

# (x float32 [B, T, H], pool_mask bool [B, T] or None) -> what a layer emits.
Collect = Callable[[jax.Array, jax.Array | None], jax.Array]

STACK_AXIS = "stack"

# Rematerialisation of each layer when differentiating through the encoder (fine-tuning):
# "none" keeps every activation; "full" recomputes the whole layer in the backward pass; "dots"
# keeps matmul outputs (no batch dims) and recomputes the rest.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class EncoderOptions:
    """How an encoder runs (never what it computes, up to float rounding).

    Attributes:
      attention: ``"auto"`` (cudnn on NVIDIA GPUs where dtype and shapes allow, blockwise for
        sequences longer than ``4 * block_size``, ``2 *`` if causal, else xla), ``"xla"``
        (dense), ``"blockwise"`` (memory-linear online softmax) or ``"cudnn"``. See
        :func:`gaam_jax.encoders.attention.choose_implementation`.
      block_size: query and key block length of the blockwise attention.
      remat: per-layer rematerialisation policy, a key of :data:`REMAT_POLICIES`.
    """

    attention: str = "auto"
    block_size: int = BLOCK_SIZE
    remat: str = "none"

    def __post_init__(self):
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(
                f"attention={self.attention!r} is not one of {', '.join(IMPLEMENTATIONS)}."
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {', '.join(REMAT_POLICIES)}.")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}.")


def scanned(layer: type[nn.Module], num_layers: int, num_args: int, options: EncoderOptions):
    """``layer`` scanned ``num_layers`` times, its parameters stacked on a leading axis.

    Args:
      layer: a Linen module class whose ``__call__(x, *args)`` returns ``(x, emitted)``; the
        ``num_args`` positional ``args`` are the same for every layer (broadcast).
      num_layers: the depth.
      num_args: how many arguments follow ``x``.
      options: the remat policy comes from here.

    Returns:
      A module class with ``layer``'s fields; calling an instance returns ``(x, emitted)`` with
      ``emitted`` stacked ``[num_layers, ...]``.
    """
    if options.remat != "none":
        # prevent_cse=False: inside scan, CSE across iterations cannot happen anyway.
        layer = nn.remat(layer, policy=REMAT_POLICIES[options.remat], prevent_cse=False)
    return nn.scan(
        layer,
        # The adapters (LoRA, DAAM) are per layer too, stacked like the parameters.
        variable_axes={"params": 0, COLLECTION: 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,) * num_args,
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: STACK_AXIS},
    )


class LayerOutput(nn.Module):
    """The identity: marks a layer's output, where DAAM adapters go.

    Every encoder layer ends with ``LayerOutput(name="layer_output")(x, mask)``;
    :data:`gaam_jax.adapters.ENCODER_DAAM` targets it, reading the token mask from ``mask``.
    """

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Returns ``x`` (``mask``: bool ``[B, T]`` of the real tokens, for the adapters)."""
        del mask
        return x


def with_layer_axis(first: jax.Array, stacked: jax.Array, last: jax.Array | None = None):
    """``[B, ...]`` (embeddings) and ``[L, B, ...]`` (layers) -> ``[B, L + 1, ...]``.

    Args:
      first: what the embedding output emits, ``[B, ...]``.
      stacked: what the layers emit, ``[L, B, ...]``.
      last: if given, replaces the last layer's entry (a final norm applied to the last state).
    """
    if last is not None:
        stacked = stacked.at[-1].set(last.astype(stacked.dtype))
    return jax.numpy.concatenate([first[None].astype(stacked.dtype), stacked]).swapaxes(0, 1)


class StackedTensor:
    """Per-layer host arrays (memory-mapped views) read as one lazy ``[layers, ...]`` array.

    Indexing reads only the requested layers and slice of each; nothing is copied before.

    Args:
      parts: one array per layer, all of one shape and dtype.
    """

    def __init__(self, parts: Sequence[np.ndarray]):
        shapes = {tuple(p.shape) for p in parts}
        dtypes = {np.dtype(p.dtype) for p in parts}
        if len(shapes) != 1 or len(dtypes) != 1:
            raise ValueError(f"layers differ in shape or dtype: {sorted(shapes)}, {dtypes}.")
        self.parts = list(parts)
        self.shape = (len(self.parts), *shapes.pop())
        self.dtype = dtypes.pop()
        self.ndim = len(self.shape)

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        if index and index[0] is Ellipsis:
            index = (slice(None),) * (self.ndim - len(index) + 1) + index[1:]
        first, rest = (index[0], index[1:]) if index else (slice(None), ())
        if isinstance(first, (int, np.integer)):
            return np.asarray(self.parts[first][rest])
        return np.stack([np.asarray(self.parts[i][rest]) for i in range(len(self.parts))[first]])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)

    def release(self, release: Callable[[np.ndarray], None]) -> None:
        """Calls ``release`` on every layer's array."""
        for part in self.parts:
            release(part)


def stack_layers(per_layer: Sequence[dict]) -> dict:
    """Trees of one layer's host arrays (same structure) -> one tree of :class:`StackedTensor`."""
    return jax.tree.map(lambda *parts: StackedTensor(parts), *per_layer)
