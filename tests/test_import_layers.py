"""Import direction between layers, read from the source with ast so that lazy imports count:
imports inside functions and `importlib.import_module("...")` / `__import__("...")` calls with a
literal name are imports too.

Intended directions (the lower layer never imports the upper one):

- `s4d_dist.models` → `s4d_dist.kernels`: the MoAE model imports the backend contract
  (`kernels/moae_contract.py`) and loads the Triton backend lazily; nothing under `kernels/`
  imports `s4d_dist.models`.
- `s4d_dist.data` → `s4d_dist.shards`: data loading reads the shard format of
  `shards/layout.py` and decodes with `shards/media.py`; nothing under `shards/` imports
  `s4d_dist.data` (`inspect` / `verify` read shards through the format alone, shards/tools.py).
- `s4d_dist.train` → `s4d_dist.data`: the trainer builds loaders and hands them its device;
  nothing under `s4d_dist/data/` imports `s4d_dist.train`.
`test_no_cycle_between_layers` checks the whole import graph for cycles between layers.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# folder in the repository → the package it installs as
PACKAGES = {"kernels": "s4d_dist.kernels", "shards": "s4d_dist.shards",
            "s4d_dist": "s4d_dist"}


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO)
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name the file imports, eagerly or lazily."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name)
                       and node.func.id in ("import_module", "__import__")))):
            found.add(node.args[0].value)
    return found


def imports_between(folder: str, forbidden: str) -> dict[str, list[str]]:
    """{file under folder: the modules it imports that are `forbidden` or below it}."""
    hits = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        bad = sorted(m for m in imported_modules(path)
                     if m == forbidden or m.startswith(forbidden + "."))
        if bad:
            hits[str(path.relative_to(REPO))] = bad
    return hits


# (lower folder, the upper package it must not import, command-line modules exempted)
LAYERS = [("kernels", "s4d_dist.models", ()),
          ("shards", "s4d_dist.data", ()),
          ("s4d_dist/data", "s4d_dist.train", ())]


@pytest.mark.parametrize("folder, forbidden, entry_points", LAYERS)
def test_no_import_against_the_layer_direction(folder, forbidden, entry_points):
    hits = imports_between(folder, forbidden)
    assert {path: bad for path, bad in hits.items() if path not in entry_points} == {}


def import_graph() -> dict[str, set[str]]:
    """module → the modules it imports (eagerly or lazily), the packages above them included:
    importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    files = {module_name(path): path for folder in PACKAGES
             for path in (REPO / folder).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for module in imported_modules(path):
            parts = module.split(".")
            targets |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        graph[name] = (targets & files.keys()) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("lower, upper", [("s4d_dist.kernels", "s4d_dist.models"),
                                          ("s4d_dist.shards", "s4d_dist.data"),
                                          ("s4d_dist.data", "s4d_dist.train")])
def test_no_cycle_between_layers(lower, upper):
    def inside(module, package):
        return module == package or module.startswith(package + ".")

    spanning = [sorted(c) for c in cycles(import_graph())
                if any(inside(m, lower) for m in c) and any(inside(m, upper) for m in c)]
    assert spanning == []


def test_the_reader_sees_lazy_imports():
    """The allowed direction is found, lazy import included, so an empty result above means
    something."""
    found = imports_between("s4d_dist/models", "s4d_dist.kernels")
    assert "s4d_dist.kernels.moae_triton" in found["s4d_dist/models/moae.py"]
