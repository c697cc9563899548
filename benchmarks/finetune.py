"""LoRA fine-tuning step: this project (JAX) vs transformers + peft (PyTorch), same weights, CPU.

Usage (in the benchmark venv, ``bash benchmarks/venv.sh``, which has torch, transformers, peft)::

    .bench-venv/bin/python -m benchmarks.finetune --out benchmarks/results   # MiniLM, Llama-100M
    .bench-venv/bin/python -m benchmarks.finetune --quick                    # tiny: a smoke test

The work: LoRA r=4 (alpha 16, peft's ``alpha / r``) on the query and value projections,
cross-entropy through the sequence-classification head, gradient clipping at norm 1 and AdamW
(lr 5e-4, weight decay 0.01) over the trained parameters (the LoRA matrices and the head: BERT's
pooler and classifier, Llama's ``score``), batch 8 of 128 tokens (one example half padding).

* ours: ``train.finetune.build_model`` of ``configs/finetune.py:lora_r4`` on the folder, and
  the jitted pure step ``train.steps.train_step`` of that ``FineTuneModel`` (its optimiser,
  ``FineTuneModel.optimizer``), the train state donated, the base weights an input;
* theirs: ``*ForSequenceClassification.from_pretrained`` of the same folder with every dropout
  probability 0 (config), ``peft.get_peft_model`` with ``LoraConfig(r=4, lora_alpha=16,
  target_modules=[q, v], lora_dropout=0, modules_to_save=[head])``, ``model.train()``,
  ``torch.optim.AdamW`` over the parameters that require grad, ``clip_grad_norm_(1.0)``, eager.

Both sides load one folder: a transformers model saved with ``save_pretrained`` (safetensors),
MiniLM (``all-MiniLM-L6-v2``, ``BertForSequenceClassification`` with a fresh 2-class classifier)
and a random Llama of about 100M parameters (hidden 768, 12 layers, 12 heads, mlp 2048,
vocab 32000, ``pad_token_id`` 0). The heads start from the same saved classifier, and LoRA's
``B`` starts at 0 on both sides, so the first step's losses must agree (the table's check).

Time: one process runs both, alternating repetition by repetition (rotating order,
:func:`benchmarks.run.compare`); medians; the ratio is theirs / ours (> 1: ours faster).

Memory, two numbers, each saying what it measures:

* ours, XLA: the compiled step's ``memory_analysis()``: argument + output + temporary bytes
  minus the bytes of outputs aliased to donated arguments, i.e. everything the step program
  holds at once on the device (base weights, state, batch, activations kept for the backward
  pass, gradients); and the temporaries alone.
* both, RSS growth: in a fresh subprocess per side, the resident-set high-water mark while
  three steps run, minus the resident set just before the first step (the model, inputs and,
  for ours, the compiled program already in memory; the peak is reset there through
  ``/proc/self/clear_refs``). glibc's ``MALLOC_MMAP_THRESHOLD_`` is pinned at 64 KiB in these
  subprocesses, so every large buffer (tensor or XLA buffer) is mapped and unmapped on
  allocation and free: the resident set follows the live bytes instead of glibc's cached free
  memory. It counts what a step adds over the loaded model: activations, gradients, optimiser
  moments (created in the first step on torch's side; part of ours' state before the baseline,
  but a few MB for LoRA), workspace.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

CLASSES = 2
MEMORY_STEPS = 3
LR, WEIGHT_DECAY, CLIP = 5e-4, 0.01, 1.0
RANK, ALPHA = 4, 16.0

# case -> (kind, transformers config kwargs or None for MiniLM, batch, tokens, description)
Case = tuple[str, dict | None, int, int, str]


def cases(quick: bool) -> dict[str, Case]:
    """The benchmark cases (``quick``: tiny random models, batch 2 of 16 tokens)."""
    if quick:
        bert = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, vocab_size=100, max_position_embeddings=32)  # fmt: skip
        llama = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, intermediate_size=128, vocab_size=128)  # fmt: skip
        return {
            "bert-tiny": ("bert", bert, 2, 16, "tiny BERT (32 wide, 2 layers)"),
            "llama-tiny": ("llama", llama, 2, 16, "tiny Llama (64 wide, 2 layers)"),
        }
    llama = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, intermediate_size=2048, vocab_size=32000)  # fmt: skip
    return {
        "minilm": ("bert", None, 8, 128, "MiniLM-L6 (384 wide, 6 layers)"),
        "llama-100m": ("llama", llama, 8, 128, "Llama 768 wide, 12 layers, mlp 2048"),
    }


def targets(kind: str) -> list[str]:
    """The query and value projections' names in transformers."""
    return ["query", "value"] if kind == "bert" else ["q_proj", "v_proj"]


