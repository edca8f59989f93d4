"""More ports and the caller's identity (issue 13, section 4), end to end.

One platform and one WireGuard client namespace (test_vpn's ``Client``: ``faasctl vpn
connect`` with a key the server never saw, its resolver the server's DNS through the
tunnel). A function serves HTTP on 80 and a raw protocol on 5432 (the C test handler:
``GET /conn`` and a raw ``HELLO`` both answer with the conn packet it was handed). The
peer reaches exactly the listed ports through the firewall, the handler is told the
port and the peer's name (null for a local caller), ``allow`` refuses a peer before any
container starts, bad ``ports`` change nothing, and a live change of ``ports`` opens
and closes listeners and firewall rules without dropping the function.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from harness import poll, run
from test_vpn import SERVER_LINK, Client

NAME = "multi"
PEER = "laptop"
RAW_CLIENT = (  # connect, send HELLO, print what comes back (hex), or "refused"
    "import socket,sys\n"
    "try:\n"
    "    s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=3)\n"
    "except OSError:\n"
    "    print('refused'); sys.exit(0)\n"
    "s.sendall(b'HELLO\\n'); data=b''\n"
    "while True:\n"
    "    try: chunk=s.recv(65536)\n"
    "    except OSError: break\n"
    "    if not chunk: break\n"
    "    data+=chunk\n"
    "print(data.hex())\n")


@pytest.fixture(scope="module")
def platform_config() -> str:
    return f'vpn_endpoint = "[{SERVER_LINK}]:51820"\n'


@pytest.fixture(scope="module")
def address(platform, image_tar) -> str:
    out = platform.faasctl("--json", "new", NAME, "-f", image_tar)
    platform.faasctl("set", NAME, "memory=64M", "ports=80,5432")
    addr = json.loads(out.stdout)["address"]
    poll("5432 answering locally", lambda: raw(platform.netns.argv, addr, 5432), 20)
    return addr


@pytest.fixture(scope="module")
def client(platform, netns, address, tmp_path_factory):
    c = Client(netns, tmp_path_factory.mktemp("vpnclient"))
    try:
        public = c.faasctl("vpn", "pubkey", "--key-file", c.key_file).stdout.split()[-1]
        config = platform.faasctl("vpn", "add", PEER, "--public-key", public).stdout
        path = c.key_file.parent / f"{PEER}.conf"
        path.write_text(config)
        c.faasctl("vpn", "connect", path, "--interface", c.interface, "--key-file",
                  c.key_file)
        poll(f"{NAME}.faas answering over the tunnel",
             lambda: c.curl(f"http://{NAME}.faas/")[0] == 200, 30)
        yield c
    finally:
        c.faasctl("vpn", "disconnect", "--interface", c.interface, check=False)
        left = c.remove()
        assert not left, f"processes left in the client namespace: {left}"


def raw(argv, address: str, port: int) -> dict | None:
    """The conn packet the handler got for a raw HELLO on ``port``; None if the
    connection was refused or closed with nothing written."""
    out = run(*argv(sys.executable, "-c", RAW_CLIENT, address, port), timeout=20).stdout
    text = out.strip()
    if text in ("refused", ""):
        return None
    return json.loads(bytes.fromhex(text))


def local_get(platform, address: str, path: str, port: int = 80) -> tuple[int, str]:
    out = run(*platform.netns.argv("curl", "-s", "-g", "-m", "5", "-o", "-", "-w",
                                   "\n%{http_code}", f"http://[{address}]:{port}{path}"),
              check=False)
    body, _, code = out.stdout.rpartition("\n")
    return int(code or 0), body


def figures(platform) -> dict:
    top = json.loads(platform.faasctl("--json", "top").stdout)
    return next(f for f in top["runner"]["functions"] if f["name"] == NAME)


def settings(platform) -> dict:
    return json.loads(platform.faasctl("--json", "info", NAME).stdout)["settings"]


def test_a_local_caller_reaches_each_port_and_has_no_peer(platform, address):
    status, body = local_get(platform, address, "/conn")
    assert status == 200
    http = json.loads(body)
    assert (http["type"], http["port"], http["peer"]) == ("conn", 80, None)
    packet = raw(platform.netns.argv, address, 5432)
    assert packet is not None and (packet["port"], packet["peer"]) == (5432, None)
    assert raw(platform.netns.argv, address, 5433) is None  # not listed: nobody listens


def test_a_peer_reaches_exactly_the_listed_ports_and_is_named(platform, netns, address,
                                                              client):
    status, body = client.curl(f"http://{NAME}.faas/conn")
    assert status == 200
    http = json.loads(body)
    assert (http["port"], http["peer"]) == (80, PEER)
    assert http["remote"].startswith("fd00:faa5:0:100:")
    packet = raw(client.ns.argv, address, 5432)
    assert packet is not None and (packet["port"], packet["peer"]) == (5432, PEER)
    # A listener on every address of the server, on a port the function does not list.
    listener = subprocess.Popen(netns.argv(sys.executable, "-c", (
        "import socket,time\n"
        "s=socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        "s.bind(('::',6000)); s.listen(); time.sleep(60)")))
    try:
        poll("the listener up (seen from the server)", lambda: run(*netns.argv(
            "bash", "-c", f"exec 3<>/dev/tcp/{address}/6000"), check=False).returncode == 0,
            10)
        assert client.tcp_open(address, 80) and client.tcp_open(address, 5432)
        assert not client.tcp_open(address, 6000)  # the firewall: not one of its ports
    finally:
        listener.kill()
        listener.wait()


def test_a_peer_not_in_allow_is_refused_before_any_container(platform, address, client):
    platform.faasctl("set", NAME, "allow=ci")
    poll("403 for the peer", lambda: client.curl(f"http://{NAME}.faas/")[0] == 403, 10)
    before = figures(platform)
    for _ in range(3):
        status, body = client.curl(f"http://{NAME}.faas/conn")
        assert status == 403 and PEER in body
    assert raw(client.ns.argv, address, 5432) is None  # another port: closed, unanswered
    after = figures(platform)
    assert after["forbidden"] - before["forbidden"] == 4
    assert (after["cold"], after["served"]) == (before["cold"], before["served"])  # no start
    status, body = local_get(platform, address, "/conn")  # a local caller is always let in
    assert status == 200 and json.loads(body)["peer"] is None
    platform.faasctl("set", NAME, f"allow=ci,{PEER}")
    poll("the peer let in again", lambda: client.curl(f"http://{NAME}.faas/")[0] == 200, 10)
    platform.faasctl("set", NAME, "allow=*")


def laptop_rx(platform) -> int:
    peers = json.loads(platform.faasctl("--json", "vpn", "list").stdout)["peers"]
    return next(p["rx_bytes"] for p in peers if p["name"] == PEER)


def test_a_peer_cannot_pose_as_another_peer(platform, address, client):
    """WireGuard takes a packet from a key only with that key's /128 as its source
    (netagent sets AllowedIPs so): the laptop sending from the address of peer ci, whom
    allow names, reaches nothing, while from its own it gets the runner's 403."""
    ci = json.loads(platform.faasctl("--json", "vpn", "add", "ci").stdout)["address"]
    platform.faasctl("set", NAME, "allow=ci")
    try:
        poll("403 for the laptop", lambda: client.curl(f"http://{NAME}.faas/")[0] == 403, 10)
        before, received = figures(platform), laptop_rx(platform)
        run(*client.ns.argv("ip", "-6", "addr", "add", f"{ci}/128", "dev", client.interface,
                            "nodad"))
        try:
            out = run(*client.argv("curl", "-s", "-g", "-m", "3", "--interface", ci, "-o",
                                   "/dev/null", "-w", "%{http_code}",
                                   f"http://[{address}]/conn"), check=False)
            assert out.stdout == "000", out.stdout  # dropped by the server's WireGuard
        finally:
            run(*client.ns.argv("ip", "-6", "addr", "del", f"{ci}/128", "dev",
                                client.interface))
        assert laptop_rx(platform) > received  # it came through the tunnel, and no further
        after = figures(platform)
        assert (after["served"], after["forbidden"]) == (before["served"],
                                                         before["forbidden"])
        assert client.curl(f"http://{NAME}.faas/")[0] == 403  # its own address: itself
    finally:
        platform.faasctl("set", NAME, "allow=*")
        platform.faasctl("vpn", "rm", "ci")


