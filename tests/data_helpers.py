"""Shared helpers for the data tests: the extraction CLI's one-line errors and a fake IEMOCAP.

``extract_cli_error`` runs ``python -m data.extract``'s ``main`` and checks the project's CLI
convention (exit 2, one ``error: ...`` line on stderr, no file written); ``fake_iemocap``
writes a tiny manual-download tree that :mod:`data.datasets.iemocap` reads.
"""

import wave

import numpy as np

from data import extract


def extract_cli_error(argv, capsys, tmp_path):
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert extract.main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no file
    return lines[0]


def write_wav(path, seconds, rate=16_000, value=3000):
    """A mono int16 sine of ``seconds`` at ``rate`` Hz, peak ``value``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = (value * np.sin(np.arange(int(seconds * rate)) / 7.0)).astype(np.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(samples.tobytes())


def fake_iemocap(manual):
    """Sessions 1 and 2, one utterance per class each (6 s -> 2 chunks), one 'fru' skipped."""
    for session in (1, 2):
        sdir = manual / "IEMOCAP_full_release" / f"Session{session}"
        dialog = f"Ses0{session}F_impro01"
        lines = "% header\n\n"
        for i, label in enumerate(["neu", "exc", "ang", "sad", "fru"]):
            utt = f"{dialog}_F00{i}"
            write_wav(sdir / "sentences" / "wav" / dialog / f"{utt}.wav", 6.0 if i == 0 else 2.0)
            lines += f"[{i}.0 - {i + 1}.5]\t{utt}\t{label}\t[2.5, 2.5, 2.5]\n"
        (sdir / "dialog" / "EmoEvaluation").mkdir(parents=True)
        (sdir / "dialog" / "EmoEvaluation" / f"{dialog}.txt").write_text(lines)
