"""Prediction from a trained run, on feature files or on raw text, and ``jax.export`` artefacts.

::

    predictor = Predictor.from_run("out/default/pang_lee_polarity/seed0_fold1")
    predictor.predict(features)                 # [batch, N, d] -> class ids
    predictor.predict_text(["a fine film ."])   # through the MiniLM encoder
    predictor.export("model.jaxexport")         # reloads with load_exported(), no model code
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

from train import artefacts
from train.runs import CONFIG
from train.steps import Steps


class Predictor:
    """A jit-compiled classifier with fixed parameters.

    Args:
      steps: supplies the model definition and the example shape.
      variables: ``{'params', 'batch_stats'}`` of one run.
      pooling: the pooling of the training features, for :meth:`predict_text`.
    """

    def __init__(self, steps: Steps, variables: Any, pooling: str = "mean"):
        self.model = steps.model
        self.input_shape = steps.input_shape
        self.variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        self.pooling = pooling
        self._logits = jax.jit(lambda v, x: self.model.apply(v, x))
        self._encoder = None

    @classmethod
    def from_run(cls, run_dir: str | pathlib.Path) -> Predictor:
        """Loads a finished run's best state, with the config and data shape it records.

        Raises:
          FileNotFoundError: the folder records no run, or the run did not finish.
          ValueError: the best state's bytes differ from the digest its record holds.
        """
        run_dir = pathlib.Path(run_dir)
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
        return cls(steps, variables, pooling=data.get("pooling", "mean"))

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Float32 logits of ``[batch, N, d]`` features."""
        features = np.asarray(features, np.float32)
        if features.shape[1:] != self.input_shape:
            raise ValueError(f"features must be [batch, {self.input_shape}], got {features.shape}.")
        return np.asarray(self._logits(self.variables, features), np.float32)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Class ids of ``[batch, N, d]`` features."""
        return self.logits(features).argmax(-1)

    def predict_text(self, texts: Sequence[str]) -> np.ndarray:
        """Class ids of raw texts, encoded by MiniLM with the training features' pooling."""
        if self._encoder is None:
            from data.extract import TextEncoder

            self._encoder = TextEncoder(pooling=self.pooling)
        return self.predict(self._encoder(list(texts)))

    def export(self, path: str | pathlib.Path) -> pathlib.Path:
        """Serialises ``features -> logits`` (parameters baked in, any batch size) to ``path``."""
        variables = self.variables

        def fn(x):
            return self.model.apply(variables, x)

        (batch,) = jax.export.symbolic_shape("batch")
        spec = jax.ShapeDtypeStruct((batch, *self.input_shape), jnp.float32)
        exported = jax.export.export(jax.jit(fn))(spec)
        path = pathlib.Path(path)
        path.write_bytes(exported.serialize())
        return path


def load_exported(path: str | pathlib.Path) -> Callable[..., np.ndarray]:
    """Loads a :meth:`Predictor.export` artefact: ``features -> logits``.

    A fine-tuned run's artefact (:meth:`FineTunedPredictor.export`) gives
    ``**model_inputs -> logits``.
    """
    exported = jax.export.deserialize(bytearray(pathlib.Path(path).read_bytes()))
    if exported.in_tree.num_leaves > 1 or "dict" in str(exported.in_tree):
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
          inputs: texts, images (uint8 ``[H, W, C]``) or waveforms (int16 or float, 16 kHz).
        """
        from train import finetune

        modality = finetune.modality(self.config)
        if modality == "text":
            records = [{"text": t} for t in inputs]
        elif modality == "image":
            records = [{"image": np.asarray(x)} for x in inputs]
        else:
            longest = max(len(x) for x in inputs)
            records = [
                {"audio": np.pad(np.asarray(x), (0, longest - len(x))), "length": len(x)}
                for x in inputs
            ]
        return finetune.preprocess(self.config, records, length=self.length)

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
        path = pathlib.Path(path)
        path.write_bytes(exported.serialize())
        return path


def _without_lora(tree: Any) -> Any:
    from flax.traverse_util import flatten_dict, unflatten_dict

    flat = flatten_dict(tree)
    return unflatten_dict({k: v for k, v in flat.items() if k[-1] not in ("lora_a", "lora_b")})
