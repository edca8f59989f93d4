"""As root, for real: `python -m cli.vpnclient` joins a WireGuard server built by hand with
wg and wireguard-go, in two network namespaces joined by a veth pair. Nothing here touches
the host's interfaces or sends a packet outside the namespaces."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = {"ip": "iproute2", "wg": "wireguard-tools", "wireguard-go": "wireguard-go",
         "nsenter": "util-linux", "ping": "iputils-ping"}
SERVER_VPN = "fd00:faa5:0:100::1"
SOCKETS = Path("/var/run/wireguard")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def _requirements():
    """Missing root or a tool fails: a skip would hide that this never ran."""
    if os.geteuid() != 0:
        pytest.fail("the VPN client integration tests run as root (sudo ./test.sh)",
                    pytrace=False)
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools: {', '.join(missing)}; apt-get install "
                    + " ".join(TOOLS[t] for t in missing), pytrace=False)


def run(*argv: object, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                            timeout=60, check=False, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} failed ({result.returncode}): {result.stderr}")
    return result


class Pair:
    """A "server" and a "client" namespace joined by a veth pair with ULA addresses
    (fdff:1::1 and fdff:1::2). Every link is created inside them, never in the host's."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.server, self.client = f"faas-vpns-{self.tag}", f"faas-vpnc-{self.tag}"
        self.names: list[str] = []  # namespaces that exist, for delete()
        self.interfaces: list[str] = []  # wireguard-go interfaces: their sockets are shared

    def create(self) -> None:
        for ns in (self.server, self.client):
            run("ip", "netns", "add", ns)
            self.names.append(ns)
            run(*self.argv(ns, "ip", "link", "set", "dev", "lo", "up"))
        veth_s, veth_c = f"vs{self.tag}", f"vc{self.tag}"
        run(*self.argv(self.server, "ip", "link", "add", veth_s, "type", "veth",
                       "peer", "name", veth_c, "netns", self.client))
        for ns, dev, addr in ((self.server, veth_s, "fdff:1::1/64"),
                              (self.client, veth_c, "fdff:1::2/64")):
            run(*self.argv(ns, "ip", "-6", "addr", "add", addr, "dev", dev, "nodad"))
            run(*self.argv(ns, "ip", "link", "set", "dev", dev, "up"))

    def argv(self, ns: str, *cmd: object) -> list[str]:
        # nsenter --net, not `ip netns exec`, which also remounts /sys.
        return ["nsenter", f"--net=/var/run/netns/{ns}", *map(str, cmd)]

    def delete(self) -> None:
        """Kill what is left inside (the server's wireguard-go at least), remove the
        namespaces and the sockets of our wireguard-go interfaces."""
        for ns in self.names:
            for pid in run("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            run("ip", "netns", "del", ns, check=False)
        for interface in self.interfaces:
            (SOCKETS / f"{interface}.sock").unlink(missing_ok=True)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


def wireguard_go_pids(interface: str) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
            and _cmdline(int(p.name)).split()[-1:] == [interface]
            and "wireguard-go" in _cmdline(int(p.name))]


@pytest.fixture
def pair():
    """Removed with whatever runs inside, even when the test failed half-way; whether
    disconnect left anything behind is the tests' own assertion (assert_gone)."""
    p = Pair()
    try:
        p.create()
        yield p
    finally:
        p.delete()


@pytest.fixture
def server(pair, tmp_path):
    """A WireGuard server by hand: wireguard-go, a key, fd00:faa5:0:100::1/64, port 51820.
    Returns (interface, public key)."""
    interface = f"wgs{pair.tag}"
    pair.interfaces.append(interface)
    run(*pair.argv(pair.server, "wireguard-go", interface))  # it daemonizes
    key = tmp_path / "server.key"
    key.write_text(run("wg", "genkey").stdout)
    key.chmod(0o600)
    run(*pair.argv(pair.server, "wg", "set", interface, "private-key", key,
                   "listen-port", "51820"))
    run(*pair.argv(pair.server, "ip", "-6", "addr", "add", f"{SERVER_VPN}/64",
                   "dev", interface))
    run(*pair.argv(pair.server, "ip", "link", "set", "dev", interface, "up"))
    return interface, run("wg", "pubkey", input=key.read_text()).stdout.strip()


def client_config(server_key: str, address: str, private_key: str | None = None,
                  extra: str = "") -> str:
    # No DNS line: with systemd-resolved on the host, `resolvectl` from inside the
    # namespace would change the host's resolver. The unit tests cover DNS.
    key = f"PrivateKey = {private_key}\n" if private_key else ""
    return (f"[Interface]\n{key}Address = {address}/128\n{extra}\n"
            f"[Peer]\nPublicKey = {server_key}\nEndpoint = [fdff:1::1]:51820\n"
            "AllowedIPs = fd00:faa5::/32\nPersistentKeepalive = 25\n")


