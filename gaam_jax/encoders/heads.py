"""Sequence-classification heads on the encoders, as transformers' ``*ForSequenceClassification``.

:class:`SequenceClassifier` puts a head on an encoder module for fine-tuning (the encoder
adapted with LoRA/DAAM, :mod:`gaam_jax.adapters`, or not). Its params are
``{'encoder': <the encoder's params>, 'head': <the head's>}``; an adapted encoder's adapter
variables sit under ``{'adapters': {'encoder': ...}}``. The encoder runs once with a pooling
(:mod:`gaam_jax.encoders.pooling`) as its ``collect``, so only float32 ``[B, L+1, H]`` pooled
states leave it (never ``[B, L+1, T, H]``), and the head maps them to float32 logits ``[B, C]``.

Heads (``head=``; ``'auto'`` is the encoder's own architecture), each equal in eval mode to
transformers 5.24's model of the same name:

* ``'bert'`` (``BertForSequenceClassification``): the last layer's first token -> ``pooler``
  (Dense H->H, tanh) -> dropout -> ``classifier`` (Dense H->C).
* ``'beit'`` (``BeitForImageClassification``): with ``use_mean_pooling`` (BEiT's default), the
  mean of the last layer's patch tokens (pool mask: every token but the class token) ->
  ``pooler_norm`` (``beit.pooler.layernorm``) -> ``classifier``; without it, the last layer's
  class token -> ``final_norm`` (``beit.layernorm``, the final LayerNorm transformers applies to
  ``last_hidden_state``; per token, so applying it to the class token alone is the same) ->
  ``classifier``.
* ``'wavlm'`` (``WavLMForSequenceClassification``): the last hidden state (or, with
  ``use_weighted_layer_sum``, the softmax(``layer_weights``)-weighted sum of all ``L+1``) ->
  mean over the real frames (the frame mask of ``attention_mask``; every frame without one) ->
  ``projector`` (Dense H->``classifier_proj_size``) -> ``classifier``. transformers projects
  every frame and then takes the masked mean; the projector is affine and the mean's weights
  sum to one, so projecting the mean is the same up to rounding, and no ``[B, T, proj]`` array
  is built. With ``do_stable_layer_norm`` (WavLM-Large) transformers pools
  ``last_hidden_state``, which carries the final LayerNorm, so the encoder must have
  ``final_norm_on_last_state=True``; the weighted sum uses ``hidden_states``, whose last entry
  has none, so then it must be False (:func:`classifier_from_encoder` sets it).
* ``'llama'`` (``LlamaForSequenceClassification``): ``score`` (Dense H->C, no bias) on the last
  non-pad token: the last position where ``input_ids != pad_token_id`` (the last real token with
  right padding, the last position with left padding; position 0 for a row of pads), whatever
  ``attention_mask`` says. With ``pad_token_id`` None it is the last position, and like
  transformers a batch of more than one row is refused.
* ``'dat'``: the paper's decoder, :class:`gaam_jax.GaussianAdaptiveTransformer`, on every layer's
  pooled states ``[B, L+1, H]``; ``head_kwargs`` are its fields (plain values, as
  ``train/steps.py``'s ``make_model`` takes them) plus ``pooling`` (default ``'mean'`` over the
  model's own mask: text ``attention_mask``, audio the real frames, images every token).

:func:`head_params_from_hf` gives the head parameters a checkpoint already has (BERT's pooler,
BEiT's pooler or final LayerNorm, and the classifier/score/projector of a
``*ForSequenceClassification`` checkpoint), so that a head starts where transformers' would;
:func:`classifier_from_encoder` builds the whole thing from a loaded
:class:`~gaam_jax.encoders.Encoder`. :data:`PAPER_TRAINABLE_HEAD_PATHS` says which head
parameters the paper's scripts train.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
import sys
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from gaam_jax.encoders import pooling as poolings
from gaam_jax.sharding import AnnotatedInit, with_logical_axes
from gaam_jax.transformer import GaussianAdaptiveTransformer

__all__ = [
    "HEADS",
    "HF_HEADS",
    "PAPER_TRAINABLE_HEAD_PATHS",
    "BeitHead",
    "BertHead",
    "LlamaHead",
    "SequenceClassifier",
    "WavLMHead",
    "classifier_from_encoder",
    "encoder_model_type",
    "head_kind",
    "head_kwargs_from_hf",
    "head_params_from_hf",
    "init_head_params",
    "make_head",
    "merge_head_params",
    "trainable_head_paths",
    "trainable_mask",
]

# The heads of transformers' classification models, by model_type; then the paper's decoder.
HF_HEADS = ("bert", "beit", "wavlm", "llama")
HEADS = (*HF_HEADS, "dat")

# The paper's fine-tuning scripts train only parameters whose name contains "classifier" (with
# the adapters): WavLM's projector and weighted-sum weights, BERT's pooler and BEiT's pooler
# norm stay frozen at their pretrained or random init, and Llama's ``score`` (no "classifier" in
# its name) trains not at all. The paper's decoder (``dat``) trains whole. Regular expressions
# searched in head parameter paths ("classifier/kernel"); the default (not paper-faithful) mode
# trains every head parameter.
PAPER_TRAINABLE_HEAD_PATHS: Mapping[str, str] = MappingProxyType(
    {
        "bert": "classifier",
        "beit": "classifier",
        "wavlm": "classifier",
        "llama": "classifier",
        "dat": "",
    }
)
ALL_HEAD_PATHS = ""  # searched, it matches every path

_DEFAULT_STD = 0.02  # transformers' initializer_range default
_ZEROS = nn.initializers.zeros_init()
_ONES = nn.initializers.ones_init()
_HIGHEST = jax.lax.Precision.HIGHEST  # the heads are tiny: exact float32 products cost nothing


def _dense(
    features: int,
    std: float,
    name: str,
    axes: tuple[str | None, str | None] = ("embed", None),
    use_bias: bool = True,
) -> nn.Dense:
    """A float32 Dense initialised as transformers' ``_init_weights`` (N(0, std), zero bias)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=jnp.float32,
        precision=_HIGHEST,
        kernel_init=with_logical_axes(nn.initializers.normal(std), axes),
        bias_init=with_logical_axes(_ZEROS, (axes[1],)),
        name=name,
    )


