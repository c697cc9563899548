"""Fine-tuning an encoder (LoRA, LoRA+, DAAM adapters): a task the trainer runs (:data:`TASK`).

A fine-tuning config (``configs/finetune.py``, ``configs/paper/*.py:lora_*``) has an ``encoder``
section. Its runs go through the same trainer, loop, checkpoints and artefacts as the decoders
on frozen features (:mod:`train.trainer`); :data:`TASK` states what changes:

* the examples are the encoder's model inputs (token ids and mask, pixel values, or waveforms),
  preprocessed on the host once by the extractor's own preprocessing (:mod:`data.preprocess`)
  and held as arrays (:class:`data.pipeline.ArraySource`);
* the model is a :class:`FineTuneModel`: the encoder with its adapters and a classification
  head (:class:`gaam_jax.encoders.heads.SequenceClassifier`). The train state holds only what
  trains (the head and the adapter collection) and its optimiser state; the base weights are
  the programs' ``frozen`` input, never differentiated, never in the optimiser, never in a
  checkpoint (the run identity names them instead: folder or hub id and a fingerprint). The
  config check builds it from ``config.json`` and the weights' headers alone; the weights are
  read once, onto the mesh, when training starts.

Each run is its own program (``runs_per_program`` 1: a model too large to stack). A finished
LoRA/DoRA run also writes ``adapter/`` of its best state in Hugging Face PEFT's
sequence-classification format (:func:`write_adapter`): ``PeftModel.from_pretrained(
AutoModelForSequenceClassification.from_pretrained(base, num_labels=C), adapter)`` and
``AutoPeftModelForSequenceClassification.from_pretrained(adapter)`` give the run's logits, and
``gaam_jax.encoders.classifier_from_pretrained(base, adapter=adapter)`` too (DAAM gates
included); its README says what peft users do not get.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from app import storage
from data import pipeline
from gaam_jax import COMPUTE_DTYPES
from gaam_jax import adapters as adapters_lib
from gaam_jax.encoders import checkpoint, heads
from train import artefacts, feeds, runs, tasks, validate
from train import config as config_lib
from train import steps as steps_lib
from train.config import ConfigError, one_line
from train.splits import CV_KINDS, DatasetFolds


def adapters_from_config(cfg: ml_collections.ConfigDict) -> adapters_lib.Adapters:
    """``config.adapters`` -> :class:`gaam_jax.adapters.Adapters` (``lora_rank`` 0: no LoRA).

    ``use_dora``, ``rank_pattern`` and ``alpha_pattern`` (``(regex, value)`` pairs) may be
    missing (configs recorded before they existed): off and empty.
    """
    lora = None
    if cfg.lora_rank:
        lora = adapters_lib.LoRA(
            rank=int(cfg.lora_rank),
            alpha=float(cfg.lora_alpha),
            targets=str(cfg.lora_targets),
            scaling=str(cfg.lora_scaling),
            init=str(cfg.lora_init),
            use_dora=bool(config_lib.setting(cfg, "use_dora", within="adapters")),
            # (regex, value) pairs; LoRA also takes the lists a recorded config.json gives back.
            rank_pattern=config_lib.setting(cfg, "rank_pattern", within="adapters") or (),
            alpha_pattern=config_lib.setting(cfg, "alpha_pattern", within="adapters") or (),
        )
    return adapters_lib.Adapters(lora=lora, daam=bool(cfg.daam))


def encoder_folder(config: ml_collections.ConfigDict) -> pathlib.Path:
    """The encoder's local folder (a hub id resolved in the Hugging Face cache)."""
    path = config.encoder.path
    if not path:
        from gaam_jax.encoders import bert

        path = bert.minilm_dir()
    return checkpoint.resolve(path, config_lib.setting(config, "encoder.revision") or None)


