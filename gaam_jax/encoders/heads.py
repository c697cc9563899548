"""A classification head on an encoder: which heads exist, their options and parameters.

:class:`SequenceClassifier` puts a head on an encoder module for fine-tuning (the encoder
adapted with LoRA/DAAM, :mod:`gaam_jax.adapters`, or not). Its params are
``{'encoder': <the encoder's params>, 'head': <the head's>}``; an adapted encoder's adapter
variables sit under ``{'adapters': {'encoder': ...}}``. The encoder runs once with a pooling
(:mod:`gaam_jax.encoders.pooling`) as its ``collect``, so only float32 ``[B, L+1, H]`` pooled
states leave it (never ``[B, L+1, T, H]``), and the head maps them to float32 logits ``[B, C]``.

Heads (``head=``; ``'auto'`` is the encoder's own architecture), each equal in eval mode to
transformers 5.24's model of the same name:

* an architecture's name (:data:`HF_HEADS`): its own head, defined with the architecture
  (``ARCHITECTURE.head``, :class:`~gaam_jax.encoders.architecture.HfHead`):
  :class:`~gaam_jax.encoders.bert.BertHead` (``BertForSequenceClassification``),
  :class:`~gaam_jax.encoders.llama.LlamaHead` (``LlamaForSequenceClassification``),
  :class:`~gaam_jax.encoders.beit.BeitHead` (``BeitForImageClassification``),
  :class:`~gaam_jax.encoders.wavlm.WavLMHead` (``WavLMForSequenceClassification``).
* ``'dat'``: the paper's decoder on every layer's pooled states
  (:mod:`~gaam_jax.encoders.dat_head`).

:func:`head_params_from_hf` gives the head parameters a checkpoint already has (BERT's pooler,
BEiT's pooler or final LayerNorm, and the classifier/score/projector of a
``*ForSequenceClassification`` checkpoint), so that a head starts where transformers' would;
:func:`classifier_from_encoder` builds the whole thing from a loaded
:class:`~gaam_jax.encoders.Encoder`. :data:`PAPER_TRAINABLE_HEAD_PATHS` says which head
parameters the paper's scripts train.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from gaam_jax.encoders import dat_head, head_parts, registry
from gaam_jax.encoders import pooling as poolings
from gaam_jax.sharding import AnnotatedInit

__all__ = [
    "HEADS",
    "HF_HEADS",
    "PAPER_TRAINABLE_HEAD_PATHS",
    "SequenceClassifier",
    "classifier_from_encoder",
    "encoder_model_type",
    "head_kind",
    "head_kwargs_from_hf",
    "head_params_from_hf",
    "head_params_from_saved",
    "head_params_to_hf",
    "init_head_params",
    "make_head",
    "merge_head_params",
    "trainable_head_paths",
    "trainable_mask",
]

# The heads of transformers' classification models, by model_type; then the paper's decoder.
HF_HEADS = registry.model_types()
HEADS = (*HF_HEADS, dat_head.NAME)

# The paper's fine-tuning scripts train only parameters whose name contains "classifier" (with
# the adapters): WavLM's projector and weighted-sum weights, BERT's pooler and BEiT's pooler
# norm stay frozen at their pretrained or random init, and Llama's ``score`` (no "classifier" in
# its name) trains not at all. The paper's decoder (``dat``) trains whole. Regular expressions
# searched in head parameter paths ("classifier/kernel"); the default (not paper-faithful) mode
# trains every head parameter.
PAPER_TRAINABLE_HEAD_PATHS: Mapping[str, str] = MappingProxyType(
    {
        **{kind: registry.get(kind).head.paper_trainable for kind in HF_HEADS},
        dat_head.NAME: dat_head.PAPER_TRAINABLE,
    }
)
ALL_HEAD_PATHS = ""  # searched, it matches every path


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
    if kind == dat_head.NAME:
        return dat_head.resolve(kwargs)
    head = registry.get(kind).head
    head_parts.check_option_names(kind, head.module, kwargs)
    _check_hf_values(kind, kwargs)
    return head.module, kwargs, head.pooling(kwargs)


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
      **head_kwargs: the head's options (its module's fields); ``dat``: the
        :class:`~gaam_jax.GaussianAdaptiveTransformer` fields (dtype names as strings allowed)
        and ``pooling``, which the head module itself does not take (see
        :class:`SequenceClassifier`).

    Raises:
      ValueError: one line, for an unknown head, option or value.
    """
    cls, kwargs, _ = _resolve(kind, num_classes, head_kwargs)
    return cls(num_classes, **kwargs, parent=None)


def encoder_model_type(encoder: nn.Module) -> str | None:
    """The ``model_type`` of the architecture whose encoder class ``encoder`` is, or None."""
    arch = registry.find(encoder)
    return None if arch is None else arch.model_type


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


