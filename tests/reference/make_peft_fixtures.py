"""Writes peft LoRA adapter fixtures for tests/gaam_jax/test_adapters_peft.py from PyTorch peft
0.21.2.

Run in the reference venv (torch 2.13, transformers 5.24, peft 0.21.2, offline)::

    $(bash tests/reference/venv.sh .reference-venv) tests/reference/make_peft_fixtures.py \
        tests/fixtures

For each architecture, ``<out>/peft/<arch>/`` gets:
  * ``adapter/``: ``adapter_config.json`` and ``adapter_model.safetensors`` as
    ``PeftModel.save_pretrained`` writes them, for a LoRA (r=2, lora_alpha=4) on the query and
    value projections of the transformers base model, with random non-zero ``lora_B`` (peft
    starts it at zero, which would hide the update);
  * ``io.npz``: the inputs (``input_ids``/``attention_mask`` int32 ``[B, T]``,
    ``pixel_values`` float32 ``[B, C, H, W]`` or ``input_values``/``attention_mask``
    ``[B, samples]``) and ``hidden_states`` float32 ``[B, L + 1, T, hidden]``
    (``torch.stack(hidden_states, 1)`` of the peft model, ``output_hidden_states=True``).

Models:
  * ``bert``: a tiny random ``BertModel`` (perturbed weights), saved in ``bert/model/``
    (``config.json``, ``model.safetensors``);
  * ``llama``: ``tests/fixtures/encoders/llama/base``, with ``use_rslora=True`` (scale
    ``lora_alpha / sqrt(r)``);
  * ``beit``: ``tests/fixtures/encoders/beit/cls_shared_abs`` (its base ``BeitModel``); also
    ``beit/adapter_v4/``, the same adapter under transformers-4 module names
    (``encoder.layer.N.attention.attention.query``, ``target_modules`` ``query``/``value``), as
    peft with transformers 4 named it;
  * ``wavlm``: ``tests/fixtures/encoders/wavlm/base``. transformers' ``WavLMAttention`` passes
    ``q_proj.weight``... to ``F.multi_head_attention_forward`` instead of calling the modules, so
    the unmerged peft model ignores a LoRA on them: ``hidden_states`` are the merged model's
    (``merge_and_unload()``, the intended adapted model) and ``hidden_states_unmerged`` peft's
    unmerged output (the base model's).

``--check ARCH FOLDER [NPZ]`` instead loads an adapter folder written elsewhere (by
``gaam_jax.adapters.peft.save``) onto the same base model with ``PeftModel.from_pretrained``, runs
it on the inputs of ``peft/<ARCH>/io.npz`` (merged first for WavLM) and prints its largest
difference from the ``hidden_states`` of ``NPZ`` (default that ``io.npz``): the round trip
gaam_jax -> peft, which the project's tests (no torch) cannot run.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModel, BertConfig, BertModel  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
ENCODERS = ROOT / "encoders"

# arch -> (base model folder relative to tests/fixtures, None: built here; target modules,
# use_rslora)
ARCHS = {
    "bert": (None, ["query", "value"], False),
    "llama": ("encoders/llama/base", ["q_proj", "v_proj"], True),
    "beit": ("encoders/beit/cls_shared_abs", ["q_proj", "v_proj"], False),
    "wavlm": ("encoders/wavlm/base", ["q_proj", "v_proj"], False),
}
BERT = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=32,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
)
LENGTH = 12
SAMPLES = 800  # WavLM: 39 frames (conv strides 5, 2, 2)
# transformers 5 BEiT module names -> transformers 4 (peft's keys and target names of old).
BEIT_V4 = (
    (r"\blayers\.(\d+)\.attention\.q_proj\b", r"encoder.layer.\1.attention.attention.query"),
    (r"\blayers\.(\d+)\.attention\.v_proj\b", r"encoder.layer.\1.attention.attention.value"),
)
BEIT_V4_TARGETS = {"q_proj": "query", "v_proj": "value"}


@torch.no_grad()
def perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Moves every parameter away from its init: 1-D tensors (norm scales, biases) by +-0.3,
    matrices by 10% of their spread."""
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=generator)
        if p.ndim == 1:
            p.add_(0.3 * noise)
        else:
            p.add_(0.1 * noise * (p.std() + 0.02))


def base_model(arch: str, out: pathlib.Path | None = None) -> torch.nn.Module:
    """The transformers base model of ``arch`` in eval mode.

    bert: built and saved in ``out/model``, or (``out`` None) read from ``peft/bert/model``.
    """
    folder, _, _ = ARCHS[arch]
    if folder is None and out is None:
        folder = "peft/bert/model"
    if folder is not None:
        model = AutoModel.from_pretrained(ROOT / folder).eval()
        model.name_or_path = f"tests/fixtures/{folder}"  # what peft records, repo-relative
        return model
    torch.manual_seed(0)
    model = BertModel(BertConfig(initializer_range=0.1, **BERT)).eval()
    perturb(model, torch.Generator().manual_seed(1))
    target = out / "model"
    shutil.rmtree(target, ignore_errors=True)
    model.save_pretrained(target, safe_serialization=True)
    raw = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    model.name_or_path = "tests/fixtures/peft/bert/model"
    return model


