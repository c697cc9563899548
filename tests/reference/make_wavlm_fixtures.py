"""Writes tiny WavLM fixtures from transformers' PyTorch ``WavLMModel`` (random, perturbed weights).

Run in the reference venv::

    /work/refvenv/bin/python tests/reference/make_wavlm_fixtures.py tests/fixtures/encoders

Writes ``<out>/wavlm/<variant>/{config.json, model.safetensors, io.npz}``. ``io.npz`` keys:
``input_values`` float32 [2, 1600]; ``attention_mask`` int32 [2, 1600] (tail of row 1 masked);
``hidden_states`` float32 [2, layers + 1, frames, hidden] (with the mask);
``hidden_states_nomask`` (same, no attention_mask); ``last_hidden_state`` float32
[2, frames, hidden] (with the mask; for stable-layer-norm models it carries the final LayerNorm,
i.e. the last hidden state transformers 4 returned).

Variants (each changes the computation somewhere):
  * ``stable``: WavLM-Large style: layer-norm feature extractor, conv bias, pre-norm layers with
    the final LayerNorm, even positional kernel (16).
  * ``base``: WavLM-Base style: group-norm feature extractor, no conv bias, post-norm layers with
    the encoder LayerNorm before them, even positional kernel (16).
  * ``odd``: post-norm layers with a layer-norm feature extractor and an odd positional kernel
    (7, nothing dropped), one layer.
"""

from __future__ import annotations

import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import WavLMConfig, WavLMModel  # noqa: E402

COMMON = dict(
    conv_dim=(16, 16, 16),
    conv_kernel=(10, 3, 3),
    conv_stride=(5, 2, 2),
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    # 79 frames > max_bucket_distance / 2 so the log-spaced and clipped buckets are used.
    num_buckets=32,
    max_bucket_distance=64,
    layer_norm_eps=1e-5,
    hidden_act="gelu",
    feat_extract_activation="gelu",
)

VARIANTS = {
    "stable": dict(COMMON, feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True),
    "base": dict(COMMON, feat_extract_norm="group", conv_bias=False, do_stable_layer_norm=False),
    "odd": dict(
        COMMON,
        feat_extract_norm="layer",
        conv_bias=True,
        do_stable_layer_norm=False,
        num_conv_pos_embeddings=7,
        num_hidden_layers=1,
        layer_norm_eps=1e-6,
    ),
}


def perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Moves every parameter away from its init value, so no piece can hide behind a default."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.add_(0.1 * noise * (p.std() if p.numel() > 1 else 0.0) + 0.1 * noise + 0.02)
            if name.endswith("original0") or name.endswith("weight_g"):
                p.mul_(1.5)  # weight-norm g: clearly not the init norm
            elif name.endswith("rel_attn_embed.weight") or name.endswith("gru_rel_pos_const"):
                # Make the relative position bias and its gate move the output by O(1), so that a
                # wrong bucket, direction or gate cannot pass within tolerance.
                p.add_(torch.randn(p.shape, generator=generator))


def main(out_dir: str) -> None:
    """Writes the fixtures into ``out_dir/wavlm``."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1234)
    samples = 1600
    input_values = torch.randn(2, samples, generator=generator)
    attention_mask = torch.ones(2, samples, dtype=torch.long)
    attention_mask[1, 1100:] = 0
    input_values[1, 1100:] = 0.0  # as a feature extractor pads
    for variant, kwargs in VARIANTS.items():
        config = WavLMConfig(
            **kwargs,
            mask_time_prob=0.0,  # no masked_spec_embed
            hidden_dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            layerdrop=0.0,
        )
        model = WavLMModel(config).eval()
        perturb(model, generator)
        folder = pathlib.Path(out_dir) / "wavlm" / variant
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder, safe_serialization=True)
        with torch.no_grad():
            out = model(input_values, attention_mask=attention_mask, output_hidden_states=True)
            plain = model(input_values, output_hidden_states=True)
        states = torch.stack(out.hidden_states, 1).numpy().astype(np.float32)
        np.savez_compressed(
            folder / "io.npz",
            input_values=input_values.numpy().astype(np.float32),
            attention_mask=attention_mask.numpy().astype(np.int32),
            hidden_states=states,
            hidden_states_nomask=torch.stack(plain.hidden_states, 1).numpy().astype(np.float32),
            last_hidden_state=out.last_hidden_state.numpy().astype(np.float32),
        )
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"wrote {folder}: hidden states {states.shape}, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/encoders")