def _last(features: jax.Array) -> jax.Array:
    if features.ndim != 3:
        raise ValueError(
            f"head input must be pooled states [batch, layers, hidden], got {features.shape}."
        )
    return features[:, -1].astype(jnp.float32)


class BertHead(nn.Module):
    """``BertForSequenceClassification``'s head: pooler (Dense + tanh), dropout, classifier.

    Attributes:
      num_classes: C.
      dropout: rate before the classifier in training (transformers: ``classifier_dropout``, else
        ``hidden_dropout_prob``); ``train=True`` then needs a ``'dropout'`` rng.
      init_std: std of the fresh kernels (``initializer_range``).
    """

    num_classes: int
    dropout: float = 0.0
    init_std: float = _DEFAULT_STD

    @nn.compact
    def __call__(self, features: jax.Array, *, train: bool = False) -> jax.Array:
        """Classifies.

        Args:
          features: float32 ``[B, L+1, H]``, every layer's first token (pooling ``first``).
          train: dropout is active.

        Returns:
          float32 logits ``[B, C]``.
        """
        x = _last(features)
        x = jnp.tanh(_dense(x.shape[-1], self.init_std, "pooler", ("embed", None))(x))
        x = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)(x)
        return _dense(self.num_classes, self.init_std, "classifier", ("embed", "classes"))(x)


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=jnp.float32,
        use_fast_variance=False,  # two-pass variance, as PyTorch
        scale_init=with_logical_axes(_ONES, (None,)),
        bias_init=with_logical_axes(_ZEROS, (None,)),
        name=name,
    )


class BeitHead(nn.Module):
    """``BeitForImageClassification``'s head: a LayerNorm on the pooled token, classifier.

    Attributes:
      num_classes: C.
      use_mean_pooling: the mean of the patch tokens and ``pooler_norm`` (transformers'
        ``beit.pooler.layernorm``); False: the class token and ``final_norm``
        (``beit.layernorm``).
      layer_norm_eps: the norm's epsilon (``config.layer_norm_eps``).
      init_std: std of the fresh classifier kernel.
    """

    num_classes: int
    use_mean_pooling: bool = True
    layer_norm_eps: float = 1e-12
    init_std: float = _DEFAULT_STD

    @nn.compact
    def __call__(self, features: jax.Array, *, train: bool = False) -> jax.Array:
        """Classifies.

        Args:
          features: float32 ``[B, L+1, H]``: every layer's mean over the patch tokens (pooling
            ``mean``, class token masked out), or its class token (``first``).
          train: unused (no dropout in this head).

        Returns:
          float32 logits ``[B, C]``.
        """
        del train
        name = "pooler_norm" if self.use_mean_pooling else "final_norm"
        x = _layer_norm(self.layer_norm_eps, name)(_last(features))
        return _dense(self.num_classes, self.init_std, "classifier", ("embed", "classes"))(x)