def _pool_mask(
    kind: str, kwargs: Mapping[str, Any], encoder: nn.Module, inputs: Mapping[str, jax.Array]
) -> jax.Array | None:
    """The bool ``[B, T]`` positions the head pools over, or None for the encoder's own mask."""
    if kind == dat_head.NAME:
        return None
    return registry.get(kind).head.pool_mask(kwargs, encoder, inputs)


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
        if kind != dat_head.NAME:
            registry.get(kind).head.check_encoder(self.encoder, kwargs)
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
      The architecture's ``head.options_from_hf(config)`` (e.g. bert: ``dropout``, from
      ``classifier_dropout``, else ``hidden_dropout_prob``; and ``init_std``).

    Raises:
      ValueError: an unknown head, or WavLM's ``add_adapter`` (transformers' classifier refuses
        it too).
    """
    _check_kind(kind)
    if kind == dat_head.NAME:
        return {}
    return registry.get(kind).head.options_from_hf(config)


def _num_labels(config: Mapping[str, Any]) -> int | None:
    if config.get("id2label"):
        return len(config["id2label"])
    return config.get("num_labels")


def head_params_from_hf(
    model_type: str, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]
) -> dict:
    """The head parameters a transformers checkpoint already has, in the head's layout.

    Names are looked up as transformers stores them, with the base model's prefix
    (``BertForSequenceClassification`` etc.) or without (a bare ``BertModel``/``BeitModel``),
    by the architecture's ``head.params_from_hf`` (e.g. bert: ``[bert.]pooler.dense.*`` ->
    ``pooler``; ``classifier.*``).

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
    if model_type == dat_head.NAME:
        return {}
    out = registry.get(model_type).head.params_from_hf(config, tensors)
    return {k: v for k, v in out.items() if not isinstance(v, dict) or v}


class _Reads(Mapping):
    """A mapping of tensors that records which were read."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self.tensors, self.read = tensors, set()

    def __getitem__(self, key: str) -> np.ndarray:
        self.read.add(key)
        return self.tensors[key]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def head_params_from_saved(
    model_type: str, config: Mapping[str, Any], saved: Mapping[str, np.ndarray]
) -> dict:
    """The head parameters among a peft adapter's ``modules_to_save`` tensors.

    Args:
      model_type: the encoder's architecture (one of :data:`HF_HEADS`).
      config: the base model's ``config.json``.
      saved: :attr:`gaam_jax.adapters.peft.PeftAdapter.saved`: tensors by their module path in
        transformers' classification model (``classifier.weight``, ``bert.pooler.dense.bias``).

    Returns:
      A partial head params tree (as :func:`head_params_from_hf`).

    Raises:
      ValueError: one line naming a saved tensor that is no part of the architecture's head
        (a saved module inside the encoder is not supported) or one of the wrong shape.
    """
    reads = _Reads(saved)
    out = head_params_from_hf(model_type, config, reads)
    unread = sorted(set(saved) - reads.read)
    if unread:
        raise ValueError(
            f"modules_to_save: {unread[0]} is not part of the {model_type} classification head; "
            "only the head's modules (classifier, score, pooler, projector) are supported."
        )
    return out


def head_params_to_hf(
    model_type: str, config: Mapping[str, Any], head_params: Mapping
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The head parameters as transformers' classification model names them (float32 numpy).

    The inverse of :func:`head_params_from_hf` for the parameters in a module of that model
    (``HfHead.hf_modules``): ``kernel`` -> ``<module>.weight`` (transposed), ``bias`` ->
    ``<module>.bias``, ``scale`` -> ``<module>.weight``. Checked: reading the result back gives
    the same parameters.

    Args:
      model_type: one of :data:`HF_HEADS`.
      config: the base model's ``config.json``.
      head_params: the head's params tree.

    Returns:
      ``(tensors by name, names of head parameters in no module)`` (WavLM's ``layer_weights``:
      transformers has them as a bare parameter, which peft's ``modules_to_save`` cannot hold).

    Raises:
      ValueError: an unknown head.
    """
    _check_kind(model_type)
    if model_type == dat_head.NAME:
        raise ValueError("head_params_to_hf: the 'dat' head has no transformers counterpart.")
    modules = registry.get(model_type).head.hf_modules
    out: dict[str, np.ndarray] = {}
    left = []
    for top, value in dict(head_params).items():
        if top not in modules:
            left.append(top)
            continue
        for leaf, array in flatten_dict(
            {"": value} if not isinstance(value, Mapping) else value
        ).items():
            name = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf[-1]]
            array = np.asarray(array, np.float32)
            out[f"{modules[top]}.{name}"] = array.T if leaf[-1] == "kernel" else array
    back = flatten_dict(head_params_from_hf(model_type, config, out))
    want = {k: v for k, v in flatten_dict(dict(head_params)).items() if k[0] not in left}
    if set(back) != set(want) or any(
        not np.array_equal(np.asarray(back[k]), np.asarray(want[k], np.float32)) for k in want
    ):
        raise ValueError(f"head_params_to_hf: the {model_type} head does not round-trip.")
    return out, left


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
    if kind != dat_head.NAME:  # e.g. WavLM's final LayerNorm on the last state, or not
        module = registry.get(kind).head.fit_encoder(module, kwargs)
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
