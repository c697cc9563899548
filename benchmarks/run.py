"""Speed and memory benchmarks of gaam_jax, side by side with PyTorch peers in one process.

Usage (``make bench`` builds the venv with PyTorch and the authors' package first)::

    .bench-venv/bin/python -m benchmarks.run --out benchmarks/results

Every comparison times its candidates in the same process, alternating them repetition by
repetition (the order rotates), and reports medians and ratios. Inputs that a timed call
consumes (donated buffers) are prepared outside the timed region. ``--quick`` runs every
section once on tiny sizes (the smoke test in tests/test_benchmarks.py); PyTorch columns read
"n/a" when PyTorch or the authors' package is not installed.

Sections:
  1. GAAM layer vs the authors' package (eager, and torch.compile where it works).
  2. GAAM forward / forward+backward vs one fused elementwise pass (the memory-bandwidth floor).
  3. Scaling with length: GAAM vs dot-product multi-head attention, time and memory; a plot.
  4. The decoder's training step vs the same decoder in PyTorch; share of matmul throughput.
  5. bfloat16: speed and error against float32.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gaam_jax import GaussianAdaptiveTransformer, GaussianBlock, MixtureGaussianAdaptiveAttention
from gaam_jax import functional as F

try:  # the peers are optional: without them the PyTorch columns read n/a
    import torch
    from gaussian_adaptive_attention import GaussianBlock as TorchBlock
    from gaussian_adaptive_attention import MultiHeadGaussianAdaptiveAttention as TorchMulti

    from benchmarks.torch_reference import PaperDecoder
except ImportError:  # pragma: no cover - exercised where torch is absent
    torch = None

Thunk = Callable[[], object]


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _sync(out: object) -> None:
    jax.block_until_ready(out)


def compare(candidates: dict[str, tuple[Callable[[], tuple], Callable]], repeats: int) -> dict:
    """Median seconds of each candidate, timed alternately.

    Args:
      candidates: name -> ``(prepare, run)``; ``prepare()`` (untimed) returns the arguments of
        ``run(*args)`` (timed, including its synchronisation).
      repeats: timed repetitions per candidate, after one warm-up call each.

    Returns:
      name -> median seconds.
    """
    names = list(candidates)
    for name in names:  # warm-up: compilation, allocator, caches
        prepare, run = candidates[name]
        _sync(run(*prepare()))
    samples = {name: [] for name in names}
    for rep in range(repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            prepare, run = candidates[name]
            args = prepare()
            _sync(args)  # finish the (asynchronous) preparation before the timer starts
            start = time.perf_counter()
            _sync(run(*args))
            samples[name].append(time.perf_counter() - start)
    return {name: float(np.median(v)) for name, v in samples.items()}


def ms(seconds: float | None) -> str:
    """Seconds as milliseconds for a table cell (``n/a`` for a missing measurement)."""
    return "n/a" if seconds is None else f"{1e3 * seconds:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    """``a / b`` as ``'2.5x'`` for a table cell (``n/a`` if either is missing)."""
    return "n/a" if a is None or b is None else f"{a / b:.1f}x"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table of ``header`` and ``rows`` (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> str:
    """A one-line description of this machine and the library versions."""
    cpu = platform.processor() or "unknown CPU"
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.*)", text).group(1)
    except (OSError, AttributeError):
        pass
    versions = f"jax {jax.__version__}"
    if torch is not None:
        versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    backend = jax.default_backend()
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}; {versions}; backend {backend}"


# ---------------------------------------------------------------------------------------------
# 1. GAAM layer vs the authors' package
# ---------------------------------------------------------------------------------------------


def _jax_mixture(case: dict):
    if case["kind"] == "block":
        module = GaussianBlock(case["axes"], case["heads"], case["gaussians"])
    else:
        module = MixtureGaussianAdaptiveAttention(
            num_heads=case["heads"], num_gaussians=case["gaussians"], axis=case["axis"]
        )
    x = jax.random.normal(jax.random.key(0), case["shape"])
    w = jax.random.normal(jax.random.key(1), case["shape"])
    params = module.init(jax.random.key(2), x)
    fwd = jax.jit(module.apply)
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(module.apply(p, x) * w), argnums=(0, 1)))
    return (lambda: (params, x), fwd), (lambda: (params, x), grad)


def _torch_mixture(case: dict, compiled: bool):
    if torch is None:
        return (None, None), (None, None)
    if case["kind"] == "block":
        n = len(case["axes"])
        module = TorchBlock(list(case["axes"]), list(case["heads"]), list(case["gaussians"]), n)
    else:
        module = TorchMulti(case["axis"], case["heads"], case["gaussians"])
    with torch.no_grad():  # well-conditioned scales, as the JAX side's log-normal init
        for name, p in module.named_parameters():
            if name.endswith(".c"):
                p.copy_(torch.exp(torch.randn_like(p)))
    x = torch.randn(case["shape"])
    w = torch.randn(case["shape"])
    fn = torch.compile(module) if compiled else module

    def forward(x):
        with torch.no_grad():
            return fn(x)

    def forward_backward(x):
        x = x.detach().requires_grad_()
        (fn(x) * w).sum().backward()
        module.zero_grad(set_to_none=True)
        return x.grad

    return (lambda: (x,), forward), (lambda: (x,), forward_backward)


def section_package(quick: bool, repeats: int, try_compile: bool) -> tuple[str, dict]:
    """GAAM mixture layer: ours vs the package, float32, forward and forward+backward."""
    s = 8 if quick else 1
    cases = [
        dict(name="(a) README", kind="block", shape=(10, 128), axes=(1, 1, 1), heads=(4, 4, 4),
             gaussians=(5, 5, 5)),
        dict(name="(b) decoder", kind="layer", shape=(32 // s, 24, 1024 // s), axis=1, heads=8,
             gaussians=1),
        dict(name="(b) decoder", kind="layer", shape=(32 // s, 24, 1024 // s), axis=1, heads=8,
             gaussians=4),
        dict(name="(c) long", kind="layer", shape=(8 // s, 8192 // s, 512 // s), axis=1, heads=8,
             gaussians=4),
    ]  # fmt: skip
    if quick:  # the smoke test: one case of each kind (the cost is compiling, not running)
        cases = [cases[0], cases[2]]
    for case in cases:
        shape = "x".join(map(str, case["shape"]))
        if case["kind"] == "block":
            case["name"] += f": {shape}, {len(case['axes'])} layers, {case['heads'][0]} heads, "
            case["name"] += f"{case['gaussians'][0]} Gaussians"
        else:
            case["name"] += f": {shape}, axis {case['axis']}, {case['heads']} heads, "
            case["name"] += f"{case['gaussians']} Gaussian{'s' * (case['gaussians'] > 1)}"
    rows, data = [], {}
    for case in cases:
        (jf, jfwd), (jb, jbwd) = _jax_mixture(case)
        (tf, tfwd), (tb, tbwd) = _torch_mixture(case, compiled=False)
        cand_f, cand_b = {"jax": (jf, jfwd)}, {"jax": (jb, jbwd)}
        if tfwd is not None:
            cand_f["torch"], cand_b["torch"] = (tf, tfwd), (tb, tbwd)
        compile_note = "not tried"
        if try_compile and torch is not None and case["kind"] == "layer" and case["gaussians"] == 4:
            try:
                (cf, cfwd), (cb, cbwd) = _torch_mixture(case, compiled=True)
                _sync(cfwd(*cf()))
                _sync(cbwd(*cb()))
                cand_f["torch.compile"], cand_b["torch.compile"] = (cf, cfwd), (cb, cbwd)
                compile_note = "ok"
            except Exception as err:  # noqa: BLE001 - report why the peer is missing
                compile_note = f"failed: {type(err).__name__}"
        fwd = compare(cand_f, repeats)
        bwd = compare(cand_b, repeats)
        data[case["name"]] = {
            "forward": fwd,
            "forward_backward": bwd,
            "torch_compile": compile_note,
        }
        if "torch.compile" in fwd:
            compiled = (
                f"{ratio(fwd['torch.compile'], fwd['jax'])} / "
                f"{ratio(bwd['torch.compile'], bwd['jax'])}"
            )
        else:
            compiled = compile_note
        rows.append([
            case["name"], ms(fwd.get("torch")), ms(fwd["jax"]),
            ratio(fwd.get("torch"), fwd["jax"]), ms(bwd.get("torch")), ms(bwd["jax"]),
            ratio(bwd.get("torch"), bwd["jax"]), compiled,
        ])  # fmt: skip
    header = ["case", "package fwd ms", "ours fwd ms", "speed-up", "package fwd+bwd ms",
              "ours fwd+bwd ms", "speed-up", "vs torch.compile (fwd / fwd+bwd)"]  # fmt: skip
    return table(header, rows), data


# ---------------------------------------------------------------------------------------------
# 2. Against the memory-bandwidth floor
# ---------------------------------------------------------------------------------------------


def _fusions(fn: Callable, *args) -> int:
    text = jax.jit(fn).lower(*args).compile().as_text()
    return len(re.findall(r"^\s*(?:ROOT\s+)?\S+ = \S+ fusion\(", text, flags=re.M))


def section_floor(quick: bool, repeats: int) -> tuple[str, dict]:
    """GAAM time divided by the time of one fused elementwise pass over the same array."""
    shape = (8, 1024, 64) if quick else (8, 8192, 512)
    heads = 8
    x = jax.random.normal(jax.random.key(0), shape)
    ct = jax.random.normal(jax.random.key(1), shape)
    delta, xi = jnp.zeros((heads, shape[-1])), jnp.full((heads, shape[-1]), 2.0)
    m, c = jnp.zeros((heads, 4)), jnp.ones((heads, 4))

    def paper(x):
        return F.gaussian_adaptive_attention(x, delta, xi, axis=1)

    def mixture(x):
        return F.mixture_gaussian_adaptive_attention(x, m, c, axis=1)

    def vjp(f):
        return lambda x, ct: jax.vjp(f, x)[1](ct)[0]

    def fresh():  # a new buffer for every donated call, made outside the timer
        return (x + 0.0,)

    def fresh2():
        return (x + 0.0, ct)

    cands = {
        "elementwise x*2": (fresh, jax.jit(lambda x: x * 2.0, donate_argnums=0)),
        "paper fwd": (fresh, jax.jit(paper, donate_argnums=0)),
        "paper fwd+bwd": (fresh2, jax.jit(vjp(paper), donate_argnums=0)),
        "mixture fwd": (fresh, jax.jit(mixture, donate_argnums=0)),
        "mixture fwd+bwd": (fresh2, jax.jit(vjp(mixture), donate_argnums=0)),
    }
    times = compare(cands, repeats)
    base = times["elementwise x*2"]
    gb = x.nbytes * 2 / 1e9  # bytes read + written by the elementwise pass
    fusions = {
        "paper fwd": _fusions(paper, x),
        "paper fwd+bwd": _fusions(vjp(paper), x, ct),
        "mixture fwd": _fusions(mixture, x),
        "mixture fwd+bwd": _fusions(vjp(mixture), x, ct),
    }
    rows = [["elementwise x*2 (floor)", ms(base), "1.0x", f"{gb / base:.1f} GB/s", "1"]]
    for name in ("paper fwd", "paper fwd+bwd", "mixture fwd", "mixture fwd+bwd"):
        rows.append([name, ms(times[name]), ratio(times[name], base), "", str(fusions[name])])
    text = f"Input {shape} float32 ({x.nbytes / 1e6:.0f} MB), gate over axis 1, {heads} heads.\n\n"
    text += table(["computation", "ms", "x floor", "bandwidth", "XLA fusions"], rows)
    return text, {"shape": shape, "times": times, "fusions": fusions}


# ---------------------------------------------------------------------------------------------
# 3. Scaling with length
# ---------------------------------------------------------------------------------------------


def _memory_bytes(fn: Callable, *args) -> int:
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def section_scaling(quick: bool, repeats: int, out_dir: pathlib.Path | None) -> tuple[str, dict]:
    """One GAAM layer vs dot-product MHA at width 512 (8 heads), batch 1, growing length."""
    import flax.linen as nn

    width, heads = (64, 4) if quick else (512, 8)
    lengths = [64, 128] if quick else [256, 1024, 4096, 16384]
    limit = 4e9  # bytes of working memory above which a candidate is analysed but not run
    mha = nn.MultiHeadDotProductAttention(num_heads=heads, qkv_features=width)
    results = {"gaam": {}, "flax_mha": {}, "jax_dpa": {}}
    rows = []
    for length in lengths:
        x = jax.random.normal(jax.random.key(0), (1, length, width))
        qkv = jax.random.normal(jax.random.key(1), (1, length, heads, width // heads))
        delta, xi = jnp.zeros((heads, width)), jnp.full((heads, width), 2.0)
        mha_params = mha.init(jax.random.key(2), x[:, :8], x[:, :8])
        fns = {
            "gaam": (
                lambda x, d=delta, s=xi: F.gaussian_adaptive_attention(x, d, s, axis=1),
                (x,),
            ),
            "flax_mha": (lambda x, p=mha_params: mha.apply(p, x, x), (x,)),
            "jax_dpa": (lambda q: jax.nn.dot_product_attention(q, q, q), (qkv,)),
        }
        cands, row = {}, [str(length)]
        for name, (fn, args) in fns.items():
            mem = _memory_bytes(fn, *args)
            results[name][length] = {"memory_bytes": mem}
            if mem < limit:
                cands[name] = (lambda args=args: args, jax.jit(fn))
        times = compare(cands, repeats)
        for name in fns:
            results[name][length]["seconds"] = times.get(name)
            row += [ms(times.get(name)), f"{results[name][length]['memory_bytes'] / 1e6:.1f}"]
        rows.append(row)
    header = [
        "length",
        "GAAM ms",
        "GAAM MB",
        "flax MHA ms",
        "flax MHA MB",
        "jax dpa ms",
        "jax dpa MB",
    ]
    text = (
        f"Width {width}, {heads} heads, batch 1. Memory: XLA's compiled temporary + output "
        f"buffers; runs needing over {limit / 1e9:.0f} GB are analysed, not run (n/a).\n\n"
        + table(header, rows)
    )
    if out_dir is not None:
        _plot_scaling(results, lengths, out_dir / "scaling.png")
        text += "\n\n![scaling](scaling.png)"
    return text, results


def _plot_scaling(results: dict, lengths: list[int], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"gaam": "GAAM (paper form)", "flax_mha": "flax MultiHeadDotProductAttention",
              "jax_dpa": "jax.nn.dot_product_attention"}  # fmt: skip
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for name, label in labels.items():
        t = [(n, results[name][n]["seconds"]) for n in lengths if results[name][n]["seconds"]]
        if t:
            ax_t.plot(*zip(*[(n, 1e3 * s) for n, s in t], strict=True), marker="o", label=label)
        ax_m.plot(
            lengths,
            [results[name][n]["memory_bytes"] / 1e6 for n in lengths],
            marker="o",
            label=label,
        )
    for ax, title, unit in ((ax_t, "time", "ms"), (ax_m, "working memory", "MB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# 4. The decoder's training step
# ---------------------------------------------------------------------------------------------


def _matmul_flops_per_second(repeats: int, n: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n))
    t = compare({"mm": (lambda: (a,), jax.jit(lambda a: a @ a))}, repeats)["mm"]
    return 2 * n**3 / t


def section_train_step(quick: bool, repeats: int) -> tuple[str, dict]:
    """Samples per second of a full decoder train step (GAAM front, AdamW)."""
    import optax

    batch, layers, d, classes = (4, 8, 64, 4) if quick else (32, 24, 1024, 4)
    side = int(np.sqrt(d))
    model = GaussianAdaptiveTransformer(num_classes=classes, num_heads=8 if not quick else 2)
    x = jax.random.normal(jax.random.key(0), (batch, layers, d))
    y = jnp.arange(batch) % classes
    params = model.init(jax.random.key(1), x)["params"]
    tx = optax.adamw(1e-4, weight_decay=0.01)

    def step(params, opt_state, x, y):
        def loss(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    jstep = jax.jit(step, donate_argnums=(0, 1))
    state = {"p": params, "o": tx.init(params)}

    def jax_run(x, y):
        state["p"], state["o"] = jstep(state["p"], state["o"], x, y)
        return state["p"]

    cands = {"jax": (lambda: (x, y), jax_run)}
    if torch is not None:
        net = PaperDecoder(layers, d, classes, 8 if not quick else 2, (side, d // side))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.01)
        tx_, ty_ = torch.randn(batch, layers, d), torch.arange(batch) % classes

        def torch_run(xb, yb):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(xb), yb).backward()
            opt.step()
            return None

        cands["torch"] = (lambda: (tx_, ty_), torch_run)
    times = compare(cands, repeats)
    cost = jax.jit(step).lower(params, tx.init(params), x, y).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0))
    peak = _matmul_flops_per_second(repeats, 256 if quick else 2048)
    rows = [
        ["ours (JAX, jit)", ms(times["jax"]), f"{batch / times['jax']:.0f}",
         f"{flops / times['jax'] / 1e9:.0f}", f"{100 * flops / times['jax'] / peak:.0f}%"],
        ["PyTorch (eager)", ms(times.get("torch")),
         "n/a" if "torch" not in times else f"{batch / times['torch']:.0f}", "", ""],
    ]  # fmt: skip
    text = (
        f"GaussianAdaptiveTransformer (GAAM front, {layers}x{d} inputs, conv 512, batch {batch}), "
        f"AdamW. Step FLOPs (XLA cost analysis): {flops / 1e9:.1f} GFLOP; measured float32 "
        f"matmul throughput: {peak / 1e9:.0f} GFLOP/s. Speed-up over PyTorch: "
        f"{ratio(times.get('torch'), times['jax'])}.\n\n"
        + table(["step", "ms", "samples/s", "GFLOP/s", "of matmul peak"], rows)
    )
    return text, {"times": times, "flops": flops, "matmul_flops_per_s": peak}


# ---------------------------------------------------------------------------------------------
# 5. bfloat16
# ---------------------------------------------------------------------------------------------


def section_bfloat16(quick: bool, repeats: int) -> tuple[str, dict]:
    """The paper-form layer on bfloat16 inputs: speed, and error against float32."""
    shapes = [(4, 24, 128), (2, 512, 64)] if quick else [(32, 24, 1024), (8, 8192, 512)]
    rows, data = [], {}
    for shape in shapes:
        x = jax.random.normal(jax.random.key(0), shape) * 3.0
        delta = 0.1 * jax.random.normal(jax.random.key(1), (8, shape[-1]))
        xi = 2.0 + 0.1 * jax.random.normal(jax.random.key(2), (8, shape[-1]))
        f = jax.jit(lambda x, d=delta, s=xi: F.gaussian_adaptive_attention(x, d, s, axis=1))
        xb = x.astype(jnp.bfloat16)
        times = compare({"f32": (lambda x=x: (x,), f), "bf16": (lambda xb=xb: (xb,), f)}, repeats)
        y32 = f(x)
        y_same_input = f(xb.astype(jnp.float32))
        yb = f(xb).astype(jnp.float32)
        scale = float(jnp.max(jnp.abs(y32)))
        err_compute = float(jnp.max(jnp.abs(yb - y_same_input))) / scale
        err_total = float(jnp.max(jnp.abs(yb - y32))) / scale
        data[str(shape)] = {"times": times, "err_compute": err_compute, "err_total": err_total}
        rows.append([str(shape), ms(times["f32"]), ms(times["bf16"]),
                     ratio(times["f32"], times["bf16"]), f"{err_compute:.1e}",
                     f"{err_total:.1e}"])  # fmt: skip
    header = ["input", "float32 ms", "bfloat16 ms", "speed-up", "max rel. error (same input)",
              "max rel. error (incl. input rounding)"]  # fmt: skip
    text = (
        "Errors are max |y_bf16 - y_f32| / max |y_f32|. 'Same input' feeds float32 the "
        "bf16-rounded input, so it measures the output rounding alone (statistics stay "
        "float32).\n\n" + table(header, rows)
    )
    return text, data


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Runs every section, prints the tables and writes them to ``--out``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run")
    parser.add_argument("--out", default=None, help="folder for results.md, results.json, plots")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 7)
    out = pathlib.Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    report = [
        f"# gaam_jax benchmarks\n\nMachine: {machine()}. Medians of {repeats} alternating "
        "repetitions.\n"
    ]
    data = {"machine": machine(), "repeats": repeats}
    sections = [
        ("1. GAAM mixture layer vs the authors' package (float32)",
         lambda: section_package(args.quick, repeats, not (args.quick or args.no_compile))),
        ("2. Against the memory-bandwidth floor", lambda: section_floor(args.quick, repeats)),
        ("3. Scaling with length: GAAM vs dot-product attention",
         lambda: section_scaling(args.quick, repeats, out)),
        ("4. The decoder's training step", lambda: section_train_step(args.quick, repeats)),
        ("5. bfloat16", lambda: section_bfloat16(args.quick, repeats)),
    ]  # fmt: skip
    for title, run in sections:
        start = time.perf_counter()
        text, section_data = run()
        block = f"## {title}\n\n{text}\n"
        print(block, flush=True)
        print(f"({time.perf_counter() - start:.0f} s)\n", flush=True)
        report.append(block)
        data[title] = section_data
    if out is not None:
        (out / "results.md").write_text("\n".join(report))
        (out / "results.json").write_text(json.dumps(data, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
