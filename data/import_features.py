"""Imports your own per-example layer features as an ``encoder_features`` dataset.

Usage::

    python -m data.import_features --npz my_features.npz --name my_features --data-dir out/data

``--npz`` is a NumPy ``.npz`` file (``np.savez``) holding:

* ``features``: float ``[N, layers, d]``, e.g. the hidden states of N examples, each of an
  encoder's layers pooled to d values (the decoder's input);
* ``label``: integer ``[N]``, classes ``0 .. C-1``, every class present, ``C >= 2``;
* ``group`` (optional): integer ``[N]``, ``>= 0``, e.g. the speaker or session, for
  leave-one-group-out cross-validation;
* ``label_names`` (optional): ``C`` distinct strings (``np.array([...], dtype=str)``).

Everything is checked before anything is written: the file, the keys, the shapes, dtypes,
finite features (the first bad index is named), the label range. Then the arrays go through the
same builder as :mod:`data.extract` into ``<data-dir>/encoder_features/<name>/1.0.0``, whose path
is printed; train on it with ``configs/features.py``::

    python -m train --config configs/features.py --workdir out/my_features
        --config.dataset=my_features --config.data_dir=out/data    (one command)

Importing the same arrays again under the same name reuses the dataset; different arrays under
an existing name are refused. Every user error prints one line ``error: <cause and fix>`` and
exits with code 2 (``--debug`` shows tracebacks).

``--data-dir`` may be an object-store URL (``gs://bucket/data``): the dataset is built in a
local staging folder (:func:`app.storage.staging`; tfds writes local files only) and
uploaded to ``<url>/encoder_features/<name>/1.0.0`` with ``dataset_info.json`` last, so a
reader never sees part of it; the URL is printed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Sequence

import numpy as np

from app import cli, storage

VERSION = "1.0.0"
REQUIRED_KEYS = ("features", "label")
OPTIONAL_KEYS = ("group", "label_names")
NAME_PATTERN = r"[a-z][a-z0-9_]*"
SHARD_SIZE = 4096


class FeatureImportError(ValueError):
    """A user error: the message is one line naming the cause and the fix."""


def dataset_path(data_dir: str | pathlib.Path, name: str) -> storage.AnyPath:
    """``<data_dir>/encoder_features/<name>/1.0.0``, the folder the trainer reads.

    An ``epath.Path`` for a URL ``data_dir`` (``gs://...``), else a ``pathlib.Path``.
    """
    if storage.is_url(data_dir):
        return storage.path(data_dir) / "encoder_features" / name / VERSION
    return pathlib.Path(data_dir).expanduser() / "encoder_features" / name / VERSION


def _first_bad(mask: np.ndarray) -> str:
    """``[i, j, k]`` of the first True element of ``mask``."""
    return "[" + ", ".join(str(int(i)) for i in np.argwhere(mask)[0]) + "]"


def load_arrays(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Reads the ``.npz`` file (no pickles) into a dict of arrays.

    Raises:
      FeatureImportError: the file is missing, unreadable or not an ``.npz`` without pickled
        objects, or it lacks a required key or holds an unknown one.
    """
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FeatureImportError(
            f"--npz {path} does not exist or is not a file; pass the .npz path."
        )
    if not os.access(path, os.R_OK):
        raise FeatureImportError(f"--npz {path} is not readable; fix its permissions.")
    if not zipfile.is_zipfile(path):
        raise FeatureImportError(
            f"--npz {path} is not an .npz file; write one with "
            "np.savez(path, features=..., label=...)."
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            missing = [k for k in REQUIRED_KEYS if k not in keys]
            unknown = [k for k in keys if k not in REQUIRED_KEYS + OPTIONAL_KEYS]
            if missing:
                raise FeatureImportError(
                    f"{path} lacks {missing} (it holds {keys}); save "
                    "np.savez(path, features=[N, layers, d] floats, label=[N] ints)"
                    + (f", renaming {unknown}." if unknown else ".")
                )
            if unknown:
                raise FeatureImportError(
                    f"{path} holds unknown keys {unknown}; allowed are "
                    f"{list(REQUIRED_KEYS + OPTIONAL_KEYS)} (rename or drop them)."
                )
            arrays = {}
            for key in keys:
                try:
                    arrays[key] = npz[key]
                except ValueError as err:  # object arrays need pickle
                    raise FeatureImportError(
                        f"{path}: {key} holds Python objects; store label_names as strings "
                        "(np.array(names, dtype=str)) and the rest as numeric arrays."
                    ) from err
            return arrays
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise FeatureImportError(
            f"{path} is not a readable .npz file ({type(err).__name__}: {err}); write it with "
            "np.savez(path, features=..., label=...)."
        ) from err


def validate(arrays: dict[str, np.ndarray]) -> dict:
    """Checks the arrays and returns what the dataset needs.

    Returns:
      ``{'features', 'label', 'group' (or None), 'label_names', 'dtype'}`` with ``features`` in
      the stored dtype (float16 stays float16, other floats become float32), labels and groups
      as int64, and the label names as a list of strings.

    Raises:
      FeatureImportError: naming the first problem found and its fix.
    """
    features, label = arrays["features"], arrays["label"]
    if features.ndim != 3 or 0 in features.shape:
        raise FeatureImportError(
            f"features has shape {features.shape}; it must be [N, layers, d] with N, layers, "
            "d >= 1 (add an axis of size 1 for a single layer: features[:, None, :])."
        )
    if not np.issubdtype(features.dtype, np.floating):
        raise FeatureImportError(
            f"features has dtype {features.dtype}; it must be floating point "
            "(features.astype(np.float32))."
        )
    dtype = "float16" if features.dtype == np.float16 else "float32"
    stored = features.astype(dtype)
    bad = ~np.isfinite(features)
    if bad.any():
        where = _first_bad(bad)
        raise FeatureImportError(
            f"features{where} is {features[tuple(np.argwhere(bad)[0])]}; every value must be "
            "finite (drop or repair that example)."
        )
    bad = ~np.isfinite(stored)
    if bad.any():
        raise FeatureImportError(
            f"features{_first_bad(bad)} = {features[tuple(np.argwhere(bad)[0])]} overflows "
            f"{dtype}; rescale the features."
        )
    n = features.shape[0]
    if label.shape != (n,):
        raise FeatureImportError(
            f"label has shape {label.shape}; it must be [N] = [{n}], one class per example."
        )
    if not np.issubdtype(label.dtype, np.integer):
        raise FeatureImportError(
            f"label has dtype {label.dtype}; it must hold integer classes 0..C-1 "
            "(label.astype(np.int64), or map names to indices first)."
        )
    if (label < 0).any():
        i = int(np.argmax(label < 0))
        raise FeatureImportError(f"label[{i}] is {int(label[i])}; classes must be 0..C-1 (>= 0).")
    num_classes = int(label.max()) + 1
    counts = np.bincount(label.astype(np.int64), minlength=num_classes)
    if num_classes < 2:
        raise FeatureImportError(
            f"label holds a single class ({int(label[0])}); a classifier needs at least 2."
        )
    if (counts == 0).any():
        absent = np.flatnonzero(counts == 0).tolist()
        raise FeatureImportError(
            f"classes {absent[:10]} have no examples though label goes up to {num_classes - 1}; "
            "number the classes 0..C-1 without gaps (np.unique(label, return_inverse=True))."
        )
    group = arrays.get("group")
    if group is not None:
        if group.shape != (n,):
            raise FeatureImportError(f"group has shape {group.shape}; it must be [N] = [{n}].")
        if not np.issubdtype(group.dtype, np.integer):
            raise FeatureImportError(
                f"group has dtype {group.dtype}; it must hold integer group ids "
                "(np.unique(groups, return_inverse=True)[1])."
            )
        if (group < 0).any():
            i = int(np.argmax(group < 0))
            raise FeatureImportError(f"group[{i}] is {int(group[i])}; group ids must be >= 0.")
        group = group.astype(np.int64)
    names = arrays.get("label_names")
    if names is None:
        label_names = [str(c) for c in range(num_classes)]
    else:
        if names.dtype.kind not in "US" or names.ndim != 1:
            raise FeatureImportError(
                f"label_names has dtype {names.dtype} and shape {names.shape}; it must be a 1-D "
                "array of strings (np.array(names, dtype=str))."
            )
        label_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
        if len(label_names) != num_classes:
            raise FeatureImportError(
                f"label_names has {len(label_names)} names but label has {num_classes} classes "
                f"(0..{num_classes - 1}); give one name per class."
            )
        if len(set(label_names)) != num_classes or "" in label_names:
            raise FeatureImportError(f"label_names {label_names} must be distinct and non-empty.")
    return {
        "features": stored,
        "label": label.astype(np.int64),
        "group": group,
        "label_names": label_names,
        "dtype": dtype,
    }


def fingerprint(checked: dict) -> str:
    """SHA-256 of the arrays and names as they will be stored."""
    h = hashlib.sha256()
    for key in ("features", "label", "group"):
        value = checked[key]
        h.update(key.encode())
        if value is not None:
            h.update(str(value.dtype).encode() + str(value.shape).encode())
            h.update(np.ascontiguousarray(value).tobytes())
    h.update(json.dumps(checked["label_names"]).encode())
    return h.hexdigest()


def _writable_dir(path: pathlib.Path) -> None:
    """Refuses a data dir that is a file or whose nearest existing folder is not writable."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise FeatureImportError(
            f"--data-dir {path}: {probe} is a file, not a folder; pass a folder."
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FeatureImportError(
            f"--data-dir {path}: {probe} is not writable; pass a folder you can write to."
        )


def _existing_fingerprint(path: storage.AnyPath) -> str:
    """The fingerprint recorded in a built dataset's metadata ("" if it has none)."""
    try:
        return str(json.loads((path / "metadata.json").read_text()).get("fingerprint", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def import_features(
    npz: str | pathlib.Path, name: str, data_dir: str | pathlib.Path
) -> storage.AnyPath:
    """Validates ``npz`` and builds ``encoder_features/<name>`` in ``data_dir``.

    Args:
      npz: the ``.npz`` file (see the module docstring for its keys).
      name: the dataset name: lowercase letters, digits and ``_``, starting with a letter.
      data_dir: the tfds data folder (``configs/features.py``'s ``data_dir``), or an
        object-store URL: the dataset is built in :func:`storage.staging` and uploaded there,
        ``dataset_info.json`` last.

    Returns:
      The built dataset's version folder (for a URL ``data_dir``, its ``epath.Path`` there).

    Raises:
      FeatureImportError: any user error, before anything is written.
    """
    if not re.fullmatch(NAME_PATTERN, name):
        raise FeatureImportError(
            f"--name {name!r} is not a valid dataset name; use lowercase letters, digits and _, "
            "starting with a letter (e.g. my_features)."
        )
    remote = storage.is_url(data_dir)
    data_dir = storage.path(data_dir) if remote else pathlib.Path(data_dir).expanduser()
    checked = validate(load_arrays(npz))
    if remote:
        try:
            storage.check_bucket(data_dir)
        except OSError as err:
            raise FeatureImportError(f"--data-dir {err}") from None
    else:
        _writable_dir(data_dir)
    digest = fingerprint(checked)
    target = dataset_path(data_dir, name)
    # On an object store a folder without dataset_info.json is an unfinished upload: absent.
    if (target / "dataset_info.json").exists() if remote else target.exists():
        if _existing_fingerprint(target) == digest:
            return target  # the same arrays were imported before: nothing to do
        raise FeatureImportError(
            f"{target} already holds a different dataset named {name!r}; choose another --name, "
            "or delete that folder to replace it."
        )
    published = target
    if remote:  # built in the staging folder, then uploaded
        data_dir = storage.staging(data_dir)
        target = dataset_path(data_dir, name)
        if target.exists() and _existing_fingerprint(target) != digest:
            shutil.rmtree(target)  # a staged build of other arrays (the bucket has none)

    from data.datasets import encoder_features

    features = checked["features"]
    n, layers, dim = features.shape
    num_shards = -(-n // SHARD_SIZE)
    manifest = {
        "source": f"imported from {pathlib.Path(npz).name}",
        "split": "train",
        "encoder": "imported",
        "pooling": "imported",
        "num_layers": layers,
        "dim": dim,
        "dtype": checked["dtype"],
        "label_names": checked["label_names"],
        "num_examples": n,
        "num_shards": num_shards,
        "has_groups": checked["group"] is not None,
        "fingerprint": digest,
    }
    group = checked["group"] if checked["group"] is not None else np.full(n, -1, np.int64)
    data_dir.mkdir(parents=True, exist_ok=True)
    shards = pathlib.Path(tempfile.mkdtemp(prefix=f".import-{name}-", dir=data_dir))
    try:
        for index in range(num_shards):
            lo, hi = index * SHARD_SIZE, min(n, (index + 1) * SHARD_SIZE)
            np.savez(
                shards / encoder_features.shard_name(index),
                features=features[lo:hi],
                label=checked["label"][lo:hi],
                id=np.arange(lo, hi, dtype=np.int64),
                group=group[lo:hi],
            )
        (shards / encoder_features.MANIFEST).write_text(json.dumps(manifest, indent=2))
        with contextlib.redirect_stdout(sys.stderr):  # stdout: only the path
            builder = encoder_features.build(shards, data_dir, name)
    finally:
        shutil.rmtree(shards, ignore_errors=True)  # the dataset holds its own copy
    if remote:
        # Unpublished (checked above): what is there is an interrupted upload's.
        storage.upload(builder.data_dir, published, last="dataset_info.json", prune=True)
        return published
    return pathlib.Path(builder.data_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (the convention of :mod:`app.cli`)."""
    parser = cli.Parser("python -m data.import_features", __doc__.split("\n")[0])
    parser.add_argument("--npz", required=True, help="features [N, layers, d], label [N], ...")
    parser.add_argument("--name", required=True, help="dataset name, e.g. my_features")
    parser.add_argument(
        "--data-dir", required=True,
        help="tfds data folder, e.g. out/data, or an object-store URL (gs://bucket/data)",
    )  # fmt: skip
    args, _ = parser.parse(argv)

    def work() -> int:
        print(import_features(args.npz, args.name, args.data_dir))
        return 0

    def user_error(err: BaseException) -> str | None:
        if isinstance(err, FeatureImportError):
            return str(err)
        if isinstance(err, OSError):  # disk full, permissions while writing
            return (
                f"writing the dataset failed ({cli.one_line(err)}); free space or fix "
                "permissions in --data-dir and rerun."
            )
        return None

    return cli.run(work, debug=args.debug, user_error=user_error)


if __name__ == "__main__":
    sys.exit(main())
