"""The data folder an extraction writes to: a local (or shared) folder, or an object store.

tfds builders and array_record write local files only, so for a URL (``gs://bucket/data``)
:func:`data.extract.extract` works in a local staging folder and mirrors its shards and the
built dataset to the bucket (:class:`RemoteDataDir`). A local folder (:class:`LocalDataDir`)
has the same interface and mirrors nothing, so extraction reads the same either way.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

from app import storage
from data.datasets import encoder_features

DISTRIBUTED_URL = (
    "--distributed with an object-store --data-dir ({data_dir}) is not supported: extract into "
    "a folder every process shares, then copy its encoder_features/<name> to the bucket."
)


def open_data_dir(
    data_dir: str | os.PathLike,
    name: str,
    *,
    shards_dir: str | os.PathLike | None = None,
    distributed: bool = False,
) -> LocalDataDir | RemoteDataDir:
    """The data folder ``data_dir`` for the ``encoder_features`` dataset ``name``.

    Args:
      data_dir: a local folder, or an object-store URL.
      name: the dataset's name (:func:`data.extract.feature_name`).
      shards_dir: a local folder's shards (default ``<data_dir>/shards/<name>``).
      distributed: several processes extract together (local folders only).

    Raises:
      ValueError: one line, for a URL with ``distributed`` or ``shards_dir``.
      ConnectionError: one line, for a store that cannot be reached.
    """
    if not storage.is_url(data_dir):
        return LocalDataDir(data_dir, name, shards_dir)
    if distributed:
        raise ValueError(DISTRIBUTED_URL.format(data_dir=data_dir))
    if shards_dir is not None:
        raise ValueError(
            f"shards_dir is for a local data_dir; with {data_dir} the shards are staged "
            f"locally and mirrored to {data_dir}/shards/{name}: drop shards_dir."
        )
    storage.check_bucket(data_dir)
    return RemoteDataDir(data_dir, name)


_VERSION = str(encoder_features.EncoderFeatures.VERSION)


def _differs(path: pathlib.Path, value: dict) -> bool:
    return path.exists() and json.loads(path.read_text()) != value


class LocalDataDir:
    """A local data folder: the work happens in it and nothing is mirrored.

    Attributes:
      root: where the source dataset is read (``data_dir``).
      work: where the shards and the dataset are built (``data_dir``).
      shards_dir: the shards folder.
      dataset: the dataset version folder.
    """

    def __init__(
        self, data_dir: str | os.PathLike, name: str, shards_dir: str | os.PathLike | None = None
    ):
        self.root = self.work = pathlib.Path(data_dir)
        self.shards_dir = pathlib.Path(shards_dir or self.work / "shards" / name)
        self.dataset = self.work / "encoder_features" / name / _VERSION

    def settle(self, file: str, value: dict, what: str) -> bool:
        """Refuses a shards folder whose ``file`` (manifest, record) is not ``value``.

        Returns:
          False: a local folder's shards are never discarded.
        """
        if _differs(self.shards_dir / file, value):
            raise ValueError(
                f"{self.shards_dir} holds shards {what} ({self.shards_dir / file}); remove it or "
                "choose another --shards-dir."
            )
        return False

    def built(self, record: dict | None) -> bool:
        """False: a local dataset is rebuilt from the shards (tfds reuses a finished one)."""
        del record
        return False

    def pull(self, indices: Sequence[int]) -> None:
        """Nothing to download."""

    def push(self, file: pathlib.Path, *, missing_only: bool = False) -> None:
        """Nothing to upload."""

    def publish(self, built: pathlib.Path) -> pathlib.Path:
        """The built dataset version folder, where it is."""
        return built


class RemoteDataDir:
    """The object-store side of an extraction into a URL ``data_dir`` (one process).

    tfds and array_record write local files only, so the work happens in a local staging folder
    keyed by the URL (:func:`storage.staging`), laid out as a local ``data_dir``; the
    attributes are :class:`LocalDataDir`'s, with ``root`` and ``dataset`` in the bucket:

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
        self.work = storage.staging(url)
        self.shards_dir = self.work / "shards" / name
        self.shards = self.root / "shards" / name
        self.dataset = self.root / "encoder_features" / name / _VERSION
        self._listed: set[str] | None = None

    def _names(self) -> set[str]:
        """File names in the bucket's shards folder (listed once)."""
        if self._listed is None:
            try:
                self._listed = {p.name for p in self.shards.iterdir()}
            except FileNotFoundError:
                self._listed = set()
        return self._listed

    def settle(self, file: str, value: dict, what: str) -> bool:
        """Refuses the bucket's shards whose ``file`` (manifest, record) is not ``value``.

        Returns:
          whether the staged shards are stale (their ``file`` differs): the staging folder is
          a cache, and the bucket's shards decide.
        """
        if file in self._names() and json.loads((self.shards / file).read_text()) != value:
            raise ValueError(
                f"{self.shards} holds shards {what} ({self.shards / file}); remove it or choose "
                "another --encoder-name."
            )
        return _differs(self.shards_dir / file, value)

    def built(self, record: dict | None) -> bool:
        """Whether the dataset is published and was built from shards of these settings."""
        return (
            (self.dataset / "dataset_info.json").exists()
            and encoder_features.MANIFEST in self._names()  # equal to ours: settle() passed
            and (record is None or encoder_features.EXTRACTION in self._names())
        )

    def pull(self, indices: Sequence[int]) -> None:
        """Downloads the bucket's shards ``indices`` into ``shards_dir`` (those it holds)."""
        for index in indices:
            name = encoder_features.shard_name(index)
            if name in self._names():
                storage.copy_file(self.shards / name, self.shards_dir / name)

    def push(self, file: pathlib.Path, *, missing_only: bool = False) -> None:
        """Uploads a staged shards-folder file to the bucket's shards folder."""
        if missing_only and file.name in self._names():
            return
        storage.copy_file(file, self.shards / file.name)
        self._names().add(file.name)

    def publish(self, built: pathlib.Path) -> storage.AnyPath:
        """Uploads the staged dataset folder ``built``, ``dataset_info.json`` last.

        Returns:
          the dataset version folder in the bucket.
        """
        info = self.dataset / "dataset_info.json"
        if info.exists():
            if info.read_bytes() == (built / "dataset_info.json").read_bytes():
                return self.dataset  # this dataset is published already
            raise ValueError(
                f"{self.dataset} already holds a different dataset (its dataset_info.json "
                f"differs from the one built in {built}); remove it or choose another "
                "--encoder-name."
            )
        # Unpublished (no dataset_info.json): what is there is an interrupted upload's.
        storage.upload(built, self.dataset, last="dataset_info.json", prune=True)
        return self.dataset
