"""The layering, enforced: every module's imports (top-level and inside functions) read with ``ast``.

    cluster/                      -> configs
    training/     analysis/       -> models, data_pipeline, configs   (siblings: never each other)
    models/       data_pipeline/  -> configs
    configs/                      -> nothing of ours

docs/ARCHITECTURE.md explains the rooms; a new package must be added to ALLOWED here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {
    "configs": set(),
    "models": {"configs"},
    "data_pipeline": {"configs"},
    "training": {"models", "data_pipeline", "configs"},
    "analysis": {"models", "data_pipeline", "configs"},
    "cluster": {"configs"},
}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package of ours) for every import statement in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:  # relative imports stay inside the package
            continue
        out += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in ALLOWED]
    return out


def modules():
    return sorted(p for pkg in ALLOWED for p in (REPO / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_module_imports_only_the_layers_below(path):
    own = path.relative_to(REPO).parts[0]
    bad = [
        f"line {line}: imports {pkg}" for line, pkg in imported_packages(path) if pkg != own and pkg not in ALLOWED[own]
    ]
    assert not bad, f"{path.relative_to(REPO)} ({own} may import {sorted(ALLOWED[own]) or 'nothing of ours'}): {bad}"


def test_the_rule_reader_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef f():\n    from analysis.fit import x\n    import training.loop as t\n")
    assert imported_packages(f) == [(4, "analysis"), (5, "training")] or sorted(imported_packages(f)) == [
        (4, "analysis"),
        (5, "training"),
    ]
