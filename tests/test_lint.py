"""The codebase stays ruff clean (part of the test command, so CI enforces it)."""

from __future__ import annotations

import shutil
import subprocess
import sys

from tests.conftest import ROOT


def test_ruff_clean() -> None:
    ruff = shutil.which("ruff") or str(ROOT / ".venv" / "bin" / "ruff")
    proc = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_package_imports_without_litellm() -> None:
    code = "import sys, ingest.cli, ingest.pipeline; assert 'litellm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