class WavLMHead(nn.Module):
    """``WavLMForSequenceClassification``'s head on frame-mean states: projector, classifier.

    Attributes:
      num_classes: C.
      classifier_proj_size: the projector's width P.
      use_weighted_layer_sum: classify the softmax(``layer_weights``)-weighted sum of all ``L+1``
        states (``layer_weights`` start at ``1 / (L+1)``, as transformers'), not the last one.
      init_std: std of the fresh kernels.
    """

    num_classes: int
    classifier_proj_size: int = 256
    use_weighted_layer_sum: bool = False
    init_std: float = _DEFAULT_STD

    @nn.compact
    def __call__(self, features: jax.Array, *, train: bool = False) -> jax.Array:
        """Classifies.

        Args:
          features: float32 ``[B, L+1, H]``, every layer's mean over the real frames (pooling
            ``mean``). Mean and weighted sum are linear and the projector affine, so this
            equals transformers' project-every-frame-then-mean up to rounding.
          train: unused (no dropout in this head).

        Returns:
          float32 logits ``[B, C]``.
        """
        del train
        x = _last(features)
        if self.use_weighted_layer_sum:
            n = features.shape[1]
            weights = self.param(
                "layer_weights", with_logical_axes(nn.initializers.constant(1.0 / n), (None,)), (n,)
            )
            norm = jax.nn.softmax(jnp.asarray(weights, jnp.float32))
            x = jnp.einsum("bnh,n->bh", features.astype(jnp.float32), norm, precision=_HIGHEST)
        x = _dense(self.classifier_proj_size, self.init_std, "projector", ("embed", None))(x)
        return _dense(self.num_classes, self.init_std, "classifier", (None, "classes"))(x)


class LlamaHead(nn.Module):
    """``LlamaForSequenceClassification``'s head: ``score`` (no bias) on the last non-pad token.

    Attributes:
      num_classes: C.
      pad_token_id: the pad id whose positions are skipped (``config.pad_token_id``); None: the
        last position, batch size 1 only (as transformers).
      init_std: std of the fresh kernel.
    """

    num_classes: int
    pad_token_id: int | None = None
    init_std: float = _DEFAULT_STD

    @nn.compact
    def __call__(self, features: jax.Array, *, train: bool = False) -> jax.Array:
        """Classifies.

        Args:
          features: float32 ``[B, L+1, H]``, every layer's state at the last non-pad token
            (pooling ``last`` over ``input_ids != pad_token_id``).
          train: unused (no dropout in this head).

        Returns:
          float32 logits ``[B, C]``.
        """
        del train
        score = _dense(self.num_classes, self.init_std, "score", ("embed", "classes"), False)
        return score(_last(features))


_HF_CLASSES: dict[str, type[nn.Module]] = {
    "bert": BertHead,
    "beit": BeitHead,
    "wavlm": WavLMHead,
    "llama": LlamaHead,
}
_DAT_PLAIN = {"dtype", "param_dtype"}  # dtype names allowed, as make_model
_DAT_TUPLES = {"map_shape", "layers", "kernel_size"}


def _options(cls: type, exclude: Sequence[str] = ()) -> tuple[str, ...]:
    skip = {"num_classes", "parent", "name", *exclude}
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in skip)


def _check_kind(kind: str) -> str:
    if kind not in HEADS:
        raise ValueError(f"head must be 'auto' or one of {', '.join(HEADS)}, got {kind!r}.")
    return kind


