"""Encoders at the paper's scale: memory against length, compile time against depth, 13B memory.

Usage (the project venv; JAX only)::

    python -m benchmarks.encoder_scale            # all sections, ~3 min on 2 cores
    python -m benchmarks.encoder_scale --quick    # tiny sizes: a smoke test

Sections:

* **memory**: a random Llama-shaped encoder (width 256, 8 query / 2 key-value heads, 4 layers,
  batch 1): peak memory of one ``hidden_states`` and one ``pooled_states`` call at 1024, 4096 and
  16384 tokens, for the dense (``xla``) and the memory-linear (``blockwise``) attention. Two
  measures: XLA's own account of the compiled program (temporaries + outputs,
  ``memory_analysis``), and the growth of the process's peak resident memory over the call
  (compile included), each case in a fresh process so one peak cannot hide another.
* **compile**: first call (trace + compile + run) of a 4- and a 32-layer encoder of the same width
  at 128 tokens, each in a fresh process: with scanned layers the program does not grow with
  depth.
* **13b**: a Llama-2-13B-shaped config (40 layers x 5120, 40 heads, vocab 32000) traced with
  ``jax.eval_shape`` and compiled for meshes ``model`` = 1, 2, 4, 8 (8 fake CPU devices) at 4096
  tokens and batch 8, bfloat16: per-device bytes of the weights (from the shardings) and of the
  activations of ``pooled_states`` (XLA's temporaries + outputs per device, see the comment in
  :func:`section_13b` on how XLA:CPU treats bfloat16 weights). Nothing is allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MB = 2**20


def _llama(layers: int, width: int = 256, heads: int = 8, kv: int = 2, vocab: int = 1024):
    from gaam_jax.encoders.llama import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=width * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=width // heads,
    )


def _encoder(config, attention: str, dtype=None, mesh=None):
    """An :class:`~gaam_jax.encoders.Encoder` with random parameters (no checkpoint needed)."""
    import jax
    import jax.numpy as jnp

    from gaam_jax.encoders import Encoder, EncoderOptions
    from gaam_jax.encoders.llama import LlamaEncoder

    dtype = dtype or jnp.float32
    module = LlamaEncoder(config, dtype, EncoderOptions(attention=attention))
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree.map(lambda a: a.astype(dtype), nn_unbox(params))
    return Encoder("llama", config, module, params, dtype, mesh)


def nn_unbox(tree):
    """Strips Flax's logical-partitioning boxes."""
    import flax.linen as nn

    return nn.unbox(tree)


def _one_case(kind: str, attention: str, tokens: int, layers: int) -> dict:
    """Runs in a fresh process: one call's memory (or the first call's time)."""
    import jax
    import numpy as np

    config = _llama(layers)
    enc = _encoder(config, attention)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, tokens)).astype(np.int32)
    mask = np.ones((1, tokens), np.int32)
    if kind == "pooled":
        call = lambda: enc.pooled_states(input_ids=ids, attention_mask=mask)  # noqa: E731
        program = enc._apply.lower(enc.params, {"input_ids": ids, "attention_mask": mask},
                                   None, "mean")  # fmt: skip
    else:
        call = lambda: enc.hidden_states(input_ids=ids, attention_mask=mask)  # noqa: E731
        program = enc._apply.lower(enc.params, {"input_ids": ids, "attention_mask": mask},
                                   None, None)  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    analysis = program.compile().memory_analysis()
    xla = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
    return {"first_call_s": first, "rss_growth": peak - before, "xla_bytes": xla}


