"""The packages import one way: model <- index_builder <- service <- sbir (the CLI); model.ground, what
every stage shares, imports nothing of ours.

The graph is read from the source with `ast`, imports inside functions included (a deferred import
is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "index_builder", "service", "sbir")
LOWER = ("model", "index_builder", "service")  # none of them may import the CLI


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Our modules that `name` imports (the longest known prefix of each imported name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for imported in names:
            while imported and imported not in MODULES:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                found.add(imported)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component that has one (Tarjan), as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for component in components:  # walk inside the component back to its first node
        start = min(component)
        path, seen = [start], {start}
        while True:
            nxt = min(w for w in graph[path[-1]] if w in component)
            if nxt in seen:
                cycles.append(path[path.index(nxt):] + [nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return cycles


def _package_graph() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for name, targets in GRAPH.items():
        out[name.split(".")[0]] |= {t.split(".")[0] for t in targets} - {name.split(".")[0]}
    return out


def test_the_cycle_finder_finds_cycles_and_only_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"a"}}) == [["a", "a"]]


def test_the_graph_sees_deferred_and_relative_imports():
    assert "index_builder.faiss_index" in GRAPH["index_builder.snapshot"]  # imported inside functions only
    assert "model.ground.errors" in GRAPH["sbir.errors"]


def test_the_packages_import_one_way():
    assert _cycles(_package_graph()) == []


def test_the_ground_module_imports_nothing_of_ours():
    for name, targets in GRAPH.items():
        if name.startswith("model.ground"):
            assert {t for t in targets if not t.startswith("model.ground")} == set(), name


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_the_layers_below_it(package):
    below = set(PACKAGES[: PACKAGES.index(package)])
    assert _package_graph()[package] <= below


@pytest.mark.parametrize("package", LOWER)
def test_lower_layers_do_not_import_the_cli(package):
    offenders = sorted(
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if name.split(".")[0] == package
        for target in targets
        if target.split(".")[0] == "sbir"
    )
    assert offenders == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_cycle_inside_a_package(package):
    inside = {
        name: {t for t in targets if t.split(".")[0] == package}
        for name, targets in GRAPH.items()
        if name.split(".")[0] == package
    }
    assert _cycles(inside) == []
