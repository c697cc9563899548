"""``python -m data.import_features``: your own features in, an ``encoder_features`` dataset out."""

import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits

from data import import_features, pipeline
from train import config as config_lib
from train.splits import open_folds


@pytest.fixture(scope="module")
def digits():
    d = load_digits()  # 1797 images of 8 x 8: [N, 8 "layers", 8 features]
    return d.images.astype(np.float32), d.target.astype(np.int64)


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_digits_import_builds_a_dataset_the_trainer_reads(tmp_path, digits):
    features, label = digits
    names = np.array([f"digit {i}" for i in range(10)])
    npz = _npz(tmp_path / "digits.npz", features=features, label=label, label_names=names)
    data_dir = tmp_path / "data"
    run = subprocess.run(
        [sys.executable, "-m", "data.import_features", "--npz", npz, "--name", "digits",
         "--data-dir", str(data_dir)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    path = data_dir / "encoder_features" / "digits" / "1.0.0"
    assert run.stdout.strip() == str(path)  # the path, and nothing else, on stdout
    assert not list(data_dir.glob(".import-*"))  # the temporary shards are gone

    source, info = pipeline.load_features(path)
    assert len(source) == len(label)
    assert info.features["features"].shape == (8, 8)
    assert info.features["label"].names == list(names)
    assert "group" not in info.features  # imported without groups
    for i in (0, 17, len(label) - 1):
        np.testing.assert_array_equal(source[i]["features"], features[source[i]["id"]])
        assert source[i]["label"] == label[source[i]["id"]]

    # configs/features.py points at it; stratified folds cut, leave-one-group-out refused.
    overrides = ["dataset=digits", f"data_dir={data_dir}", "cv.k=3"]
    config = config_lib.load("configs/features.py", overrides)
    assert config.dataset_paths.features == str(path)
    split = open_folds(config, "features")
    assert split.num_classes == 10 and split.input_shape == (8, 8) and len(split.folds) == 3
    config = config_lib.load("configs/features.py", [*overrides, "cv.kind=leave_one_group_out"])
    with pytest.raises(ValueError, match="no 'group' feature"):
        open_folds(config, "features")

    # The same arrays again: reused. Other arrays under the name: refused, dataset untouched.
    before = sorted((p.name, p.stat().st_mtime_ns) for p in path.iterdir())
    assert (
        import_features.main(["--npz", npz, "--name", "digits", "--data-dir", str(data_dir)]) == 0
    )
    other = _npz(tmp_path / "other.npz", features=features[:100], label=label[:100])
    assert (
        import_features.main(["--npz", other, "--name", "digits", "--data-dir", str(data_dir)]) == 2
    )
    assert sorted((p.name, p.stat().st_mtime_ns) for p in path.iterdir()) == before


def test_groups_give_leave_one_group_out_folds(tmp_path, digits):
    features, label = digits
    n = 300
    group = np.arange(n) % 3
    npz = _npz(tmp_path / "g.npz", features=features[:n], label=label[:n], group=group)
    path = import_features.import_features(npz, "digits_groups", tmp_path / "data")
    source, info = pipeline.load_features(path)
    assert "group" in info.features
    for i in range(6):  # tfds stores the examples in its own order; "id" is the input row
        assert int(source[i]["group"]) == group[int(source[i]["id"])]
    config = config_lib.load(
        "configs/features.py",
        ["dataset=digits_groups", f"data_dir={tmp_path / 'data'}", "cv.kind=leave_one_group_out"],
    )
    split = open_folds(config, "features")
    assert [len(val) for _, val in split.folds] == [100, 100, 100]


F = np.random.default_rng(0).normal(size=(12, 4, 6)).astype(np.float32)
L = np.arange(12) % 3


def _with(**changes):
    arrays = {"features": F, "label": L}
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


def _nan_at(index, value=np.nan, dtype=np.float32):
    f = F.astype(dtype)
    f[index] = value
    return f


BAD = [
    ("missing key", _with(label=None), "lacks ['label']"),
    ("misspelt key", {"features": F, "labels": L}, "label=[N] ints), renaming ['labels']"),
    ("extra key", _with(weights=L), "unknown keys ['weights']"),
    ("features 2-D", _with(features=F[:, 0]), "must be [N, layers, d]"),
    ("no examples", _with(features=F[:0], label=L[:0]), "must be [N, layers, d]"),
    ("features int", _with(features=F.astype(np.int32)), "must be floating point"),
    ("features NaN", _with(features=_nan_at((5, 2, 3))), "features[5, 2, 3] is nan"),
    ("features Inf", _with(features=_nan_at((0, 0, 1), np.inf)), "features[0, 0, 1] is inf"),
    (
        "float64 overflow",
        _with(features=_nan_at((7, 1, 0), 1e300, np.float64)),
        "features[7, 1, 0] = 1e+300 overflows float32",
    ),
    ("label length", _with(label=L[:-1]), "label has shape (11,); it must be [N] = [12]"),
    ("label float", _with(label=L.astype(np.float32)), "must hold integer classes"),
    ("label negative", _with(label=np.where(np.arange(12) == 4, -1, L)), "label[4] is -1"),
    ("one class", _with(label=np.zeros(12, np.int64)), "at least 2"),
    ("class gap", _with(label=np.where(L == 1, 3, L)), "classes [1] have no examples"),
    ("group length", _with(group=np.zeros(5, np.int64)), "group has shape (5,)"),
    ("group float", _with(group=np.zeros(12, np.float32)), "integer group ids"),
    ("group negative", _with(group=np.arange(12) - 1), "group[0] is -1"),
    ("names count", _with(label_names=np.array(["a", "b"])), "2 names but label has 3 classes"),
    ("names repeated", _with(label_names=np.array(["a", "b", "a"])), "must be distinct"),
    (
        "names pickled",
        _with(label_names=np.array(["a", "b", 3], dtype=object)),
        "label_names holds Python objects",
    ),
]


@pytest.mark.parametrize("arrays,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_each_bad_array_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, arrays, message):
    npz = _npz(tmp_path / "bad.npz", **arrays)
    data_dir = tmp_path / "data"
    rc = import_features.main(["--npz", npz, "--name", "mine", "--data-dir", str(data_dir)])
    err = capsys.readouterr()
    assert rc == 2
    assert err.out == ""
    lines = err.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err.err
    assert message in lines[0]
    assert not data_dir.exists()


def test_bad_files_names_and_folders(tmp_path, capsys):
    good = _npz(tmp_path / "good.npz", **_with())
    text = tmp_path / "x.npz"
    text.write_text("features,label\n1,0\n")
    (tmp_path / "afile").write_text("")
    cases = [
        ([str(tmp_path / "missing.npz"), "mine", tmp_path / "data"], "does not exist"),
        ([str(text), "mine", tmp_path / "data"], "is not an .npz file"),
        ([good, "My-Data", tmp_path / "data"], "not a valid dataset name"),
        ([good, "mine", tmp_path / "afile" / "data"], "is a file, not a folder"),
    ]
    for (npz, name, data_dir), message in cases:
        rc = import_features.main(["--npz", npz, "--name", name, "--data-dir", str(data_dir)])
        err = capsys.readouterr().err.splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "data").exists()
    with pytest.raises(SystemExit) as exit_info:  # argparse: a missing flag is one line too
        import_features.main(["--npz", good])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--name" in err[0]
