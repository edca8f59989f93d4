"""Clients from chosen source addresses, driven line by line, inside a test's namespace.

    python peerclient.py FUNCTION_ADDRESS

Reads one JSON command per line on stdin and answers one JSON line on stdout:

- ``{"open": N, "src": ADDR, "send": "half" | "none" | "sleep"}``: N connections bound
  to ADDR, each sending half a request header (``GET /sleep HTTP/1.1`` and no end of
  header), nothing, or a whole ``GET /sleep`` request; they are kept open.
- ``{"answers": ADDR}``: what the connections from ADDR have received so far: how many
  got a 503 (with Retry-After), how many were closed with no answer, how many are still
  open with nothing received.
- ``{"get": ADDR, "path": P, "timeout": T}``: one whole request from ADDR; its status
  (0: none), its body and how long it took.
- ``{"close": ADDR}``: close the connections from ADDR.

Every socket has a timeout; the script ends when stdin closes.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from typing import Any

PAYLOAD = {"half": b"GET /sleep HTTP/1.1\r\nHost: fn\r\n", "none": b"",
           "sleep": b"GET /sleep HTTP/1.1\r\nHost: fn\r\n\r\n"}


def connect(address: str, src: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((src, 0))
    sock.connect((address, 80))
    return sock


class Peers:
    def __init__(self, address: str):
        self.address = address
        self.conns: dict[str, list[socket.socket]] = {}
        self.got: dict[socket.socket, tuple[bytes, bool]] = {}  # received, ended

    def open(self, n: int, src: str, send: str) -> dict[str, Any]:
        for _ in range(n):
            sock = connect(self.address, src, 10)
            if PAYLOAD[send]:
                sock.sendall(PAYLOAD[send])
            sock.setblocking(False)
            self.conns.setdefault(src, []).append(sock)
            self.got[sock] = (b"", False)
        return {"opened": n}

    def answers(self, src: str) -> dict[str, Any]:
        counts = {"503": 0, "closed": 0, "open": 0, "other": 0}
        for sock in self.conns.get(src, []):
            data, ended = self.got[sock]
            while not ended:
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    break
                except OSError:  # reset
                    chunk = b""
                ended = not chunk
                data += chunk
            self.got[sock] = (data, ended)
            if data.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: " in data:
                counts["503"] += 1
            elif not data:
                counts["closed" if ended else "open"] += 1
            else:
                counts["other"] += 1
        return counts

    def get(self, src: str, path: str, timeout: float) -> dict[str, Any]:
        started = time.monotonic()
        data = b""
        try:
            with connect(self.address, src, timeout) as sock:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: fn\r\nConnection: close\r\n\r\n"
                             .encode())
                while chunk := sock.recv(65536):
                    data += chunk
        except OSError:
            pass
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1 ") else 0
        return {"status": status, "body": body.decode(errors="replace"),
                "seconds": time.monotonic() - started}

    def close(self, src: str) -> dict[str, Any]:
        for sock in self.conns.pop(src, []):
            sock.close()
            self.got.pop(sock, None)
        return {"closed": src}


def main() -> None:
    peers = Peers(sys.argv[1])
    for line in sys.stdin:
        cmd = json.loads(line)
        if "open" in cmd:
            out = peers.open(cmd["open"], cmd["src"], cmd["send"])
        elif "answers" in cmd:
            out = peers.answers(cmd["answers"])
        elif "get" in cmd:
            out = peers.get(cmd["get"], cmd.get("path", "/"), cmd.get("timeout", 10))
        else:
            out = peers.close(cmd["close"])
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
