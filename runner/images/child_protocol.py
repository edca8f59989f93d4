"""The extraction child's protocol, both sides: what :mod:`runner.images.extract` (the
parent) sends the child and reads back, and what :mod:`runner.images._child` writes.

Parameters go to the child as one JSON object on its stdin (:func:`encode_params`,
:func:`decode_params`). Every message comes back as one JSON line on its stdout:
``{"progress": [phase, done, total]}`` any number of times, then exactly one of
``{"result": {...}}``, ``{"error": ImageError.to_dict()}`` or ``{"crash": traceback}``
(a bug). The child imports only this of the parent's side, and standard modules.
"""

from __future__ import annotations

import json
from typing import Any

# The message kinds, one member each.
PROGRESS = "progress"
RESULT = "result"
ERROR = "error"
CRASH = "crash"

CRASH_CHARS = 4000  # the end of a crash's traceback that is sent


def encode_params(*, archive: str, images_dir: str, staging: str, tag: str | None,
                  limits: dict[str, Any], sync: bool) -> bytes:
    """The child's parameters, every one named (the child reads exactly these)."""
    return json.dumps({"archive": archive, "images_dir": images_dir, "staging": staging,
                       "tag": tag, "limits": limits, "sync": sync}).encode()


def decode_params(data: bytes) -> dict[str, Any]:
    """The parameters :func:`encode_params` wrote."""
    return json.loads(data)


def progress_line(phase: str, done: int, total: int | None) -> str:
    return _line({PROGRESS: [phase, done, total]})


def result_line(result: dict[str, Any]) -> str:
    return _line({RESULT: result})


def error_line(error: dict[str, Any]) -> str:
    """``error``: ``ImageError.to_dict()``."""
    return _line({ERROR: error})


def crash_line(traceback: str) -> str:
    return _line({CRASH: traceback[-CRASH_CHARS:]})


def _line(message: dict[str, Any]) -> str:
    return json.dumps(message) + "\n"


def parse_line(line: bytes) -> dict[str, Any]:
    """One message line as a dict with one member (a kind above)."""
    return json.loads(line)