@dataclasses.dataclass(eq=False)
class FineTuneModel:
    """An adapted encoder with a head, as :class:`train.steps.Steps` trains a model.

    The trained variables are ``{'head': ..., 'adapters': ...}`` (the state's ``params``); the
    base weights are ``frozen`` (``{'encoder': ...}``), which the programs pass to :meth:`apply`
    as ``variables['frozen']``.

    Attributes:
      module: the :class:`~gaam_jax.encoders.heads.SequenceClassifier`.
      frozen: ``{'encoder': base params}`` on device.
      example: one example's model inputs (batch 1) as ``jax.ShapeDtypeStruct`` s.
      pretrained_head: head parameters the checkpoint has (the rest start fresh).
      trainable_head: regular expression of the head parameter paths that train.
      loraplus_ratio: LoRA+'s learning-rate ratio of ``B`` to ``A`` (0: plain LoRA).
      paper_faithful: the paper's LoRA+ optimiser holds only ``A`` and ``B``.
      magnitudes: DoRA's initial magnitudes (``||W||`` of the base kernels; ``B`` starts at
        zero) by adapter path (``('encoder', 'layers', 'query', 'lora_magnitude')``), small
        host arrays; empty without DoRA.
    """

    module: heads.SequenceClassifier
    frozen: Any
    example: Any
    pretrained_head: Any
    trainable_head: str
    loraplus_ratio: float = 0.0
    paper_faithful: bool = False
    magnitudes: dict = dataclasses.field(default_factory=dict)

    def init(self, key: jax.Array, x: Any) -> dict:
        """Fresh trained variables ``{'params': {'head': ..., 'adapters': ...}}`` (traceable)."""
        variables = self.module.init(key, x)
        # Under logical annotations (Steps.state_sharding) the leaves are boxed: merge the
        # values, keep the boxes.
        boxed = variables["params"]["head"]
        merged = heads.merge_head_params(
            nn.meta.unbox(boxed), self.pretrained_head, skip_mismatched=True
        )
        head = jax.tree.map(
            lambda b, v: b.replace_boxed(v) if _is_box(b) else v, boxed, merged, is_leaf=_is_box
        )
        adapters = variables.get(adapters_lib.COLLECTION, {})
        if self.magnitudes:
            # init drew random base weights; DoRA's magnitudes are those of the real ones.
            flat = dict(flatten_dict(adapters))
            for path, value in self.magnitudes.items():
                box = flat[path]
                flat[path] = box.replace_boxed(value) if _is_box(box) else jnp.asarray(value)
            adapters = unflatten_dict(flat)
        return {"params": {"head": head, "adapters": adapters}}

    def apply(self, variables: dict, x: Any, train: bool = False, mutable: Any = False) -> Any:
        """Logits float32 ``[B, C]`` (and no updated collections, when ``mutable``)."""
        trained = variables["params"]
        full = {"params": {"encoder": variables["frozen"]["encoder"], "head": trained["head"]}}
        if trained["adapters"]:
            full[adapters_lib.COLLECTION] = trained["adapters"]
        logits = self.module.apply(full, x)  # eval mode: the heads' dropout is off
        return (logits, {}) if mutable else logits

    def labels(self, params: dict) -> dict:
        """Optimiser group of every trained leaf: ``lora_a``, ``lora_b``, ``other``, ``frozen``.

        DoRA's ``lora_magnitude`` goes with ``lora_b``: peft's LoRA+ optimiser puts every 1-D
        adapter parameter (the magnitude vectors) in B's group, at ``loraplus_ratio`` x the
        rate; without LoRA+ both groups have the same rate.
        """
        head = re.compile(self.trainable_head)

        def label(path: tuple, _: Any) -> str:
            names = [str(getattr(k, "key", k)) for k in path]
            if names[0] == "head":
                if self.loraplus_ratio and self.paper_faithful:
                    return "frozen"  # the paper's LoRA+ optimiser holds only A and B
                return "other" if head.search("/".join(names[1:])) else "frozen"
            if names[-1] == "lora_a":
                return "lora_a"
            if names[-1] in ("lora_b", "lora_magnitude"):
                return "lora_b"
            return "other"  # DAAM adapters

        return jax.tree_util.tree_map_with_path(label, params)

    def optimizer(self, opt_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
        """AdamW per group (LoRA+: ``B`` at ``loraplus_ratio`` x the rate), clipped together.

        DoRA's magnitudes are in ``B``'s group (:meth:`labels`). Frozen head parameters get no
        update (weight decay included) and stay out of the clipping norm.
        """
        lr, wd = opt_cfg.learning_rate, opt_cfg.weight_decay
        ratio = self.loraplus_ratio or 1.0
        groups = {
            "lora_a": optax.adamw(lr, weight_decay=wd),
            "lora_b": optax.adamw(lr * ratio, weight_decay=wd),
            "other": optax.adamw(lr, weight_decay=wd),
        }

        def trained(labels):
            return jax.tree.map(lambda g: "trained" if g != "frozen" else "frozen", labels)

        inner = optax.chain(
            optax.clip_by_global_norm(opt_cfg.grad_clip),
            optax.partition(groups, lambda p: jax.tree.map(_unfrozen, self.labels(p))),
        )
        return optax.partition(
            {"trained": inner, "frozen": optax.set_to_zero()},
            lambda p: trained(self.labels(p)),
        )


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _unfrozen(label: str) -> str:
    # Inside the trained branch the frozen leaves are already masked out (optax.partition gives
    # them MaskedNode); any name of a group serves.
    return label if label != "frozen" else "other"


def build_model(
    config: ml_collections.ConfigDict,
    num_classes: int,
    example: Any,
    mesh: Any = None,
    *,
    abstract: bool = False,
) -> FineTuneModel:
    """Loads the encoder (sharded over ``mesh``) and puts the config's adapters and head on it.

    Args:
      config: a fine-tuning config.
      num_classes: C.
      example: one example's model inputs (batch 1) as ``jax.ShapeDtypeStruct`` s.
      mesh: optional mesh with ``data`` and ``model`` axes.
      abstract: read only ``config.json`` and the weights' headers: the base weights are
        ``jax.ShapeDtypeStruct`` s, and the pretrained head and DoRA's magnitudes zeros of
        their shapes (the config check's model; :meth:`train.steps.Steps.bind` later takes the
        one with the weights read).
    """
    from gaam_jax.encoders import abstract_from_pretrained, from_pretrained

    enc_cfg = config.encoder
    folder = encoder_folder(config)
    encoder = (abstract_from_pretrained if abstract else from_pretrained)(
        folder,
        dtype=COMPUTE_DTYPES[enc_cfg.dtype],
        mesh=mesh,
        attention=enc_cfg.attention,
        remat=enc_cfg.remat,
        adapters=adapters_from_config(config.adapters),
    )
    head_kwargs = dict(config_lib.setting(config, "model.head_kwargs"))
    for key in ("map_shape", "layers"):
        if key in head_kwargs:
            head_kwargs[key] = tuple(head_kwargs[key]) or None
    if encoder.model_type == "llama" and config.model.head in ("auto", "llama"):
        # The head finds each row's last token by the id the preprocessing pads with (Llama:
        # eos, as the paper's scripts), whatever config.json's pad_token_id says.
        from data.preprocess.text import TextPreprocessor

        pad = TextPreprocessor(folder, encoder.config_json).pad_id
        head_kwargs.setdefault("pad_token_id", pad)
    # The head's fresh parameters are drawn per run in FineTuneModel.init; only the module (and
    # the WavLM final-norm choice it implies) is taken from here.
    module, _ = heads.classifier_from_encoder(
        encoder, num_classes, config.model.head, head_kwargs or None
    )
    found = heads.head_params_from_hf(
        module.head_kind, encoder.config_json, checkpoint.open_tensors(folder)
    )
    lora = encoder.module.adapters.lora
    # Small host copies (pooler, norms); zeros of their shapes when abstract (no page is read).
    copy = _zeros_like if abstract else np.array
    return FineTuneModel(
        module=module,
        frozen={"encoder": encoder.params},
        example=example,
        pretrained_head=jax.tree.map(copy, found),
        trainable_head=heads.trainable_head_paths(module.head_kind, config.paper_faithful),
        loraplus_ratio=float(config_lib.setting(config, "optimizer.loraplus_ratio")),
        paper_faithful=bool(config.paper_faithful),
        magnitudes=_dora_magnitudes(encoder, abstract) if lora and lora.use_dora else {},
    )


def _zeros_like(x: Any) -> np.ndarray:
    return np.zeros(x.shape, x.dtype)


def _dora_magnitudes(encoder: Any, abstract: bool) -> dict:
    """DoRA's initial magnitudes, by path in the trained ``adapters``.

    The encoder's adapters already hold them (``Encoder.with_adapters`` computes them from the
    base weights, replicated over the mesh); an abstract encoder's are shapes, so zeros here.
    """
    # Replicated: every process holds the whole value (addressable_data(0)), multi-host too.
    copy = _zeros_like if abstract else (lambda v: np.asarray(v.addressable_data(0)))
    return {
        ("encoder", *k): copy(v)
        for k, v in flatten_dict(encoder.adapters).items()
        if k[-1] == "lora_magnitude"
    }


# -- data ---------------------------------------------------------------------------------------


def modality(config: ml_collections.ConfigDict) -> str:
    """``text``, ``image`` or ``audio``: what the config's encoder reads."""
    from data.feature_encoder import MODALITY_OF_MODEL

    raw = json.loads((encoder_folder(config) / "config.json").read_text())
    return MODALITY_OF_MODEL[raw["model_type"]]


def preprocessor(config: ml_collections.ConfigDict) -> Any:
    """The :class:`data.feature_encoder.FeatureEncoder` whose preprocessing the runs use."""
    from data.feature_encoder import FeatureEncoder

    return FeatureEncoder(
        encoder_folder(config),
        max_length=config_lib.setting(config, "encoder.max_length") or None,
        pooling=config_lib.setting(config, "encoder.pooling"),
    )


def preprocess(
    config: ml_collections.ConfigDict,
    records: list[dict],
    length: int | None = None,
    encoder: Any = None,
) -> dict[str, np.ndarray]:
    """Every record's model inputs, preprocessed as extraction does (one padded array each).

    Texts are tokenised (truncated to ``encoder.max_length``) and padded on the right to the
    longest (bucketed) length, or to ``length``; images resized and normalised; waveforms
    normalised, with the mask of their real samples where the model takes one.

    Args:
      config: the fine-tuning config.
      records: raw tfds records (``text``, ``image`` or ``audio`` and ``length``).
      length: the token length of texts (None: the longest, bucketed).
      encoder: :func:`preprocessor` of ``config``, when the caller keeps one (it reads the
        tokenizer or preprocessor files).
    """
    encoder = encoder or preprocessor(config)
    if encoder.modality == "text" and length is None:  # the longest text's bucketed length
        return encoder.preprocess([r["text"] for r in records])
    return encoder.model_inputs(records, length)


class RawSource:
    """Raw examples preprocessed one at a time when read (the grain feed's source).

    For datasets whose preprocessed inputs do not fit in memory (CIFAR-100 at 224 x 224 is 30 GB
    of float32 pixels): only labels, ids and groups are held; record ``i`` is read from its
    tfds split and preprocessed as :func:`preprocess` does, texts padded to
    ``encoder.max_length`` so that every record has the same shape.

    Args:
      config: the fine-tuning config (its encoder's preprocessing).
      sources: the tfds data sources, read one after another (train, then test for holdout).
      first: one record of the first source, already read (its shapes and dtypes).
    """

    def __init__(self, config: ml_collections.ConfigDict, sources: list[Any], first: dict):
        self.config = config
        self.parts = pipeline.ConcatSource(sources)
        self.length = config_lib.setting(config, "encoder.max_length") or None
        self.encoder = preprocessor(config)  # read once, not once per record
        one = self._inputs([first])
        # One example's model inputs (batch 1): the programs' example and the feed's shapes.
        self.example = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in one.items()}

    def _inputs(self, records: list[dict]) -> dict[str, np.ndarray]:
        return preprocess(self.config, records, length=self.length, encoder=self.encoder)

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """``{'features': {name: one example's model input}, 'label', 'id'}``."""
        record = self.parts[i]
        inputs = {k: v[0] for k, v in self._inputs([record]).items()}
        return {"features": inputs, "label": int(record["label"]), "id": int(record["id"])}

    def nbytes(self) -> int:
        """The bytes of every example's model inputs, preprocessed."""
        one = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in self.example.values())
        return one * len(self)


