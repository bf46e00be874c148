"""The code passes the linter configured in pyproject.toml ([tool.ruff]): `ruff check .` finds nothing."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                    reason="ruff is not installed (pip install -e '.[dev]' installs it)")
def test_ruff_finds_nothing():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", ".", "--no-cache"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, f"ruff check . found problems (exit {r.returncode}):\n{r.stdout}{r.stderr}"