def head_modules(kind: str) -> list[str]:
    """The head modules peft trains beside LoRA (ours trains every head parameter too)."""
    return ["pooler", "classifier"] if kind == "bert" else ["score"]


NO_DROPOUT = {
    "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0),
    "llama": dict(attention_dropout=0.0),
}


def write_model(case: Case, folder: pathlib.Path) -> int:
    """Saves the case's transformers classification model to ``folder``; returns its size."""
    import torch
    import transformers

    kind, kwargs, _, _, _ = case
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    if kwargs is None:  # MiniLM's weights, a fresh classifier
        from gaam_jax.encoders import bert

        model = transformers.BertForSequenceClassification.from_pretrained(
            bert.minilm_dir(), num_labels=CLASSES, **NO_DROPOUT["bert"]
        )
    else:
        cls = {"bert": transformers.BertConfig, "llama": transformers.LlamaConfig}[kind]
        # Llama pads with eos on both sides (our preprocessing's rule; the head reads it).
        extra = {"pad_token_id": 2, "eos_token_id": 2, "max_position_embeddings": 256}
        extra = extra if kind == "llama" else {}
        config = cls(**kwargs, **extra, **NO_DROPOUT[kind], num_labels=CLASSES)
        model = transformers.AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    if kind == "llama":  # build_model reads the pad id from the tokenizer's preprocessing
        _write_tokenizer(folder)
    return sum(p.numel() for p in model.parameters())


def _write_tokenizer(folder: pathlib.Path) -> None:
    """A three-word ``tokenizer.json`` (the inputs are token ids; nothing is tokenised)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


def make_inputs(case: Case, config: dict) -> dict[str, np.ndarray]:
    """Random token ids ``[batch, tokens]`` (the last example half padding), labels."""
    _, _, batch, tokens, _ = case
    rng = np.random.default_rng(0)
    pad = int(config.get("pad_token_id") or 0)
    mask = np.ones((batch, tokens), np.int32)
    mask[-1, tokens // 2 :] = 0
    ids = rng.integers(3, config["vocab_size"], (batch, tokens)).astype(np.int32)
    ids = np.where(mask == 1, ids, pad).astype(np.int32)
    labels = (np.arange(batch) % CLASSES).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# -- ours ----------------------------------------------------------------------------------------


def jax_side(folder: pathlib.Path, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """The jitted step of our ``FineTuneModel`` on ``folder``: run, loss, memory, counts."""
    import functools

    import jax
    import jax.numpy as jnp

    from train import config as config_lib
    from train import finetune
    from train import steps as steps_lib

    config = config_lib.load("configs/finetune.py:lora_r4")
    config.encoder.path = str(folder)
    config.batch_size = int(inputs["labels"].shape[0])
    config.optimizer.learning_rate, config.optimizer.weight_decay = LR, WEIGHT_DECAY
    config.optimizer.grad_clip = CLIP
    assert (config.adapters.lora_rank, config.adapters.lora_alpha) == (RANK, ALPHA)
    tokens = inputs["input_ids"].shape[1]
    example = {
        k: jax.ShapeDtypeStruct((1, tokens), jnp.int32) for k in ("input_ids", "attention_mask")
    }  # noqa: E501
    model = finetune.build_model(config, CLASSES, example)
    tx = model.optimizer(config.optimizer)
    state = steps_lib.create_state(model, tx, 0, example)
    step = functools.partial(
        steps_lib.train_step, model=model, tx=tx, loss_fn=steps_lib.losses.get(config.loss)
    )
    jitted = jax.jit(
        lambda frozen, state, batch: step(state, batch, frozen=frozen), donate_argnums=1
    )
    batch = {
        "x": {k: jnp.asarray(inputs[k]) for k in ("input_ids", "attention_mask")},
        "label": jnp.asarray(inputs["labels"]),
    }
    compiled = jitted.lower(model.frozen, state, batch).compile()
    ma = compiled.memory_analysis()
    held = {
        "argument": int(ma.argument_size_in_bytes),
        "output": int(ma.output_size_in_bytes),
        "temp": int(ma.temp_size_in_bytes),
        "alias": int(ma.alias_size_in_bytes),
    }
    held["total"] = held["argument"] + held["output"] + held["temp"] - held["alias"]
    box = {"state": state}

    def run() -> Any:
        box["state"], metrics = compiled(model.frozen, box["state"], batch)
        return metrics

    trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    head = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params["head"]))
    return {"run": run, "memory": held, "trained": trained, "trained_head": head}


# -- theirs --------------------------------------------------------------------------------------


def torch_side(folder: pathlib.Path, kind: str, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """The peft-adapted transformers model on ``folder``: ``run`` (one AdamW step), counts."""
    import peft
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, **NO_DROPOUT[kind]
    )
    lora = peft.LoraConfig(
        task_type=peft.TaskType.SEQ_CLS, r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
        target_modules=targets(kind), modules_to_save=head_modules(kind),
    )  # fmt: skip
    model = peft.get_peft_model(model, lora)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=LR, weight_decay=WEIGHT_DECAY)
    batch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items()}

    def run() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, CLIP)
        opt.step()
        return loss.detach()

    head = sum(
        p.numel() for n, p in model.named_parameters()
        if p.requires_grad and "lora_" not in n
    )  # fmt: skip
    return {"run": run, "trained": sum(p.numel() for p in trained), "trained_head": head}


# -- memory (one subprocess per side) ------------------------------------------------------------


def _status(field: str) -> int:
    """A ``/proc/self/status`` size field in bytes (``VmRSS``, ``VmHWM``)."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}.")