def open_raw_folds(config: ml_collections.ConfigDict, name: str) -> DatasetFolds:
    """Opens dataset ``name`` (tfds folder ``dataset_paths[name]``) as preprocessed inputs.

    The folds of ``config.cv`` are cut exactly as :func:`train.splits.open_folds` cuts them for
    the features (same labels in the same order: the same folds as the decoders' runs); for
    ``holdout`` the ``test`` split follows the ``train`` split and validates.

    The inputs are preprocessed once and held as arrays (:class:`data.pipeline.ArraySource`,
    placed on the device), or, with ``data_on_device`` False, or "auto" and more than
    :data:`train.feeds.AUTO_DEVICE_BYTES` of them, read and preprocessed batch by batch by the
    grain feed (:class:`RawSource`).
    """
    from data.datasets import registry

    kind = config.cv.kind
    splits = ("train", "test") if kind == "holdout" else ("train",)
    sources, info = [], None
    for split in splits:
        source, info = registry.load_examples(
            name,
            config.dataset_paths[name],
            split,
            manual_dir=config_lib.setting(config, "manual_dir") or None,
        )
        sources.append(source)
    on_device = config_lib.setting(config, "data_on_device")
    lazy, encoder = None, None
    if on_device is not True:
        lazy = RawSource(config, sources, sources[0][0])
        if on_device == "auto" and lazy.nbytes() <= feeds.AUTO_DEVICE_BYTES:
            lazy, encoder = None, lazy.encoder  # its preprocessor serves the arrays too
    # Labels, ids and groups: one pass over the records, keeping only those.
    keys = ("label", "id", "group") if kind == "leave_one_group_out" else ("label", "id")
    every: list[dict] = []
    for source in sources:
        for i in range(len(source)):
            r = source[i]
            every.append(r if lazy is None else {k: r[k] for k in keys})
    labels = np.array([int(r["label"]) for r in every], np.int64)
    ids = np.array([int(r["id"]) for r in every], np.int64)
    if lazy is None:
        inputs = preprocess(config, every, encoder=encoder)
        source = pipeline.ArraySource(inputs, labels, ids)
        shape = tuple(sorted((k, tuple(v.shape[1:])) for k, v in inputs.items()))
    else:
        source = lazy
        shape = tuple(sorted((k, tuple(v.shape[1:])) for k, v in lazy.example.items()))
    num_classes = info.features["label"].num_classes
    if kind == "holdout":
        n = len(sources[0])
        folds = [(np.arange(n), np.arange(n, len(every)))]
    elif kind == "stratified_kfold":
        folds = pipeline.stratified_kfold(labels, config.cv.k, config.cv.seed)
    elif kind == "leave_one_group_out":
        folds = pipeline.leave_one_group_out([int(r["group"]) for r in every])
    else:
        raise ValueError(f"cv.kind must be one of {CV_KINDS}, got {kind!r}.")
    return DatasetFolds(name, source, info, folds, num_classes, shape, labels)


