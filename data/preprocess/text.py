"""Texts -> ``input_ids``/``attention_mask`` with a model folder's own ``tokenizer.json``.

The paper's AG News features (docs/design.md) tokenised one text at a time with the
Llama-2 tokenizer: BOS included, no padding, truncation at 4096 tokens, then the mean over every
token. Batching here pads on the right with the EOS id (Llama has no pad token) and the mean
leaves the padding out, which gives the same features: a causal model's real tokens never attend
to later (padding) positions, and right padding keeps their positions ``0..n-1``.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence

import numpy as np

TOKENIZER = "tokenizer.json"
# Truncation lengths by model_type: BERT's 128 as before; Llama the paper's 4096.
DEFAULT_MAX_LENGTH = {"bert": 128, "llama": 4096}


def bucket_length(longest: int, max_length: int) -> int:
    """The padded length of a batch: a multiple of 16 up to 128, then a power of two.

    Few distinct lengths keep the number of compilations of a jitted encoder small.
    """
    if longest <= 128:
        length = -(-max(longest, 1) // 16) * 16
    else:
        length = 2 ** math.ceil(math.log2(longest))
    return min(length, max_length)


class TextPreprocessor:
    """Tokenizes texts for a BERT or Llama folder.

    Args:
      folder: the model folder (``tokenizer.json``, and ``config.json`` already read).
      config: the parsed ``config.json``.
      max_length: truncation length, special tokens included (default: 128 for BERT, 4096
        for Llama as the paper).
      pad_to_max: pad every batch to ``max_length`` (for ``mean_with_padding`` pooling);
        otherwise to :func:`bucket_length` of the batch's longest text.

    Raises:
      FileNotFoundError: if the folder has no ``tokenizer.json``.
      ValueError: for a model type without text input or a non-positive ``max_length``.
    """

    def __init__(
        self,
        folder: str | pathlib.Path,
        config: dict,
        *,
        max_length: int | None = None,
        pad_to_max: bool = False,
    ):
        from tokenizers import Tokenizer

        self.model_type = config["model_type"]
        if self.model_type not in DEFAULT_MAX_LENGTH:
            raise ValueError(f"{self.model_type} models take no text input.")
        path = pathlib.Path(folder) / TOKENIZER
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: copy tokenizer.json from the model's Hugging Face "
                "snapshot into the folder (a folder with only tokenizer.model: save it once with "
                "transformers' AutoTokenizer(...).save_pretrained(folder))."
            )
        self.max_length = max_length or DEFAULT_MAX_LENGTH[self.model_type]
        if self.max_length <= 0:
            raise ValueError(f"--max-length must be positive, got {self.max_length}.")
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=self.max_length)
        self.pad_to_max = pad_to_max
        if self.model_type == "llama":
            eos = config.get("eos_token_id", 2)
            self.pad_id = int(eos[0] if isinstance(eos, list) else eos)  # pad = eos, masked out
            bos = config.get("bos_token_id", 1)
            self.bos_id = None if bos is None else int(bos[0] if isinstance(bos, list) else bos)
        else:
            self.pad_id = int(config.get("pad_token_id") or 0)
            self.bos_id = None

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text (int32), truncated; Llama's start with BOS as the paper's."""
        out = []
        for e in self._tok.encode_batch(list(texts)):
            ids = list(e.ids)
            if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
                ids = [self.bos_id, *ids][: self.max_length]  # tokenizer.json without BOS template
            out.append(np.asarray(ids, np.int32))
        return out

    def collate(self, ids: Sequence[np.ndarray], rows: int | None = None) -> dict[str, np.ndarray]:
        """Pads token ids on the right into a batch of ``rows`` (default ``len(ids)``) rows.

        Rows past ``len(ids)`` are all padding (with a mask of one leading 1, so no row is
        empty); they fill the last batch to a fixed shape and are dropped by the caller.

        Returns:
          ``input_ids`` and ``attention_mask``, int32 ``[rows, length]``.
        """
        rows = rows or len(ids)
        longest = max(len(i) for i in ids)
        length = self.max_length if self.pad_to_max else bucket_length(longest, self.max_length)
        input_ids = np.full((rows, length), self.pad_id, np.int32)
        mask = np.zeros((rows, length), np.int32)
        mask[len(ids) :, 0] = 1
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        # BERT's token_type_ids are all 0 for single texts: the encoder's default.
        return {"input_ids": input_ids, "attention_mask": mask}

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenizes and pads a batch of texts (see :meth:`collate`)."""
        return self.collate(self.encode(texts))