def memory_worker(side: str, folder: str, kind: str, inputs_file: str) -> dict[str, int]:
    """RSS growth over :data:`MEMORY_STEPS` steps of one side (run in a fresh subprocess)."""
    with np.load(inputs_file) as f:
        inputs = {k: f[k] for k in f.files}
    built = jax_side(pathlib.Path(folder), inputs) if side == "jax" else None
    if built is None:
        built = torch_side(pathlib.Path(folder), kind, inputs)
    baseline = _status("VmRSS")
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
    for _ in range(MEMORY_STEPS):
        out = built["run"]()
    if side == "jax":
        import jax

        jax.block_until_ready(out)
    peak = _status("VmHWM")
    return {"baseline": baseline, "peak": peak, "growth": peak - baseline}


def measure_memory(side: str, folder: pathlib.Path, kind: str, inputs_file: str) -> dict | None:
    """:func:`memory_worker` in a fresh interpreter (None where it fails, with the reason)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "benchmarks.finetune", "--memory-worker", side,
           str(folder), kind, inputs_file]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        print(f"memory worker {side} failed: {done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the table -----------------------------------------------------------------------------------


def _mb(n: float | None) -> str:
    if n is None:
        return "n/a"
    mb = n / 2**20
    return f"{mb:.0f}" if mb >= 10 else f"{mb:.1f}"


def run_case(name: str, case: Case, repeats: int, memory: bool) -> dict[str, Any]:
    """Times both sides on one case and measures their memory; returns the row's data."""
    import jax
    import torch

    from benchmarks.run import compare

    kind, _, batch, tokens, desc = case
    rss: dict[str, dict | None] = {"jax": None, "torch": None}
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / name
        size = write_model(case, folder)
        inputs = make_inputs(case, json.loads((folder / "config.json").read_text()))
        ours = jax_side(folder, inputs)
        theirs = torch_side(folder, kind, inputs)
        # Both heads start from the saved classifier and LoRA's B from 0: the same first loss.
        first = {"jax": float(ours["run"]()["loss"]), "torch": float(theirs["run"]())}
        times = compare(
            {"jax": (lambda: (), ours["run"]), "torch": (lambda: (), theirs["run"])}, repeats
        )
        counts = {
            side: {"trained": built["trained"], "trained_head": built["trained_head"]}
            for side, built in (("jax", ours), ("torch", theirs))
        }
        held = ours["memory"]
        del ours, theirs
        jax.clear_caches()
        if memory:
            np.savez(pathlib.Path(tmp) / "inputs.npz", **inputs)
            for side in rss:
                rss[side] = measure_memory(
                    side, folder, kind, str(pathlib.Path(tmp) / "inputs.npz")
                )
    return {
        "description": desc, "parameters": size, "batch": batch, "tokens": tokens,
        "seconds": times, "first_loss": first, "xla_memory": held, "rss": rss,
        "trained": counts, "torch_threads": torch.get_num_threads(),
    }  # fmt: skip


