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


def _max_length(max_length: int | None, config: dict) -> int:
    """``max_length``, or the model type's default, checked against the model's positions.

    BERT's position embeddings have ``max_position_embeddings`` rows; Llama's RoPE has no hard
    limit, but the config states the length the model was trained on. A default above it is
    lowered to it; an explicit ``max_length`` above it is refused.
    """
    limit = config.get("max_position_embeddings")
    limit = None if limit is None else int(limit)
    if max_length is None:
        default = DEFAULT_MAX_LENGTH[config["model_type"]]
        return default if limit is None else min(default, limit)
    if max_length <= 0:
        raise ValueError(f"--max-length must be positive, got {max_length}.")
    if limit is not None and max_length > limit:
        raise ValueError(
            f"--max-length {max_length} is more than config.json's max_position_embeddings "
            f"{limit} (the longest sequence this model takes); pass --max-length {limit} or less."
        )
    return max_length


def _check_vocab(tok, path: pathlib.Path, vocab_size: int) -> None:
    """Every id ``tok`` can produce from its vocabulary is below ``vocab_size``."""
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ValueError(
            f"{path} has {n} tokens but config.json's vocab_size is {vocab_size}: the tokenizer "
            "does not belong to this model."
        )
    # get_vocab_size counts tokens, not ids: a vocabulary with gaps can hold larger ids.
    vocab = tok.get_vocab(with_added_tokens=True)
    token, top = max(vocab.items(), key=lambda item: item[1], default=(None, -1))
    if top >= vocab_size:
        raise ValueError(
            f"{path} has token {token!r} with id {top} but config.json's vocab_size is "
            f"{vocab_size}: the tokenizer does not belong to this model."
        )


class TextPreprocessor:
    """Tokenizes texts for a BERT or Llama folder.

    Args:
      folder: the model folder (``tokenizer.json``, and ``config.json`` already read).
      config: the parsed ``config.json``.
      max_length: truncation length, special tokens included (default: 128 for BERT, 4096
        for Llama as the paper, lowered to config.json's ``max_position_embeddings``).
      pad_to_max: pad every batch to ``max_length`` (for ``mean_with_padding`` pooling);
        otherwise to :func:`bucket_length` of the batch's longest text.

    Raises:
      FileNotFoundError: if the folder has no ``tokenizer.json``.
      ValueError: one line, for a model type without text input, a non-positive
        ``max_length`` or one above config.json's ``max_position_embeddings``, or a tokenizer
        whose token ids do not fit config.json's ``vocab_size``.
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
        self.max_length = _max_length(max_length, config)
        self.path = path
        self._tok = Tokenizer.from_file(str(path))
        # Ids past the embedding table are read as NaN by jnp.take: refuse them before any work.
        self.vocab_size = config.get("vocab_size")
        if self.vocab_size is not None:
            self.vocab_size = int(self.vocab_size)
            _check_vocab(self._tok, path, self.vocab_size)
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
        if self.vocab_size is not None:
            for what, token in (("padding", self.pad_id), ("BOS", self.bos_id)):
                if token is not None and not 0 <= token < self.vocab_size:
                    raise ValueError(
                        f"config.json's {what} token id {token} is not below its vocab_size "
                        f"{self.vocab_size}: fix config.json (eos/bos/pad_token_id)."
                    )

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text (int32), truncated; Llama's start with BOS as the paper's.

        Raises:
          ValueError: if an id is not below config.json's ``vocab_size`` (e.g. one that the
            tokenizer's post-processor inserts but its vocabulary does not list).
        """
        out = []
        for k, e in enumerate(self._tok.encode_batch(list(texts))):
            ids = list(e.ids)
            if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
                ids = [self.bos_id, *ids][: self.max_length]  # tokenizer.json without BOS template
            if self.vocab_size is not None and ids and max(ids) >= self.vocab_size:
                bad = max(ids)
                raise ValueError(
                    f"text {k}: {self.path} gave token id {bad} but config.json's vocab_size is "
                    f"{self.vocab_size}: the tokenizer does not belong to this model."
                )
            out.append(np.asarray(ids, np.int32))
        return out

    def collate(
        self, ids: Sequence[np.ndarray], rows: int | None = None, length: int | None = None
    ) -> dict[str, np.ndarray]:
        """Pads token ids on the right into a batch of ``rows`` (default ``len(ids)``) rows.

        Rows past ``len(ids)`` are all padding (with a mask of one leading 1, so no row is
        empty); they fill the last batch to a fixed shape and are dropped by the caller.

        Args:
          ids: each text's token ids (:meth:`encode`).
          rows: the batch's rows.
          length: the batch's token length (longer ids are cut); default ``max_length`` with
            ``pad_to_max``, else :func:`bucket_length` of the longest.

        Returns:
          ``input_ids`` and ``attention_mask``, int32 ``[rows, length]``.
        """
        rows = rows or len(ids)
        if length is None:
            longest = max(len(i) for i in ids)
            length = self.max_length if self.pad_to_max else bucket_length(longest, self.max_length)
        input_ids = np.full((rows, length), self.pad_id, np.int32)
        mask = np.zeros((rows, length), np.int32)
        mask[len(ids) :, 0] = 1
        for row, seq in enumerate(ids):
            seq = seq[:length]
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        # BERT's token_type_ids are all 0 for single texts: the encoder's default.
        return {"input_ids": input_ids, "attention_mask": mask}

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenizes and pads a batch of texts (see :meth:`collate`)."""
        return self.collate(self.encode(texts))
