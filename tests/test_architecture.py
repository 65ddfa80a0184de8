"""visrec's packages import inward only (docs/architecture.md): a new import that breaks the layering fails here."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "visrec"

# Package -> the other visrec packages it may import (docs/architecture.md and each __init__).
MAY_IMPORT = {
    "core": set(),
    "data": {"core"},
    "model": {"core", "data"},
    "stages": {"core", "data", "model"},
    "online": {"core", "data", "model", "stages"},
    "orchestration": {"core", "data", "model", "stages"},
    "sim": {"core", "data", "model", "stages", "online", "orchestration"},
    "cli": {"core", "data", "model", "stages", "online", "orchestration", "sim"},
}


def imported_packages(path: Path) -> set[str]:
    """The visrec subpackages `path` imports (at module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "visrec":
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "visrec" and len(parts) > 1 and parts[1] in MAY_IMPORT:
                found.add(parts[1])
    return found


def test_every_package_is_declared_and_documented():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(MAY_IMPORT)
    for name in packages:
        assert ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())), name


def test_packages_import_inward_only():
    wrong = []
    for name, allowed in MAY_IMPORT.items():
        for path in sorted((PACKAGE / name).rglob("*.py")):
            for other in imported_packages(path) - allowed - {name}:
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports visrec.{other}")
    assert not wrong, "\n".join(wrong)
