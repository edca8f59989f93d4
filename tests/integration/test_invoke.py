"""Serving connections end to end: a real runc container per connection, the socket
handed over with SCM_RIGHTS, limits, pools, hostile handlers, and nothing leaked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import deploy, poll, run
from harness import http_get as get

HERE = Path(__file__).parent


@pytest.fixture(scope="module", params=["runc", "crun"])
def runtime(request) -> str:
    """Every test runs on both OCI runtimes: a platform each."""
    return request.param


@pytest.fixture(scope="module")
def platform_config(runtime) -> str:
    return f'runtime = "{runtime}"\n'


def load(platform, address: str, path: str, count: int, concurrency: int) -> dict:
    out = run(*platform.netns.argv(sys.executable, HERE / "loadclient.py", address, path,
                                   count, concurrency), timeout=300)
    return json.loads(out.stdout)


def children(pid: int) -> int:
    """How many child processes ``pid`` has, zombies included (each one it never reaped
    counts)."""
    count = 0
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                count += int(f.read().rpartition(")")[2].split()[1]) == pid
        except (ValueError, OSError):  # not a process, or gone meanwhile
            pass
    return count


def leaks(platform) -> dict[str, int]:
    """What the runner holds now: containers, bundles, control sockets, mounts, fds,
    child processes."""
    runner = platform.status()["runner"]["pid"]
    runtime = "crun" if 'runtime = "crun"' in platform.config else "runc"
    listed = run(runtime, "--root", platform.run_dir / runtime, "list", "-q", check=False)
    return {
        "containers": len(listed.stdout.split()),
        "bundles": len(os.listdir(platform.root / "bundles")),
        "sockets": len(os.listdir(platform.run_dir / "ctl")),
        # this platform's mounts only: other tests' platforms may run at the same time
        "mounts": sum(1 for line in open("/proc/self/mountinfo") if f"{platform.base}/" in line),
        "fds": len(os.listdir(f"/proc/{runner}/fd")),
        "children": children(runner),
    }


def settled(platform, baseline: dict[str, int]):
    now = leaks(platform)
    return now if all(now[k] <= baseline[k] for k in now) else None


def test_a_request_is_served_by_a_fresh_container(platform, image_tar):
    address = deploy(platform, image_tar, "hello")
    status, body = get(platform, address, "/")
    assert status == 200 and body.startswith("ok 1 pid 1"), body  # pid 1: its own namespace
    assert get(platform, address, "/")[1].startswith("ok 1 ")  # one-shot: a new container


def test_container_confinement(platform, image_tar):
    address = deploy(platform, image_tar, "confined")
    assert get(platform, address, "/id")[1] == "65534 65534"
    assert get(platform, address, "/write")[1] == "Read-only file system"
    # stdin, stdout, stderr, the control socket and the connection: nothing else
    assert get(platform, address, "/fds")[1].split() == ["0", "1", "2", "3", "4"]
    assert get(platform, address, "/net")[1] == "lo"  # an empty network namespace
    assert get(platform, address, "/caps")[1] == "0000000000000000"  # no capability
    # its own pid namespace: the handler is pid 1 and sees no host process
    assert get(platform, address, "/")[1].endswith("pid 1")


def test_python_and_c_example_handlers(platform, examples):
    fib = json.loads(platform.faasctl("--json", "new", "fibonacci", "-f",
                                      examples["fibonacci"]).stdout)["address"]
    poll("fibonacci answering", lambda: get(platform, fib, "/?n=10", timeout=10)[0] == 200, 20)
    assert get(platform, fib, "/?n=10")[1].strip() == "0, 1, 1, 2, 3, 5, 8, 13, 21, 34"
    assert get(platform, fib, "/?n=x")[0] == 400
    echo = json.loads(platform.faasctl("--json", "new", "echo", "-f",
                                       examples["echo"]).stdout)["address"]
    poll("echo answering", lambda: get(platform, echo, "/a?b=1", timeout=10)[0] == 200, 20)
    assert get(platform, echo, "/a?b=1")[1].startswith("GET /a?b=1 HTTP/1.1")
    hello = json.loads(platform.faasctl("--json", "new", "c-hello", "-f",
                                        examples["c-hello"]).stdout)["address"]
    poll("c-hello answering", lambda: get(platform, hello, "/", timeout=10)[0] == 200, 20)


def test_fifty_concurrent_clients_are_all_answered(platform, image_tar):
    # every client is one address: past per_client's default (half of concurrency) they
    # would get 503s, which is what that cap is for; 50 containers of the default 512 MiB
    # may be past the host's memory budget, which is what that is for
    address = deploy(platform, image_tar, "busy", "concurrency=64", "per_client=off",
                     "memory=64M")
    result = load(platform, address, "/", 50, 50)
    print(f"50 concurrent: {result}")
    assert result["statuses"] == {"200": 50}


def test_timeout_kills_the_container_and_closes_the_client(platform, image_tar):
    address = deploy(platform, image_tar, "slow", "timeout=1")
    started = time.monotonic()
    status, _ = get(platform, address, "/sleep", timeout=10)
    assert status == 0 and time.monotonic() - started < 5
    assert get(platform, address, "/")[0] == 200


def test_over_capacity_gets_503_with_retry_after(platform, image_tar):
    address = deploy(platform, image_tar, "narrow", "concurrency=1", "queue=0", "timeout=3")
    # The slot of the deploy's own probe frees when its container has exited, a moment
    # after its answer: curl --retry takes the 503 that may meet it as transient.
    slow = subprocess.Popen(platform.netns.argv("curl", "-s", "-g", "-m", "10", "--retry", "5",
                                                f"http://[{address}]/sleep"))
    try:
        def rejected():
            out = run(*platform.netns.argv("curl", "-s", "-g", "-i", "-m", "5",
                                           f"http://[{address}]/"), check=False)
            return out.stdout if out.stdout.startswith("HTTP/1.1 503") else None
        head = poll("a 503", rejected, 5)
        assert "Retry-After: 1" in head
    finally:
        slow.wait(timeout=20)


@pytest.mark.parametrize("mode,expect", [("crash", 502), ("noconnect", 504), ("noread", 0),
                                         ("forkbomb", 504)])
def test_hostile_handlers_fail_cleanly(platform, image_tar, mode, expect):
    name = f"bad-{mode}"
    out = platform.faasctl("--json", "new", name, "-f", image_tar)
    address = json.loads(out.stdout)["address"]
    platform.faasctl("set", name, f"env.TEST_MODE={mode}", "timeout=2", "pids=32")
    ok_address = deploy(platform, image_tar, "bystander")
    baseline = leaks(platform)  # with both listeners in place
    status, _ = get(platform, address, "/", timeout=15)
    assert status == expect
    assert get(platform, ok_address, "/")[0] == 200  # everyone else is still served
    poll("nothing left behind", lambda: settled(platform, baseline), 15)


def idle(platform, name: str) -> int:
    """How many of function ``name``'s containers wait idle, as faasctl top says."""
    rows = json.loads(platform.faasctl("--json", "top").stdout)["runner"]["functions"]
    return sum(f["idle"] for f in rows if f["name"] == name)


