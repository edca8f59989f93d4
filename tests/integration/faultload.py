"""Load for the fault-injection suite; runs inside the test's network namespace.

    python faultload.py COUNT CONCURRENCY ADDRESS...

Sends COUNT requests (GET /), round-robin over the addresses, from CONCURRENCY
threads, each request with a 5 s deadline, a short pause after a failure so an outage
is not a busy loop. Prints one JSON object: sent, ok, failed, and every failure's status
and wall-clock start and end, so the test can say the failures fell inside the outage.
"""

from __future__ import annotations

import itertools
import json
import socket
import sys
import threading
import time


def one(address: str) -> str:
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
    started = time.monotonic()

    def worker() -> None:
        nonlocal ok
        while True:
            with lock:
                if next(jobs, None) is None:
                    return
                address = next(targets)
            began = time.time()
            status = one(address)
            with lock:
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
                      "failures": failures}))


if __name__ == "__main__":
    main()
