"""The paper's decoder as a classification head on an encoder: head ``'dat'``.

:class:`gaam_jax.GaussianAdaptiveTransformer` on every layer's pooled states ``[B, L+1, H]``,
trained whole (no checkpoint has one). Its options are the decoder's fields as plain values, as
``train/steps.py``'s ``make_model`` takes them (dtype names, lists), plus ``pooling``: how the
encoder pools each layer (default ``'mean'`` over the model's own mask: text
``attention_mask``, audio the real frames, images every token).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from gaam_jax.encoders import head_parts
from gaam_jax.encoders import pooling as poolings
from gaam_jax.transformer import GaussianAdaptiveTransformer

__all__ = ["MODULE", "NAME", "PAPER_TRAINABLE", "resolve"]

NAME = "dat"
MODULE = GaussianAdaptiveTransformer
PAPER_TRAINABLE = ""  # searched, it matches every path: the decoder trains whole

_DTYPES = {"dtype", "param_dtype"}  # dtype names allowed, as make_model
_TUPLES = {"map_shape", "layers", "kernel_size"}


def resolve(options: Mapping[str, Any]) -> tuple[type[GaussianAdaptiveTransformer], dict, str]:
    """``(decoder class, its keyword arguments, the pooling name)`` of the head's options.

    Dtype names become dtypes, lists tuples, and an empty ``map_shape`` or ``layers`` the
    default (None), as ``make_model`` reads them.

    Raises:
      ValueError: one line, for an unknown pooling or option.
    """
    kwargs = dict(options)
    pooling_name = kwargs.pop("pooling", "mean")
    poolings.pooling(pooling_name)  # checks the name
    head_parts.check_option_names(NAME, MODULE, kwargs, extra=("pooling",))
    for key in _DTYPES & set(kwargs):
        if isinstance(kwargs[key], str):
            kwargs[key] = jnp.dtype(kwargs[key])
    for key in _TUPLES & set(kwargs):
        if isinstance(kwargs[key], (list, tuple)):
            kwargs[key] = tuple(kwargs[key])
    for key in ("map_shape", "layers"):  # empty means the default, as make_model
        if key in kwargs and kwargs[key] == ():
            kwargs[key] = None
    return MODULE, kwargs, pooling_name
