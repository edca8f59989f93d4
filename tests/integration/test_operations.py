"""Operating faasd: graceful stops, a simulated reboot, metrics, top and status."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from harness import PROCESSES, poll, run
from harness import http_get as get
from prometheus_client.parser import text_string_to_metric_families


def functions(platform) -> dict[str, dict]:
    return {f["name"]: f
            for f in json.loads(platform.faasctl("--json", "list").stdout)["functions"]}


@pytest.fixture(scope="module")
def deployed(platform, image_tar) -> dict[str, str]:
    """Three functions: plain, warm pool, reuse."""
    for name, settings in (("plain", ()), ("pooled", ("min_warm=1",)), ("kept", ("reuse=true",))):
        platform.faasctl("new", name, "-f", image_tar)
        if settings:
            platform.faasctl("set", name, *settings)
    addresses = {n: f["address"] for n, f in functions(platform).items()}
    for name, address in addresses.items():
        poll(f"{name} answering", lambda a=address: get(platform, a)[0] == 200, 15)
    return addresses


def all_answer(platform, addresses: dict[str, str]) -> bool:
    return all(get(platform, a, timeout=2)[0] == 200 for a in addresses.values())


def test_metrics_and_top_show_the_traffic(platform, deployed):
    for _ in range(3):
        assert get(platform, deployed["plain"])[0] == 200
    text = run(*platform.netns.argv("curl", "-s", "-m", "5",
                                    "http://127.0.0.1:8080/metrics")).stdout
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    plain = (("function", "plain"),)
    assert samples[("faasd_request_duration_seconds_count", plain)] >= 3
    assert samples[("faasd_handovers_total", (*plain, ("kind", "cold")))] >= 3
    assert samples[("faasd_pool_idle", (("function", "pooled"),))] >= 0
    assert all(samples[("faasd_agent_up", (("agent", a),))] == 1 for a in PROCESSES[1:])
    assert samples[("faasd_deploys_total", (("result", "ok"),))] >= 3
    assert samples[("faasd_deploy_bytes_total", ())] > 0
    top = platform.faasctl("top", "--once").stdout
    assert "FUNCTION" in top and "plain" in top and "pooled" in top


def test_status_is_healthy_with_no_flags(platform, deployed):
    out = json.loads(platform.faasctl("--json", "status").stdout)
    assert all(p["flags"] == [] for p in out["processes"]), out["processes"]
    poll("the warm pool filled", lambda: json.loads(platform.faasctl(
        "--json", "status", check=False).stdout)["functions"] == [], 10)


def test_runner_stop_lets_requests_in_flight_finish(platform, deployed):
    slow = subprocess.Popen(platform.netns.argv(
        "curl", "-s", "-g", "-m", "20", f"http://[{deployed['plain']}]/slow"),
        stdout=subprocess.PIPE, text=True)
    # the request is in flight once the runner has a container busy for it
    poll("the slow request in a container", lambda: any(
        f["busy"] for f in json.loads(platform.faasctl("--json", "top", check=False).stdout)
        ["runner"]["functions"] if f["name"] == "plain"), 10)
    platform.ctl("stop", "runner")  # SIGTERM: stop accepting, finish, then stop containers
    assert slow.communicate(timeout=30)[0] == "slow done"
    platform.ctl("start", "runner")
    poll("every function back", lambda: all_answer(platform, deployed), 15)


def test_stop_all_then_start_all_brings_everything_back(platform, deployed):
    before = functions(platform)
    platform.ctl("stop", "all")
    platform.ctl("start", "all")
    t0 = time.monotonic()
    platform.wait_healthy()
    poll("every function back", lambda: all_answer(platform, deployed), 15)
    print(f"stop all / start all: serving again {time.monotonic() - t0:.2f}s after start")
    assert functions(platform) == before


def test_simulated_reboot(platform, deployed):
    before = functions(platform)
    platform.stop()  # supervisord and everything under it
    for point in platform.mounts():  # a reboot unmounts everything (volumes, secrets' tmpfs)
        run("umount", point)
    for entry in platform.run_dir.iterdir():  # /run is a tmpfs: a reboot empties it
        run("rm", "-rf", entry)
    run(*platform.netns.argv("ip", "link", "del", platform.interface), check=False)
    platform.start()
    t0 = time.monotonic()
    platform.wait_healthy()
    poll("every function back", lambda: all_answer(platform, deployed), 20)
    print(f"reboot: serving again {time.monotonic() - t0:.2f}s after start")
    assert functions(platform) == before
    zone = (platform.root / "dns" / "faas.db").read_text()
    assert all(f"{n} IN AAAA {a}" in zone for n, a in deployed.items())


def test_status_flags_a_warm_pool_that_cannot_fill(platform, image_tar):
    platform.faasctl("new", "broken", "-f", image_tar)
    platform.faasctl("set", "broken", "env.TEST_MODE=crash", "min_warm=1")

    def flagged():
        out = json.loads(platform.faasctl("--json", "status", check=False).stdout)
        return [f for f in out["functions"] if f["name"] == "broken"
                and "warm pool" in f["problem"]]
    poll("the pool flagged", flagged, 15, interval=0.2)
    # the text says the same (polled too: a crashing pool's reading can change between
    # two calls, while a start is under way)
    poll("the text flag", lambda: "function broken: warm pool" in platform.faasctl(
        "status", check=False).stdout, 15, interval=0.2)
    platform.faasctl("rm", "broken")
