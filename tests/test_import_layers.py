"""Import direction between layers, read from the source with ast so that lazy imports count:
imports inside functions and `importlib.import_module("...")` / `__import__("...")` calls with a
literal name are imports too.

Intended direction: `s4d_dist.models` may import `s4d_dist.kernels` (the MoAE model imports
the backend contract, `kernels/moae_contract.py`, and loads the Triton backend lazily);
nothing under `kernels/` imports `s4d_dist.models`.
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


@pytest.mark.parametrize("folder, forbidden", [("kernels", "s4d_dist.models")])
def test_no_import_against_the_layer_direction(folder, forbidden):
    assert imports_between(folder, forbidden) == {}


def test_the_reader_sees_lazy_imports():
    """The allowed direction is found, lazy import included, so an empty result above means
    something."""
    found = imports_between("s4d_dist/models", "s4d_dist.kernels")
    assert "s4d_dist.kernels.moae" in found["s4d_dist/models/moae.py"]
