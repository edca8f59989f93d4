"""The host-wide container memory budget (issue 11 §3), end to end with real runc: a
platform whose budget is two containers of the function's memory."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from harness import http_get as get
from harness import poll, run
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).parent
MEMORY = 64 << 20


@pytest.fixture(scope="module")
def platform_config() -> str:
    return f"container_memory_budget = {2 * MEMORY}\n"


def runner_stats(platform) -> dict:
    return json.loads(platform.faasctl("--json", "top").stdout)["runner"]


def test_a_third_container_past_the_budget_gets_503_until_one_has_exited(platform, image_tar):
    out = platform.faasctl("--json", "new", "mem", "-f", image_tar)
    address = json.loads(out.stdout)["address"]
    platform.faasctl("set", "mem", f"memory={MEMORY}", "concurrency=4", "per_client=off",
                     "timeout=4")
    poll("mem answering", lambda: get(platform, address, timeout=5)[0] == 200, 15)
    held = [subprocess.Popen(platform.netns.argv("curl", "-s", "-g", "-m", "20",
                                                 f"http://[{address}]/sleep"))
            for _ in range(2)]
    try:
        poll("two containers holding the budget", lambda: runner_stats(platform)["memory"]
             == {"budget": 2 * MEMORY, "used": 2 * MEMORY, "containers": 2}, 10)
        status, body = get(platform, address)
        assert status == 503 and "memory budget" in body, (status, body)
        fn = next(f for f in runner_stats(platform)["functions"] if f["name"] == "mem")
        assert fn["rejected_memory"] == 1 and fn["busy"] == 2
        text = run(*platform.netns.argv("curl", "-s", "-m", "5",
                                        "http://127.0.0.1:8080/metrics")).stdout
        samples = {(s.name, tuple(s.labels.values())): s.value
                   for fam in text_string_to_metric_families(text) for s in fam.samples}
        assert samples[("faasd_rejected_memory_total", ("mem",))] == 1
        assert samples[("faasd_container_memory_budget_bytes", ())] == 2 * MEMORY
        assert samples[("faasd_container_memory_bytes", ())] == 2 * MEMORY
        # the held ones end at the timeout (killed): their memory is given back
        poll("served again once they have exited", lambda: get(platform, address)[0] == 200,
             15)
    finally:
        for proc in held:
            proc.wait(timeout=30)
