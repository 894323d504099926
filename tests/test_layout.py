"""The shape of the code (README "Layout"): the families are siblings (no family module imports another), the
packages import each other downwards only (../shared/DESIGN.md's rules), there is no import cycle, and no
function grows past ~60 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

SRC = ROOT / "src"
FAMILIES = ("transfer", "multi_teacher", "kdep", "zeroshot", "aft", "flips", "pretrain")
# package -> the packages it may import (besides itself and the top-level helpers in TOP: errors, io_utils, schema,
# entry, batch, seeding)
ALLOWED = {"metrics": set(), "data": set(), "models": set(), "engine": {"data", "models", "metrics"},
           "methods": {"models", "metrics"}, "tracking": {"plots", "metrics"}, "plots": set(),
           "experiments": {"data", "models", "methods", "engine", "metrics", "tracking", "plots"}}
TOP = {"errors", "io_utils", "schema", "entry", "batch", "seeding", "help"}


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """(imported module, line) of every `import` / `from ... import` in the file, relative ones made absolute."""
    mod = _module(path)
    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[:len(pkg) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            names = [name] + [f"{name}.{a.name}" for a in node.names]
            yield from ((n, node.lineno) for n in names if n.startswith("src"))
        elif isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names if a.name.startswith("src"))


def _graph():
    files = {_module(p): p for p in SRC.rglob("*.py")}
    # `from . import x` inside a package names the package too: that is not an edge to its __init__
    return files, {m: {i for i, _ in _imports(p) if i in files and not m.startswith(i + ".")}
                   for m, p in files.items()}


def test_no_family_imports_another():
    bad = []
    for fam in FAMILIES:
        path = SRC / "experiments" / f"{fam}.py"
        for name, line in _imports(path):
            other = name.split(".")
            if len(other) >= 3 and other[1] == "experiments" and other[2] in FAMILIES and other[2] != fam:
                bad.append(f"{path.name}:{line} imports {name}")
    assert not bad, bad


def test_packages_import_downwards_only():
    bad = []
    for path in SRC.rglob("*.py"):
        parts = _module(path).split(".")
        if len(parts) < 2 or parts[1] not in ALLOWED:
            continue
        for name, line in _imports(path):
            target = name.split(".")[1] if len(name.split(".")) > 1 else ""
            if target in (parts[1], *TOP) or target not in ALLOWED:
                continue
            if target not in ALLOWED[parts[1]]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({parts[1]}) imports {name}")
    assert not bad, bad


def test_no_import_cycle():
    files, graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, cycles


def test_the_engine_knows_no_configs():
    """src/engine reads no config (../shared/DESIGN.md): its caller names the method and the keys of its messages
    (`RunLabels`); nothing in it reads Hydra's state, walks a config tree, imports omegaconf or globs YAML files."""
    words = ("HydraConfig", "_get_root", "_get_full_key", "glob(", "omegaconf")
    bad = [f"{path.relative_to(ROOT)}:{i} {w}" for path in sorted((SRC / "engine").rglob("*.py"))
           for i, line in enumerate(path.read_text().splitlines(), 1) for w in words if w in line]
    assert not bad, bad


def test_the_shared_code_reads_no_run_config():
    """The walk of a run's config ends at the family's `run` and `run_context`: the shared code reads what setup
    took from it (`ctx.settings`), the families pass their own keys as arguments, and a Context holds no config."""
    from dataclasses import fields

    from src.experiments.context import Context

    assert "cfg" not in {f.name for f in fields(Context)}
    bad = [f"{path.relative_to(ROOT)}:{i}" for path in sorted(SRC.rglob("*.py"))
           for i, line in enumerate(path.read_text().splitlines(), 1) if "ctx.cfg" in line]
    assert not bad, bad


@pytest.mark.parametrize("limit", [60])
def test_no_function_over_sixty_lines(limit):
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