BAD_PORTS = ["0", "53", "80,80", ",".join(str(p) for p in range(1000, 1017)), "", "http",
             "65536"]


@pytest.mark.parametrize("value", BAD_PORTS)
def test_bad_ports_are_a_clear_error_and_change_nothing(platform, address, value):
    before = settings(platform)
    out = platform.faasctl("set", NAME, f"ports={value}", check=False)
    assert out.returncode != 0 and "ports=" in out.stderr, out.stderr
    body = json.dumps({"ports": value})
    answer = run(*platform.netns.argv(
        "curl", "-s", "-m", "10", "-X", "PATCH", "-H", "Content-Type: application/json",
        "--data-binary", body, "-w", "\n%{http_code}",
        f"http://127.0.0.1:8080/api/functions/{NAME}/settings"))
    text, _, code = answer.stdout.rpartition("\n")
    assert code == "400" and json.loads(text)["error"]["code"] == "bad_request", text
    assert settings(platform) == before
    assert raw(platform.netns.argv, address, 5432) is not None  # still served as it was


def test_changing_ports_opens_the_new_closes_the_removed_and_keeps_the_function(
        platform, address, client):
    served = figures(platform)["served"]
    slow = subprocess.Popen(client.argv("curl", "-s", "-m", "20", f"http://{NAME}.faas/slow"),
                            stdout=subprocess.PIPE, text=True)
    try:
        poll("the slow request in its container", lambda: figures(platform)["busy"] == 1, 10)
        platform.faasctl("set", NAME, "ports=5432,8080")
        poll("80 closed", lambda: run(*platform.netns.argv(
            "bash", "-c", f"exec 3<>/dev/tcp/{address}/80"), check=False).returncode != 0,
            10, interval=0.05)
        assert slow.poll() is None, "the slow request ended before port 80 closed"
        assert slow.communicate(timeout=20)[0] == "slow done"  # in flight: not dropped
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.wait()
    poll("8080 through the tunnel", lambda: client.tcp_open(address, 8080), 10)
    status, body = client.curl(f"http://{NAME}.faas:8080/conn")
    assert status == 200 and (json.loads(body)["port"], json.loads(body)["peer"]) == (
        8080, PEER)
    assert not client.tcp_open(address, 80)  # the firewall closed it too
    assert raw(client.ns.argv, address, 5432)["peer"] == PEER  # kept as it was
    assert figures(platform)["served"] > served  # the same function: its counters go on


