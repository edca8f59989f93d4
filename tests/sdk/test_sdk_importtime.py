"""A cold start pays for faas_handler's imports: they must stay a handful of modules."""

import os
import subprocess
import sys

from sdk_harness import SDK_DIR

# Modules a cold start must not pay for (each costs milliseconds at every container start;
# the output also lists what the interpreter loads for itself, like io).
FORBIDDEN = {"socket", "json", "re", "enum", "selectors", "collections", "typing", "http",
             "http.server", "http.client", "email", "urllib", "urllib.parse", "traceback",
             "threading", "logging", "dataclasses", "functools", "array"}
# What it may load beyond the interpreter's own start (os and its helpers, the C socket).
ALLOWED = {"faas_handler", "_socket", "os", "os.path", "posixpath", "genericpath", "stat",
           "_stat", "_collections_abc"}


def run(code: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SDK_DIR)}
    return subprocess.run([sys.executable, "-S", *flags, "-c", code], env=env,
                          capture_output=True, text=True, timeout=30, check=True)


def test_importtime_lists_no_heavy_module() -> None:
    stderr = run("import faas_handler", "-X", "importtime").stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "faas_handler" in imported
    assert not imported & FORBIDDEN, sorted(imported & FORBIDDEN)


def test_import_adds_only_allowed_modules() -> None:
    code = ("import sys; before = set(sys.modules); import faas_handler; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    added = set(run(code).stdout.split())
    assert "faas_handler" in added
    assert added <= ALLOWED, sorted(added - ALLOWED)
