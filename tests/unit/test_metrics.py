"""/metrics: the runner's figures and the agents' health as Prometheus text."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from controller.metrics import Metrics, outcome_of

BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
FUNCTION = {
    "name": "fib", "idle": 2, "busy": 1, "starting": 1, "waiting": 3, "served": 5,
    "cold": 3, "warm": 1, "reused": 1, "rejected": 4, "failed": 1, "timeouts": 1,
    "outcomes": {"cold:exited": 2, "cold:timeout": 1, "warm:done": 1, "reused:done": 1,
                 "rejected": 4, "failed": 1},
    "latency_counts": [0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2], "latency_sum": 7.5,
}
AGENTS = [{"name": "runner", "state": "up", "synced": True, "restarts": 2},
          {"name": "dnsagent", "state": "down", "synced": False, "restarts": 0}]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_runner_figures_and_agent_health():
    m = Metrics()
    m.deployed(1.5, 1000)
    got = samples(m.render({"functions": [FUNCTION], "buckets": BUCKETS}, AGENTS))
    fib = (("function", "fib"),)
    assert got[("faasd_invocations_total", (("function", "fib"), ("handover", "cold"),
                                            ("result", "timeout")))] == 1
    assert got[("faasd_invocations_total", (("function", "fib"), ("handover", "none"),
                                            ("result", "rejected")))] == 4
    assert got[("faasd_handovers_total", (("function", "fib"), ("kind", "warm")))] == 1
    assert got[("faasd_rejected_total", fib)] == 4 and got[("faasd_timeouts_total", fib)] == 1
    assert got[("faasd_request_duration_seconds_bucket", (*fib, ("le", "0.05")))] == 5
    assert got[("faasd_request_duration_seconds_bucket", (*fib, ("le", "60.0")))] == 5
    assert got[("faasd_request_duration_seconds_bucket", (*fib, ("le", "+Inf")))] == 7
    assert got[("faasd_request_duration_seconds_count", fib)] == 7
    assert got[("faasd_request_duration_seconds_sum", fib)] == 7.5
    assert got[("faasd_pool_idle", fib)] == 2 and got[("faasd_containers_running", fib)] == 4
    assert got[("faasd_queue_length", fib)] == 3
    assert got[("faasd_agent_up", (("agent", "runner"),))] == 1
    assert got[("faasd_agent_up", (("agent", "dnsagent"),))] == 0
    assert got[("faasd_agent_restarts_total", (("agent", "runner"),))] == 2
    assert got[("faasd_deploys_total", (("result", "ok"),))] == 1
    assert got[("faasd_deploy_bytes_total", ())] == 1000
    assert got[("faasd_runner_stats_up", ())] == 1


def test_admission_refusals_and_the_memory_budget():
    fn = {**FUNCTION, "rejected_client": 3, "rejected_memory": 1, "first_byte_timeouts": 7,
          "first_byte_dropped": 2, "first_byte_waiting": 5, "forbidden": 4}
    memory = {"budget": 4 << 30, "used": 1 << 30, "containers": 2}
    got = samples(Metrics().render({"functions": [fn], "buckets": BUCKETS, "memory": memory},
                                   AGENTS))
    fib = (("function", "fib"),)
    assert got[("faasd_rejected_client_total", fib)] == 3
    assert got[("faasd_rejected_memory_total", fib)] == 1
    assert got[("faasd_first_byte_timeouts_total", fib)] == 7
    assert got[("faasd_first_byte_dropped_total", fib)] == 2
    assert got[("faasd_forbidden_total", fib)] == 4
    assert got[("faasd_first_byte_waiting", fib)] == 5
    assert got[("faasd_container_memory_bytes", ())] == 1 << 30
    assert got[("faasd_container_memory_budget_bytes", ())] == 4 << 30


def test_a_silent_runner_leaves_its_families_out_not_the_scrape():
    got = samples(Metrics().render(None, AGENTS))
    assert got[("faasd_runner_stats_up", ())] == 0
    assert not any(name.startswith("faasd_invocations") for name, _ in got)


def test_outcome_keys():
    assert outcome_of("cold:done") == ("cold", "done")
    assert outcome_of("rejected") == ("none", "rejected")
