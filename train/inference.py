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


def load_exported(path: str | pathlib.Path) -> Callable[[np.ndarray], np.ndarray]:
    """Loads a :meth:`Predictor.export` artefact: returns ``features -> logits``."""
    exported = jax.export.deserialize(bytearray(pathlib.Path(path).read_bytes()))
    return lambda x: np.asarray(exported.call(np.asarray(x, np.float32)))