def _resolve(
    kind: str, num_classes: int, head_kwargs: Mapping[str, Any] | None
) -> tuple[type[nn.Module], dict[str, Any], str]:
    """``(head class, its keyword arguments, the pooling it needs)``, all checked.

    Raises:
      ValueError: one line, for an unknown head, option or bad value.
    """
    _check_kind(kind)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    kwargs = dict(head_kwargs or {})
    if kind == "dat":
        cls: type[nn.Module] = GaussianAdaptiveTransformer
        pooling_name = kwargs.pop("pooling", "mean")
        poolings.pooling(pooling_name)  # checks the name
    else:
        cls = _HF_CLASSES[kind]
    allowed = _options(cls)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        extra = ", pooling" if kind == "dat" else ""
        raise ValueError(
            f"{kind} head: unknown option {unknown[0]!r} (it takes {', '.join(allowed)}{extra})."
        )
    if kind == "dat":
        for key in _DAT_PLAIN & set(kwargs):
            if isinstance(kwargs[key], str):
                kwargs[key] = jnp.dtype(kwargs[key])
        for key in _DAT_TUPLES & set(kwargs):
            if isinstance(kwargs[key], (list, tuple)):
                kwargs[key] = tuple(kwargs[key])
        for key in ("map_shape", "layers"):  # empty means the default, as make_model
            if key in kwargs and kwargs[key] == ():
                kwargs[key] = None
        return cls, kwargs, pooling_name
    _check_hf_values(kind, kwargs)
    if kind == "bert":
        return cls, kwargs, "first"
    if kind == "beit":
        return cls, kwargs, "mean" if kwargs.get("use_mean_pooling", True) else "first"
    if kind == "wavlm":
        return cls, kwargs, "mean"
    return cls, kwargs, "last"


def _check_hf_values(kind: str, kwargs: Mapping[str, Any]) -> None:
    def bad(name: str, why: str) -> ValueError:
        return ValueError(f"{kind} head: {name} must be {why}, got {kwargs[name]!r}.")

    if "dropout" in kwargs and not 0.0 <= float(kwargs["dropout"]) < 1.0:
        raise bad("dropout", "in [0, 1)")
    if "init_std" in kwargs and not float(kwargs["init_std"]) > 0.0:
        raise bad("init_std", "positive")
    if "layer_norm_eps" in kwargs and not float(kwargs["layer_norm_eps"]) > 0.0:
        raise bad("layer_norm_eps", "positive")
    size = kwargs.get("classifier_proj_size", 1)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise bad("classifier_proj_size", "a positive int")
    pad = kwargs.get("pad_token_id")
    if pad is not None and (not isinstance(pad, numbers.Integral) or isinstance(pad, bool)):
        raise bad("pad_token_id", "an int or None")


def make_head(kind: str, num_classes: int, **head_kwargs: Any) -> nn.Module:
    """A head module on its own (unbound): ``head(features [B, L+1, H]) -> logits [B, C]``.

    Args:
      kind: one of :data:`HEADS`.
      num_classes: C.
      **head_kwargs: the head's options (see the module docstring); ``dat``: the
        :class:`~gaam_jax.GaussianAdaptiveTransformer` fields (dtype names as strings allowed)
        and ``pooling``, which the head module itself does not take (see
        :class:`SequenceClassifier`).

    Raises:
      ValueError: one line, for an unknown head, option or value.
    """
    cls, kwargs, _ = _resolve(kind, num_classes, head_kwargs)
    return cls(num_classes, **kwargs, parent=None)


def encoder_model_type(encoder: nn.Module) -> str | None:
    """The ``MODEL_TYPE`` of the encoders module defining ``encoder``'s class, or None."""
    module = sys.modules.get(type(encoder).__module__)
    return getattr(module, "MODEL_TYPE", None)


def head_kind(encoder: nn.Module, head: str = "auto") -> str:
    """The head ``head`` names on ``encoder``, ``'auto'`` resolved (one of :data:`HEADS`).

    Raises:
      ValueError: an unknown head, ``'auto'`` on an encoder of no known architecture, or
        another architecture's head.
    """
    arch = encoder_model_type(encoder)
    if head == "auto":
        if arch not in HF_HEADS:
            raise ValueError(
                f"head='auto': {type(encoder).__name__} is none of the architectures "
                f"{', '.join(HF_HEADS)}; name the head."
            )
        return arch
    _check_kind(head)
    if head in HF_HEADS and head != arch:
        raise ValueError(
            f"head={head!r} is {head}'s head but the encoder is {arch!r} "
            f"({type(encoder).__name__}): use 'auto' or 'dat'."
        )
    return head


