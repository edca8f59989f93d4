"""faasd, the launcher: found through a symlink (as install.sh links it), it still
finds supervisord and the faas-* programs beside its real self."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_a_symlinked_faasd_finds_supervisorctl_in_its_venv(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "faasd").symlink_to(BIN / "faasd")
    env = {"PATH": "/usr/bin:/bin", "FAAS_ROOT": str(tmp_path / "root"),
           "FAAS_RUN": str(tmp_path / "run"), "FAAS_CONFIG": "/dev/null"}
    out = subprocess.run([tmp_path / "bin" / "faasd", "--conf", REPO / "supervisord.conf",
                          "ctl", "status"], capture_output=True, text=True, env=env)
    # supervisorctl ran (and found no supervisord): not a FileNotFoundError traceback
    assert "Traceback" not in out.stderr
    assert "supervisord.sock" in out.stdout + out.stderr
