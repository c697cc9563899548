"""Audio chunks -> ``input_values`` as the paper fed WavLM (docs/design.md).

Each IEMOCAP example is a mono 16 kHz chunk of 80,000 samples zero-padded at the end
(:mod:`data.datasets.iemocap`). The paper passes the padded chunk to WavLM whole, with no
attention mask, and averages over all frames (``mean_with_padding``). int16 samples become float
in [-1, 1) (``x / 32768``, as soundfile, torchaudio and librosa load wav files). If the folder's
``preprocessor_config.json`` says ``do_normalize``, each chunk is normalised to zero mean and
unit variance as the Wav2Vec2 feature extractor does (``(x - mean) / sqrt(var + 1e-7)``): over
the whole padded chunk when no mask is passed (the paper's setting), otherwise over the valid
samples with the padding kept at 0.

With ``mean`` pooling the mask is passed to the model and only the frames that cover real audio
are averaged; frame counts follow the feature encoder's convolutions (``conv_kernel``,
``conv_stride``).
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from data.preprocess.image import PREPROCESSOR, read_preprocessor_config

SAMPLE_RATE = 16_000


def frame_lengths(lengths: np.ndarray, config: dict) -> np.ndarray:
    """Frames the feature encoder makes of ``lengths`` samples (``floor((L - k) / s) + 1``)."""
    out = np.asarray(lengths, np.int64)
    for kernel, stride in zip(config["conv_kernel"], config["conv_stride"], strict=True):
        out = (out - kernel) // stride + 1
    return np.maximum(out, 0)


@dataclasses.dataclass(frozen=True)
class AudioPreprocessor:
    """WavLM's input preparation; see the module docstring.

    Attributes:
      do_normalize: per-chunk zero-mean unit-variance normalisation.
      use_mask: pass an attention mask (``mean`` pooling) or not (the paper's setting).
    """

    do_normalize: bool
    use_mask: bool = False

    @classmethod
    def from_folder(
        cls, folder: str | pathlib.Path, config: dict, *, use_mask: bool = False
    ) -> AudioPreprocessor:
        """Reads a WavLM folder's ``preprocessor_config.json``.

        Raises:
          FileNotFoundError: if the file is missing.
          ValueError: for a sampling rate other than 16 kHz or a feature size other than 1.
        """
        raw = read_preprocessor_config(folder, "sampling rate and do_normalize")
        where = pathlib.Path(folder) / PREPROCESSOR
        if int(raw.get("sampling_rate", SAMPLE_RATE)) != SAMPLE_RATE:
            raise ValueError(
                f"{where}: sampling_rate={raw['sampling_rate']} but the audio is 16 kHz."
            )
        if int(raw.get("feature_size", 1)) != 1:
            raise ValueError(
                f"{where}: feature_size={raw['feature_size']} (expected 1: raw audio)."
            )
        return cls(do_normalize=bool(raw.get("do_normalize", True)), use_mask=use_mask)

    def __call__(self, audio: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
        """int16 chunks ``[B, T]`` with valid ``lengths`` ``[B]`` -> the model's inputs.

        Returns:
          ``input_values`` float32 ``[B, T]``, plus ``attention_mask`` int32 ``[B, T]`` when
          :attr:`use_mask`.
        """
        x = np.asarray(audio, np.float32) / 32768.0
        lengths = np.asarray(lengths, np.int64)
        mask = (np.arange(x.shape[1])[None, :] < lengths[:, None]).astype(np.int32)
        if self.do_normalize:
            if self.use_mask:
                rows = []
                for row, n in zip(x, lengths, strict=True):
                    n = max(int(n), 1)
                    valid = row[:n]
                    normed = (row - valid.mean()) / np.sqrt(valid.var() + 1e-7)
                    normed[n:] = 0.0
                    rows.append(normed)
                x = np.stack(rows).astype(np.float32)
            else:
                mean = x.mean(axis=1, keepdims=True)
                x = ((x - mean) / np.sqrt(x.var(axis=1, keepdims=True) + 1e-7)).astype(np.float32)
        out = {"input_values": x}
        if self.use_mask:
            out["attention_mask"] = mask
        return out
