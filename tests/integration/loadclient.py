"""A small HTTP load client that runs inside a test's network namespace.

    python loadclient.py ADDRESS PATH COUNT CONCURRENCY

Prints one JSON object: status counts, bodies seen, failures and latency percentiles.
Bounded in count and time: every connection has a 30 s timeout.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import sys
import time


def one(address: str, path: str) -> tuple[str, str, float]:
    started = time.perf_counter()
    try:
        with socket.create_connection((address, 80), timeout=30) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: fn\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError as exc:
        return "error", type(exc).__name__, time.perf_counter() - started
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b" ")[1].decode() if head.startswith(b"HTTP/1.1 ") else "empty"
    return status, body.decode(errors="replace"), time.perf_counter() - started


def main() -> None:
    address, path, count, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda _: one(address, path), range(count)))
    statuses: dict[str, int] = {}
    for status, _, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
    latencies = sorted(r[2] for r in results)
    print(json.dumps({
        "statuses": statuses,
        "bodies": sorted({r[1] for r in results})[:20],
        "p50": latencies[len(latencies) // 2],
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }))


if __name__ == "__main__":
    main()