def _check_wavlm_encoder(encoder: nn.Module, weighted: bool) -> None:
    """The last state must carry the final LayerNorm exactly when transformers' does."""
    cfg = getattr(encoder, "config", None)
    if not getattr(cfg, "do_stable_layer_norm", False) or getattr(
        cfg, "tie_last_hidden_states", False
    ):
        return  # no final norm, or the encoder applies it whatever the flag says
    normed = bool(getattr(encoder, "final_norm_on_last_state", False))
    if not weighted and not normed:
        raise ValueError(
            "wavlm head: with do_stable_layer_norm, transformers classifies last_hidden_state, "
            "which carries the final LayerNorm: use an encoder with final_norm_on_last_state=True "
            "(classifier_from_encoder sets it)."
        )
    if weighted and normed:
        raise ValueError(
            "wavlm head: use_weighted_layer_sum weighs transformers' hidden_states, whose last has "
            "no final LayerNorm: use an encoder with final_norm_on_last_state=False."
        )


def _required(kind: str, inputs: Mapping[str, jax.Array], name: str) -> jax.Array:
    if name not in inputs:
        raise ValueError(f"{kind} head: inputs need {name!r}, got {sorted(inputs)}.")
    return inputs[name]


def _pool_mask(
    kind: str, kwargs: Mapping[str, Any], encoder: nn.Module, inputs: Mapping[str, jax.Array]
) -> jax.Array | None:
    """The bool ``[B, T]`` positions the head pools over, or None for the encoder's own mask."""
    if kind == "beit" and kwargs.get("use_mean_pooling", True):
        pixels = _required(kind, inputs, "pixel_values")
        t = encoder.config.num_tokens
        return jnp.broadcast_to(jnp.arange(t)[None, :] >= 1, (pixels.shape[0], t))
    if kind == "llama":
        ids = _required(kind, inputs, "input_ids")
        pad = kwargs.get("pad_token_id")
        if pad is None:
            if ids.shape[0] != 1:
                raise ValueError(
                    "llama head: pad_token_id is None, so the last real token of a padded row is "
                    f"unknown; transformers refuses batch size {ids.shape[0]} > 1 (set "
                    "head_kwargs pad_token_id)."
                )
            return jnp.ones(ids.shape, bool)  # the last position, whatever attention_mask says
        return ids != int(pad)
    return None


class SequenceClassifier(AnnotatedInit, nn.Module):
    """An encoder and a classification head: model inputs -> float32 logits ``[B, C]``.

    Params are ``{'encoder': ..., 'head': ...}`` (the encoder's own params tree, unchanged, and
    the head's); an adapted encoder's adapters are ``{'adapters': {'encoder': ...}}``.

    Attributes:
      encoder: an encoder module (``BertEncoder``, ``LlamaEncoder``, ``BeitEncoder``,
        ``WavLMEncoder``; ``Encoder.module`` of a loaded one), adapted or not.
      num_classes: C.
      head: ``'auto'`` (the encoder's architecture's own head), that architecture's name, or
        ``'dat'`` (see the module docstring).
      head_kwargs: the head's options (:func:`head_kwargs_from_hf` gives a checkpoint's).
    """

    encoder: nn.Module
    num_classes: int
    head: str = "auto"
    head_kwargs: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        kind = self.head_kind
        _, kwargs, _ = _resolve(kind, self.num_classes, self.head_kwargs)
        if kind == "wavlm":
            _check_wavlm_encoder(self.encoder, bool(kwargs.get("use_weighted_layer_sum", False)))
        super().__post_init__()

    @property
    def head_kind(self) -> str:
        """The head's name, ``'auto'`` resolved (one of :data:`HEADS`; see :func:`head_kind`)."""
        return head_kind(self.encoder, self.head)

    @nn.compact
    def __call__(self, inputs: Mapping[str, Any], train: bool = False) -> jax.Array:
        """Classifies a batch.

        Args:
          inputs: the encoder's model inputs by name, batch first (bert/llama ``input_ids``,
            ``attention_mask`` int ``[B, T]``; beit ``pixel_values`` ``[B, C, H, W]``; wavlm
            ``input_values`` float ``[B, samples]``, ``attention_mask``); None values are
            dropped.
          train: training mode: the BERT head's dropout (a ``'dropout'`` rng) and the ``dat``
            head's BatchNorm (``mha_bn``: ``batch_stats`` mutable). The encoders have no
            dropout.

        Returns:
          float32 logits ``[B, num_classes]``.

        Raises:
          ValueError: a missing input, or ``llama`` with no ``pad_token_id`` and batch > 1.
        """
        kind = self.head_kind
        cls, kwargs, pooling_name = _resolve(kind, self.num_classes, self.head_kwargs)
        inputs = {k: jnp.asarray(v) for k, v in inputs.items() if v is not None}
        mask = _pool_mask(kind, kwargs, self.encoder, inputs)
        features = self.encoder(**inputs, collect=poolings.pooling(pooling_name), pool_mask=mask)
        logits = cls(self.num_classes, **kwargs, name="head")(
            features.astype(jnp.float32), train=train
        )
        return logits.astype(jnp.float32)


