"""Function logs: every line a container writes, as JSON, with the request it served.

One file per function, ``$FAAS_ROOT/logs/functions/<name>.log``, rotated at
``MAX_BYTES`` into ``.1`` .. ``.{KEEP}``. The files are root:faas 0640 so the controller
can read them for ``faasctl logs``; nobody but the runner writes them.
"""

from __future__ import annotations

import json
import os
import time
from typing import IO

MAX_BYTES = 10 << 20
KEEP = 3
MAX_LINE = 16 << 10  # a runaway line is cut, not buffered without end


class FunctionLogs:
    """Appends container output to the right function's log."""

    def __init__(self, directory: str, gid: int):
        self.directory = directory
        self.gid = gid
        self.files: dict[str, IO[str]] = {}
        os.makedirs(directory, mode=0o750, exist_ok=True)
        os.chown(directory, 0, gid)

    def path(self, function: str) -> str:
        return os.path.join(self.directory, f"{function}.log")

    def _open(self, function: str) -> IO[str]:
        f = self.files.get(function)
        if f is None:
            fd = os.open(self.path(function), os.O_WRONLY | os.O_APPEND | os.O_CREAT |
                         os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
            os.fchown(fd, 0, self.gid)
            f = self.files[function] = os.fdopen(fd, "a", buffering=1)
        return f

    def write(self, function: str, container: str, stream: str, request: str | None,
              line: str) -> None:
        """Append one line; rotate first if the file is full."""
        f = self._open(function)
        if f.tell() > MAX_BYTES:
            self._rotate(function)
            f = self._open(function)
        f.write(json.dumps({"ts": round(time.time(), 6), "container": container,
                            "stream": stream, "rid": request, "line": line[:MAX_LINE]},
                           separators=(",", ":")) + "\n")

    def _rotate(self, function: str) -> None:
        self.files.pop(function).close()
        base = self.path(function)
        for i in range(KEEP - 1, 0, -1):
            if os.path.exists(f"{base}.{i}"):
                os.replace(f"{base}.{i}", f"{base}.{i + 1}")
        os.replace(base, f"{base}.1")

    def forget(self, function: str) -> None:
        """Close a removed function's file (its logs stay until the next deploy of the
        same name appends to them)."""
        f = self.files.pop(function, None)
        if f is not None:
            f.close()
