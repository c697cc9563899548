"""What the project knows about one encoder architecture, in one value.

Each architecture module (``gaam_jax/encoders/bert.py``, ``llama.py``, ``beit.py``,
``wavlm.py``) defines ``ARCHITECTURE``, an :class:`Architecture`: its classes, its Hugging Face
names (for checkpoints and for peft adapter module paths), what it reads, example inputs and its
own classification head (:class:`HfHead`). :mod:`gaam_jax.encoders.registry` finds them by
``config.json``'s ``model_type``; loading, heads, peft files and the data pipeline read them
there, so nothing else branches on architecture names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import numpy as np

__all__ = ["MODALITIES", "Architecture", "HfHead"]

Modality = Literal["text", "image", "audio"]
MODALITIES: tuple[Modality, ...] = ("text", "image", "audio")
Path = tuple[str, ...]


def _own_mask(
    options: Mapping[str, Any], encoder: nn.Module, inputs: Mapping[str, jax.Array]
) -> jax.Array | None:
    del options, encoder, inputs
    return None  # the encoder's own mask (text: attention_mask; audio: the real frames)


def _same_encoder(encoder: nn.Module, options: Mapping[str, Any]) -> nn.Module:
    del options
    return encoder


def _any_encoder(encoder: nn.Module, options: Mapping[str, Any]) -> None:
    del encoder, options


@dataclasses.dataclass(frozen=True, kw_only=True)
class HfHead:
    """An architecture's own classification head, as transformers' ``*ForSequenceClassification``.

    The head maps every layer's pooled state, float32 ``[B, L+1, H]``, to float32 logits
    ``[B, C]``; the encoder pools with :attr:`pooling` over :attr:`pool_mask`'s positions.

    Attributes:
      module: the Linen head, ``module(num_classes, **options)``; its fields are the options.
      options_from_hf: ``config.json`` (a mapping) -> the options transformers' head has
        (transformers' defaults where the config has none); raises ValueError, one line, for a
        config transformers' head refuses.
      params_from_hf: ``(config.json, checkpoint tensors by stored name)`` -> the head
        parameters the checkpoint holds (a partial tree in the head's layout; an empty dict for
        a missing piece). Raises ValueError, one line, for a tensor of the wrong shape.
      pooling: options -> the :mod:`gaam_jax.encoders.pooling` name the head reads.
      pool_mask: ``(options, encoder module, model inputs)`` -> bool ``[B, T]`` positions to
        pool, or None for the encoder's own mask. Raises ValueError, one line, for a missing or
        unusable input.
      fit_encoder: ``(encoder module, options)`` -> the encoder module transformers' head
        reads (e.g. WavLM's last state with or without the final LayerNorm).
      check_encoder: ``(encoder module, options)`` -> None, or ValueError (one line) for an
        encoder module whose output is not what transformers' head reads.
      hf_modules: the head's top-level parameter names -> the torch module each is in
        transformers' classification model (``pooler`` -> ``bert.pooler.dense``): what a peft
        adapter saves through ``modules_to_save``. A parameter not listed has no module
        (WavLM's ``layer_weights``).
      paper_trainable: regular expression (``re.search`` in ``classifier/kernel``-style paths)
        of the head parameters the paper's fine-tuning scripts train.
    """

    module: type[nn.Module]
    options_from_hf: Callable[[Mapping[str, Any]], dict[str, Any]]
    params_from_hf: Callable[[Mapping[str, Any], Mapping[str, np.ndarray]], dict]
    pooling: Callable[[Mapping[str, Any]], str]
    pool_mask: Callable[
        [Mapping[str, Any], nn.Module, Mapping[str, jax.Array]], jax.Array | None
    ] = _own_mask
    fit_encoder: Callable[[nn.Module, Mapping[str, Any]], nn.Module] = _same_encoder
    check_encoder: Callable[[nn.Module, Mapping[str, Any]], None] = _any_encoder
    hf_modules: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # The scripts train only parameters whose name contains "classifier" (with the adapters).
    paper_trainable: str = "classifier"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Architecture:
    """One encoder architecture: its classes, Hugging Face names, inputs and head.

    Attributes:
      model_type: ``config.json``'s ``model_type`` (``bert``, ...).
      config_cls: the config dataclass; ``config_cls.from_hf(config_json)`` builds it.
      encoder_cls: the Linen encoder, ``encoder_cls(config, dtype=, options=, adapters=)``.
      params_from_hf: ``(config, checkpoint tensors by stored name)`` -> the encoder's params
        tree of (memory-mapped) views.
      modality: what the encoder reads: ``text``, ``image`` or ``audio``.
      example_inputs: ``config.json`` (a mapping; the config dataclass as a dict works too) ->
        abstract batch-1 inputs by name, in the order of the module's positional arguments, for
        ``jax.eval_shape`` (nothing runs).
      hf_base_class: transformers' base model class (``BertModel``), which the encoder is.
      hf_prefix: the base model's attribute in transformers' head models, with its dot
        (``BertForSequenceClassification.bert``: ``bert.``): the prefix of their tensor names.
      peft_module_names: ``(module path of one of our Dense, layer index or None outside the
        layer stack)`` -> that Dense's module names in the transformers base model, newest
        naming first (BEiT: transformers 5's, then 4's); ``()`` for a Dense transformers does
        not have. Peft adapter files are keyed by these names.
      hf_other_linears: Linear modules of the transformers base model that the encoder does
        not have (a peft target list must not select them).
      head: the architecture's own classification head.
    """

    model_type: str
    config_cls: type
    encoder_cls: type[nn.Module]
    params_from_hf: Callable[[Any, Mapping[str, np.ndarray]], dict]
    modality: Modality
    example_inputs: Callable[[Mapping[str, Any]], dict[str, jax.ShapeDtypeStruct]]
    hf_base_class: str
    hf_prefix: str
    peft_module_names: Callable[[Path, int | None], tuple[str, ...]]
    hf_other_linears: tuple[str, ...] = ()
    head: HfHead

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(
                f"{self.model_type}: modality {self.modality!r} is not one of "
                f"{', '.join(MODALITIES)}."
            )
