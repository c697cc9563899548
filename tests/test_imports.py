"""The import graph: no cycles among the project's modules, no use of another module's privates.

Read from the source with ``ast`` (nothing is imported). Every ``import`` statement counts,
including those inside functions: a lazy import defers a dependency, it does not remove it.
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``; a
module's parent packages are not edges (Python runs them first, but they are not what the
module depends on).
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterator

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("gaam_jax", "app", "data", "train", "benchmarks")


def _module_files() -> dict[str, pathlib.Path]:
    """``{dotted module name: file}`` of every module of :data:`PACKAGES`."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _module_files()


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The module ``from ... import`` reads, relative imports resolved."""
    if not node.level:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(module: str, tree: ast.AST) -> Iterator[tuple[ast.stmt, str, str | None]]:
    """``(statement, imported module, imported name or None)`` of every import statement."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            for alias in node.names:
                yield node, source, alias.name


def _edges(module: str, tree: ast.AST) -> set[str]:
    """The project modules that ``module`` imports."""
    out = set()
    for _, source, name in _imports(module, tree):
        if name is not None and f"{source}.{name}" in MODULES:
            out.add(f"{source}.{name}")
        elif source in MODULES:
            out.add(source)
    out.discard(module)
    return out


def _trees() -> dict[str, ast.AST]:
    return {m: ast.parse(p.read_text(), filename=str(p)) for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _private_uses(module: str, tree: ast.AST) -> list[str]:
    """``from x import _y`` and ``x._y`` (``x`` an imported module) in ``module``.

    A private module (``gaam_jax._validation``) is private to its package: its package's modules
    may import it.
    """
    where = MODULES[module].relative_to(ROOT) if module in MODULES else module
    out = []
    bound: dict[str, str] = {}  # local name -> the module it is bound to
    for node, source, name in _imports(module, tree):
        if name is None:  # import a.b (binds a) or import a.b as c (binds c to a.b)
            alias = next(a for a in node.names if a.name == source)
            if alias.asname:
                bound[alias.asname] = source
            else:
                bound[source.split(".")[0]] = source.split(".")[0]
            continue
        alias = next(a for a in node.names if a.name == name)
        target = f"{source}.{name}"
        if target in MODULES:
            bound[alias.asname or name] = target
            if _private(name) and not _inside(module, source):
                out.append(f"{where}:{node.lineno}: from {source} import {name}")
        elif _private(name) and source != module and source != "__future__":
            out.append(f"{where}:{node.lineno}: from {source} import {name}")
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _private(node.attr)):
            continue
        chain, value = [], node.value  # x.y._z: chain [x, y]
        while isinstance(value, ast.Attribute):
            chain.insert(0, value.attr)
            value = value.value
        if not isinstance(value, ast.Name) or value.id not in bound:
            continue
        owner = bound[value.id]
        for part in chain:  # every link up to the private name must be a module
            if f"{owner}.{part}" not in MODULES:
                break
            owner = f"{owner}.{part}"
        else:
            if owner != module and not (
                f"{owner}.{node.attr}" in MODULES and _inside(module, owner)
            ):
                out.append(f"{where}:{node.lineno}: {owner}.{node.attr}")
    return out


def test_no_import_cycles():
    trees = _trees()
    graph = {m: _edges(m, t) for m, t in trees.items()}
    assert graph["gaam_jax.encoders"], "the graph reads no imports: the test is broken"
    assert _cycles(graph) == []


def test_the_library_imports_no_application_package():
    """``gaam_jax`` is what ``pip install`` gives; ``app``, ``data`` and ``train`` run from the
    checkout, so the library must not import them (it writes URLs through epath itself)."""
    trees = _trees()
    graph = {m: _edges(m, t) for m, t in trees.items()}
    library = [m for m in graph if m.split(".")[0] == "gaam_jax"]
    assert "gaam_jax.adapters.peft" in library and "app.storage" in graph
    found = [(m, e) for m in library for e in graph[m] if e.split(".")[0] != "gaam_jax"]
    assert found == []


def test_no_module_uses_another_modules_private_names():
    trees = _trees()
    uses = [u for m, t in trees.items() for u in _private_uses(m, t)]
    assert uses == []


def test_the_checks_find_what_they_look_for():
    # A cycle, and each kind of private use, in a made-up graph and a made-up source.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    source = (
        "from __future__ import annotations\n"
        "from gaam_jax import __version__, _validation\n"  # a package-private module: allowed
        "from gaam_jax.encoders import beit\n"
        "from gaam_jax.encoders.beit import _init\n"
        "import gaam_jax.encoders.bert\n"
        "import numpy as np\n"
        "def f():\n"
        "    beit._init, gaam_jax.encoders.bert._part, beit.MODEL_TYPE, beit.__name__\n"
        "    np._core, _validation.COMPUTE_DTYPES, f._cache\n"
    )
    uses = _private_uses("gaam_jax.demo", ast.parse(source))
    assert sorted(u.split(": ", 1)[1] for u in uses) == [
        "from gaam_jax.encoders.beit import _init",
        "gaam_jax.encoders.beit._init",
        "gaam_jax.encoders.bert._part",
        "numpy._core",
    ]
    assert _private_uses("data.extract", ast.parse("from gaam_jax import _validation\n"))
