"""The layout's promises (docs/architecture.md), read from the source: no import circle, the data and config
packages import only their own modules and ``mrpo.errors``, every name imported from its home module, and file and
function lengths within the limits or named in architecture.md."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "mrpo"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
FILE_LINES = 550
FUNCTION_LINES = 70


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, ast.Module]:
    return {
        module_name(path): ast.parse(path.read_text(encoding="utf-8")) for path in sorted(SRC.rglob("*.py"))
    }


def imported_modules(tree: ast.Module) -> set[str]:
    """Every ``mrpo`` module a module imports, at the top or inside a function (a lazy import is an arrow too)."""
    names = set(modules())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("mrpo.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("mrpo"):
            for alias in node.names:  # `from mrpo.data import pairs` imports the submodule
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in names else node.module)
    return {name for name in found if name in names and name != "mrpo"}


def import_graph() -> dict[str, set[str]]:
    graph = {name: imported_modules(tree) - {name} for name, tree in modules().items()}
    for name in graph:  # a package face is part of its modules' package, not an arrow out of it
        graph[name] = {target for target in graph[name] if not name.startswith(f"{target}.")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_lazy_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_has_no_circle():
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize("package", ["mrpo.data", "mrpo.config"])
def test_a_package_imports_only_itself_and_errors(package):
    outside = {
        name: sorted(
            target for target in targets if not target.startswith(package) and target != "mrpo.errors"
        )
        for name, targets in import_graph().items()
        if name == package or name.startswith(f"{package}.")
    }
    assert {name: targets for name, targets in outside.items() if targets} == {}


def defined_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def faces() -> dict[str, set[str]]:
    """Package faces (an ``__init__`` with ``__all__``) and the names they offer."""
    import importlib

    offered = {}
    for name, tree in modules().items():
        is_package = (SRC.parent / name.replace(".", "/") / "__init__.py").exists()
        if is_package and "__all__" in defined_names(tree):
            offered[name] = set(importlib.import_module(name).__all__)
    return offered


def test_every_name_is_imported_from_its_home():
    """``from mrpo.X import name``, in the package, its tests, bench and experiments, names the module that
    defines ``name`` (or a package face that offers it): no module passes on another's names."""
    trees = modules()
    offered = faces()
    wrong = []
    files = [p for d in ("src", "tests", "bench", "experiments") for p in sorted((ROOT / d).rglob("*.py"))]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("mrpo")
            ):
                continue
            if node.module not in trees:
                continue
            home = offered.get(node.module) or defined_names(trees[node.module])
            for alias in node.names:
                if alias.name not in home and f"{node.module}.{alias.name}" not in trees:
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} {alias.name} from {node.module}")
    assert wrong == []


def earned_lengths() -> str:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    match = re.search(r"^## Lengths\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    return match.group(1) if match else ""


def test_files_are_short_or_their_length_is_earned_in_architecture_md():
    earned = earned_lengths()
    long = [
        f"{path.relative_to(SRC.parent)} ({lines} lines)"
        for path in sorted(SRC.rglob("*.py"))
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > FILE_LINES
        and f"`{path.relative_to(SRC).as_posix()}`" not in earned
    ]
    assert long == []


def test_functions_are_short_or_their_length_is_earned_in_architecture_md():
    earned = earned_lengths()
    long = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > FUNCTION_LINES and f"`{node.name}`" not in earned:
                    long.append(f"{name}.{node.name} ({lines} lines)")
    assert long == []


def test_package_faces_are_light_and_offer_what_they_name():
    import importlib
    import subprocess
    import sys

    for package in faces():
        module = importlib.import_module(package)
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{package}.{name}"
    code = "import sys, mrpo.data, mrpo.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