def example_of(split: DatasetFolds) -> dict[str, jax.ShapeDtypeStruct]:
    """One example's model inputs (batch 1), abstract."""
    if isinstance(split.source, RawSource):
        return split.source.example
    return {
        k: jax.ShapeDtypeStruct((1, *v.shape[1:]), v.dtype)
        for k, v in split.source.arrays["x"].items()
    }


# -- the job ------------------------------------------------------------------------------------


def with_fingerprint(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with ``encoder.fingerprint`` set (:func:`checkpoint.weights_fingerprint`), once.

    The fingerprint is part of the run identity: a workdir trained on other base weights is
    refused like one of another config, and :class:`train.inference.FineTunedPredictor` refuses
    to load a run whose encoder changed.
    """
    if not config_lib.setting(config, "encoder.fingerprint"):
        with config.unlocked():
            config.encoder.fingerprint = checkpoint.weights_fingerprint(encoder_folder(config))
    return config


def check_fingerprint(config: ml_collections.ConfigDict) -> None:
    """Raises a one-line ValueError when the encoder's weights are not the recorded ones."""
    folder = encoder_folder(config)
    if checkpoint.weights_fingerprint(folder) != config_lib.setting(config, "encoder.fingerprint"):
        raise ValueError(
            f"{folder}: the encoder's weights are not the ones this run was trained on "
            "(their fingerprint differs); point encoder.path at the original weights."
        )


def identity(config: ml_collections.ConfigDict) -> dict:
    """The run identity: the resolved config, base weights' fingerprint included.

    Each dataset's fingerprint is that of its tfds metadata.
    """
    found = runs.identity(with_fingerprint(config))
    for name, path in dict(config.dataset_paths).items():
        folder = storage.path(path) / name
        infos = sorted(
            p / "dataset_info.json"
            for p in (folder.iterdir() if folder.is_dir() else ())
            if (p / "dataset_info.json").exists()
        )
        found["data"][name]["fingerprint"] = runs.dataset_fingerprint(infos[-1].parent) if infos \
            else None  # fmt: skip
    return found


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks a fine-tuning config's own keys (the common ones: :mod:`train.validate`)."""
    if config_lib.setting(config, "runs_per_program") != 1:
        raise ConfigError("fine-tuning trains one run per program: set runs_per_program=1.")
    choices = (("encoder.dtype", tuple(COMPUTE_DTYPES)), ("model.head", ("auto", *heads.HEADS)))
    for key, allowed in choices:
        value = validate.get(config, key)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}.")
    try:
        adapters_from_config(config.adapters)
        encoder_folder(config)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(one_line(err)) from err


