"""``encoder_features``: frozen-encoder features ``[N_layers, d]`` per example, as a tfds dataset.

The extractor (:mod:`data.extract`) writes numbered ``.npz`` shards plus a ``manifest.json``
into a shards folder; this builder turns them into an array_record tfds dataset, checking every
example on the way (finite values, shape, label range). tfds writes into a temporary folder and
renames it only when the whole build succeeded, so a failed build never leaves a dataset that
looks complete.

Read the result without TensorFlow or this class: ``tfds.builder_from_directory(path)``
(:func:`data.pipeline.load_features` does this).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import tensorflow_datasets as tfds

MANIFEST = "manifest.json"
# The extractor's record of its encoder (data.feature_encoder.FeatureEncoder.record), beside the
# manifest; the built dataset's metadata holds it as "extraction".
EXTRACTION = "extraction.json"


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"shard-{index:05d}.npz"


def read_manifest(shards_dir: str | pathlib.Path) -> dict:
    """Reads and checks a shards folder's manifest."""
    path = pathlib.Path(shards_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: extract the features first (python -m data.extract ...)."
        )
    manifest = json.loads(path.read_text())
    required = {"encoder", "pooling", "num_layers", "dim", "dtype", "label_names", "num_shards"}
    missing = required - set(manifest)
    if missing:
        raise ValueError(f"{path} lacks the fields {sorted(missing)}.")
    return manifest


@dataclasses.dataclass(eq=False)
class EncoderFeaturesConfig(tfds.core.BuilderConfig):
    """Which shards to build from; the name should say dataset, encoder and pooling."""

    shards_dir: str = ""


class EncoderFeatures(tfds.core.GeneratorBasedBuilder):
    """Per-example stacks of pooled hidden states from a frozen encoder.

    Features: ``features`` ``[num_layers, dim]`` (float32 or float16), ``label`` (class label),
    ``group`` (int64, e.g. the IEMOCAP session; -1 when there are none) and ``id`` (int64, the
    example's id in the source dataset). ``info.metadata`` records the encoder, the pooling, the
    layer count and the source dataset (and, for imported features, a ``fingerprint`` of the
    arrays; for extracted ones, ``extraction``: the encoder and its settings, from the shards
    folder's ``extraction.json``). A manifest with ``"has_groups": false`` (features imported
    without groups, see :mod:`data.import_features`) builds no ``group`` feature, so
    leave-one-group-out cross-validation refuses the dataset instead of seeing one group.
    """

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [EncoderFeaturesConfig(name="default")]

    def __init__(self, *, config: EncoderFeaturesConfig, **kwargs):
        self._manifest = read_manifest(config.shards_dir)
        record = pathlib.Path(config.shards_dir) / EXTRACTION
        self._extraction = json.loads(record.read_text()) if record.exists() else None
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        m = self._manifest
        dtype = {"float32": np.float32, "float16": np.float16}[m["dtype"]]
        features = {
            "features": tfds.features.Tensor(shape=(m["num_layers"], m["dim"]), dtype=dtype),
            "label": tfds.features.ClassLabel(names=list(m["label_names"])),
            "group": tfds.features.Scalar(dtype=np.int64),
            "id": tfds.features.Scalar(dtype=np.int64),
        }
        if not m.get("has_groups", True):
            del features["group"]
        metadata = {
            k: m[k]
            for k in ("encoder", "pooling", "num_layers", "dim", "source", "layers", "fingerprint")
            if k in m
        }
        if self._extraction is not None:  # features of an older extractor have none
            metadata["extraction"] = self._extraction
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                f"{m['encoder']} features of {m.get('source', '?')}, {m['pooling']} pooling."
            ),
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(metadata),
        )

    def _split_generators(self, dl_manager):
        return {self._manifest.get("split", "train"): self._generate_examples()}

    def _generate_examples(self):
        m = self._manifest
        shards_dir = pathlib.Path(self.builder_config.shards_dir)
        num_classes = len(m["label_names"])
        has_groups = m.get("has_groups", True)
        expected = (m["num_layers"], m["dim"])
        total = 0
        for index in range(m["num_shards"]):
            path = shards_dir / shard_name(index)
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: the extraction did not finish.")
            with np.load(path) as shard:
                features, labels = shard["features"], shard["label"]
                ids = shard["id"]
                groups = shard["group"] if "group" in shard else np.full(len(ids), -1)
            if features.shape[1:] != expected:
                raise ValueError(
                    f"{path}: features have shape {features.shape[1:]}, expected {expected}."
                )
            for row in range(len(ids)):
                example_id = int(ids[row])
                where = f"example id {example_id} in {path}"
                if not np.all(np.isfinite(features[row])):
                    raise ValueError(f"{where}: features contain NaN or Inf.")
                if not 0 <= int(labels[row]) < num_classes:
                    raise ValueError(
                        f"{where}: label {int(labels[row])} is not one of the "
                        f"{num_classes} classes."
                    )
                total += 1
                example = {"features": features[row], "label": int(labels[row]), "id": example_id}
                if has_groups:
                    example["group"] = int(groups[row])
                yield example_id, example
        if total == 0:
            raise ValueError(f"{shards_dir}: the shards hold no examples (empty split).")


def build(
    shards_dir: str | pathlib.Path, data_dir: str | pathlib.Path, name: str
) -> tfds.core.DatasetBuilder:
    """Builds (or reuses) ``encoder_features/<name>`` in ``data_dir`` from ``shards_dir``."""
    config = EncoderFeaturesConfig(name=name, shards_dir=str(shards_dir))
    builder = EncoderFeatures(config=config, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder
