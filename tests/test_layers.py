"""The layers point down: run.py -> pipelines/ -> retrievers/; stages never import each other;
scripts need no sys.path edits; no module grows past ~400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_the_library_never_imports_the_runner():
    bad = {str(p.relative_to(REPO)): sorted(m for m in _imports(p) if m.split(".")[0] in ("pipelines", "scripts"))
           for p in (REPO / "retrievers").rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}


def test_no_stage_imports_another_stage():
    stages = REPO / "pipelines" / "stages"
    for p in stages.glob("*.py"):
        mods = _imports(p)
        assert not [m for m in mods if m.startswith("pipelines.stages") or m in {"pipelines"}], p.name
        assert not [m for m in mods if m.startswith("pipelines.")
                    and m not in ("pipelines.executor", "pipelines.keys", "pipelines.manifest")]


def test_scripts_do_not_edit_sys_path():
    for p in (REPO / "scripts").glob("*.py"):
        assert "sys.path" not in p.read_text(), p.name


def test_no_module_over_about_400_lines():
    long = {str(p.relative_to(REPO)): n for d in ("retrievers", "pipelines", "scripts") for p in (REPO / d).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 420}
    assert not long, f"split these by job: {long}"
