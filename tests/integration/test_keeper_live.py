"""The keeper on a real platform (issue 14, part 3): a runner that is stopped, restarted
or killed fails no connection. One that arrives meanwhile waits in the backlog of a
listener the keeper holds; one the dead runner had accepted but not handed over is
served by the next runner; one a container is serving is finished by that container.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from harness import deploy, poll, run


@pytest.fixture(scope="module")
def slow(platform, image_tar) -> str:
    """One container at a time: a second connection waits in the runner's queue."""
    return deploy(platform, image_tar, "slow", "concurrency=1", "queue=8", "timeout=20",
                  "per_client=off")


def curl(platform, address: str, path: str) -> subprocess.Popen:
    """A request in the background, from inside the platform's namespace."""
    return subprocess.Popen(platform.netns.argv(
        "curl", "-s", "-g", "-m", "30", "-o", "-", "-w", "\n%{http_code}",
        f"http://[{address}]{path}"), stdout=subprocess.PIPE, text=True)


def answer(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=60)
    body, _, code = out.rpartition("\n")
    return int(code or 0), body


def listeners(platform) -> set[str]:
    out = run(*platform.netns.argv("ss", "-ltnH")).stdout
    return {line.split()[3] for line in out.splitlines() if line.strip()}


def events(platform, program: str, event: str) -> list[dict]:
    return [e for e in platform.log_lines(program) if e.get("event") == event]


def pid(platform, program: str) -> int:
    return int(platform.ctl("pid", program).stdout.strip())


def runner_back(platform, before: int) -> None:
    poll("a new runner synced", lambda: (row := platform.status().get("runner", {}))
         .get("synced") and row.get("pid") != before, 20, interval=0.05)


def test_a_container_finishes_its_connection_when_the_runner_dies(platform, slow):
    before = pid(platform, "runner")
    busy = curl(platform, slow, "/slow")
    poll("the slow request in its container", lambda: _busy(platform, "slow"), 10,
         interval=0.05)
    os.kill(before, signal.SIGKILL)
    assert answer(busy) == (200, "slow done")
    runner_back(platform, before)
    poll("the dead runner's container retired", lambda: events(
        platform, "runner", "leftovers_retired"), 30)
    assert events(platform, "runner", "leftovers_retired")[-1]["killed"] == 0


def pool(platform, name: str) -> dict:
    """The runner's figures of one function (``faasctl --json top --once``)."""
    out = json.loads(platform.faasctl("--json", "top", "--once").stdout)
    return next(f for f in out["runner"]["functions"] if f["name"] == name)


def _busy(platform, name: str) -> bool:
    return pool(platform, name)["busy"] == 1


def test_queued_connections_are_served_by_the_next_runner(platform, slow):
    before = pid(platform, "runner")
    first = curl(platform, slow, "/slow")
    poll("the first request busy", lambda: _busy(platform, "slow"), 10, interval=0.05)
    queued = [curl(platform, slow, "/") for _ in range(3)]
    poll("three waiting in the runner's queue", lambda: pool(platform, "slow")["waiting"] == 3,
         10, interval=0.05)
    adopted_before = len(events(platform, "runner", "adopted"))
    os.kill(before, signal.SIGKILL)
    assert answer(first) == (200, "slow done")
    for proc in queued:
        status, body = answer(proc)
        assert status == 200 and body.startswith("ok "), (status, body)
    runner_back(platform, before)
    adopted = events(platform, "runner", "adopted")[adopted_before:]
    assert adopted and adopted[0]["connections"] == 3, adopted


def test_a_connection_waits_while_the_runner_is_stopped(platform, slow):
    platform.ctl("stop", "runner")
    try:
        assert f"[{slow}]:80" in listeners(platform)  # held by the keeper alone
        waiting = curl(platform, slow, "/")
        poll("the connection in the listener's backlog", lambda: waiting.poll() is None
             and _accept_queue(platform, slow) == 1, 10, interval=0.05)
    finally:
        platform.ctl("start", "runner")
    status, body = answer(waiting)
    assert status == 200 and body.startswith("ok ")


def _accept_queue(platform, address: str) -> int:
    """Connections in a listener's accept queue (ss: Recv-Q of a LISTEN socket)."""
    out = run(*platform.netns.argv("ss", "-ltnH", f"src [{address}]:80")).stdout.split()
    return int(out[1]) if out else -1


def test_a_keeper_restart_gets_everything_back_from_the_runner(platform, slow):
    keeper = pid(platform, "keeper")
    connected = len(events(platform, "keeper", "runner_connected"))
    os.kill(keeper, signal.SIGKILL)
    assert f"[{slow}]:80" in listeners(platform)  # the runner's copy
    poll("the runner connected to the new keeper", lambda: len(
        events(platform, "keeper", "runner_connected")) > connected, 20, interval=0.05)
    # The new keeper holds the listener: stop the runner and it is still there.
    poll("the listener held again", lambda: "keeper_connected" in [
        e.get("event") for e in platform.log_lines("runner")], 10)
    platform.ctl("stop", "runner")
    try:
        assert f"[{slow}]:80" in listeners(platform)
    finally:
        platform.ctl("start", "runner")
    poll("slow answering", lambda: answer(curl(platform, slow, "/"))[0] == 200, 20)


def test_only_root_may_talk_to_the_keeper(platform):
    sock = platform.run_dir / "keeper" / "keeper.sock"
    st = os.stat(sock.parent)
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700)
    out = run("setpriv", "--reuid=faas", "--regid=faas", "--init-groups", "python3", "-c",
              "import socket,sys; s=socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); "
              f"s.connect({str(sock)!r})", check=False)
    assert out.returncode != 0 and "Permission denied" in out.stderr
