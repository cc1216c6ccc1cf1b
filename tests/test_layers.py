"""The architecture, checked: the import-linter contracts (layers without upward imports, no cycles
inside a package), no generic package importing the shapes world, and source files under 600 lines."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "rewards", "learner", "actors", "cluster", "shapes", "bagel", "srum")
GENERIC = ("core", "rewards", "learner", "actors", "cluster")


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout


def test_no_generic_package_imports_a_world():
    offenders = []
    for pkg in GENERIC:
        for path in (REPO / pkg).glob("*.py"):
            if re.search(r"^\s*(from|import) shapes\b", path.read_text(), re.M):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_source_files_stay_short():
    long = {str(p.relative_to(REPO)): n for pkg in (*PACKAGES, "bench", "tests") for p in (REPO / pkg).glob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}
