"""The encoders' attention implementations side by side: time and memory against the length.

Usage::

    python -m benchmarks.attention            # CPU: xla vs blockwise; GPU: cudnn too
    python -m benchmarks.attention --quick    # tiny sizes: a smoke test

Llama-shaped grouped-query attention (8 query / 2 key-value heads of 64, batch 1, causal, one
padded key block), forward and forward+backward, in float32 (and bfloat16 where cuDNN runs).
Each case is jitted once; medians of alternating repetitions (``benchmarks.run.compare``);
memory is XLA's own account of the compiled program (temporaries + outputs). The dense ``xla``
path is skipped where its ``[B, H, T, T]`` float32 logits alone would pass 4 GB.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from gaam_jax.encoders.attention import dot_product_attention

MB = 2**20
DENSE_LIMIT = 4 * 2**30


def _inputs(t: int, dtype: jnp.dtype, heads: int = 8, kv: int = 2, d: int = 64):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, t, heads, d), dtype)
    k = jax.random.normal(keys[1], (1, t, kv, d), dtype)
    v = jax.random.normal(keys[2], (1, t, kv, d), dtype)
    mask = jnp.arange(t)[None, :] < t - 7  # a few padding keys at the end
    return q, k, v, mask


def _programs(implementation: str):
    def forward(q, k, v, mask):
        return dot_product_attention(
            q, k, v, key_mask=mask, causal=True, implementation=implementation
        )

    def backward(q, k, v, mask):
        loss = lambda q, k, v: jnp.sum(forward(q, k, v, mask).astype(jnp.float32))  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return {"forward": jax.jit(forward), "forward+backward": jax.jit(backward)}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    from benchmarks.run import compare, machine

    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    lengths = (256, 1024) if args.quick else (1024, 4096, 16384)
    gpu = jax.default_backend() == "gpu"
    dtypes = [jnp.float32] + ([jnp.bfloat16] if gpu else [])
    print(f"Machine: {machine()}. Medians of {repeats} alternating repetitions.\n", flush=True)
    print("| dtype | T | pass | " + " | ".join(["xla", "blockwise", "cudnn"][: 2 + gpu]) + " |")
    print("|---|---|---|" + "---|" * (2 + gpu))
    start = time.perf_counter()
    for dtype in dtypes:
        impls = ["xla", "blockwise"] + (["cudnn"] if gpu and dtype != jnp.float32 else [])
        for t in lengths:
            args_ = _inputs(t, dtype)
            for kind in ("forward", "forward+backward"):
                cells, candidates = {}, {}
                for impl in impls:
                    if impl == "xla" and 8 * t * t * 4 > DENSE_LIMIT:
                        cells[impl] = "(logits > 4 GB)"
                        continue
                    fn = _programs(impl)[kind]
                    mem = fn.lower(*args_).compile().memory_analysis()
                    used = (mem.temp_size_in_bytes + mem.output_size_in_bytes) / MB
                    cells[impl] = f"{used:.0f} MB"
                    candidates[impl] = (lambda a=args_: a, fn)
                times = compare(candidates, repeats)
                for impl, seconds in times.items():
                    cells[impl] = f"{seconds * 1e3:.1f} ms, {cells[impl]}"
                row = " | ".join(
                    cells.get(i, "-") for i in ["xla", "blockwise", "cudnn"][: 2 + gpu]
                )
                print(f"| {jnp.dtype(dtype).name} | {t} | {kind} | {row} |", flush=True)
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
