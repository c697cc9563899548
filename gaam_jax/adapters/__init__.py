r"""Parameter-efficient fine-tuning of any Flax model: LoRA and DAAM adapters.

One entry point, :func:`adapt`, for Linen and NNX models alike::

    from gaam_jax.adapters import DAAM, LoRA, adapt
    model = adapt(model, lora=LoRA(rank=8, targets=r"attn/(query|value)$"),
                  daam=DAAM(targets=r"^blocks_\d+$", mask_arg="mask"))

* A :class:`~lora.LoRA` adapts every matching projection (Linen ``Dense``, ``DenseGeneral``
  and ``Einsum``; NNX ``Linear``, ``LinearGeneral`` and ``Einsum``), optionally with DoRA's
  magnitudes (``use_dora``) and per-module ranks and alphas (``rank_pattern``,
  ``alpha_pattern``).
* A :class:`~daam.DAAM` puts a DAAM gate (the identity at initialisation, mask-aware) after
  every matching module.

A Linen model comes back as a Linen model whose ``params`` are exactly the base's, the adapters
in the collection :data:`COLLECTION` (``'adapters'``); train that collection and never the
base. An NNX model comes back with its adapters attached as ``nnx.LoRAParam`` variables (DAAM's
as :class:`DaamParam`, a subclass), so ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` trains
them. :func:`merge` (Linen variables) and :func:`merge_model` (NNX) fold the LoRA into the
kernels. With DoRA, a Linen model's ``init`` sets the magnitudes from the kernels it draws:
:func:`init_magnitudes` sets them from the base weights the adapters will run on. Adapters
are float32 and replicated on a mesh.

The project's encoders are adapted the same way, by their ``adapters`` field
(:class:`Adapters`): ``BertEncoder(config, adapters=Adapters(lora=..., daam=True))``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
from flax import nnx

from gaam_jax.adapters import attach, intercept
from gaam_jax.adapters.attach import DaamAdapter, DaamParam, merge_model
from gaam_jax.adapters.daam import DAAM
from gaam_jax.adapters.lora import (
    COLLECTION,
    FACTORS,
    PAPER_TARGETS,
    LoRA,
    init_magnitudes,
    merge,
    paths,
)

__all__ = [
    "COLLECTION",
    "ENCODER_DAAM",
    "FACTORS",
    "PAPER_TARGETS",
    "DAAM",
    "Adapters",
    "DaamAdapter",
    "DaamParam",
    "LoRA",
    "adapt",
    "in_call",
    "init_magnitudes",
    "merge",
    "merge_model",
    "paths",
]

in_call = intercept.in_call

# DAAM after every layer of the project's encoders: each layer marks its output with an identity
# module named layer_output, called with the layer's token mask.
ENCODER_DAAM = DAAM(targets=r"(^|/)layer_output$", axis=-2, mask_arg="mask")


@dataclasses.dataclass(frozen=True)
class Adapters:
    """The adapters of a project encoder (the default, no field set, adapts nothing).

    Attributes:
      lora: LoRA on the targeted projections, or None.
      daam: a DAAM adapter after every layer (:data:`ENCODER_DAAM`).
    """

    lora: LoRA | None = None
    daam: bool = False

    @property
    def any(self) -> bool:
        """Whether anything is adapted."""
        return self.lora is not None or self.daam

    @property
    def daam_config(self) -> DAAM | None:
        """The DAAM settings the encoders use, or None."""
        return ENCODER_DAAM if self.daam else None


def adapt(
    model: Any,
    *,
    lora: LoRA | None = None,
    daam: DAAM | None = None,
    rngs: nnx.Rngs | None = None,
    methods: tuple[str, ...] = ("__call__",),
) -> Any:
    """``model`` with LoRA and/or DAAM adapters (a copy; ``model`` itself is unchanged).

    Args:
      model: a Linen module or an NNX module.
      lora: what LoRA adapts, or None.
      daam: where DAAM adapters go, or None.
      rngs: NNX only: draws LoRA's ``A`` (default ``nnx.Rngs(0)``). A Linen model's adapters
        are drawn by its ``init``.
      methods: Linen only: the methods that run adapted.

    Returns:
      Linen: a module of a subclass of ``model``'s class (same fields) whose ``init`` adds the
      ``adapters`` collection. NNX: the model with its adapters attached.

    Raises:
      ValueError: neither adapter is given, ``rngs`` is given for a Linen model, an NNX
        target matches nothing, or a model of another kind.
    """
    if lora is None and daam is None:
        raise ValueError("adapt: give lora=LoRA(...), daam=DAAM(...) or both.")
    if isinstance(model, nn.Module):
        if rngs is not None:
            raise ValueError(
                "adapt: rngs is for NNX models; a Linen model's init draws its adapters."
            )
        return intercept.adapt(model, lora, daam, methods)
    if isinstance(model, nnx.Module):
        return attach.adapt(model, lora, daam, rngs if rngs is not None else nnx.Rngs(0))
    raise ValueError(f"adapt: expected a Linen or NNX module, got {type(model).__name__}.")