def _spawn(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.encoder_scale", "--case", *args],
        capture_output=True,
        text=True,
        check=True,
        # One CPU device, whatever the parent set for the 13b section.
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def section_memory(quick: bool) -> str:
    """Peak memory of one call against the length, dense vs blockwise."""
    lengths = (256, 1024) if quick else (1024, 4096, 16384)
    rows = []
    for kind in ("hidden", "pooled"):
        for attention in ("xla", "blockwise"):
            cells, base = [], None
            for t in lengths:
                if attention == "xla" and t > 4096:
                    cells.append("(skipped: 17 GB of logits)")
                    continue
                r = _spawn(kind, attention, str(t), "4")
                base = base or r
                cells.append(
                    f"{r['xla_bytes'] / MB:.0f} MB / {r['rss_growth'] / MB:.0f} MB"
                    f" (x{r['xla_bytes'] / base['xla_bytes']:.1f})"
                )
                print(f"  {kind} {attention} T={t}: {r}", flush=True)
            rows.append(f"| {kind}_states | {attention} | " + " | ".join(cells) + " |")
    head = (
        "| call | attention | "
        + " | ".join(f"T={t}: XLA / RSS growth (XLA vs first)" for t in lengths)
        + " |\n|"
        + "---|" * (len(lengths) + 2)
    )
    return "\n".join([head, *rows])


def section_compile(quick: bool) -> str:
    """First call (compile included) of a shallow and a deep encoder."""
    depths = (2, 8) if quick else (4, 32)
    times = {d: _spawn("compile", "auto", "128", str(d))["first_call_s"] for d in depths}
    shallow, deep = depths
    return (
        f"| first call, 128 tokens | {shallow} layers | {deep} layers | ratio |\n"
        "|---|---|---|---|\n"
        f"| hidden_states | {times[shallow]:.2f} s | {times[deep]:.2f} s | "
        f"{times[deep] / times[shallow]:.2f}x |"
    )


def section_13b(quick: bool) -> str:
    """Per-device memory of a Llama-2-13B-shaped encoder on model-parallel meshes."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from gaam_jax import sharding
    from gaam_jax.encoders import EncoderOptions, pooling
    from gaam_jax.encoders.llama import LlamaConfig, LlamaEncoder

    if quick:
        config = _llama(4, width=256, heads=8, kv=8)
        tokens, batch = 512, 8
    else:
        config = LlamaConfig(
            vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
            num_attention_heads=40, num_key_value_heads=40, head_dim=128, rms_norm_eps=1e-5,
        )  # fmt: skip
        tokens, batch = 4096, 8
    module = LlamaEncoder(config, jnp.bfloat16, EncoderOptions(attention="blockwise"))
    boxed = {"params": sharding.abstract_params(module, jax.ShapeDtypeStruct((1, 8), jnp.int32))}
    # Weights are counted in bfloat16. The activations come from compiling the bfloat16
    # program with float32 weights: XLA:CPU upcasts bfloat16 matmul operands to float32 and,
    # given bfloat16 weights, hoists that upcast of every layer out of the scan (a float32 copy
    # of the whole model in "temporaries"), which GPUs and TPUs (native bfloat16 matmuls) do not.
    abstract = nn.unbox(boxed["params"])
    rows = []
    for model in (1, 2, 4, 8):
        mesh = sharding.make_mesh({"data": 1, "model": model}, jax.devices()[:model])
        shardings = sharding.param_shardings(boxed["params"], mesh)
        weights = sum(
            int(np.prod(s.shard_shape(a.shape))) * 2  # bfloat16
            for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True)
        )
        ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)
        data = NamedSharding(mesh, PartitionSpec())

        def pooled(params, input_ids):
            with nn.logical_axis_rules(list(sharding.DEFAULT_RULES)):
                return module.apply({"params": params}, input_ids, collect=pooling.mean)

        compiled = (
            jax.jit(pooled, in_shardings=(shardings, data))
            .lower(abstract, ids)
            .compile()
            .memory_analysis()
        )
        act = compiled.temp_size_in_bytes + compiled.output_size_in_bytes
        rows.append(
            f"| {model} | {weights / 2**30:.2f} GiB | {act / 2**30:.2f} GiB | "
            f"{(weights + act) / 2**30:.2f} GiB |"
        )
        print(rows[-1], flush=True)
    head = (
        f"| model axis | weights / device | activations / device (pooled_states, batch {batch}, "
        f"{tokens} tokens) | total |\n|---|---|---|---|"
    )
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.encoder_scale")
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    parser.add_argument("--only", default="memory,compile,13b", help="sections, comma-separated")
    parser.add_argument("--case", nargs=4, help=argparse.SUPPRESS)  # one subprocess case
    args = parser.parse_args(argv)
    if args.case:
        kind, attention, tokens, layers = args.case
        print(json.dumps(_one_case(kind, attention, int(tokens), int(layers))))
        return 0
    if "13b" in args.only:  # 8 fake CPU devices, set before jax is imported
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
    from benchmarks.run import machine

    print(f"Machine: {machine()}.\n", flush=True)
    start = time.perf_counter()
    for name, section in (
        ("memory", section_memory), ("compile", section_compile), ("13b", section_13b)
    ):  # fmt: skip
        if name in args.only:
            print(f"## {name}\n", flush=True)
            print(section(args.quick), "\n", flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