SQUAT = "squat"
# Bind [argv 1]:5432 with IP_FREEBIND, say so, answer every connection. SO_REUSEADDR:
# else the TIME_WAIT its answered connections leave would keep the runner's bind failing
# for a minute after it exits (Linux lets a bind pass a TIME_WAIT only if both set it).
SQUATTER = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6,78,1)\n"
    "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "s.bind((sys.argv[1],5432)); s.listen(); print('bound',flush=True)\n"
    "while True:\n"
    "    c,_=s.accept(); c.sendall(b'SQUATTED\\n'); c.close()\n")


def squatted(argv, address: str) -> bool:
    """Whether [address]:5432 answers as the squatter does (from wherever argv runs)."""
    return "SQUATTED" in run(*argv("timeout", 3, "bash", "-c",
                                   f"exec 3<>/dev/tcp/{address}/5432 && cat <&3"),
                             check=False, timeout=10).stdout


def test_a_port_a_local_user_took_first_is_not_opened_to_peers(platform, netns, image_tar,
                                                              client):
    """docs/security.md: an unprivileged local process binds [fn]:5432 with IP_FREEBIND
    before the function is given ports=80,5432. The runner's bind fails, so it does not
    report 5432 held and netagent keeps it closed to peers (80 open); once the squatter
    is gone the runner binds within a second, reports it, and the peer reaches the
    handler on 5432."""
    addr = json.loads(platform.faasctl("--json", "new", SQUAT, "-f", image_tar).stdout)[
        "address"]
    platform.faasctl("set", SQUAT, "memory=64M")
    squatter = subprocess.Popen(netns.argv(
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
        "-c", SQUATTER, addr), stdout=subprocess.PIPE, text=True)
    try:
        assert squatter.stdout.readline() == "bound\n"
        platform.faasctl("set", SQUAT, "ports=80,5432")
        poll("the runner's bind of 5432 failing", lambda: any(
            e["event"] == "listen_failed" and e.get("function") == SQUAT
            for e in platform.log_lines("runner")), 20)
        poll("the controller told by the runner that 5432 is not held", lambda: any(
            f["name"] == SQUAT and "port 5432 held by another program" in f["problem"]
            for f in json.loads(platform.faasctl("--json", "status", check=False).stdout)[
                "functions"]), 10)
        assert squatted(platform.netns.argv, addr)  # locally: the squatter holds 5432
        poll("80 through the tunnel", lambda: client.tcp_open(addr, 80), 10)
        assert not client.tcp_open(addr, 5432)  # the firewall: the runner does not hold it
        assert not squatted(client.ns.argv, addr)
    finally:
        squatter.kill()
        squatter.wait()
    packet = poll("5432 through the tunnel, to the handler",
                  lambda: raw(client.ns.argv, addr, 5432), 10)
    assert (packet["port"], packet["peer"]) == (5432, PEER)
    platform.faasctl("rm", SQUAT)


def test_a_killed_runner_comes_back_on_every_port_knowing_its_peers(platform, address,
                                                                    client):
    os.kill(platform.status()["runner"]["pid"], signal.SIGKILL)
    packet = poll("5432 served again, to the named peer",
                  lambda: raw(client.ns.argv, address, 5432), 40)
    assert (packet["port"], packet["peer"]) == (5432, PEER)  # the resync carried the peers
    status, body = client.curl(f"http://{NAME}.faas:8080/conn")
    assert status == 200 and json.loads(body)["peer"] == PEER
