"""Writes tiny BEiT fixtures from transformers' PyTorch ``BeitModel`` (offline, random weights).

Run in the reference venv:
``/work/refvenv/bin/python tests/reference/make_beit_fixtures.py tests/fixtures/encoders``.

Each variant folder ``beit/<variant>/`` holds ``config.json``, ``model.safetensors`` (a head model,
so its names carry the ``beit.`` prefix plus head tensors; the base layout is derived at test time)
and ``io.npz`` with ``pixel_values`` ``[2, 3, H, W]`` and ``hidden_states``
``[2, num_hidden_layers + 1, tokens, hidden]`` (float32) from
``torch.stack(BeitModel(...)(pixel_values, output_hidden_states=True).hidden_states, 1)``.

Variants:
  * ``mim_relbias``: BEiT-Large style (``microsoft/beit-large-patch16-224``): per-layer relative
    position bias, layer scale (1e-5 at init), mean pooling, mask token; saved as
    ``BeitForMaskedImageModeling`` (``lm_head``, ``layernorm`` head tensors).
  * ``cls_shared_abs``: one shared relative position bias table, absolute position embeddings,
    no layer scale (``layer_scale_init_value=0``), CLS pooling (a final ``layernorm`` that must
    not touch the hidden states); saved as ``BeitForImageClassification``.

Every parameter is perturbed away from its initial value so that a piece left out of the Flax
port (a zero table, a unit scale, a zero bias) cannot hide behind its default.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    BeitConfig,
    BeitForImageClassification,
    BeitForMaskedImageModeling,
    BeitModel,
)

COMMON = dict(
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    hidden_act="gelu",
    num_channels=3,
    vocab_size=16,
    drop_path_rate=0.1,  # an eval no-op; kept non-zero as in the released configs
)

VARIANTS = {
    "mim_relbias": (
        BeitForMaskedImageModeling,
        dict(
            image_size=32,
            patch_size=8,
            use_mask_token=True,
            use_absolute_position_embeddings=False,
            use_relative_position_bias=True,
            use_shared_relative_position_bias=False,
            layer_scale_init_value=1e-5,
            use_mean_pooling=True,
            layer_norm_eps=1e-12,
        ),
    ),
    "cls_shared_abs": (
        BeitForImageClassification,
        dict(
            image_size=24,
            patch_size=8,
            use_mask_token=False,
            use_absolute_position_embeddings=True,
            use_relative_position_bias=False,
            use_shared_relative_position_bias=True,
            layer_scale_init_value=0.0,
            use_mean_pooling=False,
            layer_norm_eps=1e-6,
            num_labels=3,
        ),
    ),
}


@torch.no_grad()
def _perturb(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Moves every parameter well away from its initial value."""
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith(("lambda_1", "lambda_2")):
            # Layer scale starts at 1e-5, which would hide the attention and MLP branches.
            p.copy_(0.3 + 0.9 * torch.rand(p.shape, generator=gen))
        elif name.endswith(("cls_token", "mask_token", "position_embeddings", "bias_table")):
            # Zero-initialised tables: entries of order 1, so that a relative position bias
            # moves the attention weights clearly.
            p.copy_((1.5 if name.endswith("bias_table") else 0.5) * noise)
        elif "layernorm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith("bias"):
            p.add_(0.1 * noise)
        else:
            p.add_(0.1 * noise * (p.std() + 0.02))


@torch.no_grad()
def make_variant(out_root: pathlib.Path, name: str, gen: torch.Generator) -> None:
    """Builds, perturbs, saves and runs one variant."""
    head_cls, extra = VARIANTS[name]
    config = BeitConfig(**COMMON, **extra)
    head = head_cls(config).eval()
    _perturb(head, gen)
    folder = out_root / "beit" / name
    folder.mkdir(parents=True, exist_ok=True)
    head.save_pretrained(folder, safe_serialization=True)

    size = config.image_size
    pixel_values = torch.randn((2, config.num_channels, size, size), generator=gen)
    # The reference is the base model loaded from the saved head checkpoint, so the fixture also
    # checks that transformers itself reads the stored names as we do.
    base = BeitModel.from_pretrained(folder).eval()
    out = base(pixel_values, output_hidden_states=True)
    states = torch.stack(out.hidden_states, 1)
    inner = head.beit(pixel_values, output_hidden_states=True)
    torch.testing.assert_close(torch.stack(inner.hidden_states, 1), states, rtol=0, atol=0)
    n_tokens = (size // config.patch_size) ** 2 + 1
    assert states.shape == (2, config.num_hidden_layers + 1, n_tokens, config.hidden_size)
    # hidden_states[0] is the embedding output and the last entry is the last layer's output,
    # before BeitModel.layernorm (identity with mean pooling) and the pooler.
    torch.testing.assert_close(states[:, 0], base.embeddings(pixel_values), rtol=0, atol=0)
    if not config.use_mean_pooling:
        assert not torch.allclose(out.last_hidden_state, states[:, -1])
    np.savez_compressed(
        folder / "io.npz",
        pixel_values=pixel_values.numpy().astype(np.float32),
        hidden_states=states.numpy().astype(np.float32),
    )
    # Sorted keys give a stable diff when the fixtures are regenerated.
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    kib = sum(f.stat().st_size for f in folder.iterdir()) / 1024
    print(f"wrote {folder}: hidden states {tuple(states.shape)}, {kib:.0f} KiB")


def main(out_dir: str) -> None:
    """Writes every variant into ``out_dir/beit/``."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    for name in VARIANTS:
        make_variant(pathlib.Path(out_dir), name, gen)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/encoders")
