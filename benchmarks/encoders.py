"""Extraction throughput: our JAX encoders vs transformers' PyTorch models, same weights, on CPU.

Usage (in the benchmark venv, ``bash benchmarks/venv.sh``, which has torch and transformers)::

    .bench-venv/bin/python -m benchmarks.encoders            # Llama, BEiT-Base, WavLM-Base shapes
    .bench-venv/bin/python -m benchmarks.encoders --quick    # tiny sizes: a smoke test
    .bench-venv/bin/python -m benchmarks.encoders --mesh     # 8 CPU devices sharded vs 1 device
    python -m benchmarks.encoders --device                   # PyTorch on CUDA (device.sh)

For every architecture whose module exists in ``gaam_jax/encoders``: a transformers model with
random weights is built from a config (offline), saved with ``save_pretrained`` to a temporary
folder and loaded from there by ``gaam_jax.encoders.from_pretrained``, so both sides run the same
weights. Both produce every layer's hidden states (``output_hidden_states=True`` stacked on
axis 1, as ``hidden_states`` returns them). One process, alternating repetitions (rotating
order), medians; examples/s and the JAX/PyTorch ratio (> 1: JAX faster), plus the largest
difference between the two as a check that they compute the same thing.

``--mesh`` runs JAX alone on 8 fake CPU devices (``--xla_force_host_platform_device_count=8``):
one device against (data, model) = (8, 1), (4, 2), (2, 4) meshes; the 8 "devices" share this
machine's cores, so the table shows the cost of partitioning and collectives, not a speed-up.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

# model_type -> (transformers config class, kwargs, inputs(batch, rng) -> dict, description).
Spec = tuple[str, dict, Callable[[int, np.random.Generator], dict], str, int]


def specs(quick: bool) -> dict[str, Spec]:
    """The benchmark cases (``quick``: tiny): ``"<model_type>[-<tokens>]"`` -> spec.

    Llama runs at 128, 512 and 2048 tokens (batch shrinking as the length grows, so each case
    is about the same work); BEiT and WavLM at the paper's shapes (BEiT-Large at 224 px,
    WavLM-Large on 5-s chunks).
    """
    if quick:
        llama = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=256)  # fmt: skip
        lengths, image, patch, audio = {16: 2}, 32, 8, 1600
        beit = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, image_size=image, patch_size=patch)  # fmt: skip
        wavlm = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, conv_dim=[32] * 3, conv_kernel=[10, 3, 3],
                     conv_stride=[5, 2, 2], num_conv_pos_embeddings=16,
                     num_conv_pos_embedding_groups=4)  # fmt: skip
        batches = {"beit": 2, "wavlm": 2}
    else:
        llama = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                     num_attention_heads=16, num_key_value_heads=16, vocab_size=32000)  # fmt: skip
        lengths, image, patch, audio = {128: 8, 512: 2, 2048: 1}, 224, 16, 80000
        large = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16)  # fmt: skip
        beit = dict(large, image_size=image, patch_size=patch)  # BEiT-Large/16
        wavlm = dict(large, do_stable_layer_norm=True, feat_extract_norm="layer")  # WavLM-Large
        batches = {"beit": 4, "wavlm": 2}
    llama |= dict(max_position_embeddings=max(2 * max(lengths), 64), rope_theta=10000.0)
    beit |= dict(use_shared_relative_position_bias=True, layer_scale_init_value=0.1)

    def text(seq: int) -> Callable[[int, np.random.Generator], dict]:
        def make(batch: int, rng: np.random.Generator) -> dict:
            ids = rng.integers(0, llama["vocab_size"], (batch, seq)).astype(np.int64)
            mask = np.ones((batch, seq), np.int64)
            mask[0, seq // 2 :] = 0
            return {"input_ids": ids, "attention_mask": mask}

        return make

    def images(batch: int, rng: np.random.Generator) -> dict:
        return {"pixel_values": rng.standard_normal((batch, 3, image, image), np.float32)}

    def waves(batch: int, rng: np.random.Generator) -> dict:
        return {"input_values": rng.standard_normal((batch, audio), np.float32)}

    width = lambda c, d: c.get("hidden_size", d)  # noqa: E731
    depth = lambda c: c.get("num_hidden_layers", 12)  # noqa: E731
    out: dict[str, Spec] = {
        f"llama-{seq}": (
            "LlamaConfig",
            llama,
            text(seq),
            f"Llama {llama['hidden_size']} wide, {llama['num_hidden_layers']} layers, seq {seq}",
            batch,
        )
        for seq, batch in lengths.items()
    }
    out["beit"] = (
        "BeitConfig",
        beit,
        images,
        f"BEiT {image}px/{patch}, {width(beit, 768)} wide, {depth(beit)} layers",
        batches["beit"],
    )
    out["wavlm"] = (
        "WavLMConfig",
        wavlm,
        waves,
        f"WavLM {width(wavlm, 768)} wide, {depth(wavlm)} layers, {audio / 16000:g} s at 16 kHz",
        batches["wavlm"],
    )
    return out  # fmt: skip


def model_type(case: str) -> str:
    """``"llama-128"`` -> ``"llama"``."""
    return case.split("-")[0]


def available(quick: bool, only: list[str] | None) -> list[str]:
    """Cases whose ``gaam_jax/encoders`` module exists (and whose model type ``only`` names)."""
    names = [
        n for n in specs(quick) if importlib.util.find_spec(f"gaam_jax.encoders.{model_type(n)}")
    ]
    return [n for n in names if not only or model_type(n) in only or n in only]


def build(case: str, quick: bool, folder: str):
    """A random transformers model of the case, saved to ``folder``; returns it (eval mode)."""
    import torch
    import transformers

    config_cls, kwargs, _, _, _ = specs(quick)[case]
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kwargs)
    model = transformers.AutoModel.from_config(config).eval()
    with torch.no_grad():  # move every parameter off its init value (e.g. zero biases)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _torch_run(model, device: str = "cpu") -> Callable:
    import torch

    def run(inputs: dict):
        with torch.inference_mode():
            out = model(**inputs, output_hidden_states=True)
            stacked = torch.stack(out.hidden_states, 1)
        if device == "cuda":
            torch.cuda.synchronize()  # CUDA is asynchronous: time the work, not the launch
        return stacked

    return run


def section_vs_torch(
    names: list[str], quick: bool, repeats: int, device: str = "cpu", attention: str = "auto"
) -> str:
    """JAX float32 vs transformers (on ``device``) on every case in ``names``."""
    import jax
    import jax.numpy as jnp
    import torch

    from benchmarks.run import compare
    from gaam_jax.encoders import from_pretrained

    rows = []
    for name in names:
        _, _, make_inputs, desc, batch = specs(quick)[name]
        with tempfile.TemporaryDirectory() as folder:
            model = build(name, quick, folder)
            enc = from_pretrained(folder, dtype=jnp.float32, attention=attention)
        inputs = make_inputs(batch, np.random.default_rng(0))
        model = model.to(device)
        torch_inputs = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
        jax_inputs = {k: jnp.asarray(v) for k, v in inputs.items()}
        torch_run = _torch_run(model, device)
        ref = torch_run(torch_inputs).cpu().numpy()
        got = np.asarray(enc.hidden_states(**jax_inputs))
        err = np.abs(got - ref).max() / np.abs(ref).max()
        times = compare(
            {
                "torch": (lambda t=torch_inputs: (t,), torch_run),
                "jax": (lambda j=jax_inputs: (j,), lambda inputs, e=enc: e.hidden_states(**inputs)),
            },
            repeats,
        )
        tput = {k: batch / v for k, v in times.items()}
        rows.append(
            f"| {name}: {desc} | {batch} | {tput['torch']:.2f} | {tput['jax']:.2f} | "
            f"{tput['jax'] / tput['torch']:.2f}x | {err:.1e} |"
        )
        print(rows[-1], flush=True)
        del model, enc
        jax.clear_caches()
    head = (
        "| encoder | batch | PyTorch ex/s | JAX ex/s | JAX / PyTorch | max diff / max |\n"
        "|---|---|---|---|---|---|"
    )
    return "\n".join([head, *rows])


def section_mesh(names: list[str], quick: bool, repeats: int) -> str:
    """JAX on one device vs sharded over 8 CPU devices."""
    import jax
    import jax.numpy as jnp

    from benchmarks.run import compare
    from gaam_jax.encoders import from_pretrained
    from gaam_jax.sharding import make_mesh

    meshes = [(8, 1), (4, 2), (2, 4)]
    rows = []
    for name in names:
        _, _, make_inputs, desc, batch = specs(quick)[name]
        batch = max(batch, 8)  # one example per data shard at least
        inputs = make_inputs(batch, np.random.default_rng(0))
        candidates, encoders = {}, {}
        with tempfile.TemporaryDirectory() as folder:
            build(name, quick, folder)
            encoders["1 device"] = from_pretrained(folder, dtype=jnp.float32)
            for data, model in meshes:
                mesh = make_mesh({"data": data, "model": model})
                encoders[f"{data}x{model}"] = from_pretrained(folder, dtype=jnp.float32, mesh=mesh)
        ref = np.asarray(encoders["1 device"].hidden_states(**inputs))
        errs = {}
        for key, enc in encoders.items():
            errs[key] = np.abs(np.asarray(enc.hidden_states(**inputs)) - ref).max()
            candidates[key] = (lambda i=inputs: (i,), lambda x, e=enc: e.hidden_states(**x))
        times = compare(candidates, repeats)
        cells = " | ".join(
            f"{batch / times[k]:.2f} ({errs[k] / np.abs(ref).max():.0e})" for k in encoders
        )
        rows.append(f"| {name}: {desc} | {batch} | {cells} |")
        print(rows[-1], flush=True)
        del encoders
        jax.clear_caches()
    keys = ["1 device"] + [f"(data, model) = ({d}, {m})" for d, m in meshes]
    head = "| encoder | batch | " + " | ".join(f"{k} ex/s (diff)" for k in keys) + " |"
    return "\n".join([head, "|" + "---|" * (len(keys) + 2), *rows])


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.encoders")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition")
    parser.add_argument("--mesh", action="store_true", help="8 CPU devices sharded vs 1 device")
    parser.add_argument("--device", action="store_true", help="PyTorch on CUDA when present")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--only", default=None, help="comma-separated model types or cases")
    parser.add_argument(
        "--attention", default="auto", help="the JAX encoders' attention (auto, xla, blockwise)"
    )
    args = parser.parse_args(argv)
    if args.mesh:
        if "jax" in sys.modules:
            raise RuntimeError("--mesh must set XLA_FLAGS before jax is imported.")
        flags = os.environ.get("XLA_FLAGS", "")
        if "--xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
    from benchmarks.run import machine

    repeats = args.repeats or (1 if args.quick else 5)
    names = available(args.quick, args.only.split(",") if args.only else None)
    print(f"Machine: {machine()}. Medians of {repeats} alternating repetitions.\n", flush=True)
    start = time.perf_counter()
    if args.mesh:
        print(section_mesh(names, args.quick, repeats))
    else:
        device = "cpu"
        if args.device:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"JAX attention: {args.attention}.\n")
        print(section_vs_torch(names, args.quick, repeats, device, args.attention))
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
