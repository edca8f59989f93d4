"""The closed set of error codes, defined once.

Every failure that crosses a process boundary is a :class:`FaasError` with one of
these codes. The daemons convert it to the wire in one place (``protocol.make_error``),
clients turn it back into a ``FaasError``, and ``faasctl`` maps the code to its exit
status. Tracebacks stay in the daemon's log; only the code, a message and plain details
travel.
"""

from __future__ import annotations

import enum
from typing import Any


class Code(str, enum.Enum):
    """Error codes. Adding one is a protocol change: document it in docs/protocol.md."""

    BAD_REQUEST = "bad_request"  # malformed envelope, unknown op, wrong or missing field
    VERSION_MISMATCH = "version_mismatch"  # envelope "v" this side does not speak
    TOO_LARGE = "too_large"  # frame or upload over a configured cap
    NOT_FOUND = "not_found"  # the named function, version or peer does not exist
    CONFLICT = "conflict"  # the request contradicts the current state
    BAD_IMAGE = "bad_image"  # an uploaded image is malformed, hostile or unsupported
    FORBIDDEN = "forbidden"  # the caller may not reach that endpoint
    UNAUTHORIZED = "unauthorized"  # HTTP API: a token is needed, or the one sent is not valid
    UNAVAILABLE = "unavailable"  # the peer is down or not reachable
    TIMEOUT = "timeout"  # no reply within the call's deadline
    INTERNAL = "internal"  # a bug: the daemon's log has the traceback


# faasctl's exit status for each code; 0 is success and 2 stays argparse's usage error.
EXIT_STATUS: dict[Code, int] = {
    Code.INTERNAL: 1,
    Code.BAD_REQUEST: 2,
    Code.NOT_FOUND: 3,
    Code.CONFLICT: 4,
    Code.BAD_IMAGE: 5,
    Code.TOO_LARGE: 6,
    Code.VERSION_MISMATCH: 7,
    Code.FORBIDDEN: 8,
    Code.UNAVAILABLE: 9,
    Code.TIMEOUT: 10,
    Code.UNAUTHORIZED: 11,
}


class FaasError(Exception):
    """A failure with a stable code, a message for people and plain-data details."""

    def __init__(self, code: Code | str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = Code(code)
        self.message = message
        self.details = details or {}
        self.request_id: str | None = None  # set when a refused request had a usable id

    def to_wire(self) -> dict[str, Any]:
        """The ``error`` member of a reply."""
        return {"code": self.code.value, "message": self.message, "details": self.details}

    @classmethod
    def from_wire(cls, error: Any) -> FaasError:
        """Rebuild an error from a reply; an unknown code is itself a protocol error."""
        if not isinstance(error, dict):
            return cls(Code.INTERNAL, f"malformed error in reply: {error!r:.200}")
        try:
            code = Code(error.get("code"))
        except ValueError:
            return cls(Code.INTERNAL, f"peer sent unknown error code {error.get('code')!r:.50}")
        details = error.get("details")
        return cls(code, str(error.get("message", "")),
                   details if isinstance(details, dict) else {})

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"
