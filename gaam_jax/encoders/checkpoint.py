"""Hugging Face model folders: ``config.json`` and lazily memory-mapped safetensors weights.

:func:`open_tensors` parses the safetensors header itself (8-byte little-endian header length,
then a JSON header of ``dtype``/``shape``/``data_offsets``) and returns numpy views of a
read-only memory map: nothing is read from disk until a tensor's values are used, so a loader
can move a 26 GB checkpoint to its devices one tensor (or one shard of a tensor) at a time.
bfloat16 tensors are viewed as ``ml_dtypes.bfloat16``. Reading needs only numpy, ml_dtypes and
the standard library (no torch, no safetensors package).

:func:`resolve` turns a Hugging Face hub id (``org/name``) into its snapshot folder in the hub
cache (fetching only the files read here and by :mod:`data.preprocess` when online; the cache
alone with ``HF_HUB_OFFLINE=1``); ``huggingface_hub`` is imported only then.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import pathlib
import re
import struct
from collections.abc import Iterator, Mapping

import numpy as np

from gaam_jax.encoders import registry

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONVERT_HINT = (
    "python -m gaam_jax.encoders.convert {folder}  (needs: pip install 'gaam-jax[convert]')"
)

# The files of a hub snapshot anything here reads: config.json, the safetensors weights (one
# file, or shards and their index) and the preprocessing files of data.preprocess (text:
# tokenizer.json; image and audio: preprocessor_config.json). Files in subfolders are never read.
HUB_ALLOW_PATTERNS = (
    "config.json",
    "*.safetensors",
    INDEX_FILE,
    "tokenizer.json",
    "preprocessor_config.json",
)
HUB_IGNORE_PATTERNS = ("*/*",)
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _dtype(code: str, where: str) -> np.dtype:
    if code in _DTYPES:
        return np.dtype(_DTYPES[code])
    import ml_dtypes  # a dependency of jax

    extra = {
        "BF16": ml_dtypes.bfloat16,
        "F8_E4M3": ml_dtypes.float8_e4m3fn,
        "F8_E5M2": ml_dtypes.float8_e5m2,
    }
    if code not in extra:
        raise ValueError(f"{where}: safetensors dtype {code!r} is not supported.")
    return np.dtype(extra[code])


def _byte_bounds(array: np.ndarray) -> tuple[int, int]:
    utils = getattr(np.lib, "array_utils", None)  # numpy >= 2; np.byte_bounds before
    return (utils.byte_bounds if utils else np.byte_bounds)(array)


def is_hub_id(path_or_id: str | os.PathLike) -> bool:
    """Whether ``path_or_id`` names a Hugging Face hub repository rather than a local path.

    A hub id is ``org/name`` (letters, digits, ``_``, ``.``, ``-``) that is not an existing local
    path: an existing folder always wins, and ``./x`` or ``../x`` are always paths.
    """
    text = os.fspath(path_or_id)
    if not _HUB_ID.fullmatch(text) or any(part in (".", "..") for part in text.split("/")):
        return False
    return not pathlib.Path(text).expanduser().exists()


def _hub_fetch_command(repo_id: str, revision: str | None) -> str:
    """The ``hf download`` command that puts what :func:`resolve` reads into the hub cache."""
    parts = ["hf download", repo_id]
    if revision is not None:
        parts.append(f"--revision {revision}")
    parts += [f"--include '{p}'" for p in HUB_ALLOW_PATTERNS]
    parts += [f"--exclude '{p}'" for p in HUB_IGNORE_PATTERNS]
    return " ".join(parts)


def _offline(constants) -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: also honour it when set later.
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return constants.is_offline_mode() or value.upper() in ("1", "ON", "YES", "TRUE")


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split("\n")[0].split()).rstrip(".")
    text = text[:limit] + "..." if len(text) > limit else text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def resolve(path_or_id: str | os.PathLike, revision: str | None = None) -> pathlib.Path:
    """The local model folder of a path or a Hugging Face hub id.

    A hub id (``org/name`` that is no existing local path, see :func:`is_hub_id`) resolves
    through ``huggingface_hub.snapshot_download`` to its snapshot folder in the hub cache
    (``HF_HUB_CACHE``/``HF_HOME``): online, only the files that the encoders and their
    preprocessing read (:data:`HUB_ALLOW_PATTERNS`, top level only) are fetched; with
    ``HF_HUB_OFFLINE=1`` the cache alone is used. Anything else is returned as a path (a
    missing folder is reported by :func:`read_config`).

    Args:
      path_or_id: a local model folder, or a hub id such as ``microsoft/wavlm-large``.
      revision: for a hub id, a branch, tag or commit hash (default ``main``).

    Returns:
      The folder (for a hub id ``<cache>/models--org--name/snapshots/<commit>``).

    Raises:
      FileNotFoundError: one line naming the id, the revision and the fix, if the hub id is
        not in the cache (offline), cannot be fetched, is not a repository one can access, or
        its snapshot has no ``config.json`` or no safetensors weights.
      ValueError: one line, for a revision the repository does not have, an invalid hub id,
        or a ``revision`` given with a local folder (folders have no revisions).
    """
    path = pathlib.Path(path_or_id).expanduser()
    if not is_hub_id(path_or_id):
        if revision is not None and path.exists():
            raise ValueError(
                f"revision {revision!r} is for a Hugging Face hub id, but {path} is a local "
                "folder: drop the revision, or pass the hub id (org/name) from a working "
                "directory where no such folder exists."
            )
        return path
    repo_id = os.fspath(path_or_id)
    try:
        from huggingface_hub import constants, errors, snapshot_download
    except ImportError:
        raise ImportError(
            f"{repo_id} is a Hugging Face hub id, which needs huggingface_hub: "
            "pip install 'gaam-jax[data]'."
        ) from None
    offline = _offline(constants)
    where = f"{repo_id} (revision {revision or constants.DEFAULT_REVISION})"
    fetch = _hub_fetch_command(repo_id, revision)
    cache = constants.HF_HUB_CACHE
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=list(HUB_ALLOW_PATTERNS),
            ignore_patterns=list(HUB_IGNORE_PATTERNS),
            local_files_only=offline,
        )
    except errors.IncompleteSnapshotError as err:
        raise FileNotFoundError(
            f"{where}: its snapshot in the Hugging Face cache {cache} is incomplete "
            f"({_first_line(err)}); complete it (online) with: {fetch}"
        ) from None
    except errors.LocalEntryNotFoundError as err:
        if offline:
            raise FileNotFoundError(
                f"{where} is not in the Hugging Face cache {cache} (HF_HUB_OFFLINE=1) and is "
                f"not a local folder: download it (online) with: {fetch}"
            ) from None
        raise FileNotFoundError(
            f"{where} could not be fetched from the Hugging Face Hub ({_first_line(err)}) and "
            f"is not in the cache {cache}: check the network, or download it with: {fetch}"
        ) from None
    except errors.RevisionNotFoundError:
        raise ValueError(
            f"{where}: the repository has no revision {revision!r}; pass an existing branch, "
            "tag or commit hash as the revision."
        ) from None
    except errors.RepositoryNotFoundError as err:  # also gated and private ones
        raise FileNotFoundError(
            f"{where} is neither a local folder nor a Hugging Face repository this machine can "
            f"access ({_first_line(err)}): check the id, or log in (hf auth login) for a "
            "gated or private repository."
        ) from None
    except errors.HFValidationError as err:
        raise ValueError(
            f"{repo_id} is neither a local folder nor a valid Hugging Face hub id "
            f"({_first_line(err)})."
        ) from None
    except Exception as err:  # network and server errors: still one line with the fix
        raise FileNotFoundError(
            f"{where} could not be fetched from the Hugging Face Hub ({_first_line(err)}): "
            f"check the network, or download it with: {fetch}"
        ) from None
    folder = pathlib.Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{where}: its snapshot {folder} has no config.json (not a model repository, or an "
            f"incomplete download: complete it with: {fetch})."
        )
    if not (folder / SINGLE_FILE).is_file() and not (folder / INDEX_FILE).is_file():
        local = f"~/hf/{repo_id.split('/')[-1]}"
        raise FileNotFoundError(
            f"{where}: its snapshot {folder} has no safetensors weights ({SINGLE_FILE} or "
            f"{INDEX_FILE}). An incomplete download: complete it with: {fetch}. A repository "
            f"with only PyTorch .bin weights: hf download {repo_id} --local-dir {local}, "
            f"convert it once with {CONVERT_HINT.format(folder=local)}, and pass {local}."
        )
    return folder


def _folder(folder: str | pathlib.Path) -> pathlib.Path:
    folder = pathlib.Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist (or is not a folder).")
    return folder


def read_config(folder: str | pathlib.Path) -> dict:
    """Reads a model folder's ``config.json`` and checks its ``model_type``.

    Args:
      folder: a local Hugging Face model folder.

    Returns:
      The parsed ``config.json``.

    Raises:
      FileNotFoundError: if the folder or its ``config.json`` does not exist.
      ValueError: if ``config.json`` is not JSON or its ``model_type`` is not supported.
    """
    path = _folder(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a Hugging Face model folder.")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}.") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in registry.model_types():
        raise ValueError(
            f"{path}: model_type={model_type!r} is not supported (supported: "
            f"{', '.join(registry.model_types())})."
        )
    return raw


class SafetensorsFile(Mapping[str, np.ndarray]):
    """One ``.safetensors`` file as a mapping of names to read-only memory-mapped numpy views.

    Args:
      path: the file.
    """

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        with open(self.path, "rb") as f:
            size = self.path.stat().st_size
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path} is not a safetensors file (shorter than 8 bytes).")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"{self.path} is not a safetensors file (bad header length {n}).")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(f"{self.path} is not a safetensors file (bad header).") from None
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        header.pop("__metadata__", None)
        self._start = 8 + n
        self._base = np.frombuffer(self._map, np.uint8) if self._map is not None else None
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            dtype = _dtype(info["dtype"], f"{self.path}: {name}")
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (self._start + int(o) for o in info["data_offsets"])
            if end - begin != dtype.itemsize * int(np.prod(shape)) or end > size:
                raise ValueError(f"{self.path}: tensor {name!r} has inconsistent data offsets.")
            self._entries[name] = (dtype, shape, begin, end)

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[name]
        # A view of the memory map: creating it reads nothing.
        return self._base[begin:end].view(dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def release(self, array: np.ndarray) -> None:
        """Lets the kernel drop the pages behind ``array`` (a view of this file) from memory.

        The mapping is read-only and file-backed, so dropped pages are simply read again if
        used again; a loader calls this after moving a tensor to its devices so that the
        touched file pages do not add up to a second copy of the model in resident memory.
        """
        if self._map is None or not hasattr(self._map, "madvise"):
            return
        base = self._base.__array_interface__["data"][0]
        low, high = _byte_bounds(array)
        if not (base <= low <= high <= base + len(self._map)):
            return  # not a view of this file
        page = mmap.PAGESIZE
        start = (low - base) // page * page
        self._map.madvise(mmap.MADV_DONTNEED, start, high - base - start)


class Tensors(Mapping[str, np.ndarray]):
    """The tensors of a model folder, from one file or several shards, memory-mapped lazily."""

    def __init__(self, files: dict[str, SafetensorsFile], where: dict[str, str]):
        self._files = files
        self._where = where

    def __getitem__(self, name: str) -> np.ndarray:
        return self._files[self._where[name]][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def release(self, array: np.ndarray) -> None:
        """Drops the file pages behind ``array`` (see :meth:`SafetensorsFile.release`)."""
        for f in self._files.values():
            f.release(array)


def open_tensors(folder: str | pathlib.Path) -> Tensors:
    """Opens a model folder's safetensors weights without reading them.

    ``model.safetensors``, or shards listed by ``model.safetensors.index.json``
    (``weight_map``: tensor name -> shard file).

    Args:
      folder: a local Hugging Face model folder.

    Returns:
      A read-only mapping of tensor names (as stored) to numpy views of memory-mapped files, in
      the stored dtype (bfloat16 as ``ml_dtypes.bfloat16``).

    Raises:
      FileNotFoundError: if there are no safetensors weights (with the conversion command when
        the folder holds PyTorch ``.bin`` files), or a shard the index names is missing.
      ValueError: if a file is not valid safetensors or the index disagrees with a shard.
    """
    folder = _folder(folder)
    if (folder / SINGLE_FILE).is_file():
        f = SafetensorsFile(folder / SINGLE_FILE)
        return Tensors({SINGLE_FILE: f}, dict.fromkeys(f, SINGLE_FILE))
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{index} has no valid 'weight_map'.") from None
        files = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{folder / shard} (named by {INDEX_FILE}) does not exist.")
            files[shard] = SafetensorsFile(folder / shard)
        for name, shard in weight_map.items():
            if name not in files[shard]:
                raise ValueError(f"{index}: {name!r} is not in {shard}.")
        return Tensors(files, dict(weight_map))
    if list(folder.glob("pytorch_model*.bin")):
        raise FileNotFoundError(
            f"{folder} holds only PyTorch .bin weights: convert them once with "
            + CONVERT_HINT.format(folder=folder)
        )
    raise FileNotFoundError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}.")


def weights_fingerprint(folder: str | pathlib.Path) -> str:
    """SHA-256 over a model folder's ``config.json`` and weight files (name, size, contents).

    Every weight byte is read (about 1 s per GB): a changed weight changes the fingerprint.
    Fine-tuned runs (:mod:`train.finetune`) and feature datasets (:mod:`data.extract`) record it
    to refuse other weights later.

    Raises:
      FileNotFoundError: the folder has no ``config.json``.
    """
    folder = pathlib.Path(folder)
    h = hashlib.sha256()
    files = [folder / "config.json", *sorted(folder.glob("*.safetensors"))]
    for file in files:
        h.update(file.name.encode() + b"\0" + str(file.stat().st_size).encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()
