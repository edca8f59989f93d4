"""Structured logs: one JSON object per line, one line per event.

Every line names the process, the event and, when there is one, the request id. The id
of the request being served lives in a context variable: the RPC server sets it from the
incoming envelope, and the RPC client derives the ids of the calls it makes from it
(``<id>.<n>``), so ``grep <id> $FAAS_ROOT/logs/*.log`` follows one operation through
every daemon.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import sys
import time
from typing import Any, TextIO

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id",
                                                                        default=None)

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_encode = json.JSONEncoder(default=str, separators=(",", ":")).encode  # made once
BATCH_SECONDS = 0.05  # how long a line logged with ``batched`` may wait to be written
BATCH_LINES = 512  # ... or how many may wait


class EventLog:
    """Writes events as JSON lines to a stream (stderr under supervisord)."""

    def __init__(self, proc: str, level: str = "info", stream: TextIO | None = None):
        self.proc = proc
        self.threshold = LEVELS[level]
        self.stream = stream or sys.stderr
        self._batch: list[str] = []
        self._flush_at: asyncio.TimerHandle | None = None

    def set_level(self, level: str) -> None:
        """Change the threshold once settings are known."""
        self.threshold = LEVELS[level]

    def _line(self, level: str, event: str, rid: str | None, fields: dict[str, Any]) -> str:
        record: dict[str, Any] = {
            "ts": round(time.time(), 6),
            "level": level,
            "proc": self.proc,
            "event": event,
        }
        if rid is not None:
            record["rid"] = rid
        record.update(fields)
        return _encode(record) + "\n"

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed log stream must not take the daemon down

    def emit(self, level: str, event: str, **fields: Any) -> None:
        """Write one event if ``level`` passes the threshold."""
        if LEVELS[level] < self.threshold:
            return
        line = self._line(level, event, request_id.get(), fields)
        if self._batch:  # lines keep their order
            line = self.flush(write=False) + line
        self._write(line)

    def batched(self, level: str, event: str, rid: str | None, **fields: Any) -> None:
        """Log one event of a kind that comes at request rate (the runner's access log):
        written with the others of the next BATCH_SECONDS in one write, so a busy daemon
        does not pay a write, and its supervisor a read, per request. Needs a running
        event loop; any other event written meanwhile flushes the batch first."""
        if LEVELS[level] < self.threshold:
            return
        self._batch.append(self._line(level, event, rid, fields))
        if len(self._batch) >= BATCH_LINES:
            self.flush()
        elif self._flush_at is None:
            self._flush_at = asyncio.get_running_loop().call_later(BATCH_SECONDS, self.flush)

    def flush(self, write: bool = True) -> str:
        """Write the batched lines now (or, ``write=False``, return them to the caller)."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        text, self._batch = "".join(self._batch), []
        if write and text:
            self._write(text)
        return text

    def debug(self, event: str, **fields: Any) -> None:
        self.emit("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self.emit("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.emit("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.emit("error", event, **fields)