def test_reuse_serves_the_next_connection_in_the_same_container(platform, image_tar):
    address = deploy(platform, image_tar, "reused", "reuse=true")
    bodies = []
    for _ in range(3):
        bodies.append(get(platform, address, "/")[1])
        # The client has its answer before the handler says done: wait for the container
        # to be back in the pool, or a loaded host's next connection may start another.
        poll("the container idle again", lambda: idle(platform, "reused") == 1, 10)
    pids = {b.split()[-1] for b in bodies}
    counts = [int(b.split()[1]) for b in bodies]
    assert len(pids) == 1 and counts == sorted(counts) and counts[-1] >= 3, bodies


def test_min_warm_hands_over_without_a_start(platform, image_tar):
    deploy(platform, image_tar, "warm", "min_warm=2")
    poll("two warm containers ready", lambda: [
        f["idle"] for f in json.loads(platform.faasctl("--json", "top").stdout)
        ["runner"]["functions"] if f["name"] == "warm"] == [2], 15)
    address = json.loads(platform.faasctl("--json", "ip", "warm").stdout)["address"]

    def outcomes() -> list[str]:
        return [line.get("outcome") for line in platform.log_lines("runner")
                if line.get("function") == "warm" and line["event"] == "request"]
    # deploy's own request (answered before it returned) reaches the log in a batch of
    # the runner's, maybe after ours is answered: counted first, ours is the one after
    before = len(poll("deploy's request in the runner's log", outcomes, 5))
    assert get(platform, address, "/")[0] == 200
    after = poll("our request in the runner's log", lambda: outcomes()[before:], 5)
    assert after[-1].startswith("warm:"), after


def test_logs_carry_the_request_id(platform, image_tar):
    address = deploy(platform, image_tar, "chatty")
    get(platform, address, "/")

    def mine() -> list[dict]:
        out = platform.faasctl("--json", "logs", "chatty")
        lines = [json.loads(line) for line in out.stdout.splitlines()]
        return [line for line in lines if line["line"].startswith("request ")]
    lines = poll("the handler's line in the function's log", mine, 5)
    assert lines[-1]["rid"] == lines[-1]["line"].split()[1]


def test_runner_restart_brings_listeners_back_and_cleans_up(platform, image_tar):
    address = deploy(platform, image_tar, "phoenix", "min_warm=1")
    os.kill(platform.status()["runner"]["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    poll("answering again", lambda: get(platform, address, "/", timeout=2)[0] == 200, 10)
    print(f"runner kill -9: answering again after {time.monotonic() - t0:.2f}s")
    assert time.monotonic() - t0 < 3.0 + 2  # heal within 3 s of the runner being back


def test_a_thousand_requests_leave_nothing_behind(platform, image_tar):
    address = deploy(platform, image_tar, "many")
    get(platform, address, "/")
    baseline = leaks(platform)
    result = load(platform, address, "/", 1000, 1)
    print(f"1000 sequential: {result}")
    assert result["statuses"] == {"200": 1000}
    try:
        after = poll("back to the baseline", lambda: settled(platform, baseline), 20)
    except AssertionError:
        raise AssertionError(f"left behind: before {baseline}, now {leaks(platform)}") from None
    print(f"before {baseline} after {after}")


def test_settings_change_keeps_connections_in_flight(platform, image_tar):
    address = deploy(platform, image_tar, "inflight")
    slow = subprocess.Popen(platform.netns.argv("curl", "-s", "-g", "-m", "20",
                                                f"http://[{address}]/slow"),
                            stdout=subprocess.PIPE, text=True)
    poll("the slow request in its container", lambda: any(
        f["busy"] for f in json.loads(platform.faasctl("--json", "top").stdout)
        ["runner"]["functions"] if f["name"] == "inflight"), 10)
    platform.faasctl("set", "inflight", "memory=256M", "concurrency=4", "env.NEW=1")
    assert slow.communicate(timeout=30)[0] == "slow done"
    assert get(platform, address, "/")[0] == 200
