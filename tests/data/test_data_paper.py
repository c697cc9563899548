"""The paper's datasets offline: CIFAR-100 and AG News on mock data, IEMOCAP on a fixture tree."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from data_helpers import write_wav

from data.datasets import iemocap, registry


def test_paper_datasets_through_tfds_builders_with_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
        cifar, info = registry.load_paper("cifar100", tmp_path, "test")
        assert len(cifar) == 10 and cifar[0]["image"].shape == (32, 32, 3)
        assert info.features["label"].num_classes == 100
        news, info = registry.load_text("ag_news_subset", tmp_path, "test")
        assert len(news) == 10 and info.features["label"].num_classes == 4
        record = news[3]
        assert record["id"] == 3 and isinstance(record["text"], str) and " " in record["text"]


def test_missing_paper_dataset_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build cifar100"):
        registry.load_paper("cifar100", tmp_path, "train")


def _fake_iemocap(root):
    """Two sessions; utterances of 12 s (3 chunks), 3 s, a frustrated one (skipped), 8 kHz."""
    lines = {
        1: [("Ses01F_impro01_F000", "neu", 12.0), ("Ses01F_impro01_M001", "exc", 3.0)],
        2: [("Ses02F_impro01_F000", "fru", 2.0), ("Ses02F_impro01_M001", "sad", 4.0)],
    }
    for session, utts in lines.items():
        sdir = root / "IEMOCAP_full_release" / f"Session{session}"
        text = "% header\n\n"
        for i, (utt, label, seconds) in enumerate(utts):
            rate = 8_000 if session == 2 else 16_000
            wav = sdir / "sentences" / "wav" / utt.rsplit("_", 1)[0] / f"{utt}.wav"
            write_wav(wav, seconds, rate, value=1000)
            text += f"[{i}.0 - {i + 1}.5]\t{utt}\t{label}\t[2.5, 2.5, 2.5]\n"
        evaluation = sdir / "dialog" / "EmoEvaluation" / f"{utts[0][0].rsplit('_', 1)[0]}.txt"
        evaluation.parent.mkdir(parents=True)
        evaluation.write_text(text)


def test_iemocap_builder_on_a_fixture_tree(tmp_path):
    manual = tmp_path / "manual"
    _fake_iemocap(manual)
    builder = iemocap.Iemocap(data_dir=str(tmp_path / "data"), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
    )
    source = builder.as_data_source(split="train")
    records = sorted((source[i] for i in range(len(source))), key=lambda r: r["id"])
    # 12 s -> chunks of 5, 5, 2 s; 3 s -> 1; frustrated skipped; 4 s at 8 kHz -> 1 (resampled).
    assert [int(r["length"]) for r in records] == [80_000, 80_000, 32_000, 48_000, 64_000]
    assert [int(r["label"]) for r in records] == [1, 1, 1, 2, 0]  # neu, neu, neu, exc->hap, sad
    assert [int(r["group"]) for r in records] == [1, 1, 1, 1, 2]
    last = records[2]["audio"]
    assert last.shape == (80_000,) and not last[32_000:].any()  # zero-padded at the end


def test_iemocap_chunking_and_labels_units():
    chunks = iemocap.chunks(np.ones(170_000, np.int16))
    assert [length for _, length in chunks] == [80_000, 80_000, 10_000]
    assert all(c.shape == (80_000,) for c, _ in chunks)
