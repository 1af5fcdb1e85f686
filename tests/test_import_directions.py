"""The stages import only downwards (pyproject's [tool.importlinter] contracts, docs/design.md)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["imgformat", "training", "export", "service", "monitoring", "container", "deploy", "loadtests"]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter on the tree at ``root`` (its packages first on the path)."""
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_every_contract_is_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The check bites: a copy of the tree where the file formats import the service fails it."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    constants = tmp_path / "imgformat" / "constants.py"
    constants.write_text(constants.read_text() + "\nimport service.launcher  # an upward import\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "stages import only downwards BROKEN" in result.stdout
    assert "imgformat.constants -> service.launcher" in result.stdout
