"""An object-store data folder (``gs://bucket/data``) that feature extraction writes to.

tfds builders and array_record write local files only, so :func:`data.extract.extract` works
in a local staging folder and mirrors its shards and the built dataset to the bucket
(:class:`RemoteDataDir`).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

from data.datasets import encoder_features
from gaam_jax import storage

DISTRIBUTED_URL = (
    "--distributed with an object-store --data-dir ({data_dir}) is not supported: extract into "
    "a folder every process shares, then copy its encoder_features/<name> to the bucket."
)


class RemoteDataDir:
    """The object-store side of an extraction into a URL ``data_dir`` (one process).

    tfds and array_record write local files only, so the work happens in a local staging folder
    keyed by the URL (:func:`storage.staging`), laid out as a local ``data_dir``:

    * the source dataset is read as :func:`data.datasets.registry.load_examples` reads a URL
      data folder (the bucket's copy, or one built in the same staging folder);
    * the manifest, the encoder's record and every finished shard are also uploaded to
      ``<url>/shards/<name>``; a job started on another machine first checks them against its
      settings and downloads the shards there before deciding what to compute;
    * the built dataset is uploaded to ``<url>/encoder_features/<name>/1.0.0`` with
      ``dataset_info.json`` last (readers treat a folder without it as absent). A published
      dataset of the same shards' settings is reused; one whose ``dataset_info.json`` differs
      from the one built here is refused, not overwritten.
    """

    def __init__(self, url: str | os.PathLike, name: str):
        self.root = storage.path(url)
        self.staging = storage.staging(url)
        self.shards = self.root / "shards" / name
        self.dataset = (
            self.root / "encoder_features" / name / str(encoder_features.EncoderFeatures.VERSION)
        )
        self._listed: set[str] | None = None

    def _names(self) -> set[str]:
        """File names in the bucket's shards folder (listed once)."""
        if self._listed is None:
            try:
                self._listed = {p.name for p in self.shards.iterdir()}
            except FileNotFoundError:
                self._listed = set()
        return self._listed

    def check(self, file: str, value: dict, what: str) -> None:
        """Refuses the bucket's shards whose ``file`` (manifest, record) is not ``value``."""
        if file in self._names() and json.loads((self.shards / file).read_text()) != value:
            raise ValueError(
                f"{self.shards} holds shards {what} ({self.shards / file}); remove it or choose "
                "another --encoder-name."
            )

    def built(self, record: dict | None) -> bool:
        """Whether the dataset is published and was built from shards of these settings."""
        return (
            (self.dataset / "dataset_info.json").exists()
            and encoder_features.MANIFEST in self._names()  # equal to ours: check() passed
            and (record is None or encoder_features.EXTRACTION in self._names())
        )

    def pull(self, shards_dir: pathlib.Path, indices: Sequence[int]) -> None:
        """Downloads the bucket's shards ``indices`` into ``shards_dir`` (those it holds)."""
        for index in indices:
            name = encoder_features.shard_name(index)
            if name in self._names():
                storage.copy_file(self.shards / name, shards_dir / name)

    def push(self, file: pathlib.Path, *, missing_only: bool = False) -> None:
        """Uploads a staged shards-folder file to the bucket's shards folder."""
        if missing_only and file.name in self._names():
            return
        storage.copy_file(file, self.shards / file.name)
        self._names().add(file.name)

    def publish(self, built: pathlib.Path) -> None:
        """Uploads the staged dataset folder ``built``, ``dataset_info.json`` last."""
        info = self.dataset / "dataset_info.json"
        if info.exists():
            if info.read_bytes() == (built / "dataset_info.json").read_bytes():
                return  # this dataset is published already
            raise ValueError(
                f"{self.dataset} already holds a different dataset (its dataset_info.json "
                f"differs from the one built in {built}); remove it or choose another "
                "--encoder-name."
            )
        storage.upload(built, self.dataset, last="dataset_info.json")
