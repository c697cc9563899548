"""Parameter-efficient fine-tuning of the encoders: LoRA and DAAM adapters.

An :class:`Adapters` value on an encoder module (``BertEncoder(config, adapters=...)``, or
``from_pretrained(path, adapters=...)``) says what it adapts: a :class:`~lora.LoRA` on the
``Dense`` layers its ``targets`` select, a :class:`~daam.DaamAdapter` after every layer, or
both. The adapters' variables form one collection, :data:`COLLECTION` (``'adapters'``),
float32 and replicated, beside the frozen ``params``::

    variables = module.init(key, ids)          # {'params': ..., 'adapters': ...}
    module.apply({'params': base, 'adapters': adapters}, ids)

Train the adapter collection (and a head); never the base.
"""

from __future__ import annotations

import dataclasses

import jax

from gaam_jax.adapters.daam import DaamAdapter
from gaam_jax.adapters.lora import COLLECTION, PAPER_TARGETS, LoRA, applied, merge, paths

__all__ = [
    "COLLECTION",
    "PAPER_TARGETS",
    "Adapters",
    "DaamAdapter",
    "LoRA",
    "after_layer",
    "applied",
    "merge",
    "paths",
]


@dataclasses.dataclass(frozen=True)
class Adapters:
    """The adapters of an encoder (the default, no field set, adapts nothing).

    Attributes:
      lora: LoRA on the targeted ``Dense`` layers, or None.
      daam: a DAAM adapter on every layer's output.
    """

    lora: LoRA | None = None
    daam: bool = False

    @property
    def any(self) -> bool:
        """Whether anything is adapted."""
        return self.lora is not None or self.daam


def after_layer(adapters: Adapters, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """A layer's output through its DAAM adapter (if ``adapters.daam``); call it in the layer.

    Args:
      adapters: the encoder's adapters.
      x: the layer's output ``[B, T, d]``.
      mask: bool ``[B, T]`` of the real tokens, or None.
    """
    if not adapters.daam:
        return x
    return DaamAdapter(name="daam_adapter")(x, mask)
