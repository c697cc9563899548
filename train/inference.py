"""Prediction from a trained run, on features or on raw inputs, and ``jax.export`` artefacts.

::

    predictor = Predictor.from_run("out/default/pang_lee_polarity/seed0_fold1")
    predictor.predict(features)                  # [batch, N, d] -> class ids
    predictor.predict_raw(["a fine film ."])     # texts, images or waveforms -> class ids
    predictor.export("model.jaxexport")          # features -> logits
    predictor.export("raw.jaxexport", raw=True)  # model inputs -> logits, encoder included
    load_exported("raw.jaxexport")(**predictor.preprocess(["a fine film ."]))  # jax alone

Raw inputs go through the encoder that made the run's features, as the feature dataset records
it (:meth:`data.feature_encoder.FeatureEncoder.record`, in the run's ``config.json`` as
``data.extraction``): the packaged MiniLM, a model folder or a hub snapshot, with the recorded
pooling, layers, ``max_length`` and compute dtype, and extraction's own preprocessing and
encoder classes (:func:`data.feature_encoder.encoder_from_record`). Its weights' fingerprint and its
tokenizer or preprocessor file are checked first; a missing or changed encoder is refused in
one line. Features extracted before datasets recorded their encoder still load and predict;
only raw inputs are refused.

A fine-tuned run (a config with an ``encoder`` section) loads as a
:class:`FineTunedPredictor`: its raw inputs go through its own adapted encoder and head.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from app import storage
from train import artefacts
from train.runs import CONFIG
from train.steps import Steps


class Predictor:
    """A jit-compiled classifier with fixed parameters.

    Args:
      steps: supplies the model definition and the example shape.
      variables: ``{'params', 'batch_stats'}`` of one run.
      pooling: the pooling of the training features.
      extraction: the feature dataset's record of its encoder (``config.json``'s
        ``data.extraction``), for raw inputs; None for features without one.
      source: names the run in messages.
    """

    def __init__(
        self,
        steps: Steps,
        variables: Any,
        pooling: str = "mean",
        extraction: dict | None = None,
        source: str | pathlib.Path = "this predictor",
    ):
        self.model = steps.model
        self.input_shape = steps.input_shape
        self.variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        self.pooling = pooling
        self.extraction = extraction
        self.source = str(source)
        self._logits = jax.jit(lambda v, x: self.model.apply(v, x))
        self._encoder = None

    @classmethod
    def from_run(cls, run_dir: str | pathlib.Path) -> Predictor:
        """Loads a finished run's best state, with the config and data shape it records.

        Raises:
          FileNotFoundError: the folder records no run, or the run did not finish.
          ValueError: the best state's bytes differ from the digest its record holds.
        """
        run_dir = storage.path(run_dir)
        path = run_dir / CONFIG
        recorded = json.loads(path.read_text()) if path.exists() else {}
        if "num_classes" not in recorded.get("data", {}):
            raise FileNotFoundError(
                f"{run_dir} records no run; pass a run folder such as "
                "<workdir>/<dataset>/seed0_fold1."
            )
        config = ml_collections.ConfigDict(recorded["config"])
        data = recorded["data"]
        if "encoder" in config:  # a fine-tuned encoder: raw inputs in, logits out
            return FineTunedPredictor.from_config(run_dir, config, data)
        steps = Steps(config, data["num_classes"], tuple(data["input_shape"]))
        variables = artefacts.load_best_variables(run_dir)
        return cls(
            steps,
            variables,
            pooling=data.get("pooling", "mean"),
            extraction=data.get("extraction"),
            source=run_dir,
        )

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Float32 logits of ``[batch, N, d]`` features."""
        features = np.asarray(features, np.float32)
        if features.shape[1:] != self.input_shape:
            raise ValueError(f"features must be [batch, {self.input_shape}], got {features.shape}.")
        return np.asarray(self._logits(self.variables, features), np.float32)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Class ids of ``[batch, N, d]`` features."""
        return self.logits(features).argmax(-1)

    @property
    def encoder(self) -> Any:
        """The :class:`data.feature_encoder.FeatureEncoder` that made the features, loaded once.

        Raises:
          ValueError: the features record no encoder, or its weights, tokenizer or
            preprocessor file changed (one line each).
          FileNotFoundError: its folder or hub snapshot is missing (one line).
        """
        if self._encoder is None:
            if not self.extraction:
                raise ValueError(
                    f"{self.source}: its features record no encoder (extracted before feature "
                    "datasets recorded one), so raw inputs cannot be encoded as they were: "
                    "re-extract them with python -m data.extract (remove the old dataset folder "
                    "first) and retrain."
                )
            from data.feature_encoder import encoder_from_record

            encoder = encoder_from_record(self.extraction)
            if (encoder.num_layers, encoder.dim) != self.input_shape:
                raise ValueError(
                    f"{self.source}: the recorded encoder gives features "
                    f"{(encoder.num_layers, encoder.dim)} but the run takes {self.input_shape}."
                )
            self._encoder = encoder
        return self._encoder

    def features(self, inputs: Sequence[Any]) -> np.ndarray:
        """Float32 ``[batch, N, d]`` features of raw inputs, extracted as the run's were.

        Args:
          inputs: texts, images (uint8 ``[H, W, C]``) or waveforms (int16 ``[T]``, 16 kHz, at
            most the recorded chunk length; zero-padded to it as the dataset's chunks are).
        """
        encoder = self.encoder
        records = encoder.raw_records(list(inputs), self.extraction.get("samples"))
        return encoder.encode_records(records)

    def logits_raw(self, inputs: Sequence[Any]) -> np.ndarray:
        """Float32 logits ``[batch, classes]`` of raw inputs (see :meth:`features`)."""
        return self.logits(self.features(inputs))

    def predict_raw(self, inputs: Sequence[Any]) -> np.ndarray:
        """Class ids of raw texts, images or waveforms (see :meth:`features`)."""
        return self.logits_raw(inputs).argmax(-1)

    def predict_text(self, texts: Sequence[str]) -> np.ndarray:
        """Class ids of raw texts: :meth:`predict_raw` (the run's own text encoder)."""
        if self.extraction and self.extraction.get("modality") != "text":
            raise ValueError(
                f"{self.source}: its features are of {self.extraction.get('modality')}, not "
                "text; use predict_raw."
            )
        return self.predict_raw(list(texts))

    def preprocess(self, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
        """Raw inputs -> the encoder's model inputs, as :meth:`export` with ``raw`` takes them.

        Returns:
          texts: ``input_ids``, ``attention_mask`` int32 ``[batch, max_length]``; images:
          ``pixel_values`` float32 ``[batch, C, H, W]``; audio: ``input_values`` float32
          ``[batch, samples]`` (and ``attention_mask`` int32, with ``mean`` pooling).
        """
        encoder = self.encoder
        records = encoder.raw_records(list(inputs), self.extraction.get("samples"))
        return encoder.model_inputs(records)

    def export(self, path: str | pathlib.Path, raw: bool = False) -> pathlib.Path:
        """Serialises the classifier (parameters baked in, any batch size) to ``path``.

        Args:
          path: the artefact's file.
          raw: False: ``features [batch, N, d] -> logits``. True: ``model inputs -> logits``
            (those of :meth:`preprocess`: texts at the recorded ``max_length``), the recorded
            encoder, extraction's pooling and layer selection
            (:meth:`data.feature_encoder.FeatureEncoder.pooled_inputs`) and the decoder in one
            program.

        Raises:
          ValueError, FileNotFoundError: for ``raw``, as :attr:`encoder`.
        """
        variables = self.variables
        (batch,) = jax.export.symbolic_shape("batch")
        if raw:
            encoder = self.encoder
            encoder.load()

            def fn(inputs):
                return self.model.apply(variables, encoder.pooled_inputs(inputs))

            # One example's model inputs give the names, dtypes and per-example shapes.
            example = self.preprocess(_example_inputs(encoder, self.extraction))
            spec: Any = {
                k: jax.ShapeDtypeStruct((batch, *v.shape[1:]), v.dtype) for k, v in example.items()
            }
        else:

            def fn(x):
                return self.model.apply(variables, x)

            spec = jax.ShapeDtypeStruct((batch, *self.input_shape), jnp.float32)
        exported = jax.export.export(jax.jit(fn))(spec)
        path = storage.path(path)
        path.write_bytes(exported.serialize())
        return path


def _example_inputs(encoder: Any, extraction: dict) -> list[Any]:
    """One raw input of the encoder's modality (its values do not matter, only its shapes)."""
    if encoder.modality == "text":
        return [""]
    if encoder.modality == "image":
        size = encoder.raw.get("image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return [np.zeros((h, w, 3), np.uint8)]
    return [np.zeros(extraction.get("samples") or 16_000, np.int16)]


def load_exported(path: str | pathlib.Path) -> Callable[..., np.ndarray]:
    """Loads a :meth:`Predictor.export` artefact: ``features -> logits``.

    A raw-input artefact (``raw=True``) and a fine-tuned run's
    (:meth:`FineTunedPredictor.export`) give ``**model_inputs -> logits``.
    """
    exported = jax.export.deserialize(bytearray(storage.path(path).read_bytes()))
    # in_tree is that of (args, kwargs); a dict argument (even of one array: BEiT's
    # pixel_values) takes keyword inputs.
    (first, *_), _ = exported.in_tree.unflatten([None] * exported.in_tree.num_leaves)
    if isinstance(first, dict):
        return lambda **inputs: np.asarray(exported.call(dict(inputs)))
    return lambda x: np.asarray(exported.call(np.asarray(x, np.float32)))


# Model input dtypes by name (the recorded input shapes carry names and shapes only).
_INPUT_DTYPES = {"input_ids": np.int32, "attention_mask": np.int32, "token_type_ids": np.int32}


class FineTunedPredictor:
    """A fine-tuned run's encoder, adapters and head: raw inputs -> class ids.

    Built by :meth:`Predictor.from_run` for a run whose config has an ``encoder`` section. The
    base weights are loaded from the folder or hub id the config names and must be the ones
    it was trained on (their fingerprint is checked).

    Args:
      model: the :class:`train.finetune.FineTuneModel` (base weights included).
      variables: the run's best trained variables (``{'params': {'head', 'adapters'}}``).
      config: the run's config.
      length: the token length the run was trained at (texts are padded or cut to it).
    """

    def __init__(self, model: Any, variables: Any, config: ml_collections.ConfigDict, length):
        self.model = model
        self.config = config
        self.length = length
        self.variables = {"params": variables["params"], "frozen": model.frozen}
        self._logits = jax.jit(lambda v, x: self.model.apply(v, x))
        self._preprocess = None

    @classmethod
    def from_config(cls, run_dir: pathlib.Path, config: ml_collections.ConfigDict, data: dict):
        """Loads the run's base encoder (checked against its fingerprint) and best state.

        Raises:
          FileNotFoundError: the encoder folder (or hub snapshot) is missing.
          ValueError: its weights are not the ones the run was trained on.
        """
        from train import finetune

        finetune.check_fingerprint(config)
        shapes = {name: tuple(shape) for name, shape in data["input_shape"]}
        example = {
            k: jax.ShapeDtypeStruct((1, *v), _INPUT_DTYPES.get(k, np.float32))
            for k, v in shapes.items()
        }
        model = finetune.build_model(config, data["num_classes"], example)
        variables = artefacts.load_best_variables(run_dir)
        length = shapes["input_ids"][0] if "input_ids" in shapes else None
        return cls(model, variables, config, length)

    def preprocess(self, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
        """Raw inputs -> model inputs, by the preprocessing the run was trained with.

        Args:
          inputs: texts, images (uint8 ``[H, W, C]``) or waveforms (int16 or float, 16 kHz;
            zero-padded to the longest, with the mask of their samples).

        Raises:
          ValueError: a waveform too short to make one frame.
        """
        from train import finetune

        if self._preprocess is None:  # the tokenizer or preprocessor files, read once
            self._preprocess = finetune.preprocessor(self.config)
        records = self._preprocess.raw_records(list(inputs))
        return finetune.preprocess(self.config, records, self.length, self._preprocess)

    def logits(self, **inputs: np.ndarray) -> np.ndarray:
        """Float32 logits ``[batch, classes]`` of model inputs (``input_ids``, ...)."""
        return np.asarray(self._logits(self.variables, inputs), np.float32)

    def predict_raw(self, inputs: Sequence[Any]) -> np.ndarray:
        """Class ids of raw texts, images or waveforms."""
        return self.logits(**self.preprocess(inputs)).argmax(-1)

    def export(self, path: str | pathlib.Path, raw: bool = True) -> pathlib.Path:
        """Serialises ``model inputs -> logits`` to ``path``; it reloads with jax alone.

        The encoder and head are one program, LoRA merged into the base kernels, any batch
        size; texts at the trained token length.

        Args:
          path: the artefact's file.
          raw: must be True (a fine-tuned run has no features -> logits form).
        """
        if not raw:
            raise ValueError("a fine-tuned run exports from its model inputs: use raw=True.")
        from gaam_jax.adapters import merge

        module, trained = self.model.module, self.variables["params"]
        lora = module.encoder.adapters.lora
        encoder_params = self.model.frozen["encoder"]
        adapters = trained["adapters"]
        if lora is not None:
            encoder_params = merge(encoder_params, adapters.get("encoder", {}), lora)
            adapters = _without_lora(adapters)
            module = module.clone(
                encoder=module.encoder.clone(
                    adapters=module.encoder.adapters.__class__(daam=module.encoder.adapters.daam)
                )
            )
        variables = {"params": {"encoder": encoder_params, "head": trained["head"]}}
        if jax.tree.leaves(adapters):
            variables["adapters"] = adapters

        def fn(inputs):
            return module.apply(variables, inputs)

        (batch,) = jax.export.symbolic_shape("batch")
        spec = {
            name: jax.ShapeDtypeStruct((batch, *s.shape[1:]), s.dtype)
            for name, s in self.model.example.items()
        }
        exported = jax.export.export(jax.jit(fn))(spec)
        path = storage.path(path)
        path.write_bytes(exported.serialize())
        return path


def _without_lora(tree: Any) -> Any:
    from flax.traverse_util import flatten_dict, unflatten_dict

    from gaam_jax.adapters import FACTORS

    flat = flatten_dict(tree)
    return unflatten_dict({k: v for k, v in flat.items() if k[-1] not in FACTORS})
