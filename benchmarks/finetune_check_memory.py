"""Peak host memory of checking a fine-tuning config on a ~2 GB Llama checkpoint.

Usage::

    .venv/bin/python -m benchmarks.finetune_check_memory [--mode cli|function] [--folder DIR]
        [--keep] [--out benchmarks/results/finetune_check_memory.json]

Writes (in a temporary folder, or ``--folder``) a Llama checkpoint of TinyLlama-1.1B's shape
(width 2048, MLP 5632, 22 layers, 32 heads over 4 KV heads, vocabulary 32000, untied
``lm_head``): 2.2 GB of bfloat16 safetensors in four shards with an index, written tensor by
tensor by repeating one 32 MiB block of pseudo-random values (the host never holds more),
plus a word-level ``tokenizer.json`` built as the tests build the tiny Llama fixture's
(``tests/model_folders.py``: that fixture ships none). :func:`check_checkpoint` verifies
the folder shapes-only. Then, each in a fresh subprocess, it measures the peak resident memory
(``ru_maxrss``) of:

* ``check``: the config check of a fine-tuning run of this checkpoint,
  ``configs/finetune.py:lora_r4,runlocal`` with ``encoder.path`` the folder. ``--mode cli``
  runs ``--command`` (default ``python -m train ... --check-only``; ``{python}``, ``{folder}``
  and ``{workdir}`` are filled in) and reads the command's peak from ``RUSAGE_CHILDREN`` of a
  wrapper process that runs nothing else; ``--mode function`` calls
  the check in the child, the config loaded as the CLI loads it (``train.config.load(spec,
  ["encoder.path=<folder>", *--override])``): ``train.finetune.check(config, workdir)`` where
  it exists (the check before it went shapes-only), else ``train.trainer.check`` (what
  ``--check-only`` runs).
* ``check_loaded`` (``--mode function``, ``train.trainer.check`` only): the same check with the
  fine-tuning model built from the weights (``finetune.build_model(abstract=False)``: float32
  ``from_pretrained``, as the config says), as the check read them before it went shapes-only.
* ``abstract``: ``gaam_jax.encoders.abstract_from_pretrained(folder)`` alone (shapes only);
* ``from_pretrained_bf16``: ``from_pretrained(folder, dtype=bfloat16)`` alone.

The datasets are the offline text datasets in ``out/data`` (``make features``), read from the
repository root. Every peak includes the Python, JAX and (for the check) TensorFlow-datasets
imports: ``baseline`` (a child that imports ``train.finetune``, loads the config and stops) gives
that floor.
The JSON has the checkpoint's bytes, each peak in MiB and its ratio to the checkpoint's size.
The checkpoint is deleted at the end unless ``--keep`` (or it was there before).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pathlib
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SPEC = "configs/finetune.py:lora_r4,runlocal"
DEFAULT_COMMAND = (
    "{python} -m train --config " + SPEC + " --config.encoder.path={folder} "
    "--workdir {workdir} --check-only"
)
CASES = ("baseline", "check", "check_loaded", "abstract", "from_pretrained_bf16")
SHARDS = 4
CHUNK = 1 << 24  # values generated and written at a time (32 MiB of bfloat16)
WORDS = (
    "the a of to in and for on is with it this that film movie story good bad not but "
    "as its by an be one are all from at has have his her you who more than so like"
).split()


def tinyllama_config() -> dict:
    """TinyLlama-1.1B's config.json (transformers 4 style, bfloat16)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
        "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False, "mlp_bias": False,
        "initializer_range": 0.02,
    }  # fmt: skip


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """``LlamaForCausalLM``'s state dict: name -> shape, in storage order."""
    d, ff, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,), p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q), p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
            p + "mlp.down_proj.weight": (d, ff),
        }  # fmt: skip
    shapes |= {"model.norm.weight": (d,), "lm_head.weight": (v, d)}
    return shapes


def _write_safetensors(path: pathlib.Path, shapes: dict[str, tuple[int, ...]], block) -> int:
    """One bfloat16 safetensors file written tensor by tensor, ``block`` repeated as the data."""
    import numpy as np

    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for shape in shapes.values():
            left = int(np.prod(shape))
            while left:
                n = min(left, block.size)
                f.write(block[:n].tobytes())
                left -= n
    return path.stat().st_size


