"""Converts a model folder's PyTorch ``.bin`` weights to safetensors, in place, once.

Usage::

    pip install 'gaam-jax[convert]'          # torch + safetensors, needed only here
    python -m gaam_jax.encoders.convert FOLDER

``pytorch_model.bin`` becomes ``model.safetensors``; sharded ``pytorch_model-0000x-of-0000y.bin``
with ``pytorch_model.bin.index.json`` become ``model-0000x-of-0000y.safetensors`` with
``model.safetensors.index.json``. One shard is in memory at a time. The ``.bin`` files are left
where they are (delete them once the folder loads). This module imports nothing from the rest
of the project, so it also runs as a plain script in an environment without JAX.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


def _safe_name(bin_name: str) -> str:
    # pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors
    stem = bin_name.removesuffix(".bin")
    stem = (
        "model" + stem.removeprefix("pytorch_model") if stem.startswith("pytorch_model") else stem
    )
    return stem + ".safetensors"


def _convert_file(src: pathlib.Path, dst: pathlib.Path, torch, save_file) -> list[str]:
    state = torch.load(src, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and len(state) <= 3:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{src} does not hold a state dict (got {type(state).__name__}).")
    # safetensors refuses tensors that share storage (tied weights): give each its own copy.
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items() if torch.is_tensor(v)}
    tmp = dst.with_name(f".{dst.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(dst)  # a half-written file is never mistaken for a converted one
    return list(tensors)


def convert(folder: str | pathlib.Path) -> list[pathlib.Path]:
    """Writes safetensors next to the PyTorch weights of ``folder``.

    Args:
      folder: a Hugging Face model folder with ``pytorch_model.bin`` or sharded ``.bin`` files
        and ``pytorch_model.bin.index.json``.

    Returns:
      The files written.

    Raises:
      FileNotFoundError: the folder or its ``.bin`` weights do not exist.
      ImportError: torch or safetensors is not installed (one line naming the fix).
    """
    folder = pathlib.Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist.")
    if not (folder / BIN).is_file() and not (folder / BIN_INDEX).is_file():
        raise FileNotFoundError(f"{folder} has neither {BIN} nor {BIN_INDEX}: nothing to convert.")
    try:
        import torch
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError(
            "converting .bin weights needs torch and safetensors: pip install 'gaam-jax[convert]'"
        ) from None
    if (folder / BIN).is_file():
        _convert_file(folder / BIN, folder / SAFE, torch, save_file)
        return [folder / SAFE]
    index = json.loads((folder / BIN_INDEX).read_text())
    weight_map = index["weight_map"]
    written, new_map = [], {}
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            raise FileNotFoundError(f"{folder / shard} (named by {BIN_INDEX}) does not exist.")
        target = folder / _safe_name(shard)
        names = _convert_file(folder / shard, target, torch, save_file)
        new_map.update(dict.fromkeys(names, target.name))
        written.append(target)
    missing = sorted(set(weight_map) - set(new_map))
    if missing:
        raise ValueError(f"{BIN_INDEX} names {missing[0]!r}, which no shard holds.")
    out = {"metadata": index.get("metadata", {}), "weight_map": new_map}
    (folder / SAFE_INDEX).write_text(json.dumps(out, indent=2))
    return [*written, folder / SAFE_INDEX]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: a user error is one line ``error: ...`` and exit 2.

    ``--debug`` shows the traceback instead (the convention of the project's commands).
    """
    parser = argparse.ArgumentParser(
        prog="python -m gaam_jax.encoders.convert", description=__doc__.split("\n")[0]
    )
    parser.add_argument("folder", help="Hugging Face model folder with PyTorch .bin weights")
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one line")
    parser.error = lambda message: parser.exit(  # one line, as every command of the project
        2, f"error: {' '.join(message.split())} (see {parser.prog} --help)\n"
    )
    args = parser.parse_args(argv)
    try:
        for path in convert(args.folder):
            print(f"wrote {path}")
    except (FileNotFoundError, ImportError, ValueError) as err:
        if args.debug:
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
