"""Uploads in progress: image bytes spooled to ``$FAAS_ROOT/spool`` as they arrive.

No process holds a whole image: the CLI sends 1 MiB chunks with at most
``UPLOAD_WINDOW`` unacknowledged (its flow control is our acknowledgement), the HTTP API
copies its body to the same spool file. An upload that stops arriving is dropped after
``upload_idle_seconds``, and one that trickles (a byte now and then resets no timer) when
it averages less than ``upload_min_rate`` over an ``upload_rate_window``. Uploads hold
slots: ``upload_slots`` in all and ``upload_slots_per_user`` per caller, so that one
user's stalled uploads cannot keep everyone else from deploying. At start every spooled
file is removed, because the uploads they belonged to died with the previous controller.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field

from common.errors import Code, FaasError

MAX_UPLOADS = 8
UNKNOWN_CALLER = "unknown"  # callers the transport does not identify share one count
_REMEMBER_DROPS = 64  # why an upload was dropped, told to its next chunk


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
    caller: str = UNKNOWN_CALLER
    # the start of the current rate window and the bytes received by then
    mark: float = field(default_factory=time.monotonic)
    mark_bytes: int = 0


class Uploads:
    """The spool directory and the uploads writing into it."""

    def __init__(self, spool: str, max_bytes: int, idle_seconds: float, min_rate: int = 0,
                 rate_window: float = 30.0, slots: int = MAX_UPLOADS,
                 slots_per_caller: int = MAX_UPLOADS):
        self.spool = spool
        self.max_bytes = max_bytes
        self.idle_seconds = idle_seconds
        self.min_rate = min_rate
        self.rate_window = rate_window
        self.slots = slots
        self.slots_per_caller = slots_per_caller
        self.active: dict[str, Upload] = {}
        self.dropped: dict[str, str] = {}  # upload id -> why the janitor dropped it

    def clear(self) -> int:
        """Remove every spooled file (at start); return how many there were."""
        os.makedirs(self.spool, mode=0o700, exist_ok=True)
        removed = 0
        for entry in os.scandir(self.spool):
            os.unlink(entry.path)
            removed += 1
        return removed

    def begin(self, name: str, tag: str | None, caller: str = UNKNOWN_CALLER) -> Upload:
        """Open a new spool file for ``name``; the name was checked by the schema.
        ``caller`` says whose slot it takes (the daemon's word, never the request's)."""
        mine = sum(1 for u in self.active.values() if u.caller == caller)
        if mine >= self.slots_per_caller:
            raise FaasError(Code.UNAVAILABLE, f"too many uploads in progress for you: {mine}; "
                            "wait for one to finish or abort one (upload_slots_per_user = "
                            f"{self.slots_per_caller})", {"max": self.slots_per_caller})
        if len(self.active) >= self.slots:
            raise FaasError(Code.CONFLICT, f"{self.slots} uploads already in progress; "
                            "wait for one to finish (upload_slots)", {"max": self.slots})
        uid = secrets.token_hex(16)
        path = os.path.join(self.spool, f"{uid}.tar")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        now = time.monotonic()
        up = self.active[uid] = Upload(uid, name, tag, path, fd, touched=now, caller=caller,
                                       mark=now)
        return up

    def get(self, upload_id: str) -> Upload:
        """The upload, or not_found (expired, finished or never begun)."""
        up = self.active.get(upload_id)
        if up is None:
            why = self.dropped.get(upload_id) or (
                f"it finished, failed or was idle over {self.idle_seconds:.0f}s")
            raise FaasError(Code.NOT_FOUND, f"no upload {upload_id}: {why}; start again")
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
        """Drop uploads (not yet being deployed) idle too long, or slower than
        ``min_rate`` over the window that just ended; called every second."""
        now = time.monotonic()
        stale: dict[str, str] = {}
        for u in self.active.values():
            if u.phase != "upload":
                continue
            if now - u.touched > self.idle_seconds:
                stale[u.id] = f"it sent nothing for {self.idle_seconds:.0f}s"
            elif self.min_rate and now - u.mark >= self.rate_window:
                rate = (u.received - u.mark_bytes) / (now - u.mark)
                if rate < self.min_rate:
                    stale[u.id] = (f"it was dropped for sending {rate:.0f} bytes/s over "
                                   f"{now - u.mark:.0f}s, under upload_min_rate "
                                   f"({self.min_rate} bytes/s)")
                else:
                    u.mark, u.mark_bytes = now, u.received
        for uid, why in stale.items():
            self.drop(uid)
            self.dropped[uid] = why
        while len(self.dropped) > _REMEMBER_DROPS:
            del self.dropped[next(iter(self.dropped))]
        return list(stale)
