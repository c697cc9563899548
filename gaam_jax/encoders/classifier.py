"""A classifier from a Hugging Face checkpoint and, optionally, a peft adapter folder.

:func:`classifier_from_pretrained` is what transformers plus peft give for
``PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(path), adapter)``
(``AutoModelForImageClassification`` for BEiT, ``...AudioClassification`` for WavLM)::

    from gaam_jax.encoders import classifier_from_pretrained
    clf = classifier_from_pretrained(base_folder, adapter="run/adapter")
    logits = clf.logits(input_ids=ids, attention_mask=mask)  # float32 [B, C]

The adapter's LoRA (:func:`gaam_jax.adapters.peft.read`: ranks, alphas and their patterns,
``layers_to_transform``, rsLoRA, DoRA) adapts the encoder, with the DAAM gates of a gaam_jax
run's adapter (:data:`gaam_jax.adapters.peft.DAAM_FILE`); the head starts from what the base
checkpoint holds (:func:`~gaam_jax.encoders.heads.head_params_from_hf`) and takes what the
adapter saved through ``modules_to_save`` (the classifier or score, BERT's pooler, WavLM's
projector). WavLM: peft's *unmerged* model ignores a LoRA on the attention projections (see
:mod:`gaam_jax.adapters.peft`); this equals its merged model.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from gaam_jax.adapters import COLLECTION, Adapters
from gaam_jax.encoders import heads
from gaam_jax.encoders.checkpoint import open_tensors, resolve
from gaam_jax.encoders.encoder import Encoder
from gaam_jax.encoders.loading import from_pretrained

__all__ = ["PretrainedClassifier", "classifier_from_pretrained"]

# transformers' PretrainedConfig default when config.json names no labels.
_HF_DEFAULT_LABELS = 2


@dataclasses.dataclass(frozen=True)
class PretrainedClassifier:
    """A loaded classifier: the module, its params and adapters.

    Attributes:
      module: the :class:`~gaam_jax.encoders.heads.SequenceClassifier`.
      params: ``{'encoder': ..., 'head': ...}``.
      adapters: the encoder's adapter collection (LoRA/DoRA variables), or None.
      encoder: the loaded :class:`~gaam_jax.encoders.Encoder` (adapted when ``adapters``).
      adapter_config: the adapter's parsed ``adapter_config.json``, or None.
    """

    module: heads.SequenceClassifier
    params: Any
    adapters: Any
    encoder: Encoder
    adapter_config: dict | None = None

    @property
    def num_classes(self) -> int:
        """C."""
        return self.module.num_classes

    @property
    def variables(self) -> dict:
        """The variables ``module.apply`` takes."""
        out = {"params": self.params}
        if self.adapters is not None:
            out[COLLECTION] = {"encoder": self.adapters}
        return out

    def logits(self, **inputs: Any) -> jax.Array:
        """Eval-mode float32 logits ``[B, C]``.

        Args:
          **inputs: the encoder's model inputs (``input_ids``, ``attention_mask`` int
            ``[B, T]``; ``pixel_values`` float ``[B, C, H, W]``; ``input_values`` float
            ``[B, samples]``); None values are dropped.
        """
        inputs = {k: jnp.asarray(v) for k, v in inputs.items() if v is not None}
        return self._apply(self.variables, inputs)

    @functools.cached_property
    def _apply(self) -> Any:
        # The module holds dicts (head options): unhashable, so closed over, not a static arg.
        return jax.jit(self.module.apply)


def _saved_labels(saved: Mapping[str, Any]) -> int | None:
    for name in ("classifier.weight", "score.weight"):
        if name in saved:
            return int(saved[name].shape[0])
    return None


def classifier_from_pretrained(
    path: str | pathlib.Path,
    *,
    adapter: str | pathlib.Path | None = None,
    num_classes: int | None = None,
    head: str = "auto",
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    revision: str | None = None,
    head_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    **encoder_kwargs: Any,
) -> PretrainedClassifier:
    """A classifier equal (in eval mode) to transformers' classification model plus peft.

    Args:
      path: the base model folder or hub id (as :func:`~gaam_jax.encoders.from_pretrained`).
      adapter: a peft LoRA adapter folder (``task_type`` ``SEQ_CLS`` or any other made on the
        model), or None: the base checkpoint's own head.
      num_classes: C; default the adapter's saved classifier's, else ``config.json``'s labels,
        else 2 (transformers' default).
      head: ``'auto'`` (the architecture's own head, as transformers) or ``'dat'``.
      dtype: the encoder's compute dtype (logits are float32).
      mesh: as :func:`~gaam_jax.encoders.from_pretrained`'s.
      revision: for a hub id.
      head_kwargs: overrides of the head options ``config.json`` implies.
      seed: seeds head parameters neither the checkpoint nor the adapter holds (transformers
        draws those randomly too).
      **encoder_kwargs: further :func:`~gaam_jax.encoders.from_pretrained` options (``rules``,
        ``attention``, ``block_size``, ``remat``).

    Returns:
      The :class:`PretrainedClassifier`.

    Raises:
      FileNotFoundError: as :func:`~gaam_jax.encoders.from_pretrained` and
        :func:`gaam_jax.adapters.peft.read`.
      ValueError: one line: an adapter option that is not supported (``lora_bias``,
        ``trainable_token_indices``, another ``peft_type``, ...), a saved module that is no part
        of the head, or tensors that do not fit.
    """
    # Imported when used: peft reads this package's registry (see loading.from_pretrained).
    from gaam_jax.adapters import peft  # noqa: PLC0415

    folder = resolve(path, revision)
    encoder = from_pretrained(folder, dtype, mesh, **encoder_kwargs)
    raw = encoder.config_json or {}
    saved_head: dict = {}
    adapter_config = None
    if adapter is not None:
        read = peft.read(adapter, encoder.model_type, encoder.config, params=encoder.params)
        adapter_config = read.config
        kind = heads.head_kind(encoder.module, head)
        if read.saved:
            saved_head = heads.head_params_from_saved(kind, raw, read.saved)
        if num_classes is None:
            num_classes = _saved_labels(read.saved)
        adapters = Adapters(lora=read.lora, daam=read.daam)
        encoder = encoder.with_adapters(adapters, variables=read.variables)
    if num_classes is None:
        labels = raw.get("id2label") or {}
        num_classes = len(labels) or raw.get("num_labels") or _HF_DEFAULT_LABELS
    module, params = heads.classifier_from_encoder(
        encoder,
        num_classes,
        head,
        head_kwargs,
        tensors=open_tensors(folder),
        seed=seed,
        # The adapter's saved classifier replaces the checkpoint's, whatever its size.
        skip_mismatched=bool(saved_head),
    )
    if saved_head:
        params = {**params, "head": heads.merge_head_params(params["head"], saved_head)}
    return PretrainedClassifier(module, params, encoder.adapters, encoder, adapter_config)
