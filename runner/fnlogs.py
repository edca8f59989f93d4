"""Function logs: every line a container writes, as JSON, with the request it served.

One file per function, ``$FAAS_ROOT/logs/functions/<name>.log``, rotated at
``MAX_BYTES`` into ``.1`` .. ``.{KEEP}``. The files are root:faas 0640 so the controller
can read them for ``faasctl logs``; nobody but the runner writes them. They go with their
function: a function deployed later under the same name starts with no log of the old one.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from typing import IO

MAX_BYTES = 10 << 20
KEEP = 3
_quote = json.JSONEncoder(separators=(",", ":")).encode
MAX_LINE = 16 << 10  # a runaway line is cut, not buffered without end
FLUSH_SECONDS = 0.05  # lines reach the file at most this late, in one write per file
_LOG_FILE = re.compile(r"(?P<name>[^/]+)\.log(\.[0-9]+)?")


class FunctionLogs:
    """Appends container output to the right function's log."""

    def __init__(self, directory: str, gid: int):
        self.directory = directory
        self.gid = gid
        self.files: dict[str, IO[str]] = {}
        self.sizes: dict[str, int] = {}  # (asking a text file its position flushes it)
        self.dropped = 0  # lines lost to a file that could not be written
        self._flush_at: asyncio.TimerHandle | None = None
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
            self.sizes[function] = os.fstat(fd).st_size
            f = self.files[function] = os.fdopen(fd, "a")
        return f

    def write(self, function: str, container: str, stream: str, request: str | None,
              lines: list[str]) -> None:
        """Append lines that one stream of one container wrote, in one write; rotate
        first if the file is full. A full disk or a broken file drops the lines (they are
        counted in ``dropped``): a container's output must never hold up its requests."""
        try:
            self._write(function, container, stream, request, lines)
        except OSError:
            self.dropped += len(lines)

    def _write(self, function: str, container: str, stream: str, request: str | None,
               lines: list[str]) -> None:
        f = self._open(function)
        if self.sizes[function] > MAX_BYTES:
            self._rotate(function)
            f = self._open(function)
        # json.dumps of {"ts", "container", "stream", "rid", "line"}, the same for every
        # line but the last field
        head = (f'{{"ts":{round(time.time(), 6)!r},"container":{_quote(container)},'
                f'"stream":{_quote(stream)},"rid":{_quote(request)},"line":')
        text = "".join(f"{head}{_quote(line[:MAX_LINE])}}}\n" for line in lines)
        f.write(text)
        self.sizes[function] += len(text)  # characters: ASCII, json.dumps escapes the rest
        if self._flush_at is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (a script, a test): now
                return f.flush()
            self._flush_at = loop.call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """Write what the files buffer (a handler that logs per request would otherwise
        cost a write per request)."""
        self._flush_at = None
        for f in self.files.values():
            try:
                f.flush()
            except OSError:
                pass  # a full disk must not take the runner down; the lines are lost

    def _rotate(self, function: str) -> None:
        self.files.pop(function).close()  # (flushes it)
        base = self.path(function)
        for i in range(KEEP - 1, 0, -1):
            if os.path.exists(f"{base}.{i}"):
                os.replace(f"{base}.{i}", f"{base}.{i + 1}")
        os.replace(base, f"{base}.1")

    def forget(self, function: str) -> None:
        """Close a function's file (it stays: the function is being replaced, not gone)."""
        f = self.files.pop(function, None)
        self.sizes.pop(function, None)
        if f is not None:
            f.close()

    def remove(self, function: str) -> int:
        """Close and delete a removed function's log and its rotated files, so that what
        it wrote is never served as the log of a later function of the same name; return
        how many files went."""
        self.forget(function)
        removed = 0
        base = self.path(function)
        for path in [base] + [f"{base}.{i}" for i in range(1, KEEP + 2)]:
            try:
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                pass
        return removed

    def prune(self, keep: set[str]) -> list[str]:
        """Delete the logs of every function not in ``keep`` (removed while the runner
        was down, or before this rule existed); return their names."""
        gone = sorted({m["name"] for m in map(_LOG_FILE.fullmatch, os.listdir(self.directory))
                       if m is not None and m["name"] not in keep})
        for name in gone:
            self.remove(name)
        return gone
