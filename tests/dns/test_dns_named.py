"""faas-named and a real BIND 9 named, in network namespaces these tests make and remove.

Needs root (named binds port 53, then becomes user bind) and the BIND tools; missing
either fails the tests, never skips them.
"""

from __future__ import annotations

import asyncio
import ctypes
import io
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.log import EventLog
from common.settings import SettingsError, load
from dnsagent import named
from dnsagent.main import DnsAgent

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VPN_NS = "fd00:faa5:0:100::1"  # ::1 of the default vpn_prefix: where named listens
OUTSIDER = "2001:db8::5"  # a client outside the VPN prefix
UPSTREAM = "fd00:53::53"  # a stand-in upstream resolver: named authoritative for example.
TOOLS = ("ip", "nsenter", "setpriv", "ss", "named", "named-checkconf", "named-checkzone", "rndc",
         "dig")


@pytest.fixture(scope="module", autouse=True)
def _requirements() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests run as root (sudo ./test.sh)", pytrace=False)
    missing = [t for t in TOOLS if named.find_tool(t) is None]
    if missing:
        pytest.fail(f"missing tools: {', '.join(missing)}; run ./install.sh", pytrace=False)
    for user in ("bind", "faas"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            pytest.fail(f"no user {user}; run ./install.sh", pytrace=False)


def run(*argv: Any, check: bool = True, timeout: float = 30,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command (argv), capture text; fail loudly with its output."""
    proc = subprocess.run([str(a) for a in argv], check=False, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
    return proc


def poll(what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.02) -> float:
    """Call ``probe`` until truthy; return the seconds it took, or fail at the deadline."""
    start = time.monotonic()
    last: Any = None
    while True:
        last = probe()
        if last:
            return time.monotonic() - start
        if time.monotonic() - start >= timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def instance_dir() -> Path:
    """A private root that user bind can traverse (pytest's tmp_path is 0700)."""
    root = Path(tempfile.mkdtemp(prefix="faas-dns-"))
    root.chmod(0o755)
    return root


def settings_for(root: Path, **extra: str) -> dict[str, str]:
    env = {"FAAS_CONFIG": "/dev/null", "FAAS_ROOT": str(root), "FAAS_RUN": str(root / "run")}
    env.update(extra)
    return env


class Netns:
    """A throwaway network namespace with one link; killed and removed at the end."""

    def __init__(self) -> None:
        self.name = f"faas-dns-{secrets.token_hex(3)}"
        run("ip", "netns", "add", self.name)
        run("ip", "-n", self.name, "link", "set", "lo", "up")
        # A dummy link; kernels built without the dummy driver get a veth pair instead.
        if run("ip", "-n", self.name, "link", "add", "d0", "type", "dummy",
               check=False).returncode != 0:
            run("ip", "-n", self.name, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
            run("ip", "-n", self.name, "link", "set", "d1", "up")
        run("ip", "-n", self.name, "link", "set", "d0", "up")

    def add_address(self, address: str) -> None:
        run("ip", "-n", self.name, "-6", "addr", "add", f"{address}/64", "dev", "d0", "nodad")

    def argv(self, *cmd: Any) -> list[str]:
        return ["nsenter", f"--net=/var/run/netns/{self.name}", *map(str, cmd)]

    def dig(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run(*self.argv("dig", "+time=1", "+tries=1", *args), check=False)

    def delete(self) -> None:
        out = run("ip", "netns", "pids", self.name, check=False).stdout
        for pid in map(int, out.split()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        run("ip", "netns", "del", self.name, check=False)


def start_faas_named(ns: Netns, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """faas-named's main() inside the namespace: renders the config, execs named -g."""
    full = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    with open(Path(env["FAAS_ROOT"]) / "named.log", "wb") as log:
        return subprocess.Popen(
            ns.argv(sys.executable, "-c", "from dnsagent.named import main; main()"),
            env=full, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def answers(ns: Netns, *query: str, server: str = VPN_NS, source: str | None = None
            ) -> list[str]:
    """The records of a +short answer; nothing when the server could not be reached."""
    bind = ["-b", source] if source else []
    out = ns.dig(f"@{server}", *bind, "+short", *query)
    if out.returncode != 0:
        return []
    return [w for line in out.stdout.splitlines() if not line.startswith(";")
            for w in line.split()]


def status(out: str) -> str:
    m = re.search(r"status: (\w+)", out)
    return m.group(1) if m else ""


def flags(out: str) -> set[str]:
    m = re.search(r";; flags: ([a-z ]+);", out)
    return set(m.group(1).split()) if m else set()


def new_agent(env: dict[str, str]) -> DnsAgent:
    return DnsAgent(load(env), EventLog("dnsagent", stream=io.StringIO()))


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextmanager
def inside(ns: Netns) -> Iterator[None]:
    """Run this thread in ``ns`` for a while (Python 3.11 has no os.setns), so the rndc
    the agent starts reaches the named in there on 127.0.0.1."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{ns.name}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def converge(agent: DnsAgent, ns: Netns, *pairs: tuple[str, str]) -> None:
    """The agent's converge, with its rndc inside the namespace."""
    with inside(ns):
        asyncio.run(agent.converge({"records": [{"name": n, "address": a} for n, a in pairs]}))


# --- rendering the instance (no named running) --------------------------------------


def test_prepared_config_passes_named_checkconf_with_and_without_upstreams():
    root = instance_dir()
    try:
        for upstreams in ("", f"{UPSTREAM},192.0.2.53"):
            env = settings_for(root, FAAS_DNS_UPSTREAMS=upstreams)
            layout = named.prepare(load(env))
            result = run("named-checkconf", layout.named_conf, check=False)
            assert result.returncode == 0, result.stdout + result.stderr
            conf = Path(layout.named_conf).read_text()
            assert "listen-on { none; };" in conf
            assert f"listen-on-v6 port 53 {{ {VPN_NS}; }};" in conf
            assert "version none;" in conf and "allow-transfer { none; };" in conf
            if upstreams:
                assert "allow-recursion { fd00:faa5:0:100::/64; fd00:faa5:e::/48; };" in conf
                assert f"forwarders {{ {UPSTREAM}; 192.0.2.53; }};" in conf
            else:
                assert "recursion no;" in conf and "forwarders" not in conf
    finally:
        shutil.rmtree(root)


def test_prepare_owners_modes_and_a_key_made_once():
    root = instance_dir()
    try:
        settings = load(settings_for(root))
        layout = named.prepare(settings)
        secret = named.read_secret(layout.rndc_key)
        assert secret and secret in Path(layout.rndc_conf).read_text()
        bind, faas = pwd.getpwnam("bind"), pwd.getpwnam("faas")
        expect = {
            layout.named_dir: (0, bind.pw_gid, 0o750),
            layout.named_work: (bind.pw_uid, bind.pw_gid, 0o750),
            layout.named_conf: (0, bind.pw_gid, 0o640),
            layout.rndc_key: (0, bind.pw_gid, 0o640),
            layout.rndc_conf: (faas.pw_uid, None, 0o600),
            layout.dns_dir: (faas.pw_uid, None, 0o755),
        }
        for path, (uid, gid, mode) in expect.items():
            st = os.lstat(path)
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, mode), path
            assert gid is None or st.st_gid == gid, path
        named.prepare(settings)  # a restart keeps the key
        assert named.read_secret(layout.rndc_key) == secret
    finally:
        shutil.rmtree(root)


def test_prepare_replaces_a_planted_symlink_instead_of_writing_through_it():
    root = instance_dir()
    try:
        victim = root / "victim"
        victim.write_text("precious\n")
        (root / "dns").mkdir()
        (root / "dns" / "rndc.conf").symlink_to(victim)
        layout = named.prepare(load(settings_for(root)))
        assert victim.read_text() == "precious\n"
        assert not os.path.islink(layout.rndc_conf)
        assert [p for p in os.listdir(layout.dns_dir) if p.endswith(".tmp")] == []
    finally:
        shutil.rmtree(root)


@pytest.mark.parametrize("env", [
    {"FAAS_DNS_UPSTREAMS": 'fe80::1%x"; }; include "x'},  # the settings check refuses it
    {"FAAS_ROOT": '/tmp/x"; include "/etc/shadow'},
])
def test_values_that_would_inject_into_named_conf_are_refused(env):
    root = instance_dir()
    try:
        with pytest.raises(SettingsError):  # at load or, failing that, at render
            settings = load({**settings_for(root), **env})
            named.render_named_conf(settings, named.Layout(settings.root))
    finally:
        shutil.rmtree(root)


def test_faas_named_exits_78_on_a_bad_setting_and_77_when_not_root():
    root = instance_dir()
    try:
        argv = [sys.executable, "-c", "from dnsagent.named import main; main()"]
        env = {**os.environ, **settings_for(root), "PYTHONPATH": str(REPO)}
        bad = run(*argv, check=False, env={**env, "FAAS_VPN_PREFIX": "nonsense"})
        assert bad.returncode == 78 and "vpn_prefix" in bad.stderr
        user = run("setpriv", "--reuid=faas", "--regid=faas", "--clear-groups", *argv,
                   check=False, env=env)
        assert user.returncode == 77 and "root" in user.stderr
        assert not (root / "named").exists()  # nothing was prepared
    finally:
        shutil.rmtree(root)


# --- a real named --------------------------------------------------------------------


@dataclass
class Server:
    ns: Netns
    env: dict[str, str]
    agent: DnsAgent
    pending_before_named: bool


UPSTREAM_ZONE = """$TTL 5
@ IN SOA ns.example. hostmaster.example. 1 3600 600 86400 5
@ IN NS ns.example.
ns IN AAAA fd00:53::53
www IN AAAA 2001:db8::80
"""


def start_upstream(ns: Netns, root: Path) -> subprocess.Popen[bytes]:
    """A second named, authoritative for example., standing in for the upstream resolver."""
    up = root / "upstream"
    (up / "work").mkdir(parents=True)
    up.chmod(0o755)
    shutil.chown(up / "work", "bind", "bind")
    (up / "example.db").write_text(UPSTREAM_ZONE)
    (up / "example.db").chmod(0o644)
    (up / "named.conf").write_text(
        f'options {{ directory "{up}/work"; pid-file none; lock-file none; '
        f'session-keyfile none; listen-on {{ none; }}; listen-on-v6 {{ {UPSTREAM}; }}; '
        f'recursion no; dnssec-validation no; }};\ncontrols {{ }};\n'
        f'zone "example" {{ type primary; file "{up}/example.db"; }};\n')
    (up / "named.conf").chmod(0o644)
    with open(up / "named.log", "wb") as log:
        return subprocess.Popen(ns.argv("named", "-g", "-u", "bind", "-c", up / "named.conf"),
                                stdout=log, stderr=subprocess.STDOUT)


def named_log(env: dict[str, str]) -> str:
    path = Path(env["FAAS_ROOT"]) / "named.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    ns, root = Netns(), instance_dir()
    procs: list[subprocess.Popen[bytes]] = []
    env = settings_for(root, FAAS_DNS_UPSTREAMS=UPSTREAM)
    try:
        for address in (VPN_NS, OUTSIDER, UPSTREAM):
            ns.add_address(address)
        procs.append(start_upstream(ns, root))
        named.prepare(load(env))  # rndc.conf is there, named is not running yet
        agent = new_agent(env)
        converge(agent, ns, ("fib", "fd00:faa5:1::a"))  # so the reload fails
        pending = agent.reload_pending
        procs.append(start_faas_named(ns, env))
        poll("named to answer SOA faas", lambda: answers(ns, "SOA", "faas") or
             procs[-1].poll() is not None, 20)
        assert procs[-1].poll() is None, named_log(env)
        poll("the upstream to answer", lambda: answers(ns, "AAAA", "www.example",
                                                       server=UPSTREAM), 20)
        yield Server(ns, env, agent, pending)
    finally:
        for proc in procs:
            stop(proc)
        ns.delete()
        shutil.rmtree(root)


def test_named_serves_the_zone(server):
    ns = server.ns
    soa = answers(ns, "SOA", "faas")
    assert soa[:2] == ["ns.faas.", "hostmaster.faas."] and soa[3:] == ["3600", "600", "86400",
                                                                       "5"]
    assert answers(ns, "AAAA", "fib.faas") == ["fd00:faa5:1::a"]
    assert answers(ns, "AAAA", "ns.faas") == [VPN_NS]
    assert answers(ns, "TXT", "_functions.faas") == ['"fib"']
    assert answers(ns, "NS", "faas") == ["ns.faas."]


def test_a_failed_reload_is_retried_by_the_next_sync(server):
    assert server.pending_before_named  # the first sync came before named was up
    # unchanged: nothing is written, but the reload is tried again
    converge(server.agent, server.ns, ("fib", "fd00:faa5:1::a"))
    assert not server.agent.reload_pending


def test_a_converged_change_resolves_well_under_two_seconds(server):
    ns, agent = server.ns, server.agent
    start = time.monotonic()
    converge(agent, ns, ("fib", "fd00:faa5:1::a"), ("hello", "fd00:faa5:1::b"),
             ("world", "fd00:faa5:1::c"))
    poll("hello.faas", lambda: answers(ns, "AAAA", "hello.faas") == ["fd00:faa5:1::b"], 5)
    elapsed = time.monotonic() - start
    print(f"sync to answer: {elapsed * 1000:.0f} ms")
    assert elapsed < 2, f"a new function took {elapsed:.2f}s to resolve"
    assert answers(ns, "TXT", "_functions.faas") == ['"fib,hello,world"']
    converge(agent, ns, ("hello", "fd00:faa5:1::b"), ("world", "fd00:faa5:1::c"))  # fib removed
    poll("fib.faas to go", lambda: status(ns.dig(f"@{VPN_NS}", "AAAA", "fib.faas").stdout)
         == "NXDOMAIN", 5)
    assert answers(ns, "TXT", "_functions.faas") == ['"hello,world"']


def test_vpn_clients_get_forwarding_and_outsiders_are_refused(server):
    ns = server.ns
    inside = ns.dig(f"@{VPN_NS}", "-b", VPN_NS, "AAAA", "www.example")
    assert status(inside.stdout) == "NOERROR" and "ra" in flags(inside.stdout)
    assert "2001:db8::80" in inside.stdout
    outside = ns.dig(f"@{VPN_NS}", "-b", OUTSIDER, "AAAA", "www.example")
    assert status(outside.stdout) == "REFUSED", outside.stdout
    assert "ra" not in flags(outside.stdout)
    # the zone itself is authoritative data: anyone who can reach the address may ask
    assert answers(ns, "AAAA", "ns.faas", source=OUTSIDER) == [VPN_NS]


def test_named_listens_on_the_vpn_address_only(server):
    ns = server.ns
    for address in ("::1", "127.0.0.1", OUTSIDER):
        start = time.monotonic()
        out = ns.dig(f"@{address}", "SOA", "faas")
        assert out.returncode != 0 and status(out.stdout) == "", (address, out.stdout)
        assert time.monotonic() - start < 5
    listening = run(*ns.argv("ss", "-H", "-lntup", "sport", "=", ":53")).stdout
    # the only column ending in ":53" is the local address (the peer is "*" or "[::]:*")
    local = {word.rsplit(":", 1)[0] for line in listening.splitlines() if "named" in line
             for word in line.split() if word.endswith(":53")}
    assert local == {f"[{VPN_NS}]", f"[{UPSTREAM}]"}, listening  # ours, and the stand-in's


def test_no_zone_transfer_and_no_version(server):
    ns = server.ns
    axfr = ns.dig(f"@{VPN_NS}", "AXFR", "faas")
    assert "Transfer failed" in axfr.stdout and "fd00:faa5:1::" not in axfr.stdout
    version = ns.dig(f"@{VPN_NS}", "+short", "CH", "TXT", "version.bind")
    assert "9." not in version.stdout


def test_rndc_needs_the_key(server):
    ns = server.ns
    good = run(*ns.argv("rndc", "-c", named.Layout(server.env["FAAS_ROOT"]).rndc_conf,
                        "status"), check=False)
    assert good.returncode == 0, good.stderr
    bad = Path(server.env["FAAS_ROOT"]) / "bad-rndc.conf"
    bad.write_text(named.render_rndc_conf(named.new_secret()))
    wrong = run(*ns.argv("rndc", "-c", bad, "status"), check=False)
    assert wrong.returncode != 0


def test_named_picks_up_the_address_when_it_appears_later():
    """netagent may put the VPN address on the interface after named started: the
    route socket tells named, which starts listening without a restart."""
    ns, root = Netns(), instance_dir()
    env = settings_for(root)
    proc = None
    try:
        proc = start_faas_named(ns, env)  # no address and no zone file yet
        layout = named.Layout(str(root))
        agent = new_agent(env)
        poll("named's control channel", lambda: run(*ns.argv(
            "rndc", "-c", layout.rndc_conf, "status"), check=False).returncode == 0
            or proc.poll() is not None, 20)
        assert proc.poll() is None, named_log(env)
        converge(agent, ns, ("late", "fd00:faa5:1::a"))
        assert not agent.reload_pending  # named loaded the zone it started without
        ns.add_address(VPN_NS)
        took = poll("named on the new address", lambda: answers(ns, "AAAA", "late.faas"), 10)
        print(f"address to answer: {took * 1000:.0f} ms")
        assert took < 5, f"named took {took:.2f}s to listen on the new address"
    finally:
        if proc is not None:
            stop(proc)
        ns.delete()
        shutil.rmtree(root)
