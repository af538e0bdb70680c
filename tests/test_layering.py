"""The installed package's import graph: no cycles, and nothing imports a layer above its own.

The folders are the layers, bottom to top:

    foundation  rosafx.errors, rosafx.io (reading inputs, atomic writes, what may be overwritten)
    core        rosafx.graph, rosafx.methods, rosafx.ops, rosafx.kernels
    passes      rosafx.passes (GraphModule -> GraphModule)
    pipeline    rosafx.pipeline (transform, capture in parts, adapter files: rosafx and HF PEFT)
    api         rosafx.api
    training    rosafx.training (fit, life cycles, checkpoints, RUN directories, distributed)
    face        rosafx (the package's __init__: what ``import rosafx`` gives)
    recipes     rosafx.recipes (task models, data, evaluation, the demo)
    cli         rosafx.cli, rosafx.__main__

Imports are read with ``ast`` from the installed files, at any depth (an import inside a
function is an edge like any other), so a lazy import cannot hide a cycle.
"""
import ast
import importlib.util
from pathlib import Path

import pytest

PACKAGES = ["rosafx", "rosafx.io", "rosafx.graph", "rosafx.methods", "rosafx.ops", "rosafx.kernels", "rosafx.passes",
            "rosafx.pipeline", "rosafx.training", "rosafx.recipes", "rosafx.recipes.data", "rosafx.cli"]
LAYERS = (
    ("foundation", ("rosafx.errors", "rosafx.io")),
    ("core", ("rosafx.graph", "rosafx.methods", "rosafx.ops", "rosafx.kernels")),
    ("passes", ("rosafx.passes",)),
    ("pipeline", ("rosafx.pipeline",)),
    ("api", ("rosafx.api",)),
    ("training", ("rosafx.training",)),
    ("face", ()),                                   # the package itself: rosafx/__init__.py
    ("recipes", ("rosafx.recipes",)),
    ("cli", ("rosafx.cli", "rosafx.__main__")),
)
LAYER_NAMES = tuple(name for name, _ in LAYERS)


def layer(module: str) -> int:
    if module == "rosafx":
        return LAYER_NAMES.index("face")
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer: put it in a layer's folder and name the folder in LAYERS")


def package_modules() -> dict[str, Path]:
    """Every module of the installed package (the folders the package-dir mapping names too)."""
    found = {}
    for package in PACKAGES:
        (root,) = importlib.util.find_spec(package).submodule_search_locations
        for path in Path(root).glob("*.py"):
            found[package if path.name == "__init__.py" else f"{package}.{path.stem}"] = path
    return found


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            source = node.module
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                if f"{source}.{alias.name}" in known:    # from package import submodule
                    edges.add(f"{source}.{alias.name}")
                elif source in known:
                    edges.add(source)
    edges.discard(module)
    return edges


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {m: imports_of(m, p, set(modules)) for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_mapped_folders_and_lazy_imports(graph):
    assert {"rosafx.passes.merge", "rosafx.cli.main", "rosafx.kernels", "rosafx.methods.rosa"} <= set(graph)
    assert "rosafx.passes.merge" in graph["rosafx.pipeline.partial"]           # a top-level import
    assert "rosafx.pipeline.serialize" in graph["rosafx.api"]                  # an import inside a function


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_every_module_is_in_a_layer(graph):
    for module in graph:
        layer(module)


def test_nothing_imports_a_layer_above_its_own(graph):
    upward = sorted(f"{m} ({LAYER_NAMES[layer(m)]}) -> {t} ({LAYER_NAMES[layer(t)]})"
                    for m, targets in graph.items() for t in targets if layer(t) > layer(m))
    assert upward == []


def test_a_cycle_and_an_upward_import_are_found():
    fake = {"rosafx.graph.sites": {"rosafx.passes.merge"}, "rosafx.passes.merge": {"rosafx.graph.sites"}}
    assert cycles(fake) == [["rosafx.graph.sites", "rosafx.passes.merge"]]
    assert layer("rosafx.passes.merge") > layer("rosafx.graph.sites")
    assert layer("rosafx.cli.train") > layer("rosafx.recipes.recipe") > layer("rosafx") > layer("rosafx.training.fit")
