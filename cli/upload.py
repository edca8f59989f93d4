"""faasctl new: stream an image to the controller and show how it goes.

The image is read in chunks of the size the controller asks for, with at most its
``window`` of chunks unacknowledged: that is the flow control, and it means neither
side ever holds more than a few MiB of the image. While the controller verifies and
extracts, its progress is polled and shown.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
import time
from typing import Any, BinaryIO, TextIO

from common.errors import FaasError
from common.rpc import Client

POLL_SECONDS = 0.25


class ProgressLine:
    """One updating line on a terminal; a plain line per phase and per 10% otherwise."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.tty = stream.isatty()
        self.phase = ""
        self.phase_started = time.monotonic()
        self.last_draw = 0.0
        self.last_tenth = -1

    def update(self, phase: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        if phase != self.phase:
            if self.tty and self.phase:
                self.stream.write("\n")
            self.phase, self.phase_started, self.last_tenth = phase, now, -1
            self.last_draw = 0.0  # a new phase is always shown
        rate = done / max(now - self.phase_started, 1e-3)
        text = f"{phase:8} {_mib(done)}" + (f" / {_mib(total)}" if total else "")
        text += f"  {_mib(rate)}/s"
        if self.tty:
            if now - self.last_draw >= 0.1:
                self.stream.write("\r" + text.ljust(60))
                self.last_draw = now
        else:
            tenth = int(10 * done / total) if total else 0
            if tenth != self.last_tenth:
                self.stream.write(text + "\n")
                self.last_tenth = tenth
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.phase:
            self.stream.write("\n")
            self.stream.flush()


def _mib(n: float | None) -> str:
    return "?" if n is None else f"{n / 1048576:.1f} MiB"


def _size(src: BinaryIO) -> int | None:
    try:
        st = os.fstat(src.fileno())
    except (OSError, ValueError):
        return None
    return st.st_size if st.st_size and stat.S_ISREG(st.st_mode) else None


async def upload(client: Client, name: str, tag: str | None, src: BinaryIO,
                 progress: ProgressLine | None) -> dict[str, Any]:
    """Upload ``src`` as a new version of ``name`` and deploy it; return the result."""
    begin = await client.call("upload_begin", {"name": name, "tag": tag})
    upload_id, chunk, window = begin["upload"], begin["chunk"], begin["window"]
    total = _size(src)
    try:
        await _send(client, upload_id, src, chunk, window, total, progress)
        deploy = asyncio.ensure_future(client.call("deploy", {"upload": upload_id}, retries=0))
        while not deploy.done():
            await asyncio.wait({deploy}, timeout=POLL_SECONDS)
            if progress is not None and not deploy.done():
                try:
                    seen = await client.call("deploy_progress", {"upload": upload_id}, retries=0)
                    progress.update(seen["phase"], seen["done"], seen["total"])
                except FaasError:
                    pass  # the deploy's own outcome is what counts
        return deploy.result()
    except BaseException:
        try:
            await client.call("upload_abort", {"upload": upload_id}, timeout=2, retries=0)
        except FaasError:
            pass
        raise
    finally:
        if progress is not None:
            progress.close()


async def _send(client: Client, upload_id: str, src: BinaryIO, chunk: int, window: int,
                total: int | None, progress: ProgressLine | None) -> None:
    inflight: set[asyncio.Future[Any]] = set()
    offset = 0
    while True:
        data = await asyncio.to_thread(src.read, chunk)
        if not data:
            break
        inflight.add(asyncio.ensure_future(client.call(
            "upload_chunk", {"upload": upload_id, "offset": offset, "data": data})))
        offset += len(data)
        if len(inflight) >= window:
            done, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
            for d in done:
                d.result()  # raise the first failure
        if progress is not None:
            progress.update("upload", offset, total)
    for d in asyncio.as_completed(inflight):
        await d


def source(path: str | None) -> BinaryIO:
    """The image: a file, else stdin (which must not be a terminal)."""
    if path is not None and path != "-":
        return open(path, "rb")
    if sys.stdin.isatty():
        raise FaasError("bad_request", "no image: pipe one in (docker save fn | faasctl new "
                        "fn) or give -f FILE")
    return sys.stdin.buffer
