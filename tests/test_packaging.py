"""Every third-party package the installed code imports is declared in setup.py (a runtime
requirement, or the extra of the optional feature that imports it), so a fresh install never
meets an ImportError that another package happened to hide here."""
import ast
import re
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INSTALLED_CODE = ("s4d_dist", "kernels", "shards")


def imported_top_level_names() -> set[str]:
    names = set()
    for folder in INSTALLED_CODE:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"s4d_dist", "__future__"}


def declared() -> set[str]:
    """Normalised names of the distributions setup.py requires, extras included."""
    return {re.split(r"[\s\[<>=!;]", r, maxsplit=1)[0].lower().replace("_", "-")
            for r in metadata.requires("s4d_dist") or []}


# Import names whose distribution is named otherwise, for optional extras that a default install
# (CI's) leaves out, where installed metadata cannot tell
NOT_INSTALLED_PROVIDERS = {"cv2": ["opencv-python-headless"]}


def test_every_import_is_a_declared_distribution():
    providers = {**NOT_INSTALLED_PROVIDERS, **metadata.packages_distributions()}
    wanted = declared()
    missing = {}
    for name in sorted(imported_top_level_names()):
        distributions = {d.lower().replace("_", "-") for d in providers.get(name, [name])}
        if not distributions & wanted:
            missing[name] = sorted(distributions)
    assert not missing, f"imported but not declared in setup.py: {missing}"
