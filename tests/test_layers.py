"""The house rules of the import graph: sharding <- llama_jax <- train <- bench, and no module circle."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOORS = ["sharding", "llama_jax", "train", "bench"]  # each may import only the floors before it


def _modules() -> dict[str, str]:
    found = {}
    for floor in FLOORS:
        for folder, _, files in os.walk(os.path.join(ROOT, floor)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                    found[module] = path
    return found


def _imports(path: str) -> set[str]:
    """Every project module a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n.split(".")[0] in FLOORS}


def test_no_module_imports_a_higher_floor():
    for module, path in _modules().items():
        floor = FLOORS.index(module.split(".")[0])
        for imported in _imports(path):
            assert FLOORS.index(imported.split(".")[0]) <= floor, f"{module} imports {imported} (a higher floor)"


def test_no_import_circle():
    modules = _modules()
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    for m in graph:  # a package's __init__ re-exporting its own modules is not a circle
        graph[m] = {i for i in graph[m] if not (m.count(".") < i.count(".") and i.startswith(m + "."))}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for nxt in sorted(graph[m]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [m, nxt]))
            if nxt not in state:
                visit(nxt, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
