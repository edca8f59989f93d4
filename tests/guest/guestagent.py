#!/usr/bin/python3
"""The test guest's control agent: reads commands from a virtio-serial port, runs each
with bash, answers its exit status, stdout and stderr. The guest has no network; this is
how the host drives it (docs/guest.md). Standard library only: it runs on the guest's
/usr/bin/python3, started by systemd at every boot (Restart=always).

Framing, both ways: one JSON object per line (UTF-8; undecodable output bytes replaced).
A request is ``{"id": ID, "cmd": BASH_TEXT, "timeout": SECONDS}``; its answer
``{"id": ID, "rc": N, "stdout": S, "stderr": S}``. A line that is not a request (stale
bytes from before a reboot, a half line) is answered with ``{"id": null, "error": ...}``
and otherwise ignored, so the host can always resynchronise by sending a fresh id and
reading until it comes back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

MAX_LINE = 1 << 20
MAX_OUTPUT = 4 << 20


def encode(msg: dict) -> bytes:
    """One message as one line."""
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


class LineReader:
    """Splits a byte stream into lines; a line longer than MAX_LINE is dropped whole."""

    def __init__(self) -> None:
        self.buf = b""
        self.skipping = False

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        lines = []
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if self.skipping:
                self.skipping = False
            else:
                lines.append(line)
        if len(self.buf) > MAX_LINE:
            self.buf, self.skipping = b"", True
        return lines


def decode(line: bytes) -> dict | None:
    """A line's object, or None if it is not one (garbage, a torn line)."""
    try:
        msg = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return msg if isinstance(msg, dict) else None


def handle(msg: dict | None) -> dict:
    """Run one request; the answer to send."""
    if not msg or not isinstance(msg.get("cmd"), str) or "id" not in msg:
        return {"id": None, "error": "not a request"}
    timeout = msg.get("timeout", 600)
    try:
        proc = subprocess.run(["bash", "-c", msg["cmd"]], capture_output=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = 124, exc.stdout or b"", (exc.stderr or b"") + b"\n(agent: timed out)"
    return {"id": msg["id"], "rc": rc,
            "stdout": out[-MAX_OUTPUT:].decode("utf-8", "replace"),
            "stderr": err[-MAX_OUTPUT:].decode("utf-8", "replace")}


def serve(path: str) -> None:
    while not os.path.exists(path):  # udev makes the link a moment after boot
        time.sleep(0.2)
    fd = os.open(path, os.O_RDWR)
    reader = LineReader()
    while True:
        data = os.read(fd, 65536)
        if not data:  # no host on the other end yet
            time.sleep(0.2)
            continue
        for line in reader.feed(data):
            reply = encode(handle(decode(line)))
            while reply:
                reply = reply[os.write(fd, reply):]


if __name__ == "__main__":
    serve(sys.argv[1])
