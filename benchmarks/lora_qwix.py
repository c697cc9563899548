"""gaam_jax.adapters against qwix (Google's JAX LoRA/quantisation library), side by side.

Both attach LoRA to a model built from Flax's own layers (pre-LN blocks of
``nn.MultiHeadDotProductAttention`` / ``nnx.MultiHeadAttention``: ``DenseGeneral`` /
``LinearGeneral`` query, key, value and out, adapted at rank 8, alpha 16), Linen and NNX. In one
process, for each side: what the adapted model's variables look like (is ``params`` still the
base's? the adapters' dtype on a bfloat16 base?), the compile time and the median time of a
jitted step that differentiates the adapters only, and, with qwix's factors copied into ours,
the largest output difference (the same update, two implementations). Candidates alternate
repetition by repetition. Also tried: LoRA on a Linen ``nn.Einsum``.

Usage::

    .venv/bin/python -m benchmarks.lora_qwix [--quick] [--out benchmarks/results/lora_qwix.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from gaam_jax.adapters import COLLECTION, LoRA, adapt

TARGETS = r"(^|/)attn/(query|key|value|out)$"
QWIX_TARGETS = r".*attn/(query|key|value|out)"  # qwix full-matches module paths
RANK, ALPHA = 8, 16.0


class LinenBlock(nn.Module):
    """A pre-LN transformer block of Flax's own Linen layers."""

    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, T, D]`` -> ``[B, T, D]``."""
        d = x.shape[-1]
        h = nn.LayerNorm(param_dtype=self.dtype)(x)
        x = x + nn.MultiHeadDotProductAttention(self.heads, param_dtype=self.dtype, name="attn")(h)
        h = nn.LayerNorm(param_dtype=self.dtype)(x)
        h = nn.gelu(nn.Dense(4 * d, param_dtype=self.dtype)(h))
        return x + nn.Dense(d, param_dtype=self.dtype)(h)


class LinenModel(nn.Module):
    """``blocks`` Linen blocks."""

    blocks: int
    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, T, D]`` -> ``[B, T, D]``."""
        for i in range(self.blocks):
            x = LinenBlock(self.heads, self.dtype, name=f"block_{i}")(x)
        return x


class NnxBlock(nnx.Module):
    """The same block from Flax's own NNX layers."""

    def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, T, D]`` -> ``[B, T, D]``."""
        x = x + self.attn(self.norm1(x))
        return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class NnxModel(nnx.Module):
    """``blocks`` NNX blocks, as attributes ``block_i``."""

    def __init__(self, d: int, heads: int, blocks: int, rngs: nnx.Rngs):
        self.blocks = blocks
        for i in range(blocks):
            setattr(self, f"block_{i}", NnxBlock(d, heads, rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, T, D]`` -> ``[B, T, D]``."""
        for i in range(self.blocks):
            x = getattr(self, f"block_{i}")(x)
        return x


def _timed(fn, args, reps: int) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, times


def _from_qwix(qwix_tree: dict, heads: int) -> dict:
    """Qwix's ``kernel_lora_a`` ``[in, r]`` / ``kernel_lora_b`` ``[r, prod(out)]`` -> ours."""
    ours = {}
    for path, value in flatten_dict(qwix_tree).items():
        if path[-1] == "kernel_lora_a":
            a = value
            if path[-2] == "out":  # the out kernel is [heads, head_dim, d]
                a = a.reshape(heads, -1, a.shape[-1])
            ours[(*path[:-1], "lora_a")] = a
        elif path[-1] == "kernel_lora_b":
            b = value
            if path[-2] != "out":  # query/key/value kernels are [in, heads, head_dim]
                b = b.reshape(b.shape[0], heads, -1)
            ours[(*path[:-1], "lora_b")] = b
    return unflatten_dict(ours)


