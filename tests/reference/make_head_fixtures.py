"""Writes tiny random classification-model fixtures for tests/gaam_jax/test_encoders_heads.py.

Run in the reference venv (torch + transformers 5.24, offline)::

    .reference-venv/bin/python tests/reference/make_head_fixtures.py tests/fixtures/heads

Each variant folder ``<arch>/<variant>/`` holds ``config.json`` + ``model.safetensors`` (from
``save_pretrained``) and ``io.npz``: the model inputs (padded rows included) and ``logits``
float32 ``[B, num_labels]`` of the model in eval mode (default sdpa attention).

Variants:
  * ``bert/cls``: ``BertForSequenceClassification``; token types; rows of 10, 6 and 3 real
    tokens (right padding).
  * ``beit/mean``: ``BeitForImageClassification`` with ``use_mean_pooling`` (the pooler
    LayerNorm on the mean patch token), per-layer relative position bias, layer scale.
  * ``beit/cls``: the same with ``use_mean_pooling=False`` (class token after the final
    ``layernorm``), a shared relative position bias and absolute position embeddings.
  * ``wavlm/base``: ``WavLMForSequenceClassification``, post-norm, last hidden state; rows of
    800, 600 and 400 real samples; also ``logits_nomask`` (no ``attention_mask``: every frame).
  * ``wavlm/stable``: pre-norm (``do_stable_layer_norm``): pools ``last_hidden_state``, which has
    the final LayerNorm.
  * ``wavlm/weighted``: pre-norm with ``use_weighted_layer_sum`` (``layer_weights`` perturbed
    away from uniform); the weighted states have no final LayerNorm on the last one.
  * ``llama/pad``: ``LlamaForSequenceClassification`` with ``pad_token_id=0``; rows: full but
    ending in token 0 (so the pad id, not ``attention_mask``, decides), right-padded,
    left-padded, all padding; also ``logits_no_pad_id`` ``[1, C]``: row 1 alone with
    ``pad_token_id=None`` (transformers then takes the last position, a pad here).

Every parameter is perturbed away from its init (norm scales from 1, biases from 0), and the head
matrices are redrawn at unit gain so the logits are O(1) and a misplaced piece shows.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    BeitConfig,
    BeitForImageClassification,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    WavLMConfig,
    WavLMForSequenceClassification,
)

NUM_LABELS = 3
HEAD_NAMES = ("classifier", "score", "projector", "pooler", "layer_weights")

BERT = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
    type_vocab_size=2,
    hidden_dropout_prob=0.1,  # eval: no-ops
    attention_probs_dropout_prob=0.1,
)
BEIT = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    image_size=16,
    patch_size=8,
    num_channels=3,
    layer_norm_eps=1e-6,
)
WAVLM = dict(
    conv_dim=(8, 8),
    conv_kernel=(10, 3),
    conv_stride=(5, 2),
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    num_conv_pos_embeddings=8,
    num_conv_pos_embedding_groups=2,
    num_buckets=16,
    max_bucket_distance=32,
    classifier_proj_size=8,
)
LLAMA = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
)

VARIANTS = {
    ("bert", "cls"): (BertForSequenceClassification, BertConfig, BERT),
    ("beit", "mean"): (
        BeitForImageClassification,
        BeitConfig,
        dict(
            BEIT, use_mean_pooling=True, use_relative_position_bias=True, layer_scale_init_value=0.1
        ),
    ),
    ("beit", "cls"): (
        BeitForImageClassification,
        BeitConfig,
        dict(
            BEIT,
            use_mean_pooling=False,
            use_shared_relative_position_bias=True,
            use_absolute_position_embeddings=True,
            layer_scale_init_value=0.0,
        ),
    ),
    ("wavlm", "base"): (
        WavLMForSequenceClassification,
        WavLMConfig,
        dict(WAVLM, feat_extract_norm="group", conv_bias=False, do_stable_layer_norm=False),
    ),
    ("wavlm", "stable"): (
        WavLMForSequenceClassification,
        WavLMConfig,
        dict(WAVLM, feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True),
    ),
    ("wavlm", "weighted"): (
        WavLMForSequenceClassification,
        WavLMConfig,
        dict(
            WAVLM,
            feat_extract_norm="layer",
            conv_bias=True,
            do_stable_layer_norm=True,
            use_weighted_layer_sum=True,
        ),
    ),
    ("llama", "pad"): (
        LlamaForSequenceClassification,
        LlamaConfig,
        dict(LLAMA, pad_token_id=0),
    ),
}


def perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Moves every parameter away from its init; redraws head matrices at unit gain."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            head = name.split(".")[0] in HEAD_NAMES or ".pooler." in name
            if name == "layer_weights":
                p.copy_(noise)  # far from uniform after the softmax
            elif head and p.ndim == 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            elif p.ndim == 1:
                p.add_(0.3 * noise)
            else:
                p.add_(0.1 * noise * (p.std() + 0.02))


def text_inputs(vocab: int, generator: torch.Generator, length: int) -> dict[str, torch.Tensor]:
    """BERT: three right-padded rows of 10, 6 and 3 real tokens, token types on row 0."""
    ids = torch.randint(1, vocab, (3, length), generator=generator)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    types = torch.zeros_like(ids)
    types[0, 5:] = 1
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": types}


def llama_inputs(vocab: int, generator: torch.Generator, length: int) -> dict[str, torch.Tensor]:
    """Full (its last token is the pad id 0), right-padded, left-padded, all padding."""
    ids = torch.randint(1, vocab, (4, length), generator=generator)
    mask = torch.ones(4, length, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, :4] = 0
    mask[3, :] = 0
    ids = ids * mask
    ids[0, -1] = 0  # a real token (attention_mask 1) equal to the pad id
    return {"input_ids": ids, "attention_mask": mask}


def audio_inputs(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Three rows of 800 samples with 800, 600 and 400 real ones."""
    values = torch.randn(3, 800, generator=generator)
    mask = torch.ones(3, 800, dtype=torch.long)
    mask[1, 600:] = 0
    mask[2, 400:] = 0
    return {"input_values": values * mask, "attention_mask": mask}