def check_data(config: ml_collections.ConfigDict, split: DatasetFolds) -> None:
    """Every training split holds a batch."""
    smallest = min(len(tr) for tr, _ in split.folds)
    if config.batch_size > smallest:
        raise ConfigError(
            f"batch_size {config.batch_size} exceeds the {smallest} training examples of "
            f"{split.name}'s smallest split; use --config.batch_size={smallest} or less."
        )


def abstract_steps(config: ml_collections.ConfigDict, split: DatasetFolds, mesh: Any) -> Any:
    """The programs of ``split``'s shape on the abstract model: headers and config.json only.

    Raises:
      ConfigError: the weights do not match config.json, or the head or adapters do not fit.
    """
    try:
        model = build_model(config, split.num_classes, example_of(split), mesh, abstract=True)
        steps = steps_lib.Steps(config, split.num_classes, split.input_shape, mesh=mesh,
                                model=model)  # fmt: skip
        steps.abstract_state()
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{encoder_folder(config)}: {one_line(err)}") from err
    return steps


def load_weights(steps: Any, config: ml_collections.ConfigDict) -> None:
    """Reads the encoder's weights onto the programs' mesh, once, and binds them."""
    steps.bind(build_model(config, steps.num_classes, steps.example, steps.mesh))


def write_adapter_once(config: ml_collections.ConfigDict, run_dir: Any) -> None:
    """:func:`write_adapter` for a LoRA run whose folder has no adapter yet."""
    if config.adapters.lora_rank and not (run_dir / "adapter" / "adapter_config.json").exists():
        write_adapter(config, run_dir)