def head_kwargs_from_hf(kind: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The head options a transformers ``config.json`` implies (transformers' defaults if absent).

    Args:
      kind: one of :data:`HEADS` (``dat`` has none: ``{}``).
      config: the parsed ``config.json``.

    Returns:
      bert: ``dropout`` (``classifier_dropout``, else ``hidden_dropout_prob``), ``init_std``;
      beit: ``use_mean_pooling``, ``layer_norm_eps``, ``init_std``; wavlm:
      ``classifier_proj_size``, ``use_weighted_layer_sum``, ``init_std``; llama:
      ``pad_token_id``, ``init_std``.

    Raises:
      ValueError: an unknown head, or WavLM's ``add_adapter`` (transformers' classifier refuses
        it too).
    """
    _check_kind(kind)
    if kind == "dat":
        return {}
    std = float(config.get("initializer_range") or _DEFAULT_STD)
    if kind == "bert":
        rate = config.get("classifier_dropout")
        rate = config.get("hidden_dropout_prob", 0.1) if rate is None else rate
        return {"dropout": float(rate), "init_std": std}
    if kind == "beit":
        return {
            "use_mean_pooling": bool(config.get("use_mean_pooling", True)),
            "layer_norm_eps": float(config.get("layer_norm_eps", 1e-12)),
            "init_std": std,
        }
    if kind == "wavlm":
        if config.get("add_adapter"):
            raise ValueError(
                "config.json: add_adapter=True: transformers' WavLMForSequenceClassification does "
                "not support WavLM adapters either."
            )
        return {
            "classifier_proj_size": int(config.get("classifier_proj_size", 256)),
            "use_weighted_layer_sum": bool(config.get("use_weighted_layer_sum", False)),
            "init_std": std,
        }
    pad = config.get("pad_token_id")
    return {"pad_token_id": None if pad is None else int(pad), "init_std": std}


def _num_labels(config: Mapping[str, Any]) -> int | None:
    if config.get("id2label"):
        return len(config["id2label"])
    return config.get("num_labels")


class _HeadTensors:
    """Looks checkpoint tensors up under alternative names (views only, as ``params_from_hf``)."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self.tensors = tensors

    def find(self, names: Sequence[str]) -> str | None:
        return next((n for n in names if n in self.tensors), None)

    def get(self, names: Sequence[str], shape: tuple[int | None, ...]) -> np.ndarray | None:
        key = self.find(names)
        if key is None:
            return None
        value = self.tensors[key]
        got = tuple(value.shape)
        if len(got) != len(shape) or any(
            s is not None and g != s for g, s in zip(got, shape, strict=True)
        ):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"checkpoint: {key} has shape {got}, expected {want}.")
        return value

    def dense(
        self, names: Sequence[str], n_in: int, n_out: int | None, use_bias: bool = True
    ) -> dict:
        """Flax ``Dense`` leaves (kernel ``[in, out]``) of the stored torch ``Linear``s found."""
        out = {}
        weight = self.get([f"{n}.weight" for n in names], (n_out, n_in))
        if weight is not None:
            out["kernel"] = weight.T  # torch Linear stores [out, in]
            n_out = weight.shape[0]
        if use_bias:
            bias = self.get([f"{n}.bias" for n in names], (n_out,))
            if bias is not None:
                out["bias"] = bias
        return out

    def norm(self, names: Sequence[str], d: int) -> dict:
        """Flax ``LayerNorm`` leaves of the stored ``LayerNorm`` found."""
        out = {}
        for torch_name, leaf in (("weight", "scale"), ("bias", "bias")):
            value = self.get([f"{n}.{torch_name}" for n in names], (d,))
            if value is not None:
                out[leaf] = value
        return out


