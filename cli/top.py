"""faasctl top: the live figures of every function and agent, refreshed every second.

The same figures /metrics serves, from the controller's ``stats`` call. Rates and
latency percentiles are computed here between two readings: requests per second from
the ``served`` counter, p50/p99 from the latency histogram's buckets (the bucket's upper
bound, as Prometheus's ``histogram_quantile`` would without interpolation).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, TextIO

from cli.render import table
from common.rpc import Client

CLEAR = "\x1b[H\x1b[2J"


def quantile(q: float, buckets: list[float], counts: list[int]) -> float | None:
    """The upper bound of the bucket holding the q-quantile (None: no requests; inf:
    past the last bound)."""
    total = sum(counts)
    if total == 0:
        return None
    rank, seen = q * total, 0
    for bound, n in zip([*buckets, float("inf")], counts):
        seen += n
        if seen >= rank:
            return bound
    return float("inf")


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return ">60s" if seconds == float("inf") else f"<{seconds * 1e3:g}ms"


def frame(now: dict[str, Any], before: dict[str, Any] | None, elapsed: float,
          out: TextIO) -> None:
    """One screen: agents, then functions."""
    agents = "  ".join(f"{a['name']} {a['state']}{'' if a['synced'] else ' (unsynced)'}"
                       for a in now["agents"])
    out.write(f"agents: {agents}\n\n")
    runner = now["runner"]
    if runner is None:
        out.write("the runner does not answer: no function figures\n")
        return
    previous = (before or {}).get("runner") or {"functions": []}
    old = {f["name"]: f for f in previous["functions"]}
    rows = [["FUNCTION", "REQ/S", "P50", "P99", "IDLE", "BUSY", "START", "QUEUE", "SERVED",
             "COLD", "WARM", "REUSED", "503", "FAILED", "TIMEOUT"]]
    for f in runner["functions"]:
        prev = old.get(f["name"])
        if prev is not None and any(a < b for a, b in zip(f["latency_counts"],
                                                          prev["latency_counts"])):
            prev = None  # the runner restarted between the readings: its counters too
        # p50/p99 over the interval when there is one, else since the runner started
        counts = f["latency_counts"] if prev is None else [
            a - b for a, b in zip(f["latency_counts"], prev["latency_counts"])]
        rate = "-" if prev is None or elapsed <= 0 else \
            f"{(sum(f['latency_counts']) - sum(prev['latency_counts'])) / elapsed:.1f}"
        rows.append([f["name"], rate, _ms(quantile(0.5, runner["buckets"], counts)),
                     _ms(quantile(0.99, runner["buckets"], counts)),
                     *(str(f[k]) for k in ("idle", "busy", "starting", "waiting", "served",
                                           "cold", "warm", "reused", "rejected", "failed",
                                           "timeouts"))])
    table(rows, out)


async def top(client: Client, once: bool, interval: float = 1.0, out: TextIO = sys.stdout
              ) -> None:
    """Print frames until interrupted (or one, with ``once``)."""
    before, then = None, time.monotonic()
    while True:
        now = await client.call("stats", {})
        moment = time.monotonic()
        if out.isatty() and not once:
            out.write(CLEAR)
        frame(now, before, moment - then, out)
        out.flush()
        if once:
            return
        before, then = now, moment
        await asyncio.sleep(interval)
