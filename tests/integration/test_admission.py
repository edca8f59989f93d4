"""One peer cannot take a function offline (issue 11 §3): end to end, real runc, two
client addresses on the namespace's lo.

The attacker's connections send half a request header for ``GET /sleep``: the test
handler then waits for ever, as an HTTP handler waits for the rest of a header, so every
such connection that reaches a container holds its slot until the function's timeout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import poll, run

HERE = Path(__file__).parent
ATTACKER = "fd00:beef::a"
VICTIM = "fd00:beef::b"


@pytest.fixture(scope="module")
def addresses(netns) -> None:
    for address in (ATTACKER, VICTIM):
        run("ip", "-n", netns.name, "addr", "add", f"{address}/128", "dev", "lo", "nodad")


class Peers:
    """peerclient.py in the namespace, one JSON command and answer per line."""

    def __init__(self, platform, address: str):
        self.proc = subprocess.Popen(
            platform.netns.argv(sys.executable, HERE / "peerclient.py", address),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, **cmd) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "peerclient.py ended"
        return json.loads(line)

    def end(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def deploy(platform, image_tar, name: str, *settings: str) -> str:
    out = platform.faasctl("--json", "new", name, "-f", image_tar)
    address = json.loads(out.stdout)["address"]
    platform.faasctl("set", name, "memory=64M", *settings)
    poll(f"{name} answering", lambda: run(*platform.netns.argv(
        "curl", "-s", "-g", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}",
        f"http://[{address}]/"), check=False).stdout == "200", 15)
    return address


def figures(platform, name: str) -> dict:
    top = json.loads(platform.faasctl("--json", "top").stdout)
    return next(f for f in top["runner"]["functions"] if f["name"] == name)


def test_one_peer_sending_half_headers_cannot_keep_another_peer_out(platform, image_tar,
                                                                     addresses):
    # per_client at its default: half of concurrency, 2
    address = deploy(platform, image_tar, "slowloris", "concurrency=4", "queue=4",
                     "timeout=30")
    peers = Peers(platform, address)
    try:
        peers(open=12, src=ATTACKER, send="half")  # more than concurrency + queue
        poll("all but per_client of them refused with 503",
             lambda: peers(answers=ATTACKER) == {"503": 10, "closed": 0, "open": 2,
                                                 "other": 0}, 10)
        poll("the two held in containers", lambda: figures(platform, "slowloris")["busy"] == 2,
             10)
        got = peers(get=VICTIM, path="/", timeout=10)
        assert got["status"] == 200 and got["seconds"] < 5, got
        assert figures(platform, "slowloris")["rejected_client"] == 10
    finally:
        peers.end()


def test_silent_connections_hold_no_slot_and_are_closed_at_first_byte_timeout(
        platform, image_tar, addresses):
    address = deploy(platform, image_tar, "silent", "concurrency=2", "queue=0",
                     "first_byte_timeout=3", "per_client=20")
    peers = Peers(platform, address)
    try:
        opened = time.monotonic()
        peers(open=10, src=ATTACKER, send="none")
        poll("ten waiting for their first byte",
             lambda: figures(platform, "silent")["first_byte_waiting"] == 10, 5)
        fig = figures(platform, "silent")
        assert fig["busy"] == 0 and fig["starting"] == 0  # no slot, no container
        got = peers(get=VICTIM, path="/", timeout=10)
        assert got["status"] == 200 and got["seconds"] < 5, got
        assert peers(answers=ATTACKER)["open"] == 10  # not closed before their time
        poll("all ten closed unanswered", lambda: peers(answers=ATTACKER) == {
            "503": 0, "closed": 10, "open": 0, "other": 0}, 10)
        assert time.monotonic() - opened >= 3
        fig = figures(platform, "silent")
        assert fig["first_byte_timeouts"] == 10 and fig["first_byte_waiting"] == 0
    finally:
        peers.end()


def test_per_client_refuses_the_extra_connection_of_one_address(platform, image_tar,
                                                                addresses):
    address = deploy(platform, image_tar, "capped", "concurrency=8")
    # a function whose server speaks first: no waiting for a byte; two per address
    platform.faasctl("set", "capped", "first_byte_timeout=0", "per_client=2")
    info = platform.faasctl("info", "capped").stdout
    assert "first_byte_timeout=0.0" in info and "per_client=2" in info, info
    peers = Peers(platform, address)
    try:
        peers(open=3, src=ATTACKER, send="none")
        poll("two handed over as they are, the third refused",
             lambda: peers(answers=ATTACKER) == {"503": 1, "closed": 0, "open": 2,
                                                 "other": 0}, 10)
        poll("two in containers", lambda: figures(platform, "capped")["busy"] == 2, 10)
        assert peers(get=VICTIM, path="/", timeout=10)["status"] == 200
        peers(close=ATTACKER)  # their handlers read the end, answer nobody and exit
        poll("the address may connect again",
             lambda: peers(get=ATTACKER, path="/", timeout=5)["status"] == 200, 10)
    finally:
        peers.end()
