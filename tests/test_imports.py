"""model/ imports one way: its module graph, read with `ast` (imports inside functions count, since
deferring an import does not remove the dependency), has no cycle."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The one edge that still closes a cycle (model.backbones -> model.quantize -> model.backbones):
# quantize.calibrate_dataset, the driver of `sbir calibrate`, builds a backbone. It belongs above both
# (in model/commands.py or a module of its own, with commands.py importing it from there); that move
# touches files outside this change, so the edge is named here, and a test below fails once it is gone.
KNOWN_CYCLE_EDGES = {("model.quantize", "model.backbones")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """Modules of `modules` that an import statement loads (a submodule loads its parent packages too)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        names = [base] + [f"{base}.{a.name}" for a in node.names]
    out = set()
    for name in names:
        parts = name.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules
    return out


def import_graph(package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports, anywhere in its file."""
    files = {_module_name(p): p for p in (ROOT / package).rglob("*.py")}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                deps |= _targets(node, name, is_package, modules)
        # a module's own parent packages are loaded before it: importing them is no cycle
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph as a path [a, b, ..., a]; [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_cycle_finder_finds_cycles_and_only_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"d": {"a"}, "a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_the_graph_sees_deferred_relative_and_package_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import x\n")
    (pkg / "sub" / "leaf.py").write_text("x = 1\n")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import y\n")
    (pkg / "b.py").write_text("from pkg import a\nimport pkg.sub.leaf\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    graph = import_graph("pkg")
    assert graph["pkg.a"] == {"pkg.b"}  # a module's own parent package is not an edge
    assert graph["pkg.b"] == {"pkg.a", "pkg.sub", "pkg.sub.leaf"}
    assert graph["pkg.sub"] == {"pkg.sub.leaf"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


def test_model_imports_are_acyclic():
    graph = import_graph("model")
    assert "model.backbones" in graph and "model.data.emoji" in graph  # the graph covers model/ and model/data/
    for src, dst in KNOWN_CYCLE_EDGES:
        graph[src] = graph[src] - {dst}
    assert find_cycle(graph) == []


def test_the_known_cycle_edges_still_exist():
    """Once calibrate_dataset leaves model.quantize, drop its edge from KNOWN_CYCLE_EDGES."""
    graph = import_graph("model")
    assert all(dst in graph[src] for src, dst in KNOWN_CYCLE_EDGES)
