"""Paths that may be local folders or object-store URLs (``gs://bucket/...``).

``pathlib`` collapses ``gs://bkt/run`` into ``gs:/bkt/run`` (a local folder named ``gs:``), so
every workdir, feature dataset and checkpoint path of the training path goes through
:func:`path`: a URL becomes an :class:`etils.epath.Path` (read and written through fsspec, e.g.
gcsfs for ``gs://``), a local path stays a :class:`pathlib.Path`, so local behaviour (renames,
fsyncs, ``flock``) is unchanged.

Object stores have no rename: :func:`write_atomic` writes the final object directly
there (a GCS object becomes visible only once its upload completed, so a reader sees the old
object or the new one, never part of one). TFDS's array_record reader reads local files only,
so a feature dataset on a URL is copied once into a local cache (:func:`local_copy`).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import socket
import tempfile
import urllib.parse
from typing import Any

from etils import epath

# Where remote feature datasets are cached (default ~/.cache/gaam_jax/features).
CACHE_ENV = "GAAM_JAX_CACHE"

AnyPath = pathlib.Path | epath.Path


def is_url(path: Any) -> bool:
    """Whether ``path`` names an object-store location (``scheme://...``), not a local one."""
    return "://" in str(path)


def path(value: str | os.PathLike) -> AnyPath:
    """``value`` as a path object: an :class:`epath.Path` for a URL, else a ``pathlib.Path``."""
    return epath.Path(str(value)) if is_url(value) else pathlib.Path(value)


def absolute(value: str | os.PathLike) -> AnyPath:
    """:func:`path`, made absolute when local (``epath.Path.absolute`` mangles URLs)."""
    p = path(value)
    return p if is_url(p) else p.absolute()


def _temp_beside(path: pathlib.Path) -> pathlib.Path:
    """A temporary file's name beside ``path``, renamed over it once written."""
    # Host and pid: processes of a multi-host job may share a folder (and pids).
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def write_atomic(path: str | pathlib.Path, text: str | bytes, *, durable: bool = True) -> None:
    """Writes ``text`` to ``path`` so that a crash leaves either the old or the new file.

    ``durable=False`` skips the fsyncs: a kill still leaves a whole file, a power cut may leave
    the old one (for logs rewritten every epoch from checkpointed state). On an object store
    the object is written in one upload (visible only when complete, so no rename is needed).
    """
    if is_url(path):
        target = epath.Path(str(path))
        if isinstance(text, bytes):
            target.write_bytes(text)
        else:
            target.write_text(text)
        return
    path = pathlib.Path(path)
    tmp = _temp_beside(path)
    with tmp.open("wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if not durable:
        return
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)


def cache_root() -> pathlib.Path:
    """The local folder that holds copies of remote feature datasets."""
    default = pathlib.Path.home() / ".cache" / "gaam_jax"
    return pathlib.Path(os.environ.get(CACHE_ENV, default)) / "features"


def files(root: AnyPath) -> list[tuple[str, AnyPath]]:
    """Every file under ``root`` (local or remote) as ``(relative path, path)``, in order.

    Remote folders are listed one by one: epath refuses ``rglob`` on GCS.
    """
    if not is_url(root):
        found = sorted((p for p in pathlib.Path(root).rglob("*") if p.is_file()),
                       key=lambda p: p.parts)  # fmt: skip
        return [(str(p.relative_to(root)), p) for p in found]
    root = path(root)
    out = []
    pending = [root]
    while pending:
        for p in pending.pop().iterdir():
            if p.is_dir():
                pending.append(p)
            else:
                out.append((str(p)[len(str(root)) + 1 :], p))
    return sorted(out, key=lambda item: item[1].parts)


def local_copy(url: str | os.PathLike) -> pathlib.Path:
    """A local copy of the folder at ``url`` (a built tfds dataset), made once and reused.

    The copy is keyed by the URL and the SHA-256 of its ``dataset_info.json`` (a rebuilt
    dataset is copied again) and made in a temporary folder renamed into place when complete,
    so an interrupted copy is never reused. A copy whose file names and sizes differ from the
    remote folder's is replaced.

    Raises:
      FileNotFoundError: ``url`` holds no ``dataset_info.json``.
    """
    remote = epath.Path(str(url))
    info = remote / "dataset_info.json"
    if not info.exists():
        raise FileNotFoundError(f"no feature dataset at {url} (it has no dataset_info.json).")
    key = hashlib.sha256(str(url).encode() + b"\0" + info.read_bytes()).hexdigest()[:24]
    target = cache_root() / key
    listed = files(remote)
    expected = {name: p.stat().length for name, p in listed}
    if target.is_dir():
        have = {str(p.relative_to(target)): p.stat().st_size
                for p in target.rglob("*") if p.is_file()}  # fmt: skip
        if have == expected:
            return target
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
    try:
        for name, p in listed:
            copy_file(p, tmp / name)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():  # else another process finished the same copy first
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def staging(url: str | os.PathLike) -> pathlib.Path:
    """The local folder where what is written to the data folder ``url`` is staged first.

    tfds builders and array_record write local files only, so a dataset meant for ``url`` is
    built here, laid out as a local data folder would be, and then uploaded (:func:`upload`).
    The folder is ``staging/<SHA-256 of the URL>`` beside :func:`cache_root` (default
    ``~/.cache/gaam_jax/staging/...``; under ``$GAAM_JAX_CACHE`` when set), keyed by the URL
    (without a trailing slash), so a rerun on the same machine finds its earlier work.
    """
    key = hashlib.sha256(str(path(url)).encode()).hexdigest()[:24]
    return cache_root().parent / "staging" / key


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies the file ``src`` to ``dst``, either local or remote, streamed.

    A local ``dst`` is written to a temporary file beside it and renamed into place, so it is
    never seen partly written; a remote object is visible only once its upload completed.
    """
    source, target = path(src), path(dst)
    if not is_url(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(target)
        try:
            with source.open("rb") as f, tmp.open("wb") as out:
                shutil.copyfileobj(f, out, 1 << 22)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return
    with source.open("rb") as f, target.open("wb") as out:
        shutil.copyfileobj(f, out, 1 << 22)


def upload(
    local: str | os.PathLike,
    url: str | os.PathLike,
    *,
    last: str | None = None,
    prune: bool = False,
) -> None:
    """Copies every file under the local folder ``local`` to ``url``, same relative paths.

    ``last`` (a relative path, e.g. ``dataset_info.json``) is copied after all the others: a
    reader that treats a folder without it as absent (:func:`local_copy`, tfds) never sees a
    partly uploaded folder. Existing objects of the same names are overwritten; others under
    ``url`` are left as they are, or, with ``prune``, deleted first (what an interrupted upload
    of another build left: a rebuilt dataset may have other shard files).

    Raises:
      FileNotFoundError: ``last`` is not a file under ``local``.
    """
    listed = files(local)
    if last is not None:
        if last not in {name for name, _ in listed}:
            raise FileNotFoundError(f"{local} holds no {last} to upload last.")
        listed = [item for item in listed if item[0] != last] + [(last, path(local) / last)]
    remote = path(url)
    if prune and remote.exists():
        keep = {name for name, _ in listed}
        for name, p in files(remote):
            if name not in keep:
                p.unlink()
    for name, p in listed:
        copy_file(p, remote / name)


def endpoint(url: str | os.PathLike) -> tuple[str, int] | None:
    """The host and port a client of ``url``'s object store connects to (``gs://`` only).

    ``STORAGE_EMULATOR_HOST`` (an emulator, as gcsfs reads it) or Google's endpoint; None for
    other schemes.
    """
    if not str(url).startswith("gs://"):
        return None
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        parts = urllib.parse.urlsplit(emulator if "://" in emulator else f"http://{emulator}")
        return parts.hostname or "localhost", parts.port or (443 if parts.scheme == "https" else 80)
    return "storage.googleapis.com", 443


def check_bucket(url: str | os.PathLike) -> None:
    """Checks that the bucket of the URL ``url`` exists and can be read (nothing is written).

    The store's endpoint is tried first with a 10-second connection (not when an HTTPS proxy is
    set): without a network gcsfs retries for about a minute before it fails.

    Raises:
      ConnectionError: the store's endpoint cannot be reached (one line, naming it).
      FileNotFoundError: the bucket does not exist (one line, naming it).
      PermissionError: the store cannot be read (no credentials, ...): one line with the cause.
    """
    where = endpoint(url)
    # Behind a proxy a direct connection may fail where the client's own would not.
    proxied = any(
        os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    )
    if where is not None and not proxied:
        try:
            socket.create_connection(where, timeout=10).close()
        except OSError as err:
            raise ConnectionError(
                f"{url}: the object store at {where[0]}:{where[1]} cannot be reached "
                f"({type(err).__name__}: {' '.join(str(err).split())}); check the network "
                "(or STORAGE_EMULATOR_HOST for an emulator)."
            ) from None
    bucket = path("/".join(str(path(url)).split("/")[:3]))  # gs://bucket
    try:
        found = bucket.exists()
    except Exception as err:  # noqa: BLE001 - fsspec backends raise their own types
        detail = " ".join(str(err).split())
        raise PermissionError(
            f"{url}: the object store cannot be read ({type(err).__name__}: {detail}); check "
            "the credentials (gcloud auth application-default login) and the bucket's name."
        ) from err
    if not found:
        raise FileNotFoundError(f"{url}: the bucket {bucket} does not exist.")
