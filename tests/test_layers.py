"""The import graph of the installed package, lazy imports (inside functions) included: no cycles,
and the layers point one way.

    llama2_onnx.errors, llama2_onnx.files                      leaves
    models  <-  runtime (core)  <-  export  <-  assets (the default model)
    runtime's user-facing APIs and CLIs (cli_*), serve, benchmarks, the top-level entry points  on top

runtime's core never reaches export (nor assets, which exports the default model on first use),
and nothing in runtime, export or models imports serve or benchmarks; benchmarks do not import
serve (they run it as a process). runtime/__init__ imports nothing at import time.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

PACKAGES = ("llama2_onnx", "llama2_onnx.models", "llama2_onnx.export", "llama2_onnx.runtime",
            "llama2_onnx.benchmarks", "llama2_onnx.serve")


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for folder in importlib.util.find_spec(pkg).submodule_search_locations:
            for f in Path(folder).glob("*.py"):
                found[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that `name` imports anywhere in its source (a package's own
    __init__ is not counted for `from . import x`: Python imports it first anyway)."""
    is_pkg = path.stem == "__init__"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[:len(name.split(".")) - node.level + is_pkg]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" for a in node.names] + ([base] if node.module else [])
        else:
            continue
        out |= {t for t in targets if t in MODULES and t != name}
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _reach(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _is_core(name: str) -> bool:
    """runtime's core: every runtime module but the CLIs (cli_*), which sit above it."""
    return name.startswith("llama2_onnx.runtime") and not name.rsplit(".", 1)[-1].startswith("cli")


def test_the_walk_sees_the_package():
    assert {"llama2_onnx.runtime.session", "llama2_onnx.serve.app", "llama2_onnx.export.api"} <= set(MODULES)
    assert "llama2_onnx.runtime.session" in GRAPH["llama2_onnx.runtime.generator"]


def test_no_import_cycles():
    cycles = sorted(name for name in GRAPH if name in _reach(name))
    assert not cycles, f"modules on import cycles: {cycles}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _is_core(n) or n.startswith("llama2_onnx.models")))
def test_runtime_core_and_models_never_reach_export_serve_or_benchmarks(name):
    bad = {m for m in _reach(name) if m.startswith(("llama2_onnx.export", "llama2_onnx.serve", "llama2_onnx.benchmarks"))
           or m in ("llama2_onnx.assets", "llama2_onnx.entry", "llama2_onnx.cli")}
    assert not bad, f"{name} reaches {sorted(bad)}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith(("llama2_onnx.export", "llama2_onnx.benchmarks",
                                                                             "llama2_onnx.runtime"))))
def test_nothing_below_serve_imports_it(name):
    assert not {m for m in GRAPH[name] if m.startswith("llama2_onnx.serve")}


def test_runtime_init_is_light():
    assert GRAPH["llama2_onnx.runtime"] == set()