def inputs(arch: str, model: torch.nn.Module, generator: torch.Generator) -> dict:
    """The reference inputs (torch tensors) of ``arch``."""
    config = model.config
    if arch in ("bert", "llama"):
        ids = torch.randint(1, config.vocab_size, (3, LENGTH), generator=generator)
        mask = torch.ones(3, LENGTH, dtype=torch.long)
        mask[1, 7:] = 0
        if arch == "llama":
            mask[2, :3] = 0  # left padding too
        ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
        return {"input_ids": ids, "attention_mask": mask}
    if arch == "beit":
        size = config.image_size
        return {
            "pixel_values": torch.randn((2, config.num_channels, size, size), generator=generator)
        }
    values = torch.randn(2, SAMPLES, generator=generator)
    mask = torch.ones(2, SAMPLES, dtype=torch.long)
    mask[1, 600:] = 0
    values[1, 600:] = 0.0
    return {"input_values": values, "attention_mask": mask}


@torch.no_grad()
def states(model: torch.nn.Module, batch: dict) -> np.ndarray:
    """float32 ``[B, L + 1, T, hidden]``."""
    out = model(**batch, output_hidden_states=True)
    return torch.stack(out.hidden_states, 1).numpy().astype(np.float32)


def save_npz(path: pathlib.Path, batch: dict, **arrays: np.ndarray) -> None:
    """Inputs (int32 or float32) and reference arrays, compressed."""
    stored = {
        k: v.numpy().astype(np.int32 if v.dtype == torch.long else np.float32)
        for k, v in batch.items()
    }
    np.savez_compressed(path, **stored, **arrays)


def clean(folder: pathlib.Path) -> None:
    """Keeps only the adapter files the tests read (peft also writes a README.md model card)."""
    for extra in folder.iterdir():
        if extra.name not in ("adapter_config.json", "adapter_model.safetensors"):
            extra.unlink()
    raw = json.loads((folder / "adapter_config.json").read_text())
    raw["target_modules"] = sorted(raw["target_modules"])  # peft writes a set: stable order
    (folder / "adapter_config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def beit_v4(adapter: pathlib.Path, target: pathlib.Path) -> None:
    """The adapter under transformers-4 BEiT module names."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    tensors = load_file(adapter / "adapter_model.safetensors")
    renamed = {}
    for key, value in tensors.items():
        for pattern, repl in BEIT_V4:
            key = re.sub(pattern, repl, key)
        renamed[key] = value
    assert len(renamed) == len(tensors) and all("proj" not in k for k in renamed), renamed
    save_file(renamed, target / "adapter_model.safetensors", metadata={"format": "pt"})
    raw = json.loads((adapter / "adapter_config.json").read_text())
    raw["target_modules"] = sorted(BEIT_V4_TARGETS[t] for t in raw["target_modules"])
    (target / "adapter_config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def make(arch: str, out_root: pathlib.Path) -> None:
    """Builds, runs and saves one architecture's adapter fixture."""
    out = out_root / "peft" / arch
    out.mkdir(parents=True, exist_ok=True)
    base = base_model(arch, out)
    generator = torch.Generator().manual_seed(100 + list(ARCHS).index(arch))
    batch = inputs(arch, base, generator)
    before = states(base, batch)
    _, targets, rslora = ARCHS[arch]
    torch.manual_seed(10)
    model = get_peft_model(
        base, LoraConfig(r=2, lora_alpha=4, target_modules=targets, use_rslora=rslora)
    ).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
                weight = module.lora_B["default"].weight
                weight.copy_(0.3 * torch.randn(weight.shape, generator=generator))
    adapter = out / "adapter"
    shutil.rmtree(adapter, ignore_errors=True)
    model.save_pretrained(adapter)
    clean(adapter)
    unmerged = states(model, batch)
    arrays = {"hidden_states": unmerged}
    if arch == "wavlm":
        merged = states(model.merge_and_unload(), batch)
        arrays = {"hidden_states": merged, "hidden_states_unmerged": unmerged}
        # The bypass: unmerged is the base model; merged is not.
        print(f"  wavlm unmerged - base: {np.abs(unmerged - before).max():.2e}")
    ref = arrays["hidden_states"]
    change = np.abs(ref - before).max() / np.abs(before).max()
    save_npz(out / "io.npz", batch, **arrays)
    if arch == "beit":
        beit_v4(adapter, out / "adapter_v4")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(
        f"wrote {out}: hidden states {ref.shape}, LoRA moves them by {change:.2f} of their "
        f"scale, {size / 1024:.0f} KiB"
    )


def check(arch: str, folder: str, expected: str | None = None) -> float:
    """Largest |difference| / scale of ``folder``'s adapter on the base model vs ``expected``."""
    model = PeftModel.from_pretrained(base_model(arch), folder).eval()
    if arch == "wavlm":
        model = model.merge_and_unload()
    with np.load(ROOT / "peft" / arch / "io.npz") as data:
        io = dict(data)
    names = ("input_ids", "attention_mask", "pixel_values", "input_values")
    batch = {
        k: torch.from_numpy(io[k]).to(torch.long if io[k].dtype == np.int32 else torch.float32)
        for k in names
        if k in io
    }
    ref = io["hidden_states"]
    if expected is not None:
        with np.load(expected) as data:
            ref = data["hidden_states"]
    err = float(np.abs(states(model, batch) - ref).max() / np.abs(ref).max())
    print(f"{arch}: {folder} on the base model differs from io.npz by {err:.2e} of the scale")
    return err


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == "--check":
        sys.exit(0 if check(*sys.argv[2:]) < 1e-4 else 1)
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
    for name in ARCHS:
        make(name, root)