def table(results: dict[str, dict]) -> str:
    """The markdown table of :func:`run_case` results."""
    header = (
        "| model | batch x tokens | ours ms | transformers+peft ms | theirs / ours | "
        "ours XLA total MB | ours XLA temp MB | ours RSS growth MB | theirs RSS growth MB | "
        "trained params (ours / theirs) | first loss diff |\n" + "|---" * 11 + "|"
    )
    rows = [header]
    for name, r in results.items():
        t, mem, rss, n = r["seconds"], r["xla_memory"], r["rss"], r["trained"]
        growth = {k: None if v is None else v["growth"] for k, v in rss.items()}
        diff = abs(r["first_loss"]["jax"] - r["first_loss"]["torch"])
        rows.append(
            f"| {name}: {r['description']}, {r['parameters'] / 1e6:.1f}M | "
            f"{r['batch']} x {r['tokens']} | {1e3 * t['jax']:.0f} | {1e3 * t['torch']:.0f} | "
            f"{t['torch'] / t['jax']:.2f}x | {_mb(mem['total'])} | {_mb(mem['temp'])} | "
            f"{_mb(growth['jax'])} | {_mb(growth['torch'])} | "
            f"{n['jax']['trained']:,} / {n['torch']['trained']:,} | {diff:.1e} |"
        )
    return "\n".join(rows)


COLUMNS = """\
Columns: *ours ms* / *transformers+peft ms*: median milliseconds of one step (forward, backward,
clip, AdamW update), the two alternating in one process; *theirs / ours*: > 1 means ours is
faster. *ours XLA total*: the compiled step's ``memory_analysis()``, argument + output +
temporary bytes minus the outputs aliased to donated arguments (base weights, train state,
batch, and everything the step allocates); *ours XLA temp*: its temporaries alone (activations
kept for the backward pass, gradients, workspace). *RSS growth*: in a fresh subprocess per side
(glibc ``MALLOC_MMAP_THRESHOLD_=65536``, so freed large buffers leave the resident set), the
resident-set peak over 3 steps minus the resident set right before the first one (model and
inputs loaded, ours compiled); the same method on both sides. *trained params*: LoRA A/B
plus the head (BERT pooler + classifier, Llama score). *first loss diff*: |ours - theirs| of
the first step's loss (same weights; LoRA B = 0 on both sides). MB = 2^20 bytes.
"""


def report(results: dict[str, dict], machine: str, repeats: int) -> str:
    """The markdown of a run: settings, the table, what its columns measure."""
    intro = (
        f"Machine: {machine}. Medians of {repeats} alternating repetitions of one training "
        "step (LoRA r=4, alpha 16 on the query/value projections, AdamW lr 5e-4 wd 0.01, "
        "gradient clipping at 1, cross-entropy through the sequence-classification head; "
        "float32; dropout off on both sides)."
    )
    return f"{intro}\n\n{table(results)}\n\n{COLUMNS}"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``--memory-worker`` is the subprocess of one side)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--memory-worker"]:
        side, folder, kind, inputs_file = argv[1:5]
        print(json.dumps(memory_worker(side, folder, kind, inputs_file)))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.finetune")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--only", default=None, help="comma-separated case names")
    parser.add_argument("--no-memory", action="store_true", help="skip the RSS subprocesses")
    parser.add_argument("--out", default=None, help="folder for finetune.md and finetune.json")
    args = parser.parse_args(argv)
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError as err:
        print(f"needs torch, transformers and peft (bash benchmarks/venv.sh): {err}")
        return 1
    from benchmarks.run import machine

    repeats = args.repeats or (1 if args.quick else 7)
    chosen = cases(args.quick)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    start = time.perf_counter()
    results = {}
    for name, case in chosen.items():
        results[name] = run_case(name, case, repeats, memory=not args.no_memory)
        print(table({name: results[name]}).splitlines()[-1], flush=True)
    text = report(results, machine(), repeats)
    print("\n" + text + f"\n({time.perf_counter() - start:.0f} s)")
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        title = "# LoRA fine-tuning step: ours vs transformers + peft\n\n"
        (out / "finetune.md").write_text(title + text)
        data = {"machine": machine(), "repeats": repeats, "cases": results}
        (out / "finetune.json").write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