def head_params_from_hf(
    model_type: str, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
) -> dict:
    """The head parameters a transformers checkpoint already has, in the head's layout.

    Names are looked up as transformers stores them, with the base model's prefix
    (``BertForSequenceClassification`` etc.) or without (a bare ``BertModel``/``BeitModel``):

    * bert: ``[bert.]pooler.dense.*`` -> ``pooler``; ``classifier.*``.
    * beit: ``[beit.]pooler.layernorm.*`` -> ``pooler_norm`` (``use_mean_pooling``) or
      ``[beit.]layernorm.*`` -> ``final_norm``; ``classifier.*``.
    * wavlm: ``projector.*``, ``classifier.*``, ``layer_weights`` (``use_weighted_layer_sum``).
    * llama: ``score.weight`` -> ``score/kernel``.

    Args:
      model_type: one of :data:`HEADS` (``dat``: a checkpoint has no DAT, ``{}``).
      config: the parsed ``config.json`` (hidden size, ``classifier_proj_size``, ...).
      tensors: the checkpoint's tensors by stored name (e.g. ``checkpoint.open_tensors``);
        memory-mapped views are kept (kernels transposed as views).

    Returns:
      A partial head params tree: only what the checkpoint holds (a missing piece keeps its
      fresh init in :func:`merge_head_params`). The classifier keeps the checkpoint's number of
      labels.

    Raises:
      ValueError: one line, for an unknown head or a stored tensor of the wrong shape.
    """
    _check_kind(model_type)
    if model_type == "dat":
        return {}
    read = _HeadTensors(tensors)
    d = int(config.get("hidden_size", 768))
    out: dict[str, dict] = {}
    if model_type == "bert":
        out["pooler"] = read.dense(["bert.pooler.dense", "pooler.dense"], d, d)
        out["classifier"] = read.dense(["classifier"], d, None)
    elif model_type == "beit":
        if config.get("use_mean_pooling", True):
            out["pooler_norm"] = read.norm(["beit.pooler.layernorm", "pooler.layernorm"], d)
        else:
            out["final_norm"] = read.norm(["beit.layernorm", "layernorm"], d)
        out["classifier"] = read.dense(["classifier"], d, None)
    elif model_type == "wavlm":
        proj = int(config.get("classifier_proj_size", 256))
        out["projector"] = read.dense(["projector"], d, proj)
        out["classifier"] = read.dense(["classifier"], proj, None)
        if config.get("use_weighted_layer_sum", False):
            n = int(config.get("num_hidden_layers", 12)) + 1
            weights = read.get(["layer_weights"], (n,))
            if weights is not None:
                out["layer_weights"] = weights  # type: ignore[assignment]
    else:
        out["score"] = read.dense(["score"], d, None, use_bias=False)
    return {k: v for k, v in out.items() if not isinstance(v, dict) or v}


def merge_head_params(head_params: Any, pretrained: Mapping, *, skip_mismatched: bool = False):
    """``head_params`` with the leaves ``pretrained`` has replaced (cast to the leaf's dtype).

    Args:
      head_params: a full head params tree (:func:`init_head_params`).
      pretrained: a partial tree (:func:`head_params_from_hf`).
      skip_mismatched: keep the fresh leaf where the shapes differ (a classifier for another
        number of classes, as transformers' ``ignore_mismatched_sizes``) instead of raising.

    Returns:
      The merged tree (new arrays where replaced).

    Raises:
      ValueError: one line, for a pretrained leaf the head does not have, or of another shape.
    """
    flat = dict(flatten_dict(dict(head_params)))
    for path, value in flatten_dict(dict(pretrained)).items():
        name = "/".join(path)
        if path not in flat:
            raise ValueError(f"head params: the head has no {name} (it has {_names(flat)}).")
        if tuple(value.shape) != tuple(flat[path].shape):
            if skip_mismatched:
                continue
            raise ValueError(
                f"head params: {name} is {tuple(value.shape)} in the checkpoint but "
                f"{tuple(flat[path].shape)} in the head (another num_classes? pass "
                "skip_mismatched=True to keep the fresh init)."
            )
        flat[path] = jnp.asarray(np.asarray(value), dtype=flat[path].dtype)
    return unflatten_dict(flat)


def _names(flat: Mapping[tuple, Any]) -> str:
    return ", ".join("/".join(p) for p in sorted(flat))


def init_head_params(classifier: SequenceClassifier, seed: int = 0) -> dict:
    """Fresh params of ``classifier``'s head alone (the encoder is neither built nor traced).

    The head is initialised on float32 zeros ``[1, L+1, H]`` (``L``, ``H``: the encoder config's
    ``num_hidden_layers``, ``hidden_size``) with ``jax.random.key(seed)``; the values differ from
    the head part of ``classifier.init`` (another rng path), the shapes and init laws do not.
    """
    kind = classifier.head_kind
    cls, kwargs, _ = _resolve(kind, classifier.num_classes, classifier.head_kwargs)
    cfg = classifier.encoder.config
    features = jnp.zeros((1, cfg.num_hidden_layers + 1, cfg.hidden_size), jnp.float32)
    head = cls(classifier.num_classes, **kwargs, parent=None)
    variables = jax.jit(head.init)(jax.random.key(seed), features)
    return nn.meta.unbox(variables["params"])


