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

Each example becomes its encoder's pooled hidden states, ``[N_layers, d]``, as
:mod:`data.feature_encoder` describes (``--pooling mean`` or ``mean_with_padding``;
``--no-wavlm-final-norm`` keeps transformers 5's last WavLM state).

Work is written in shards (``--shard-size`` examples each, written atomically): an interrupted
run restarted with the same command redoes only the unfinished shards. Finally the shards are
turned into ``<data-dir>/encoder_features/<dataset>_<encoder-name>_<pooling>`` (with ``_<split>``
appended for a split other than ``train``, e.g. the test split used as a validation set).
Every user error is one line ``error: ...`` and exit code 2, before any file is written
(``--debug`` shows tracebacks). Standard output is the one line ``wrote <dataset folder>: ...``;
progress, tfds' own messages and the encoder's description go to standard error.

``--data-dir`` may be an object-store URL (``gs://bucket/data``): tfds and array_record write
local files only, so the work is staged in a local folder keyed by the URL
(``~/.cache/gaam_jax/staging/<hash>``, under ``$GAAM_JAX_CACHE`` when set), the source dataset
is read from ``<url>/<dataset>/<version>`` when the bucket holds it, every finished shard is
also uploaded to ``<url>/shards/<name>`` (a job restarted on another machine resumes from
them), and the dataset is uploaded to ``<url>/encoder_features/<name>/1.0.0`` with
``dataset_info.json`` last, so a reader never sees part of it (:mod:`data.data_dir`).

The dataset's metadata records the encoder as ``extraction``
(:meth:`data.feature_encoder.FeatureEncoder.record`), written beside the manifest as
``extraction.json``: runs copy it, and :func:`data.feature_encoder.encoder_from_record`
rebuilds the encoder, checked, for raw-input inference (:mod:`train.inference`). A shards
folder whose ``extraction.json`` names other weights is refused; one from before the record
(none) resumes as before.

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
import contextlib
import dataclasses
import io
import json
import pathlib
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from app import cli, storage
from data.data_dir import DISTRIBUTED_URL, open_data_dir
from data.datasets import encoder_features, registry
from data.feature_encoder import (
    MODALITY_OF_MODEL,
    POOLINGS,
    FeatureEncoder,
    default_encoder_name,
)
from data.processes import USER_ERRORS, Processes
from gaam_jax import COMPUTE_DTYPES, sharding
from gaam_jax.encoders import checkpoint

FEATURE_DTYPES = ("float32", "float16")


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
    sizes = cli.parse_mesh(spec)
    if not set(sizes) <= {"data", "model"}:
        raise ValueError(
            f"--mesh {spec!r}: axes must be data and model, each once "
            "(e.g. --mesh data=-1,model=2)."
        )
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"--mesh {spec!r}: {name} must be positive or -1.")
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


@dataclasses.dataclass
class _Work:
    """What :func:`extract` found to do: the source, its size, this process's shards."""

    source: Any
    n: int
    mine: list[int]
    todo: set[int]
    reused: bool = False  # a URL data_dir whose dataset is published from these settings


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


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
        there (see :mod:`data.data_dir`).
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
        kinds = " or ".join(t for t, m in MODALITY_OF_MODEL.items() if m == want)
        raise ValueError(
            f"{dataset} holds {want} but {encoder.model_dir} is a {encoder.model_type} "
            f"({encoder.modality}) encoder; pass --encoder with a {kinds} folder."
        )
    name = feature_name(dataset, encoder_name, encoder.pooling, split)
    out = open_data_dir(data_dir, name, shards_dir=shards_dir, distributed=procs.count > 1)
    shards_dir = out.shards_dir
    manifest_path = shards_dir / encoder_features.MANIFEST
    record_path = shards_dir / encoder_features.EXTRACTION
    shape = (encoder.num_layers, encoder.dim)

    def prepare() -> _Work:
        """Opens the source; checks (process 0: writes) the manifest; lists this process's work."""
        if procs.index and not manifest_path.exists():
            raise FileNotFoundError(
                f"{manifest_path}, written by process 0, is not visible to process "
                f"{procs.index}: --data-dir must be a folder every process shares."
            )
        source, info = registry.load_examples(dataset, out.root, split, manual_dir=manual_dir)
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
        # Shards of other settings are refused (staged copies of a URL's are discarded).
        stale = out.settle(encoder_features.MANIFEST, manifest, "made with other settings")
        # The encoder's record (metadata "extraction", for raw-input inference) is a file of
        # its own: manifests stay as before (older shard folders resume), and shards of other
        # weights are refused. A folder from before records is resumed and gets one.
        record = None
        if procs.index == 0:
            record = encoder.record()  # reads every weight byte (about 1 s per GB)
            if encoder.modality == "audio":
                record["samples"] = int(len(source[0]["audio"]))
            other = "of another encoder's weights or preprocessing"
            stale = out.settle(encoder_features.EXTRACTION, record, other) or stale
        mine = [index for index in range(num_shards) if procs.owns(index)]

        def ok(index: int) -> bool:
            return _shard_ok(
                shards_dir / encoder_features.shard_name(index),
                min(n, (index + 1) * shard_size) - index * shard_size,
                shape,
            )

        if out.built(record):  # published from these settings' shards: reuse it
            return _Work(source, n, [], set(), reused=True)
        if stale:
            shutil.rmtree(shards_dir, ignore_errors=True)
            shutil.rmtree(out.work / "encoder_features" / name, ignore_errors=True)
        out.pull([index for index in mine if not ok(index)])
        todo = {index for index in mine if not ok(index)}
        if todo:
            encoder.load()  # a bad checkpoint fails here, before anything is written
        if procs.index == 0:
            shards_dir.mkdir(parents=True, exist_ok=True)
            storage.write_atomic(manifest_path, json.dumps(manifest, indent=2))
            storage.write_atomic(record_path, json.dumps(record, indent=2))
            out.push(manifest_path)
            out.push(record_path)
        for index in sorted(set(mine) - todo):  # valid here but not yet in the bucket
            out.push(shards_dir / encoder_features.shard_name(index), missing_only=True)
        return _Work(source, n, mine, todo)

    def compute(work: _Work) -> None:
        """Computes and writes this process's unfinished shards."""
        source, n, mine, todo = work.source, work.n, work.mine, work.todo
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
            shard = _npz(
                features=feats.astype(dtype),
                label=np.array([r["label"] for r in records], np.int64),
                id=np.array([r["id"] for r in records], np.int64),
                group=np.array([r.get("group", -1) for r in records], np.int64),
            )  # written whole or not at all: a restart redoes a missing shard
            storage.write_atomic(shards_dir / encoder_features.shard_name(index), shard)
            out.push(shards_dir / encoder_features.shard_name(index))  # a restart elsewhere
            if on_shard is not None:
                on_shard(index)
        bar.close()
        if show and computed:
            print(
                f"encoded {computed} examples in {seconds:.1f} s: {computed / seconds:.1f} "
                "examples/s (first batches include compilation)",
                file=sys.stderr,
            )

    def build() -> storage.AnyPath:
        if prepared is not None and prepared.reused:
            return out.dataset
        builder = encoder_features.build(shards_dir, out.work, name)
        return out.publish(pathlib.Path(builder.data_dir))

    # Process 0 first: it may build the source dataset, and it writes the manifest.
    prepared = procs.step("gaam_extract_source", prepare if procs.index == 0 else None)
    procs.step("gaam_extract_shards", lambda: compute(prepared or prepare()))
    built = procs.step("gaam_extract_dataset", build if procs.index == 0 else None)
    return built if built is not None else build()  # the others open what process 0 built


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
    if args.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"--dtype must be float32 or bfloat16, got {args.dtype!r}.")
    if args.feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"--feature-dtype must be float32 or float16, got {args.feature_dtype!r}.")
    for flag in ("batch_size", "shard_size", "limit", "max_length"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {value}.")
    processes = None
    if storage.is_url(args.data_dir):
        if args.distributed:
            raise ValueError(DISTRIBUTED_URL.format(data_dir=args.data_dir))
        storage.check_bucket(args.data_dir)  # seconds, not gcsfs's minute of retries
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
    with contextlib.redirect_stdout(sys.stderr):  # tfds' own lines: stdout is the result only
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
