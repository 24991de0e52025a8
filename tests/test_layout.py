"""The package's layout rules, read from the import graph (ast over vlmtax/): layers, routes, no circles.

Layers, lowest first; a module imports only from its own package or from a lower layer:
  base (errors, fileio, meta, progress, runlog) < models < data < inference < evaluate < train
  < the two routes (generate, heads: never each other) < the top-level verbs (cli, demo, sft, predict).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vlmtax"
BASE = {"vlmtax", "vlmtax.errors", "vlmtax.fileio", "vlmtax.meta", "vlmtax.progress", "vlmtax.runlog"}
TOP = {"vlmtax.__main__", "vlmtax.cli", "vlmtax.demo", "vlmtax.sft", "vlmtax.predict"}
LAYERS = {"models": 1, "data": 2, "inference": 3, "evaluate": 4, "train": 5, "generate": 6, "heads": 6}
ROUTES = {"generate", "heads"}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.with_suffix("").relative_to(root.parent).parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def place(module: str) -> tuple[str, int]:
    """(package, layer) of a module; a module nobody placed is an error of its own."""
    if module in BASE:
        return "base", 0
    if module in TOP:
        return "top", 7
    package = module.split(".")[1]
    if package not in LAYERS:
        raise AssertionError(f"{module} has no place in the layout: put it in a subpackage (or add it to "
                             "BASE/TOP in tests/test_layout.py and README's Layout if it truly belongs there)")
    return package, LAYERS[package]


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, set[str]]]:
    """module -> {imported vlmtax module: names taken from it}; every import counts, function-level ones too."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, dict[str, set[str]]] = {}
    for name, path in modules.items():
        edges: dict[str, set[str]] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vlmtax":
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    target, names = (sub, set()) if sub in modules else (node.module, {alias.name})
                    edges.setdefault(target, set()).update(names)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "vlmtax":
                        edges.setdefault(alias.name, set())
        edges.pop(name, None)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(graph: dict[str, dict[str, set[str]]]) -> list[str]:
    """Every broken rule, one line each."""
    out = [f"import circle: {' <-> '.join(c)}" for c in cycles(graph)]
    for module, edges in sorted(graph.items()):
        package, layer = place(module)
        for target, names in sorted(edges.items()):
            private = sorted(n for n in names if n.startswith("_") and not n.startswith("__"))
            if private:
                out.append(f"{module} imports private {', '.join(private)} from {target}")
            if target == "vlmtax":
                continue
            their_package, their_layer = place(target)
            if package in ROUTES and their_package in ROUTES and package != their_package:
                out.append(f"{module} (route {package}) imports the other route: {target}")
            elif their_package != package and their_layer >= layer:
                out.append(f"{module} ({package}) imports {target} ({their_package}): an import up the layers")
    return out


def test_the_package_keeps_its_layout():
    assert violations(import_graph()) == []


def test_modules_and_functions_stay_small():
    long_modules, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{module_name(path)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{module_name(path)}.{node.name}: {lines} lines")
    assert long_modules == [] and long_functions == []


@pytest.mark.parametrize("graph, broken", [
    ({"vlmtax.heads.knn": {"vlmtax.generate.chat": set()}, "vlmtax.generate.chat": {}}, "imports the other route"),
    ({"vlmtax.data.records": {"vlmtax.train.recipe": set()}, "vlmtax.train.recipe": {}}, "up the layers"),
    ({"vlmtax.evaluate.tune": {"vlmtax.sft": set()}, "vlmtax.sft": {}}, "up the layers"),
    ({"vlmtax.fileio": {"vlmtax.data.taxonomy": set()}, "vlmtax.data.taxonomy": {}}, "up the layers"),
    ({"vlmtax.predict": {"vlmtax.inference.rows": {"_decode"}}, "vlmtax.inference.rows": {}}, "private _decode"),
    ({"vlmtax.data.answer": {"vlmtax.data.template": set()}, "vlmtax.data.template": {"vlmtax.data.answer": set()}},
     "import circle: vlmtax.data.answer <-> vlmtax.data.template"),
])
def test_each_rule_catches_its_breach(graph, broken):
    found = violations(graph)
    assert len(found) == 1 and broken in found[0], found


def test_the_rules_allow_what_the_layout_means():
    graph = {"vlmtax.sft": {"vlmtax.generate.train": set(), "vlmtax.heads.train": set()},
             "vlmtax.generate.train": {"vlmtax.train.run": {"output_dir_state"}, "vlmtax.generate.model": set()},
             "vlmtax.heads.train": {"vlmtax.train.run": set(), "vlmtax.models.loading": {"DTYPES"}},
             "vlmtax.generate.model": {}, "vlmtax.train.run": {"vlmtax.errors": set()},
             "vlmtax.models.loading": {"vlmtax": {"__version__"}}, "vlmtax.errors": {}, "vlmtax": {}}
    assert violations(graph) == []


def test_a_module_outside_the_layout_is_named():
    with pytest.raises(AssertionError, match="vlmtax.helpers has no place"):
        violations({"vlmtax.helpers": {}})


def test_the_graph_sees_function_level_and_plain_imports(tmp_path):
    pkg = tmp_path / "vlmtax"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("def f():\n    from vlmtax.data.b import _g\n    import vlmtax.errors\n")
    (pkg / "data" / "b.py").write_text("from vlmtax.data import a\n")
    (pkg / "errors.py").write_text("")
    graph = import_graph(pkg)
    assert graph["vlmtax.data.a"] == {"vlmtax.data.b": {"_g"}, "vlmtax.errors": set()}
    assert graph["vlmtax.data.b"] == {"vlmtax.data.a": set()}