def vpnclient(pair: Pair, tmp_path: Path, *args: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAAS_")}
    env["FAAS_CLIENT_RUN"] = str(tmp_path / "run")
    env["TMPDIR"] = str(tmp_path / "tmp")  # where a config's key is written for `wg set`
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return run(*pair.argv(pair.client, sys.executable, "-m", "cli.vpnclient", *args),
               check=False, cwd=REPO, env=env)


def ping_through(pair: Pair, seconds: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Ping the server's VPN address until it answers or the deadline passes; each try
    waits up to 2 s for its answer, so this needs no sleep."""
    deadline = time.monotonic() + seconds
    while True:
        result = run(*pair.argv(pair.client, "ping", "-6", "-c1", "-W2", SERVER_VPN),
                     check=False)
        if result.returncode == 0 or time.monotonic() > deadline:
            return result


def assert_handshake(pair: Pair, server_if: str, client_public: str) -> None:
    out = run(*pair.argv(pair.server, "wg", "show", server_if, "latest-handshakes")).stdout
    stamps = dict(line.split("\t") for line in out.strip().splitlines())
    assert int(stamps[client_public]) > 0, out


def assert_gone(pair: Pair, interface: str, tmp_path: Path) -> None:
    shown = run(*pair.argv(pair.client, "ip", "link", "show", "dev", interface), check=False)
    assert shown.returncode != 0, shown.stdout
    assert wireguard_go_pids(interface) == []
    assert not (SOCKETS / f"{interface}.sock").exists()
    assert not (tmp_path / "run" / f"{interface}.json").exists()


def test_connect_with_a_local_key_ping_then_disconnect(pair, server, tmp_path):
    server_if, server_key = server
    interface, key_file = f"wgc{pair.tag}", tmp_path / "client" / "private.key"
    pair.interfaces.append(interface)

    pub = vpnclient(pair, tmp_path, "pubkey", "--key-file", key_file)
    assert pub.returncode == 0, pub.stderr
    client_public = pub.stdout.strip()
    assert "faasctl vpn add NAME --public-key" in pub.stderr
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.parent.stat().st_mode & 0o777 == 0o700
    run(*pair.argv(pair.server, "wg", "set", server_if, "peer", client_public,
                   "allowed-ips", "fd00:faa5:0:100::2/128"))

    config = tmp_path / "client.conf"
    config.write_text(client_config(server_key, "fd00:faa5:0:100::2"))
    up = vpnclient(pair, tmp_path, "connect", config, "--interface", interface,
                   "--key-file", key_file)
    assert up.returncode == 0, up.stderr
    assert f"its public key is {client_public}" in up.stdout
    assert f"connected {interface}" in up.stdout

    pinged = ping_through(pair)
    assert pinged.returncode == 0, pinged.stdout + pinged.stderr
    route = run(*pair.argv(pair.client, "ip", "-6", "route", "get", SERVER_VPN)).stdout
    assert f"dev {interface}" in route
    assert_handshake(pair, server_if, client_public)

    again = vpnclient(pair, tmp_path, "connect", config, "--interface", interface,
                      "--key-file", key_file)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert f"faasctl vpn disconnect --interface {interface}" in again.stderr

    down = vpnclient(pair, tmp_path, "disconnect", "--interface", interface)
    assert down.returncode == 0, down.stderr
    assert_gone(pair, interface, tmp_path)
    assert key_file.exists()  # the local key outlives the tunnel

    twice = vpnclient(pair, tmp_path, "disconnect", "--interface", interface)
    assert twice.returncode == 1 and f"{interface} is not connected" in twice.stderr


def test_connect_with_the_configs_key_and_a_hostile_postup(pair, server, tmp_path):
    server_if, server_key = server
    interface = f"wgc{pair.tag}"
    pair.interfaces.append(interface)
    private = run("wg", "genkey").stdout.strip()
    client_public = run("wg", "pubkey", input=private).stdout.strip()
    run(*pair.argv(pair.server, "wg", "set", server_if, "peer", client_public,
                   "allowed-ips", "fd00:faa5:0:100::3/128"))

    config = tmp_path / "client.conf"
    config.write_text(client_config(server_key, "fd00:faa5:0:100::3", private,
                                    extra=f"PostUp = touch {tmp_path}/pwned"))
    config.chmod(0o600)
    up = vpnclient(pair, tmp_path, "connect", config, "--interface", interface,
                   "--key-file", tmp_path / "unused.key")
    assert up.returncode == 0, up.stderr
    assert "PostUp is not used" in up.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "unused.key").exists()

    pinged = ping_through(pair)
    assert pinged.returncode == 0, pinged.stdout + pinged.stderr
    assert_handshake(pair, server_if, client_public)
    assert list((tmp_path / "tmp").iterdir()) == []  # the temporary key file is gone

    down = vpnclient(pair, tmp_path, "disconnect", "--interface", interface)
    assert down.returncode == 0, down.stderr
    assert_gone(pair, interface, tmp_path)

