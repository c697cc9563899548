"""How far the main job's config travels: the project files a newcomer follows it through.

Runs ``python -m train --config <config> --workdir <tmp>`` in this process under a profiler
hook and records, for every Python call in the project's own files (``app``, ``data``,
``gaam_jax``, ``train``), whether the call's arguments hold the job's config (the
``ConfigDict`` itself or one of its sections). The sequence of files those calls are in is
the config's path. Reported:

* ``files``: the distinct files on the path (listed);
* ``visits``: how many times the path enters a file (a stay is consecutive calls in one file);
* ``returns``: visits to a file the path had already left once;
* ``train_import_depth``: the longest chain of imports between ``train/`` modules (an import
  *floor* per module on the chain), read from the source with ``ast``;
* ``trainer_lines``: the length of the trainer module, when it exists.

The measurement depends only on the code, not on timing: run it in two checkouts (with the
same venv) to compare them::

    python -m benchmarks.config_path --config configs/default.py:runlocal
"""

from __future__ import annotations

import argparse
import ast
import json
import pathlib
import sys
import tempfile

ROOT = pathlib.Path.cwd()
PACKAGES = ("app", "data", "gaam_jax", "train")


def _project_file(filename: str) -> str | None:
    path = pathlib.Path(filename)
    try:
        rel = path.resolve().relative_to(ROOT)
    except ValueError:
        return None
    return str(rel) if rel.parts and rel.parts[0] in PACKAGES else None


def config_path(argv: list[str]) -> list[str]:
    """The files of the calls that receive the config, in call order."""
    import ml_collections

    from train import __main__ as cli

    seen: list[str] = []
    names: dict[str, str | None] = {}

    def holds_config(frame) -> bool:
        code = frame.f_code
        for name in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]:
            if isinstance(frame.f_locals.get(name), ml_collections.ConfigDict):
                return True
        return False

    def profile(frame, event, arg):
        if event != "call":
            return
        filename = frame.f_code.co_filename
        if filename not in names:
            names[filename] = _project_file(filename)
        rel = names[filename]
        if rel is not None and holds_config(frame):
            seen.append(rel)

    sys.setprofile(profile)
    try:
        code = cli.main(argv)
    finally:
        sys.setprofile(None)
    if code != 0:
        raise SystemExit(f"python -m train exited {code}")
    return seen


def summary(seen: list[str]) -> dict:
    """Distinct files, visits (stays) and returns of a path."""
    visits, left, returns = [], set(), 0
    for f in seen:
        if visits and visits[-1] == f:
            continue
        if visits:
            left.add(visits[-1])
        returns += f in left
        visits.append(f)
    return {"files": sorted(set(seen)), "visits": len(visits), "returns": returns}


def import_depth(package: str = "train") -> tuple[int, list[str]]:
    """The longest import chain between ``package``'s modules (top-level and lazy imports)."""
    modules = {p.stem: p for p in (ROOT / package).glob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if parts[0] == package and len(parts) == 2 and parts[1] in modules:
                    edges[name].add(parts[1])
                elif node.module == package:
                    edges[name].update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    parts = a.name.split(".")
                    if parts[0] == package and len(parts) == 2 and parts[1] in modules:
                        edges[name].add(parts[1])
    memo: dict[str, list[str]] = {}

    def longest(m: str, stack: tuple = ()) -> list[str]:
        if m in memo:
            return memo[m]
        best = [m]
        for n in edges[m] - {m}:
            if n not in stack:
                chain = [m, *longest(n, (*stack, m))]
                best = max(best, chain, key=len)
        memo[m] = best
        return best

    chain = max((longest(m) for m in modules), key=len)
    return len(chain), chain


def main() -> None:
    """Measures the config path and prints (and optionally writes) the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.py:runlocal")
    parser.add_argument("--out", default=None, help="JSON file for the numbers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        seen = config_path(["--config", args.config, "--workdir", f"{tmp}/w", "--no-progress"])
    found = summary(seen)
    depth, chain = import_depth()
    trainer = ROOT / "train" / "trainer.py"
    found |= {
        "config": args.config,
        "train_import_depth": depth,
        "train_import_chain": chain,
        "trainer_lines": len(trainer.read_text().splitlines()) if trainer.exists() else None,
    }
    print(json.dumps(found, indent=1))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(found, indent=1) + "\n")


if __name__ == "__main__":
    main()
