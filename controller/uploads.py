"""Uploads in progress: image bytes spooled to ``$FAAS_ROOT/spool`` as they arrive.

No process holds a whole image: the CLI sends 1 MiB chunks with at most
``UPLOAD_WINDOW`` unacknowledged (its flow control is our acknowledgement), the HTTP API
copies its body to the same spool file. An upload that stops arriving is dropped after
``upload_idle_seconds``; at start every spooled file is removed, because the uploads they
belonged to died with the previous controller.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field

from common.errors import Code, FaasError

MAX_UPLOADS = 8


@dataclass
class Upload:
    """One upload: where its bytes go and how far it has come."""

    id: str
    name: str
    tag: str | None
    path: str
    fd: int
    received: int = 0
    phase: str = "upload"  # upload, verify, extract, done
    done: int = 0  # progress within the phase (bytes)
    total: int | None = None
    touched: float = field(default_factory=time.monotonic)


class Uploads:
    """The spool directory and the uploads writing into it."""

    def __init__(self, spool: str, max_bytes: int, idle_seconds: float):
        self.spool = spool
        self.max_bytes = max_bytes
        self.idle_seconds = idle_seconds
        self.active: dict[str, Upload] = {}

    def clear(self) -> int:
        """Remove every spooled file (at start); return how many there were."""
        os.makedirs(self.spool, mode=0o700, exist_ok=True)
        removed = 0
        for entry in os.scandir(self.spool):
            os.unlink(entry.path)
            removed += 1
        return removed

    def begin(self, name: str, tag: str | None) -> Upload:
        """Open a new spool file for ``name``; the name was checked by the schema."""
        if len(self.active) >= MAX_UPLOADS:
            raise FaasError(Code.CONFLICT, f"{MAX_UPLOADS} uploads already in progress; "
                            "wait for one to finish")
        uid = secrets.token_hex(16)
        path = os.path.join(self.spool, f"{uid}.tar")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        up = self.active[uid] = Upload(uid, name, tag, path, fd)
        return up

    def get(self, upload_id: str) -> Upload:
        """The upload, or not_found (expired, finished or never begun)."""
        up = self.active.get(upload_id)
        if up is None:
            raise FaasError(Code.NOT_FOUND, f"no upload {upload_id}: it finished, failed or "
                            f"was idle over {self.idle_seconds:.0f}s; start again")
        up.touched = time.monotonic()
        return up

    def write(self, upload_id: str, offset: int, data: bytes) -> int:
        """Write a chunk at ``offset``; a chunk already received is acknowledged again."""
        up = self.get(upload_id)
        if up.phase != "upload":
            raise FaasError(Code.CONFLICT, f"upload {upload_id} is past its upload phase")
        if offset + len(data) <= up.received:
            return up.received  # a retry of a chunk we have
        if offset != up.received:
            raise FaasError(Code.BAD_REQUEST, f"chunk at offset {offset}, expected "
                            f"{up.received}: send chunks in order", {"expected": up.received})
        if up.received + len(data) > self.max_bytes:
            self.drop(upload_id)
            raise FaasError(Code.TOO_LARGE, f"image over {self.max_bytes} bytes; raise "
                            "upload_max_bytes if this is right", {"max": self.max_bytes})
        try:
            os.write(up.fd, data)
        except OSError as exc:
            self.drop(upload_id)
            raise FaasError(Code.UNAVAILABLE, f"cannot spool the upload: {exc.strerror}; free "
                            f"space under {self.spool}") from None
        up.received += len(data)
        up.done = up.received
        return up.received

    def finish(self, upload_id: str) -> Upload:
        """End the upload phase: the bytes are on disk, durably."""
        up = self.get(upload_id)
        if up.phase != "upload":
            raise FaasError(Code.CONFLICT, f"upload {upload_id} is already being deployed")
        if up.received == 0:
            self.drop(upload_id)
            raise FaasError(Code.BAD_IMAGE, "the upload is empty: send a docker save tarball")
        os.fsync(up.fd)
        os.close(up.fd)
        up.fd = -1
        up.phase, up.done, up.total = "verify", 0, up.received
        return up

    def drop(self, upload_id: str) -> None:
        """Forget an upload and remove its file, whatever state it is in."""
        up = self.active.pop(upload_id, None)
        if up is None:
            return
        if up.fd >= 0:
            os.close(up.fd)
        try:
            os.unlink(up.path)
        except FileNotFoundError:
            pass  # the runner took it

    def expire(self) -> list[str]:
        """Drop uploads idle too long that are not being deployed."""
        now = time.monotonic()
        stale = [u.id for u in self.active.values()
                 if u.phase == "upload" and now - u.touched > self.idle_seconds]
        for uid in stale:
            self.drop(uid)
        return stale
