"""The encoder architectures by ``config.json``'s ``model_type``.

Each architecture module defines its :class:`~gaam_jax.encoders.architecture.Architecture` as
``ARCHITECTURE``; this is the one list of those modules. Loading, heads, peft adapter files and
the data pipeline look architectures up here instead of keeping tables of their own.
"""

from __future__ import annotations

from types import MappingProxyType

from flax import linen as nn

from gaam_jax.encoders import beit, bert, llama, wavlm
from gaam_jax.encoders.architecture import Architecture

__all__ = ["find", "get", "model_types"]

# In the order error messages list them.
_ARCHITECTURES = MappingProxyType(
    {
        a.model_type: a
        for a in (bert.ARCHITECTURE, llama.ARCHITECTURE, beit.ARCHITECTURE, wavlm.ARCHITECTURE)
    }
)


def model_types() -> tuple[str, ...]:
    """The supported ``model_type`` s: ``('bert', 'llama', 'beit', 'wavlm')``."""
    return tuple(_ARCHITECTURES)


def get(model_type: str) -> Architecture:
    """The :class:`~gaam_jax.encoders.architecture.Architecture` of ``model_type``.

    Raises:
      ValueError: one line naming the supported ``model_type`` s.
    """
    if model_type not in _ARCHITECTURES:
        raise ValueError(
            f"model_type={model_type!r} is not supported (supported: {', '.join(model_types())})."
        )
    return _ARCHITECTURES[model_type]


def find(encoder: nn.Module) -> Architecture | None:
    """The architecture whose encoder class ``encoder`` is an instance of exactly, or None."""
    return next((a for a in _ARCHITECTURES.values() if type(encoder) is a.encoder_cls), None)