def main(out_dir: str) -> None:
    """Writes every variant under ``out_dir``."""
    root = pathlib.Path(out_dir)
    total = 0
    for seed, ((arch, name), (model_cls, config_cls, kwargs)) in enumerate(VARIANTS.items()):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(2000 + seed)
        config = config_cls(num_labels=NUM_LABELS, **kwargs)
        model = model_cls(config).eval()
        perturb(model, generator)
        if arch == "bert":
            inputs = text_inputs(config.vocab_size, generator, 10)
        elif arch == "llama":
            inputs = llama_inputs(config.vocab_size, generator, 12)
        elif arch == "beit":
            size = config.image_size
            inputs = {"pixel_values": torch.randn(2, 3, size, size, generator=generator)}
        else:
            inputs = audio_inputs(generator)
        extra = {}
        with torch.no_grad():
            logits = model(**inputs).logits
            if arch == "wavlm":
                extra["logits_nomask"] = model(input_values=inputs["input_values"]).logits
            if arch == "llama":
                model.config.pad_token_id = None
                row = {k: v[1:2] for k, v in inputs.items()}
                extra["logits_no_pad_id"] = model(**row).logits
                model.config.pad_token_id = kwargs["pad_token_id"]
        assert torch.isfinite(logits).all(), (arch, name, logits)
        folder = root / arch / name
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder, safe_serialization=True)
        for path in folder.iterdir():  # keep only what the tests read
            if path.name not in ("config.json", "model.safetensors"):
                path.unlink()
        arrays = {
            k: v.numpy().astype(np.float32 if v.is_floating_point() else np.int32)
            for k, v in inputs.items()
        }
        arrays.update(logits=logits.numpy().astype(np.float32))
        arrays.update({k: v.numpy().astype(np.float32) for k, v in extra.items()})
        np.savez_compressed(folder / "io.npz", **arrays)
        size = sum(f.stat().st_size for f in folder.iterdir())
        total += size
        print(f"wrote {folder}: logits {tuple(logits.shape)}, {size / 1024:.0f} KiB")
    print(f"total {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/heads")
