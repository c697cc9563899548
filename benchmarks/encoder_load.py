"""Peak host memory of loading an encoder checkpoint, against the checkpoint's size.

Usage::

    .venv/bin/python -m benchmarks.encoder_load [--folder /tmp/gaam_load_llama] [--layers 8]

Writes (once, never inside the repository) a random Llama-shaped checkpoint of a few hundred MB
(width 1024, vocabulary 32000, float32, two safetensors shards with an index), then loads it in
fresh subprocesses, each reporting its resident-memory high-water mark (``VmHWM`` of
``/proc/self/status``) above the resident memory it had before loading (after importing JAX
and starting its CPU devices):

* ``from_pretrained``: one device, float32 and bfloat16 compute;
* ``from_pretrained`` on 8 CPU devices with ``mesh`` (data, model) = (1, 8) and (2, 4);
* a naive loader for contrast: ``safetensors.numpy.load_file`` then ``jax.device_put``.

On CPU the "devices" are host memory too, so the parameters themselves count: the figure to
read is the peak *above* what the devices hold at the end (the loading overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

CASES = ("single_f32", "single_bf16", "mesh_1x8", "mesh_2x4", "naive_load_file")


def llama_config(layers: int, hidden: int = 1024, vocab: int = 32000) -> dict:
    """A Llama config.json (transformers 5 style) of the given size."""
    return {
        "model_type": "llama", "architectures": ["LlamaModel"], "hidden_size": hidden,
        "intermediate_size": 2816 * hidden // 1024, "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 128, "head_dim": 64, "num_hidden_layers": layers,
        "vocab_size": vocab, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "max_position_embeddings": 2048, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }  # fmt: skip


def write_random_llama(folder: pathlib.Path, layers: int) -> int:
    """Writes a random float32 Llama checkpoint in two shards; returns its size in bytes."""
    import numpy as np
    from safetensors.numpy import save_file

    config = llama_config(layers)
    d, ff = config["hidden_size"], config["intermediate_size"]
    q, kv = config["num_attention_heads"] * 64, config["num_key_value_heads"] * 64
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], d), "model.norm.weight": (d,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
            p + "mlp.down_proj.weight": (d, ff), p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = list(shapes)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        tensors = {k: (0.02 * rng.standard_normal(shapes[k], np.float32)) for k in part}
        save_file(tensors, folder / file)
        del tensors
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return sum((folder / f).stat().st_size for f in set(weight_map.values()))


def _status() -> dict[str, int]:
    out = {}
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    # Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS.
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def child(case: str, folder: str) -> dict:
    """Loads ``folder`` one way, in this (fresh) process; returns memory figures in bytes."""
    if case.startswith("mesh"):
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    import jax.numpy as jnp

    from gaam_jax.encoders import from_pretrained
    from gaam_jax.sharding import make_mesh

    jax.devices()
    jnp.zeros(1).block_until_ready()
    _reset_peak()
    before = _status()
    start = time.perf_counter()
    if case == "naive_load_file":
        from safetensors.numpy import load_file

        index = json.loads((pathlib.Path(folder) / "model.safetensors.index.json").read_text())
        host = {}
        for file in sorted(set(index["weight_map"].values())):
            host |= load_file(str(pathlib.Path(folder) / file))
        params = jax.device_put(host)
        jax.block_until_ready(params)
        leaves = jax.tree.leaves(params)
        del host
    else:
        mesh = None
        if case.startswith("mesh"):
            data, model = (int(x) for x in case.removeprefix("mesh_").split("x"))
            mesh = make_mesh({"data": data, "model": model})
        dtype = jnp.bfloat16 if case.endswith("bf16") else jnp.float32
        enc = from_pretrained(folder, dtype=dtype, mesh=mesh)
        leaves = jax.tree.leaves(enc.params)
    seconds = time.perf_counter() - start
    after = _status()
    device_bytes = sum(s.data.nbytes for leaf in leaves for s in leaf.addressable_shards)
    per_device: dict = {}
    for leaf in leaves:
        for s in leaf.addressable_shards:
            per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
    return {
        "case": case,
        "seconds": seconds,
        "rss_before": before["VmRSS"],
        "peak": after["VmHWM"],
        "rss_after": after["VmRSS"],
        "rss_file_after": after["RssFile"],
        "device_bytes": device_bytes,
        "max_per_device": max(per_device.values()),
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.encoder_load")
    parser.add_argument("--folder", default="/tmp/gaam_load_llama")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.folder)))
        return 0
    folder = pathlib.Path(args.folder)
    if not (folder / "config.json").exists():
        print(f"writing a random Llama checkpoint to {folder} ...", flush=True)
        write_random_llama(folder, args.layers)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    mb = lambda n: f"{n / 2**20:.0f}"  # noqa: E731
    print(f"checkpoint: {folder}, {mb(size)} MB float32 safetensors (2 shards)\n")
    print("| loader | peak above start (MB) | on devices (MB) | per device (MB) "
          "| peak - devices (MB) | / checkpoint | RSS after (MB) | s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        cmd = [sys.executable, "-m", "benchmarks.encoder_load", "--child", case]
        run = subprocess.run(
            [*cmd, "--folder", str(folder)], capture_output=True, text=True, check=False
        )
        if run.returncode:
            print(f"| {case} | failed: {run.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        rise = r["peak"] - r["rss_before"]
        overhead = rise - r["device_bytes"]
        print(
            f"| {case} | {mb(rise)} | {mb(r['device_bytes'])} | {mb(r['max_per_device'])} | "
            f"{mb(overhead)} | "
            f"{overhead / size:.2f} | {mb(r['rss_after'] - r['rss_before'])} | "
            f"{r['seconds']:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
