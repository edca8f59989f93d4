"""Prometheus metrics on ``GET /metrics`` (the controller's HTTP API, loopback only).

Two kinds of figures. The controller's own (deploys: count, duration, bytes) live in
prometheus_client objects. The runner's (per function: invocations by outcome,
hand-overs, latency histogram, pool, queue) and the agents' health are read at scrape
time, so a scrape shows the runner's counters as they are, with no second copy to
drift: a runner restart resets them, which Prometheus's ``rate()`` treats as any
counter reset. The runner not answering leaves its families out and sets
``faasd_runner_stats_up`` to 0 rather than failing the scrape.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEPLOY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def outcome_of(key: str) -> tuple[str, str]:
    """(hand-over, result) of a runner outcome key: ``cold:done`` -> (cold, done);
    ``rejected`` (503), ``failed`` (502/504 before hand-over) -> (none, key)."""
    how, sep, result = key.partition(":")
    return (how, result) if sep else ("none", key)


class Snapshot:
    """A collector of the figures read at scrape time (see the module docstring)."""

    def __init__(self) -> None:
        self.stats: dict[str, Any] | None = None
        self.agents: list[dict[str, Any]] = []

    def collect(self) -> Iterator[Metric]:
        yield from self._agents()
        up = GaugeMetricFamily("faasd_runner_stats_up",
                               "1 when the runner answered this scrape's stats call")
        up.add_metric([], 1 if self.stats is not None else 0)
        yield up
        if self.stats is not None:
            yield from self._functions(self.stats["functions"], self.stats["buckets"])
            if "memory" in self.stats:
                yield from self._memory(self.stats["memory"])

    def _memory(self, memory: dict[str, int]) -> Iterator[Metric]:
        used = GaugeMetricFamily("faasd_container_memory_bytes", "memory limits of the "
                                 "containers started and not yet exited, all functions")
        used.add_metric([], memory["used"])
        budget = GaugeMetricFamily("faasd_container_memory_budget_bytes", "the host's "
                                   "container memory budget (container_memory_budget)")
        budget.add_metric([], memory["budget"])
        yield from (used, budget)

    def _agents(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("faasd_agent_up", "1 when the agent answers its pings",
                               labels=["agent"])
        synced = GaugeMetricFamily("faasd_agent_synced", "1 when the agent has the "
                                   "current desired state", labels=["agent"])
        restarts = CounterMetricFamily("faasd_agent_restarts", "new boot ids seen since "
                                       "the controller started", labels=["agent"])
        for a in self.agents:
            up.add_metric([a["name"]], 1 if a["state"] == "up" else 0)
            synced.add_metric([a["name"]], 1 if a["synced"] else 0)
            restarts.add_metric([a["name"]], a["restarts"])
        yield from (up, synced, restarts)

    def _functions(self, functions: list[dict[str, Any]], buckets: list[float]
                   ) -> Iterator[Metric]:
        invocations = CounterMetricFamily(
            "faasd_invocations", "connections served, by hand-over (cold, warm, reused, "
            "none) and result (done, exited, timeout, rejected, forbidden, failed, error)",
            labels=["function", "handover", "result"])
        handovers = CounterMetricFamily("faasd_handovers", "connections handed to a "
                                        "container, by how it was found",
                                        labels=["function", "kind"])
        timeouts = CounterMetricFamily("faasd_timeouts", "containers killed at the "
                                       "function's timeout", labels=["function"])
        rejected = CounterMetricFamily("faasd_rejected", "connections answered 503 by the "
                                       "runner (concurrency and queue full)",
                                       labels=["function"])
        refused = {k: CounterMetricFamily(f"faasd_{k}", text, labels=["function"])
                   for k, text in (
            ("rejected_client", "of faasd_rejected: the client address held per_client "
             "connections"),
            ("rejected_memory", "of faasd_rejected: a new container would have gone past "
             "the container memory budget"),
            ("first_byte_timeouts", "connections closed unanswered: no byte within "
             "first_byte_timeout"),
            ("first_byte_dropped", "connections closed unanswered: too many were waiting "
             "for their first byte"),
            ("forbidden", "connections from a VPN peer the function's allow does not name: "
             "403 on port 80, closed on another, before any container"),
        )}
        failed = CounterMetricFamily("faasd_failed", "connections answered 502/504 before "
                                     "a hand-over (container failed to start or connect)",
                                     labels=["function"])
        latency = HistogramMetricFamily("faasd_request_duration_seconds", "connection "
                                        "accepted to closed", labels=["function"])
        gauges = {k: GaugeMetricFamily(f"faasd_{k}", text, labels=["function"]) for k, text in (
            ("pool_idle", "containers ready and waiting for a connection"),
            ("containers_running", "containers idle, busy or starting"),
            ("queue_length", "connections waiting for a concurrency slot"),
            ("first_byte_waiting", "connections accepted whose first byte has not come"),
        )}
        for f in functions:
            name = f["name"]
            for key, n in sorted(f["outcomes"].items()):
                invocations.add_metric([name, *outcome_of(key)], n)
            for kind in ("cold", "warm", "reused"):
                handovers.add_metric([name, kind], f[kind])
            timeouts.add_metric([name], f["timeouts"])
            rejected.add_metric([name], f["rejected"])
            failed.add_metric([name], f["failed"])
            for key, family in refused.items():
                family.add_metric([name], f.get(key, 0))
            cumulative, total = [], 0
            for bound, n in zip([*map(str, buckets), "+Inf"], f["latency_counts"]):
                total += n
                cumulative.append((bound, total))
            latency.add_metric([name], cumulative, f["latency_sum"])
            gauges["pool_idle"].add_metric([name], f["idle"])
            gauges["containers_running"].add_metric([name], f["idle"] + f["busy"] + f["starting"])
            gauges["queue_length"].add_metric([name], f["waiting"])
            gauges["first_byte_waiting"].add_metric([name], f.get("first_byte_waiting", 0))
        yield from (invocations, handovers, timeouts, rejected, *refused.values(), failed,
                    latency, *gauges.values())


class Metrics:
    """The controller's registry: its own deploy figures plus the scrape-time snapshot."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.snapshot = Snapshot()
        self.registry.register(self.snapshot)
        self.deploys = Counter("faasd_deploys", "deploys, by result (ok, failed)",
                               ["result"], registry=self.registry)
        self.deploy_seconds = Histogram("faasd_deploy_duration_seconds", "deploy: upload "
                                        "finished to version recorded (verify, extract)",
                                        buckets=DEPLOY_BUCKETS, registry=self.registry)
        self.deploy_bytes = Counter("faasd_deploy_bytes", "image bytes uploaded by deploys",
                                    registry=self.registry)

    def deployed(self, seconds: float, size: int) -> None:
        self.deploys.labels("ok").inc()
        self.deploy_seconds.observe(seconds)
        self.deploy_bytes.inc(size)

    def deploy_failed(self) -> None:
        self.deploys.labels("failed").inc()

    def render(self, stats: dict[str, Any] | None, agents: list[dict[str, Any]]) -> str:
        """The exposition text with these scrape-time figures."""
        self.snapshot.stats, self.snapshot.agents = stats, agents
        return generate_latest(self.registry).decode()