def classifier_from_encoder(
    encoder: Any,
    num_classes: int | None = None,
    head: str = "auto",
    head_kwargs: Mapping[str, Any] | None = None,
    *,
    tensors: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    skip_mismatched: bool = False,
) -> tuple[SequenceClassifier, dict]:
    """A :class:`SequenceClassifier` on a loaded encoder, and its params.

    Args:
      encoder: a :class:`gaam_jax.encoders.Encoder` (``from_pretrained``).
      num_classes: C; default the checkpoint's number of labels (``id2label``/``num_labels``).
      head: as :class:`SequenceClassifier`'s.
      head_kwargs: overrides of :func:`head_kwargs_from_hf` of the encoder's ``config.json``
        (for ``dat``: the decoder's options).
      tensors: the checkpoint's tensors (``checkpoint.open_tensors(folder)``): the head starts
        from the parameters they hold (:func:`head_params_from_hf`), the rest fresh.
      seed: seeds the fresh head parameters (:func:`init_head_params`).
      skip_mismatched: as :func:`merge_head_params`'s.

    Returns:
      ``(classifier, params)`` with ``params = {'encoder': encoder.params, 'head': ...}``; apply
      with ``classifier.apply({'params': params}, inputs)`` (plus ``'adapters': {'encoder':
      encoder.adapters}`` for an adapted encoder). A stable-layer-norm WavLM encoder module is
      cloned with the ``final_norm_on_last_state`` transformers' head implies.

    Raises:
      ValueError: one line, for a bad head or option, no ``num_classes`` to be found, or
        checkpoint head tensors that do not fit.
    """
    raw = encoder.config_json or {}
    kind = head_kind(encoder.module, head)
    if num_classes is None:
        num_classes = _num_labels(raw)
        if num_classes is None:
            raise ValueError("num_classes: config.json has no id2label or num_labels; give it.")
    kwargs = {**head_kwargs_from_hf(kind, raw), **dict(head_kwargs or {})}
    module = encoder.module
    if kind == "wavlm" and module.config.do_stable_layer_norm:
        weighted = bool(kwargs.get("use_weighted_layer_sum", False))
        module = module.clone(final_norm_on_last_state=not weighted)
    classifier = SequenceClassifier(module, num_classes, kind, kwargs, parent=None)
    params = init_head_params(classifier, seed)
    if tensors is not None:
        params = merge_head_params(
            params, head_params_from_hf(kind, raw, tensors), skip_mismatched=skip_mismatched
        )
    return classifier, {"encoder": encoder.params, "head": params}


def trainable_head_paths(kind: str, paper_faithful: bool = False) -> str:
    """The regular expression (``re.search``) of the head parameter paths that train.

    Args:
      kind: one of :data:`HEADS` (``'auto'`` resolved: :attr:`SequenceClassifier.head_kind`).
      paper_faithful: the paper's scripts' rule (:data:`PAPER_TRAINABLE_HEAD_PATHS`: only
        ``classifier``, so nothing of Llama's head); else every head parameter trains.

    Raises:
      ValueError: an unknown head.
    """
    _check_kind(kind)
    return PAPER_TRAINABLE_HEAD_PATHS[kind] if paper_faithful else ALL_HEAD_PATHS


def trainable_mask(params: Mapping, kind: str, paper_faithful: bool = False) -> dict:
    """True for the parameters that train: head ones by :func:`trainable_head_paths`.

    Args:
      params: ``{'encoder': ..., 'head': ...}`` (the encoder's are all False: its base weights
        stay frozen; adapters live in their own collection).
      kind: the head's name.
      paper_faithful: as :func:`trainable_head_paths`.

    Returns:
      A tree like ``params`` of bools (for ``optax.masked`` / ``optax.multi_transform``).
    """
    pattern = re.compile(trainable_head_paths(kind, paper_faithful))
    head = {
        path: bool(pattern.search("/".join(path))) for path in flatten_dict(dict(params["head"]))
    }
    return {
        "encoder": jax.tree.map(lambda _: False, params["encoder"]),
        "head": unflatten_dict(head),
    }
