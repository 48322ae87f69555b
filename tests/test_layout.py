"""The layout stays as README's "Layout" describes it: layers that import only downward, no import
circles between modules or packages, and every module importable on its own.

Imports are read from the source (every `import`, including those inside functions, since an
import moved into a function to break a circle is still a circle), so the check is fast and
needs none of the heavy libraries.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "tokenmill", "data_catalog", "tasks", "flows")

# Bottom to top. A module may import from a lower layer, or from its own package; the stage
# packages share a layer and never import one another. The longest matching prefix decides.
LAYERS = [
    ("model",),
    ("tokenmill",),  # config, errors, console, runtime, locks
    ("data_catalog",),
    ("tasks.core",),
    ("tasks.modeling",),
    ("tasks.run",),
    ("tasks.preprocess", "tasks.train", "tasks.evaluate", "tasks.registry", "tasks.gc", "tasks"),
    ("flows",),
    ("tokenmill.cli",),
]
# Logged with each registered model and run by MLflow with the model's code/ on sys.path, where
# `pyfunc_io` is a top-level module; never imported by tokenmill itself.
LOGGED_CODE = {"tasks.registry.lm_pyfunc", "tasks.registry.classifier_pyfunc"}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from its package upward
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def layer_of(name: str) -> tuple[int, str]:
    """(rank, package group) of a module: the longest prefix listed in LAYERS."""
    best = None
    for rank, groups in enumerate(LAYERS):
        for group in groups:
            if (name == group or name.startswith(group + ".")) and (best is None or len(group) > len(best[1])):
                best = (rank, group)
    assert best is not None, f"{name} is in no layer: add its package to LAYERS and README's layout"
    return best


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items() if name not in LOGGED_CODE}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle in `edges`, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_module_imports_only_downward_or_within_its_package():
    upward = []
    for name, targets in graph().items():
        rank, group = layer_of(name)
        for target in sorted(targets):
            t_rank, t_group = layer_of(target)
            if t_rank > rank or (t_rank == rank and t_group != group):
                upward.append(f"{name} -> {target}")
    assert not upward, "imports that reach up a layer or into a sibling stage:\n" + "\n".join(upward)


def test_no_import_circle_between_modules():
    found = cycle(graph())
    assert found is None, "import circle: " + " -> ".join(found)


def test_no_import_circle_between_packages():
    edges: dict[str, set[str]] = {}
    for name, targets in graph().items():
        group = layer_of(name)[1]
        edges.setdefault(group, set()).update(layer_of(t)[1] for t in targets if layer_of(t)[1] != group)
    found = cycle(edges)
    assert found is None, "package circle: " + " -> ".join(found)


def third_party(path: Path) -> set[str]:
    """Top-level names of everything a file imports that is not part of this project."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names - set(PACKAGES) - set(sys.stdlib_module_names) - {"__future__"}


@pytest.mark.parametrize(
    "prefix, allowed, banned",
    [
        ("model", {"torch"}, set()),  # the network imports torch and nothing else
        ("tasks.core", None, {"prefect", "mlflow", "torch"}),  # usable by Dask workers, ranks and servers alike
    ],
)
def test_the_lowest_layers_stay_light(prefix, allowed, banned):
    for name, path in modules().items():
        if name == prefix or name.startswith(prefix + "."):
            found = third_party(path)
            assert allowed is None or found <= allowed, f"{name} imports {sorted(found - allowed)}"
            assert not found & banned, f"{name} imports {sorted(found & banned)}"


def test_the_checks_see_an_upward_import_and_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("tasks.core.manifest") < layer_of("tasks.train.trainer") < layer_of("tokenmill.cli.train")
    assert layer_of("tokenmill.config")[0] < layer_of("data_catalog.loader")[0]


@pytest.mark.parametrize("name", sorted(set(modules()) - LOGGED_CODE - {"tokenmill.cli.__main__"}))
def test_every_module_imports_on_its_own(name):
    """Imported first, with no other project module loaded: no order-dependent import."""
    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if m.split(".")[0] in PACKAGES}
    try:
        importlib.import_module(name)
    finally:
        for m in [m for m in sys.modules if m.split(".")[0] in PACKAGES]:
            del sys.modules[m]
        sys.modules.update(saved)
