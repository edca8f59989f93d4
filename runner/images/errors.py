"""The one exception type of the image code, with a closed set of codes.

Every failure caused by the uploaded image (or by a cap it exceeded) is an
:class:`ImageError`. It crosses the extraction child's process boundary as plain
data (:meth:`ImageError.to_dict`), so ``details`` only ever holds JSON types.
"""

from __future__ import annotations

from typing import Any

BAD_IMAGE = "bad_image"  # malformed, hostile or unsupported content
TOO_LARGE = "too_large"  # a cap was exceeded (bytes, entries, path, CPU, memory, time)
AMBIGUOUS = "ambiguous"  # several images in the archive and no tag to choose one
NOT_FOUND = "not_found"  # the requested tag is not in the archive

CODES = frozenset({BAD_IMAGE, TOO_LARGE, AMBIGUOUS, NOT_FOUND})

# The project-wide wire codes (common/errors.py) have no "ambiguous": a missing
# choice is the caller's request being incomplete, so it travels as bad_request.
WIRE_CODES = {BAD_IMAGE: "bad_image", TOO_LARGE: "too_large", AMBIGUOUS: "bad_request",
              NOT_FOUND: "not_found"}


class ImageError(Exception):
    """An image could not be used: ``code`` says why, ``message`` what to do about it."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None):
        if code not in CODES:
            raise ValueError(f"unknown image error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = dict(details or {})

    @property
    def wire_code(self) -> str:
        """The matching code of the project's closed set (``common.errors.Code``)."""
        return WIRE_CODES[self.code]

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for crossing a process boundary."""
        return {"code": self.code, "message": self.message, "details": self.details}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageError:
        """Rebuild an error made by :meth:`to_dict`."""
        return cls(data["code"], data["message"], data.get("details") or {})

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def bad_image(message: str, **details: Any) -> ImageError:
    """Shorthand for a ``bad_image`` error."""
    return ImageError(BAD_IMAGE, message, details)


def too_large(message: str, **details: Any) -> ImageError:
    """Shorthand for a ``too_large`` error."""
    return ImageError(TOO_LARGE, message, details)
