"""Load for the fault-injection suite; runs inside the test's network namespace.

    python faultload.py COUNT CONCURRENCY TARGET...

Sends COUNT requests, round-robin over the targets, from CONCURRENCY threads: a TARGET
is a function's address (GET /, a 5 s deadline) or dns:NAME@SERVER (an AAAA query over
UDP, as a stub resolver asks: up to 5 tries a second apart). A failure is followed by a
short pause, so an outage is not a busy loop. Prints one JSON object: sent, ok, failed,
the slowest request's seconds, and every failure's status and wall-clock start and end,
so the test can say the failures fell inside the outage.
"""

from __future__ import annotations

import itertools
import json
import random
import socket
import struct
import sys
import threading
import time


def query(name: str, server: str) -> str:
    """One AAAA query with a stub resolver's retries: "200" for an answer."""
    qid = random.randrange(1 << 16)
    packet = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + b"".join(
        bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0" + \
        struct.pack("!HH", 28, 1)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.settimeout(1)
        for _ in range(5):
            try:
                s.sendto(packet, (server, 53))
                reply = s.recv(4096)
            except OSError:
                continue
            rid, flags, _, answers = struct.unpack("!HHHH", reply[:8])
            if rid == qid:
                return "200" if flags & 0xF == 0 and answers else f"rcode{flags & 0xF}"
    return "dns timeout"


def one(address: str) -> str:
    if address.startswith("dns:"):
        name, _, server = address[4:].partition("@")
        return query(name, server)
    try:
        with socket.create_connection((address, 80), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: fn\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError as exc:
        return type(exc).__name__
    head = data.split(b"\r\n", 1)[0]
    return head.split(b" ")[1].decode() if head.startswith(b"HTTP/1.1 ") else "empty"


def main() -> None:
    count, concurrency, addresses = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    jobs = iter(range(count))
    targets = itertools.cycle(addresses)
    lock = threading.Lock()
    failures: list[tuple[float, str, str]] = []
    ok = 0
    slowest = 0.0
    started = time.monotonic()

    def worker() -> None:
        nonlocal ok, slowest
        while True:
            with lock:
                if next(jobs, None) is None:
                    return
                address = next(targets)
            began = time.time()
            status = one(address)
            with lock:
                slowest = max(slowest, time.time() - began)
                if status == "200":
                    ok += 1
                else:
                    failures.append((began, time.time(), address, status))
            if status != "200":
                time.sleep(0.05)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"sent": count, "ok": ok, "failed": len(failures),
                      "seconds": round(time.monotonic() - started, 2),
                      "slowest": round(slowest, 3),
                      "failures": failures}))


if __name__ == "__main__":
    main()
