"""IEMOCAP from a user's manual download, as the paper uses it (docs/design.md section 9).

Place the release (``IEMOCAP_full_release`` with ``Session1`` ... ``Session5``) in tfds' manual
folder (``<data_dir>/downloads/manual/`` or ``download_config.manual_dir``). Four classes: the
code's ids sadness 0, neutral 1, happiness (``hap`` and ``exc`` merged) 2, anger 3; every other
label is skipped. Each utterance is resampled to 16 kHz and cut into 5-second chunks; every chunk
is an example (accuracy is chunk-level), zero-padded at the end to 80,000 samples, with its valid
length kept so pooling can leave the padding out. ``group`` is the session (1-5), for
leave-one-session-out cross-validation.
"""

from __future__ import annotations

import pathlib
import re
import wave

import numpy as np
import tensorflow_datasets as tfds

SAMPLE_RATE = 16_000
CHUNK = 5 * SAMPLE_RATE
LABELS = ["sadness", "neutral", "happiness_excited", "anger"]
_LABEL_OF = {"sad": 0, "neu": 1, "hap": 2, "exc": 2, "ang": 3}
_LINE = re.compile(r"^\[[\d.]+ - [\d.]+\]\t(\S+)\t(\w+)\t")


def read_wav(path: pathlib.Path) -> np.ndarray:
    """Reads a 16-bit PCM wav as mono int16 at 16 kHz (resampling if needed)."""
    with wave.open(str(path), "rb") as f:
        if f.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit PCM, got {8 * f.getsampwidth()}-bit.")
        rate, channels = f.getframerate(), f.getnchannels()
        audio = np.frombuffer(f.readframes(f.getnframes()), np.int16).reshape(-1, channels)
    audio = audio.mean(axis=1) if channels > 1 else audio[:, 0].astype(np.float64)
    if rate != SAMPLE_RATE:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(SAMPLE_RATE, rate)
        audio = resample_poly(audio, SAMPLE_RATE // g, rate // g)
    return np.clip(np.round(audio), -32768, 32767).astype(np.int16)


def chunks(audio: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """Cuts audio into 5-s chunks, each zero-padded to 80,000 samples: ``[(chunk, length)]``."""
    out = []
    for start in range(0, max(len(audio), 1), CHUNK):
        piece = audio[start : start + CHUNK]
        out.append((np.pad(piece, (0, CHUNK - len(piece))), len(piece)))
    return out


def read_labels(session_dir: pathlib.Path) -> dict[str, int]:
    """Utterance name -> class id from a session's ``dialog/EmoEvaluation/*.txt`` files."""
    labels = {}
    for path in sorted((session_dir / "dialog" / "EmoEvaluation").glob("*.txt")):
        for line in path.read_text(errors="replace").splitlines():
            match = _LINE.match(line)
            if match and match.group(2) in _LABEL_OF:
                labels[match.group(1)] = _LABEL_OF[match.group(2)]
    return labels


class Iemocap(tfds.core.GeneratorBasedBuilder):
    """IEMOCAP, four classes, 5-s chunks, sessions as groups (manual download)."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Request IEMOCAP from https://sail.usc.edu/iemocap/ and place IEMOCAP_full_release "
        "(with Session1..Session5) in the manual folder."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="IEMOCAP, 4 classes, 5-s chunks at 16 kHz, zero-padded to 80,000 samples.",
            features=tfds.features.FeaturesDict(
                {
                    "audio": tfds.features.Tensor(shape=(CHUNK,), dtype=np.int16),
                    "length": tfds.features.Scalar(dtype=np.int64),
                    "label": tfds.features.ClassLabel(names=LABELS),
                    "group": tfds.features.Scalar(dtype=np.int64),
                    "utterance": tfds.features.Text(),
                    "id": tfds.features.Scalar(dtype=np.int64),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        root = pathlib.Path(dl_manager.manual_dir)
        if (root / "IEMOCAP_full_release").is_dir():
            root = root / "IEMOCAP_full_release"
        sessions = sorted(root.glob("Session[1-5]"))
        if not sessions:
            raise FileNotFoundError(f"no Session1..Session5 folders in {root}.")
        return {"train": self._generate_examples(sessions)}

    def _generate_examples(self, sessions: list[pathlib.Path]):
        example_id = 0
        for session_dir in sessions:
            session = int(session_dir.name.removeprefix("Session"))
            labels = read_labels(session_dir)
            for wav in sorted((session_dir / "sentences" / "wav").glob("*/*.wav")):
                if wav.stem not in labels:
                    continue
                for index, (chunk, length) in enumerate(chunks(read_wav(wav))):
                    yield (
                        f"{wav.stem}_{index}",
                        {
                            "audio": chunk,
                            "length": length,
                            "label": labels[wav.stem],
                            "group": session,
                            "utterance": wav.stem,
                            "id": example_id,
                        },
                    )
                    example_id += 1