def linen(d: int, heads: int, blocks: int, batch: int, length: int, reps: int) -> dict:
    """The Linen comparison's row."""
    x = jax.random.normal(jax.random.key(0), (batch, length, d))
    base = LinenModel(blocks, heads)
    ours = adapt(base, lora=LoRA(rank=RANK, alpha=ALPHA, targets=TARGETS))
    theirs = qwix.apply_lora_to_model(
        base, qwix.LoraProvider(module_path=QWIX_TARGETS, rank=RANK, alpha=ALPHA)
    )
    v_ours = ours.init(jax.random.key(2), x)
    v_theirs = theirs.init(jax.random.key(2), x)
    flat = flatten_dict(v_theirs["params"])
    # One base for both: qwix's, without its factors (they sit in its params).
    params = unflatten_dict({k: v for k, v in flat.items() if "lora" not in k[-1]})
    # Move B off zero (both libraries start B at 0) so the comparison sees the update.
    v_theirs = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.01 if "lora_b" in str(p[-1]) else v, v_theirs
    )
    adapters = _from_qwix(v_theirs["params"], heads)

    def loss_ours(adapters):
        return jnp.mean(ours.apply({"params": params, COLLECTION: adapters}, x) ** 2)

    flat = flatten_dict(v_theirs["params"])
    lora_keys = [k for k in flat if "lora" in k[-1]]
    frozen = {k: v for k, v in flat.items() if k not in lora_keys}

    def loss_theirs(lora):
        merged = unflatten_dict({**frozen, **dict(zip(lora_keys, lora, strict=True))})
        return jnp.mean(theirs.apply({"params": merged}, x) ** 2)

    step_ours = jax.jit(jax.grad(loss_ours))
    step_theirs = jax.jit(jax.grad(loss_theirs))
    lora = [flat[k] for k in lora_keys]
    c_ours, t_ours, c_theirs, t_theirs = [], [], [], []
    for rep in range(2):  # alternate who goes first
        for name in ("ours", "theirs") if rep == 0 else ("theirs", "ours"):
            if name == "ours":
                first, times = _timed(step_ours, (adapters,), reps)
                c_ours.append(first)
                t_ours += times
            else:
                first, times = _timed(step_theirs, (lora,), reps)
                c_theirs.append(first)
                t_theirs += times
    out_ours = ours.apply({"params": params, COLLECTION: adapters}, x)
    out_theirs = theirs.apply(v_theirs, x)
    base_bf16 = LinenModel(blocks, heads, jnp.bfloat16)
    bf_ours = adapt(base_bf16, lora=LoRA(rank=RANK, alpha=ALPHA, targets=TARGETS))
    bf_theirs = qwix.apply_lora_to_model(
        base_bf16, qwix.LoraProvider(module_path=QWIX_TARGETS, rank=RANK, alpha=ALPHA)
    )
    dt_ours = {
        str(a.dtype) for a in jax.tree.leaves(bf_ours.init(jax.random.key(0), x)[COLLECTION])
    }
    bf_vars = flatten_dict(bf_theirs.init(jax.random.key(0), x)["params"])
    dt_theirs = {str(v.dtype) for k, v in bf_vars.items() if "lora" in k[-1]}
    return {
        "params_equal_base": {
            "gaam_jax": jax.tree.structure(v_ours["params"]) == jax.tree.structure(params),
            "qwix": jax.tree.structure(v_theirs["params"]) == jax.tree.structure(params),
        },
        "adapter_dtype_on_bf16_base": {"gaam_jax": sorted(dt_ours), "qwix": sorted(dt_theirs)},
        "first_call_s": {"gaam_jax": c_ours[0], "qwix": c_theirs[0]},
        "step_ms": {
            "gaam_jax": 1e3 * statistics.median(t_ours),
            "qwix": 1e3 * statistics.median(t_theirs),
        },
        "qwix_over_ours_step": statistics.median(t_theirs) / statistics.median(t_ours),
        "max_output_difference_of_scale": float(
            jnp.max(jnp.abs(out_ours - out_theirs)) / jnp.max(jnp.abs(out_theirs))
        ),
    }


def nnx_row(d: int, heads: int, blocks: int, batch: int, length: int, reps: int) -> dict:
    """The NNX comparison's row: step time of ``nnx.grad`` over the ``LoRAParam`` s."""
    x = jax.random.normal(jax.random.key(0), (batch, length, d))
    ours = adapt(
        NnxModel(d, heads, blocks, nnx.Rngs(0)),
        lora=LoRA(rank=RANK, alpha=ALPHA, targets=TARGETS),
        rngs=nnx.Rngs(1),
    )
    theirs = qwix.apply_lora_to_model(
        NnxModel(d, heads, blocks, nnx.Rngs(0)),
        qwix.LoraProvider(module_path=QWIX_TARGETS, rank=RANK, alpha=ALPHA),
        x,
        rngs=nnx.Rngs(1),
    )

    def stepper(model):
        graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

        @jax.jit
        def step(lora):
            return jax.grad(lambda lo: jnp.mean(nnx.merge(graphdef, lo, rest)(x) ** 2))(lora)

        return step, lora

    (s_ours, l_ours), (s_theirs, l_theirs) = stepper(ours), stepper(theirs)
    c, t = {"gaam_jax": [], "qwix": []}, {"gaam_jax": [], "qwix": []}
    for rep in range(2):
        order = (("gaam_jax", s_ours, l_ours), ("qwix", s_theirs, l_theirs))
        for name, step, lora in order if rep == 0 else order[::-1]:
            first, times = _timed(step, (lora,), reps)
            c[name].append(first)
            t[name] += times
    return {
        "first_call_s": {"gaam_jax": c["gaam_jax"][0], "qwix": c["qwix"][0]},
        "step_ms": {k: 1e3 * statistics.median(v) for k, v in t.items()},
        "qwix_over_ours_step": statistics.median(t["qwix"]) / statistics.median(t["gaam_jax"]),
    }


def linen_einsum() -> str:
    """What qwix does with LoRA on a Linen ``nn.Einsum``.

    Ours adapts it (tests/gaam_jax/test_adapters).
    """
    model = nn.Einsum((4, 8), "btf,fd->btd", name="embed")
    x = jnp.ones((1, 2, 4))
    try:
        qwix.apply_lora_to_model(
            model, qwix.LoraProvider(module_path=".*", rank=2, alpha=4.0)
        ).init(jax.random.key(0), x)
    except Exception as err:  # noqa: BLE001 - reported, not handled
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return "ok"


def main(argv: list[str] | None = None) -> dict:
    """Runs the comparison, prints (and writes) it and returns it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    size = dict(d=64, heads=2, blocks=1, batch=2, length=8, reps=1)
    if not args.quick:
        size = dict(d=256, heads=4, blocks=4, batch=16, length=128, reps=7)
    result = {
        "size": size,
        "jax": jax.__version__,
        "qwix": getattr(qwix, "__version__", "?"),
        "linen": linen(**size),
        "nnx": nnx_row(**size),
        "linen_einsum_qwix": linen_einsum(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