def write_tokenizer(folder: pathlib.Path) -> None:
    """A word-level ``tokenizer.json`` that adds BOS as Llama-2's (ids far below 32000)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))


def write_checkpoint(folder: pathlib.Path) -> int:
    """Writes the checkpoint, tokenizer and index; returns the safetensors bytes."""
    import ml_dtypes
    import numpy as np

    config = tinyllama_config()
    shapes = tensor_shapes(config)
    folder.mkdir(parents=True, exist_ok=True)
    block = (0.02 * np.random.default_rng(0).standard_normal(CHUNK, np.float32)).astype(
        ml_dtypes.bfloat16
    )
    # Shards of about equal size, tensors in order.
    sizes = {k: int(np.prod(s)) for k, s in shapes.items()}
    per_shard, shards, current, filled = sum(sizes.values()) / SHARDS, [], {}, 0
    for name, shape in shapes.items():
        current[name] = shape
        filled += sizes[name]
        if filled >= per_shard * (len(shards) + 1) and len(shards) < SHARDS - 1:
            shards.append(current)
            current = {}
    shards.append(current)
    weight_map, total = {}, 0
    for i, part in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += _write_safetensors(folder / file, part, block)
        weight_map |= dict.fromkeys(part, file)
    index = {"metadata": {"total_size": 2 * sum(sizes.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    write_tokenizer(folder)
    return total


def _rss_now() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _maxrss(who: int) -> int:
    """``ru_maxrss`` in bytes (kilobytes on Linux)."""
    return resource.getrusage(who).ru_maxrss * 1024


def _overrides(args: argparse.Namespace) -> list[str]:
    return [f"encoder.path={args.folder}", *args.override]


def _load_config(folder: str, overrides: list[str]):
    from train import config as config_lib  # as python -m train loads --config and overrides

    return config_lib.load(SPEC, [f"encoder.path={folder}", *overrides])


def _check_function(config, workdir: pathlib.Path, loaded: bool) -> str:
    """The CLI's config check, called in this process; returns what was called.

    ``train.finetune.check`` where it exists (the check before it went shapes-only), else
    ``train.trainer.check`` (what ``python -m train --check-only`` runs). ``loaded``: the
    latter with the fine-tuning model built from the weights (``build_model(abstract=False)``,
    ``from_pretrained`` in the config's dtype), as the check before the change built it.
    """
    from train import finetune

    if hasattr(finetune, "check"):
        if loaded:
            raise ValueError("check_loaded needs train.trainer.check; use the case check.")
        finetune.check(config, workdir)
        return "train.finetune.check(config, workdir)"
    from train import trainer

    if not loaded:
        trainer.check(config, workdir)
        return "train.trainer.check(config, workdir)"
    build = finetune.build_model
    finetune.build_model = lambda *a, abstract=False, **k: build(*a, **k)  # weights read
    try:
        trainer.check(config, workdir)
    finally:
        finetune.build_model = build
    return "train.trainer.check(config, workdir) with finetune.build_model(abstract=False)"


def child(case: str, args: argparse.Namespace) -> dict:
    """Runs one case in this (fresh) process; returns its figures (bytes, seconds)."""
    out: dict = {"case": case}
    start = time.perf_counter()
    if case == "check" and args.mode == "cli":
        with tempfile.TemporaryDirectory(prefix="gaam-check-") as tmp:
            command = args.command.format(
                python=shlex.quote(sys.executable),
                folder=shlex.quote(args.folder),
                workdir=shlex.quote(str(pathlib.Path(tmp) / "workdir")),
            )
            run = subprocess.run(
                shlex.split(command), cwd=REPO, capture_output=True, text=True, check=False
            )
        out |= {"command": command, "returncode": run.returncode, "peak": _maxrss(-1)}
        out["output_tail"] = (run.stdout + run.stderr).strip().splitlines()[-5:]
        out["seconds"] = time.perf_counter() - start
        return out
    import jax
    import jax.numpy as jnp

    if case in ("baseline", "check", "check_loaded"):
        for name in ("train.finetune", "train.trainer"):  # what the check imports
            if importlib.util.find_spec(name) is not None:
                importlib.import_module(name)

        config = _load_config(args.folder, args.override)
        jax.devices()
        out["rss_before"] = _rss_now()
        if case != "baseline":
            with tempfile.TemporaryDirectory(prefix="gaam-check-") as tmp:
                out["command"] = _check_function(
                    config, pathlib.Path(tmp) / "workdir", loaded=case == "check_loaded"
                )
            out["command"] += f" on train.config.load({SPEC!r}, {_overrides(args)!r})"
    else:
        from gaam_jax.encoders import abstract_from_pretrained, from_pretrained

        jax.devices()
        out["rss_before"] = _rss_now()
        if case == "abstract":
            enc = abstract_from_pretrained(args.folder)
        elif case == "from_pretrained_bf16":
            enc = from_pretrained(args.folder, dtype=jnp.bfloat16)
        else:
            raise ValueError(f"unknown case {case!r}; one of {CASES}.")
        out["param_bytes"] = sum(enc.bytes_per_device().values())
    out["seconds"] = time.perf_counter() - start
    out["returncode"] = 0
    out["peak"] = _maxrss(resource.RUSAGE_SELF)
    return out


def _measure(case: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.finetune_check_memory", "--child", case]
    cmd += ["--folder", args.folder, "--mode", args.mode, "--command", args.command]
    for item in args.override:
        cmd += ["--override", item]
    try:
        run = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, check=False, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        return {"case": case, "returncode": None, "error": f"timed out after {args.timeout} s"}
    lines = run.stdout.strip().splitlines()
    if run.returncode or not lines:
        tail = (run.stdout + run.stderr).strip().splitlines()[-5:]
        return {"case": case, "returncode": run.returncode, "error": tail}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.finetune_check_memory")
    parser.add_argument("--mode", choices=("cli", "function"), default="cli")
    parser.add_argument("--command", default=DEFAULT_COMMAND, help="--mode cli's command")
    parser.add_argument("--folder", default=None, help="default: a temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint written")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--override", action="append", default=[], help="key=value (config)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks/results/finetune_check_memory.json")
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0

    made = tempfile.mkdtemp(prefix="gaam-tinyllama-") if args.folder is None else None
    folder = pathlib.Path(args.folder or made)
    args.folder = str(folder)
    wrote = not (folder / "config.json").exists()
    try:
        if wrote:
            print(f"writing a TinyLlama-shaped bfloat16 checkpoint to {folder} ...", flush=True)
            start = time.perf_counter()
            write_checkpoint(folder)
            print(f"  {time.perf_counter() - start:.0f} s", flush=True)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        check = subprocess.run(
            [sys.executable, "-c", "import sys; from gaam_jax.encoders.loading import "
             "check_checkpoint as c; c(sys.argv[1])", str(folder)],
            cwd=REPO, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if check.returncode:
            raise SystemExit(f"check_checkpoint failed: {check.stderr.strip()}")
        mib = lambda n: n / 2**20  # noqa: E731
        print(f"checkpoint: {mib(size):.0f} MiB of safetensors; check_checkpoint passes\n")
        print("| case | peak RSS (MiB) | / checkpoint | RSS before (MiB) | s | rc |")
        print("|---|---|---|---|---|---|")
        results = {}
        for case in args.cases.split(","):
            r = _measure(case, args)
            if "peak" in r:
                r["peak_rss_mib"] = round(mib(r["peak"]), 1)
                r["peak_over_checkpoint"] = round(r["peak"] / size, 3)
            results[case] = r
            before = f"{mib(r['rss_before']):.0f}" if "rss_before" in r else "-"
            print(
                f"| {case} | {r.get('peak_rss_mib', '-')} | {r.get('peak_over_checkpoint', '-')} "
                f"| {before} | {r.get('seconds', 0):.1f} | {r.get('returncode')} |",
                flush=True,
            )
            if r.get("error") or r.get("returncode"):
                print(f"  {r.get('error') or r.get('output_tail')}", flush=True)
        report = {
            "what": "peak RSS of a fine-tuning config check on a TinyLlama-shaped checkpoint",
            "mode": args.mode,
            "config": SPEC,
            "overrides": args.override,
            "checkpoint": {
                "bytes": size,
                "mib": round(mib(size), 1),
                "shape": "TinyLlama-1.1B, bfloat16, 4 shards",
            },
            "cases": results,
            "python": sys.version.split()[0],
            "machine": f"{os.cpu_count()} CPUs",
        }
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {out}")
    finally:
        if wrote and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
