"""The package's layout: one subpackage per pipeline stage, data flowing downward, no
import circles, and an engine that loads without torch, the CLI or Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pyneuron

PACKAGE = Path(pyneuron.__file__).resolve().parent

#: What each part may import (besides itself, the standard library and third parties).
ALLOWED = {
    "errors": set(),
    "progress": set(),
    "image_files": {"errors"},
    "weights": set(),
    "devices": {"errors"},
    "presets": {"errors"},
    "engine": {"errors", "progress"},
    "scale": {"engine", "errors", "progress"},
    "concepts": {"engine", "scale", "image_files", "errors", "progress", "weights", "devices"},
    "model": {
        "engine",
        "scale",
        "concepts",
        "image_files",
        "errors",
        "progress",
        "weights",
        "devices",
        "presets",
    },
    "describe": {"model", "engine", "image_files", "errors", "progress"},
    "report": {"describe", "engine", "errors", "progress"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if "_bench" in path.parts:  # the benchmark scripts shipped with the package
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (lazy imports inside functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            folder = PACKAGE.parent.joinpath(*module.split("."))
            for alias in node.names:
                if f"{module}.{alias.name}" in modules:
                    found.add(f"{module}.{alias.name}")
                elif any(folder.glob(f"{alias.name}.*")):
                    continue  # a compiled submodule (the engine's _core)
                elif module in modules:
                    found.add(module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert circles == []


def test_each_part_imports_only_the_parts_below_it():
    wrong = []
    for module, targets in _graph().items():
        part = _part(module)
        if part not in ALLOWED:
            continue
        for target in targets:
            other = _part(target)
            if other != part and other not in ALLOWED[part]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_no_module_takes_another_modules_private_names():
    modules = _modules()
    taken = []
    for name, path in modules.items():
        in_engine = name == "pyneuron.engine" or name.startswith("pyneuron.engine.")
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if not (node.level or (node.module or "").startswith("pyneuron")):
                continue
            if not in_engine and "_native" in (node.module or ""):
                taken.append(f"{name}: {node.module}")
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                allowed = alias.name == "_core" or (in_engine and alias.name == "_native")
                if private and not allowed:
                    taken.append(f"{name}: {alias.name}")
    assert taken == []
    importers = [name for name, path in modules.items() if "import _core" in path.read_text()]
    assert importers == ["pyneuron.engine._native"], "only _native imports the compiled core"


def test_the_engine_loads_without_torch_the_cli_or_ray():
    heavy = ("torch", "typer", "jinja2", "matplotlib", "ray", "transformers")
    code = (
        "import sys, pyneuron.engine.search, pyneuron.engine.store, pyneuron.engine.heldout, "
        "pyneuron.engine.null; "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "", f"the engine imported {done.stdout.strip()}"


def test_no_module_outside_the_engine_reads_private_attributes():
    """Other parts use the engine's public API (e.g. ``MaskSet.arrays``), not its insides."""
    found = []
    for name, path in _modules().items():
        if name == "pyneuron.engine" or name.startswith("pyneuron.engine."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if private and not own:
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert found == []
