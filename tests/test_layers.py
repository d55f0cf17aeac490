"""The package's layers: every import runs from a higher layer to a lower one (or within one
package), with no cycle hidden behind a lazy import. Read from the source, so a function-level
import counts as much as a top-level one."""

from __future__ import annotations

import ast
from pathlib import Path

import rollouts

ROOT = Path(rollouts.__file__).parent
# What each top-level package may import besides itself; anything unlisted is a higher layer.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "monitoring": set(),
    "data": set(),
    "training": {"core"},
    "inference": {"core"},
    "tasks": {"core", "data", "inference"},
    "sft": {"core", "data", "monitoring", "training"},
    "rl": {"core", "inference", "monitoring", "tasks", "training"},
    "recipes": {"core", "data", "inference", "monitoring", "rl", "sft", "tasks", "training"},
    "serve": {"core", "inference", "training"},
    "cli": {"monitoring", "recipes", "serve"},
}


def _imports(path: Path) -> set[str]:
    """The `rollouts.X` packages a module imports, anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found.update(n.split(".")[1] for n in names if n.startswith("rollouts.") and "." in n)
    return found


def _package_of(path: Path) -> str:
    relative = path.relative_to(ROOT)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def test_every_import_goes_down_a_layer() -> None:
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        package = _package_of(path)
        if package == "__init__":
            continue
        assert package in ALLOWED, f"{path}: new package {package!r}, give it a layer above"
        for target in _imports(path) - {package}:
            if target not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports rollouts.{target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_layer_map_has_no_cycle() -> None:
    def reaches(start: str, goal: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(
            t == goal or (t not in seen and reaches(t, goal, seen | {t})) for t in ALLOWED[start]
        )

    assert not [p for p in ALLOWED if reaches(p, p)]