TASK = tasks.Task(
    # Inputs: the encoder's model inputs, preprocessed as extraction does.
    open_folds=open_raw_folds,
    check=check_config,
    check_data=check_data,
    # Model and trainable parameters: the adapted encoder and its head (FineTuneModel).
    steps=abstract_steps,
    load=load_weights,
    # Identity: the base weights' fingerprint is part of it.
    resolve=with_fingerprint,
    identity=identity,
    # What a finished run writes: its PEFT adapter.
    finish=write_adapter_once,
)


def base_model_id(config: ml_collections.ConfigDict) -> tuple[str, str | None]:
    """``(base_model_name_or_path, revision)`` for peft's adapter config.

    The hub id and revision the run used, or its local folder as an absolute path (the packaged
    MiniLM's when no path is given).
    """
    path = config.encoder.path
    if path and checkpoint.is_hub_id(path):
        return path, config_lib.setting(config, "encoder.revision") or None
    return str(encoder_folder(config).resolve()), None


def write_adapter(config: ml_collections.ConfigDict, run_dir: Any) -> list[str]:
    """Writes ``<run_dir>/adapter/``: the run's best state as a peft ``SEQ_CLS`` adapter.

    The LoRA (DoRA magnitudes, per-module ranks and alphas) under the classification model's
    module paths; the whole head through ``modules_to_save`` (trained or not: a part the
    checkpoint lacks would be drawn afresh by transformers); the DAAM gates in
    :data:`gaam_jax.adapters.peft.DAAM_FILE`; ``base_model_name_or_path`` and ``revision`` as
    :func:`base_model_id`; a README listing what peft users do not get.

    Args:
      config: the run's fine-tuning config.
      run_dir: the run folder (``<workdir>/<dataset>/seed0_fold1``) with its best state.

    Returns:
      The README's notes (what a peft user does not get; empty when nothing).
    """
    from gaam_jax.adapters import peft
    from gaam_jax.encoders import configure

    best = artefacts.load_best_variables(run_dir)
    raw = json.loads((encoder_folder(config) / "config.json").read_text())
    arch, enc_config, _ = configure(raw)
    lora = adapters_from_config(config.adapters).lora
    trained = best["params"]
    kind = arch.model_type if config.model.head == "auto" else config.model.head
    notes, saved = [], {}
    if kind in heads.HF_HEADS:
        saved, left = heads.head_params_to_hf(kind, raw, trained["head"])
        notes += [
            f"the head's {name} (a bare parameter in transformers' model, which peft's "
            "modules_to_save cannot hold): transformers' own init is used"
            for name in left
        ]
        pad = dict(config_lib.setting(config, "model.head_kwargs")).get("pad_token_id")
        if pad is None and arch.model_type == "llama":
            from data.preprocess.text import TextPreprocessor

            pad = TextPreprocessor(encoder_folder(config), raw).pad_id
        if pad is not None and pad != raw.get("pad_token_id"):
            notes.append(
                f"the head read each row's last token by pad id {pad}; set "
                f"config.pad_token_id={pad} on transformers' model to do the same"
            )
    else:
        notes.append(
            f"the {kind!r} head (no transformers counterpart): transformers' classifier starts "
            "fresh; load with gaam_jax (train.inference.Predictor) for the run's predictions"
        )
    if arch.model_type == "wavlm":
        notes.append(
            "transformers' WavLM attention reads q/k/v/out_proj weights directly: call "
            "merge_and_unload() for the LoRA on them to apply"
        )
    base, revision = base_model_id(config)
    peft.save(
        run_dir / "adapter",
        lora,
        trained["adapters"]["encoder"],
        raw["model_type"],
        enc_config,
        base_model_name_or_path=base,
        revision=revision,
        task_type="SEQ_CLS",
        saved=saved,
        notes=notes,
    )
    return notes
