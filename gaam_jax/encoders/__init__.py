"""Frozen pretrained encoders whose per-layer hidden states become GAAM decoder inputs.

One entry point loads a Hugging Face model folder (``config.json`` plus ``model.safetensors``
or sharded ``model-0000x-of-0000y.safetensors`` with ``model.safetensors.index.json``), local or
a hub id resolved through the Hugging Face cache (:func:`checkpoint.resolve`)::

    from gaam_jax.encoders import from_pretrained
    enc = from_pretrained(path, dtype=jnp.float32)          # or jnp.bfloat16 compute
    hs = enc.hidden_states(input_ids=ids, attention_mask=mask)  # float32 [B, L+1, T, hidden]

The architecture comes from ``config.json``'s ``model_type``: ``bert``, ``llama``, ``beit`` or
``wavlm``. With ``mesh`` (a ``jax.sharding.Mesh`` with axes ``data`` and ``model``) parameters
are placed by logical-axis rules (``gaam_jax.sharding.DEFAULT_RULES``, the project's one table):
every parameter is created with logical axis names (``vocab``, ``embed``, ``heads``, ...), the
rules map them to mesh axes, and each tensor is streamed from the memory-mapped checkpoint
straight to its shards, each device reading only its slice.

The package:

* ``bert``, ``llama``, ``beit``, ``wavlm``: one module per architecture, each with its config,
  encoder, checkpoint mapping, classification head and ``ARCHITECTURE``, what the rest of the
  project knows about it (:class:`Architecture`); ``registry`` finds them by ``model_type``.
* ``loading`` (:func:`from_pretrained`; :func:`abstract_from_pretrained`, its shapes, dtypes
  and shardings without reading a weight), ``encoder`` (:class:`Encoder`), ``checkpoint``
  (``config.json`` and safetensors), ``convert`` (``.bin`` to safetensors).
* ``stack``, ``attention``, ``pooling``: what every architecture's layers share.
* ``heads`` (:class:`SequenceClassifier`, a head on an encoder), ``head_parts`` (what the heads
  are made of), ``dat_head`` (the paper's decoder as a head); ``classifier``
  (:func:`classifier_from_pretrained`: a checkpoint and a peft adapter as a classifier).
"""

from __future__ import annotations

from gaam_jax.encoders.architecture import Architecture, HfHead
from gaam_jax.encoders.classifier import PretrainedClassifier, classifier_from_pretrained
from gaam_jax.encoders.encoder import Encoder, init_adapters
from gaam_jax.encoders.heads import SequenceClassifier, classifier_from_encoder
from gaam_jax.encoders.loading import (
    abstract_from_pretrained,
    check_checkpoint,
    configure,
    from_pretrained,
    open_host_params,
)
from gaam_jax.encoders.stack import EncoderOptions

__all__ = [
    "Architecture",
    "Encoder",
    "EncoderOptions",
    "HfHead",
    "PretrainedClassifier",
    "SequenceClassifier",
    "abstract_from_pretrained",
    "check_checkpoint",
    "classifier_from_encoder",
    "classifier_from_pretrained",
    "configure",
    "from_pretrained",
    "init_adapters",
    "open_host_params",
]
