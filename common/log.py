"""Structured logs: one JSON object per line, one line per event.

Every line names the process, the event and, when there is one, the request id. The id
of the request being served lives in a context variable: the RPC server sets it from the
incoming envelope, and the RPC client derives the ids of the calls it makes from it
(``<id>.<n>``), so ``grep <id> $FAAS_ROOT/logs/*.log`` follows one operation through
every daemon.
"""

from __future__ import annotations

import contextvars
import json
import sys
import time
from typing import Any, TextIO

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id",
                                                                        default=None)

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class EventLog:
    """Writes events as JSON lines to a stream (stderr under supervisord)."""

    def __init__(self, proc: str, level: str = "info", stream: TextIO | None = None):
        self.proc = proc
        self.threshold = LEVELS[level]
        self.stream = stream or sys.stderr

    def set_level(self, level: str) -> None:
        """Change the threshold once settings are known."""
        self.threshold = LEVELS[level]

    def emit(self, level: str, event: str, **fields: Any) -> None:
        """Write one event if ``level`` passes the threshold."""
        if LEVELS[level] < self.threshold:
            return
        record: dict[str, Any] = {
            "ts": round(time.time(), 6),
            "level": level,
            "proc": self.proc,
            "event": event,
        }
        rid = request_id.get()
        if rid is not None:
            record["rid"] = rid
        record.update(fields)
        try:
            self.stream.write(json.dumps(record, default=str, separators=(",", ":")) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed log stream must not take the daemon down

    def debug(self, event: str, **fields: Any) -> None:
        self.emit("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self.emit("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.emit("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.emit("error", event, **fields)
