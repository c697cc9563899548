"""Writes tiny random Llama fixtures for tests/gaam_jax/test_encoders_llama.py from PyTorch
transformers.

Run in the reference venv (torch + transformers 5.24, offline):
``/work/refvenv/bin/python tests/reference/make_llama_fixtures.py tests/fixtures/encoders``.

Each variant folder ``llama/<variant>/`` holds ``config.json`` + ``model.safetensors`` (from
``save_pretrained``) and ``io.npz`` with ``input_ids``, ``attention_mask`` (int32 ``[B, T]``) and
``hidden_states`` (float32 ``[B, num_hidden_layers + 1, T, hidden]``, i.e.
``torch.stack(hidden_states, 1)`` of ``LlamaModel`` in eval mode with the default (sdpa) attention).

Variants (each changes the computation in a way the others do not cover):
  * ``base``: ``LlamaModel`` (unprefixed names), grouped KV heads (4 query / 2 KV heads), default
    RoPE with rope_theta 5000, rms_norm_eps 1e-5, no biases.
  * ``llama3``: ``LlamaForCausalLM`` (``model.`` names + ``lm_head``), one KV head, explicit
    head_dim 16 != hidden/heads, attention_bias and mlp_bias, llama3 RoPE scaling whose three
    frequency bands (kept, smoothed, divided) all occur at head_dim 16.
  * ``linear``: ``LlamaForCausalLM`` with tied embeddings (no ``lm_head`` saved), linear RoPE
    scaling, pretraining_tp=2 (no effect on the computation in transformers 5).

Every parameter is perturbed away from its initial value (norm scales away from 1, biases away
from 0) so that a piece left out of the port cannot hide behind a default.
The batch has a full row, a right-padded row and a left-padded row (fully masked query rows).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel  # noqa: E402

LENGTH = 12

VARIANTS = {
    "base": (
        LlamaModel,
        dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
            max_position_embeddings=64,
        ),
    ),
    "llama3": (
        LlamaForCausalLM,
        dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            rms_norm_eps=2e-5,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=False,
            max_position_embeddings=1024,
            # head_dim 16, theta 5000: wavelengths 6, 18, 53 (kept), 154 (smoothed), 449.. (/8).
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 5000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        ),
    ),
    "linear": (
        LlamaForCausalLM,
        dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            pretraining_tp=2,
            max_position_embeddings=64,
            rope_parameters={"rope_type": "linear", "rope_theta": 300.0, "factor": 3.0},
        ),
    ),
}


def perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Moves every parameter away from its init: 1-D tensors (norm scales, biases) by +-0.3,
    matrices by 10% of their spread."""
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim == 1:
                p.add_(0.3 * noise)
            else:
                p.add_(0.1 * noise * (p.std() + 0.02))


def inputs(vocab_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of LENGTH tokens: full, right-padded (7 real), left-padded (9 real)."""
    ids = torch.randint(1, vocab_size, (3, LENGTH), generator=generator)
    mask = torch.ones(3, LENGTH, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, :3] = 0
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))  # pad id 0
    return ids, mask


def main(out_dir: str) -> None:
    """Writes every variant under ``out_dir/llama``."""
    root = pathlib.Path(out_dir) / "llama"
    for seed, (name, (cls, kwargs)) in enumerate(VARIANTS.items()):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(1000 + seed)
        config = LlamaConfig(initializer_range=0.1, pad_token_id=0, **kwargs)
        model = cls(config).eval()
        perturb(model, generator)
        if config.tie_word_embeddings:
            model.tie_weights()
        ids, mask = inputs(config.vocab_size, generator)
        base = model if cls is LlamaModel else model.model
        with torch.no_grad():
            out = base(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        states = torch.stack(out.hidden_states, 1).numpy().astype(np.float32)
        folder = root / name
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder, safe_serialization=True)
        for extra in folder.iterdir():  # keep only what the tests read
            if extra.name not in ("config.json", "model.safetensors"):
                extra.unlink()
        np.savez_compressed(
            folder / "io.npz",
            input_ids=ids.numpy().astype(np.int32),
            attention_mask=mask.numpy().astype(np.int32),
            hidden_states=states,
        )
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"wrote {folder}: hidden states {states.shape}, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/encoders")
