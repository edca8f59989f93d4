"""The code follows the one lint configuration (pyproject.toml's [tool.ruff]): run by the
test suite, so style holds without anyone policing it in review."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ruff_finds_nothing():
    # The ruff of the interpreter running the tests (the `test` extra installs it), so the
    # version is the one setup.cfg asks for; --no-cache: nothing is written into the tree.
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"ruff check failed:\n{proc.stdout}{proc.stderr}"
