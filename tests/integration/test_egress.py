"""network=egress end to end: a test internet behind the platform's default route.

The platform runs in its namespace (conftest). This module gives that namespace a veth
to an "internet" namespace holding the default route's next hop, a web server on
public-looking addresses (and on 169.254.169.254 and a private 10.99.0.80, which the
internet would route, so only the firewall can stop a function reaching them), and a
named authoritative for example.com that the platform's named forwards to. Each test
asks the test handler's /fetch, running in a function's container, to fetch a URL.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from harness import BIN, Netns, deploy, poll, run
from harness import http_get as get

PLATFORM4, INET4 = "203.0.113.2", "203.0.113.1"
PLATFORM6, INET6 = "2001:db8:1::2", "2001:db8:1::1"
WEB4, WEB6 = "198.51.100.80", "2001:db8:80::80"
METADATA, PRIVATE = "169.254.169.254", "10.99.0.80"
SERVER = "fd00:faa5:0:100::1"  # the VPN server address (default vpn_prefix)
ZONE = f"""$TTL 5
@ IN SOA ns.example.com. hostmaster.example.com. 1 3600 600 86400 5
@ IN NS ns
ns IN A {INET4}
www IN A {WEB4}
www6 IN AAAA {WEB6}
"""


@pytest.fixture(scope="module")
def internet(netns):
    """The internet namespace, wired to the platform's, with a web server and DNS."""
    inet = Netns("faas-inet")
    base = Path(tempfile.mkdtemp(prefix="faas-inet-", dir="/tmp"))
    base.chmod(0o755)  # named runs as bind
    procs: list[subprocess.Popen[bytes]] = []
    try:
        run("ip", "link", "add", "inet-up", "netns", netns.name, "type", "veth", "peer",
            "name", "inet-down", "netns", inet.name)
        for ns, dev, v4, v6 in ((netns, "inet-up", PLATFORM4, PLATFORM6),
                                (inet, "inet-down", INET4, INET6)):
            run(*ns.argv("ip", "addr", "add", f"{v4}/24", "dev", dev))
            run(*ns.argv("ip", "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad"))
            run(*ns.argv("ip", "link", "set", dev, "up"))
        run(*netns.argv("ip", "route", "add", "default", "via", INET4))
        run(*netns.argv("ip", "-6", "route", "add", "default", "via", INET6))
        for address in (f"{WEB4}/32", f"{METADATA}/32", f"{PRIVATE}/32"):
            run(*inet.argv("ip", "addr", "add", address, "dev", "lo"))
        run(*inet.argv("ip", "-6", "addr", "add", f"{WEB6}/128", "dev", "lo"))
        (base / "www").mkdir()
        (base / "www" / "index.html").write_text("hello from the internet")
        procs.append(subprocess.Popen(inet.argv("python3", "-m", "http.server", "--bind", "::",
                                                "--directory", base / "www", "80"),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        (base / "work").mkdir()
        shutil.chown(base / "work", "bind", "bind")
        (base / "example.db").write_text(ZONE)
        (base / "example.db").chmod(0o644)
        (base / "named.conf").write_text(
            f'options {{ directory "{base}/work"; pid-file none; lock-file none; '
            f'session-keyfile none; listen-on {{ {INET4}; }}; listen-on-v6 {{ none; }}; '
            'recursion no; dnssec-validation no; };\ncontrols { };\n'
            f'zone "example.com" {{ type primary; file "{base}/example.db"; }};\n')
        (base / "named.conf").chmod(0o644)
        with open(base / "named.log", "wb") as log:
            procs.append(subprocess.Popen(inet.argv("named", "-g", "-u", "bind", "-c",
                                                    base / "named.conf"),
                                          stdout=log, stderr=subprocess.STDOUT))
        poll("the internet's web server", lambda: "hello" in run(*netns.argv(
            "curl", "-s", "-m", "2", f"http://{WEB4}/"), check=False).stdout, 15)
        poll("the internet's DNS", lambda: WEB4 in run(*netns.argv(
            "dig", "+short", "+time=1", f"@{INET4}", "www.example.com"), check=False).stdout,
             15)
        yield inet
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)
        left = inet.delete()
        assert not left, f"processes left in the internet: {left}"


@pytest.fixture(scope="module", params=["runc", "crun"])
def platform_config(request) -> str:
    """Every test on both OCI runtimes: each joins the namespace by its path."""
    return (f'runtime = "{request.param}"\ndns_upstreams = ["{INET4}"]\n'
            'http_listen_vpn = true\nvpn_endpoint = "192.0.2.1:51820"\n'
            'max_egress_functions = 2\n')


@pytest.fixture(scope="module")
def egress_platform(internet, platform):
    """The platform, and at the end what `faasd down` does after supervisord: the
    namespaces' bind mounts and the chains go (else the temp dir could not be removed)."""
    yield platform
    platform.stop()
    out = run(*platform.netns.argv(BIN / "faas-netagent", "--remove"), env=platform.env,
              check=False)
    assert out.returncode == 0, out.stderr
    mounts = [line for line in open("/proc/self/mountinfo")
              if f"{platform.run_dir}/netns" in line]
    assert not mounts, mounts  # (the runner's secrets tmpfs is the harness's to remove)


@pytest.fixture(scope="module")
def host_service(netns):
    """A service of the platform host on every address, port 8081: what an egress
    function must never reach."""
    proc = subprocess.Popen(netns.argv("python3", "-m", "http.server", "--bind", "::",
                                       "--directory", "/", "8081"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    poll("the host's service", lambda: run(*netns.argv(
        "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "2",
        f"http://{PLATFORM4}:8081/"), check=False).stdout == "200", 15)
    yield
    proc.kill()
    proc.wait()


def fetch(platform, address: str, host: str, port: int = 80) -> str:
    """What the function at ``address`` got for http://HOST:PORT/."""
    code, body = get(platform, address, f"/fetch/{host}/{port}")
    assert code == 200, (code, body)
    return body


@pytest.fixture(scope="module")
def functions(egress_platform, image_tar, host_service):
    p = egress_platform
    out = {"inside": deploy(p, image_tar, "inside"),
           "caller": deploy(p, image_tar, "caller", "network=egress"),
           "plain": deploy(p, image_tar, "plain")}
    poll("caller's containers in its namespace",
         lambda: "fetched" in fetch(p, out["caller"], "www.example.com"), 20)
    return out


def test_an_egress_function_fetches_from_the_internet_by_name(egress_platform, functions):
    assert fetch(egress_platform, functions["caller"], "www.example.com") == \
        "fetched hello from the internet"
    assert fetch(egress_platform, functions["caller"], "www6.example.com") == \
        "fetched hello from the internet"  # IPv6, NATed out as well


def test_a_none_function_reaches_nothing(egress_platform, functions):
    assert fetch(egress_platform, functions["plain"], "www.example.com").startswith(
        "error resolve")
    assert fetch(egress_platform, functions["plain"], WEB4).startswith("error connect")


@pytest.mark.parametrize("target", [
    f"{PLATFORM4}/8081",  # the host's own address on its uplink
    f"[{PLATFORM6}]/8081",
    "HOSTSIDE/8081",  # the host side of the function's own veth
    f"{SERVER}/8081",  # the VPN server address: a service on it
    f"{SERVER}/8080",  # the HTTP API on the VPN address (http_listen_vpn)
    "fd00:faa5:0:100::2/80",  # a VPN peer's address
    f"{METADATA}/80",  # routed to the internet, which answers there: the firewall stops it
    f"{PRIVATE}/80",  # a private range, until egress_allow
    f"{INET4}/80",  # the host's LAN (a connected route's prefix), public or not
    f"[{INET6}]/80",
])
def test_an_egress_function_reaches_nothing_of_the_hosts(egress_platform, functions, target):
    host, port = target.rsplit("/", 1)
    index = int(ipaddress.IPv6Address(functions["caller"])) & 0xffff
    host = host.strip("[]").replace("HOSTSIDE", str(ipaddress.IPv4Address("10.250.0.1")
                                                    + 4 * index))
    got = fetch(egress_platform, functions["caller"], host, int(port))
    assert got.startswith("error connect"), got


def test_the_hosts_service_answers_others_so_the_drops_above_are_the_firewall(
        egress_platform, netns, functions):
    for url in (f"http://{PLATFORM4}:8081/", f"http://[{SERVER}]:8081/",
                f"http://{METADATA}/", f"http://{PRIVATE}/", f"http://{INET4}/",
                f"http://[{INET6}]/"):
        out = run(*netns.argv("curl", "-s", "-g", "-o", "/dev/null", "-w", "%{http_code}",
                              "-m", "3", url), check=False)
        assert out.stdout == "200", url


def test_may_call_opens_exactly_the_functions_it_names(egress_platform, functions):
    p, inside = egress_platform, functions["inside"]
    assert fetch(p, functions["caller"], inside).startswith("error connect")
    bad = p.faasctl("set", "caller", "may_call=inside,nosuch", check=False)
    assert bad.returncode != 0 and "nosuch" in bad.stderr
    shown = json.loads(p.faasctl("--json", "info", "caller").stdout)
    assert shown["settings"]["may_call"] == []  # nothing changed
    p.faasctl("set", "caller", "may_call=inside")
    poll("caller reaching inside.faas", lambda: fetch(p, functions["caller"], "inside.faas")
         .startswith("fetched ok"), 20)
    assert fetch(p, functions["caller"], inside).startswith("fetched ok")
    assert fetch(p, functions["caller"], functions["plain"]).startswith("error connect")
    p.faasctl("set", "caller", "may_call=")
    poll("inside closed again", lambda: fetch(p, functions["caller"], inside)
         .startswith("error connect"), 20)


def test_a_may_call_target_of_sixteen_ports_is_reached_on_the_sixteenth(egress_platform,
                                                                      functions):
    """Review 13: 16 ports in one multiport rule ("too many ports specified") failed
    every sync from then on; now two rules, and the 16th port is reached."""
    p = egress_platform
    p.faasctl("set", "inside", "ports=80," + ",".join(str(n) for n in range(9001, 9016)))
    p.faasctl("set", "caller", "may_call=inside")
    try:
        poll("caller reaching inside's 16th port", lambda: fetch(
            p, functions["caller"], functions["inside"], 9015).startswith("fetched ok"), 20)
        poll("netagent synced", p.healthy, 20)
    finally:
        p.faasctl("set", "caller", "may_call=")
        p.faasctl("set", "inside", "ports=80")


SPOOF = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_IP, getattr(socket, "IP_FREEBIND", 15), 1)
s.settimeout(2)
s.bind((sys.argv[1], 0))
try:
    s.connect((sys.argv[2], 80))
    print("connected")
except OSError as exc:
    print("failed", exc)
"""


def test_a_spoofed_source_does_not_leave(egress_platform, internet, functions, netns):
    """Review 13: a function may send from any address (IP_FREEBIND is allowed); only
    its namespace's own address gets past its veth. A sender in the function's own
    namespace (the one its containers join): its own source reaches the internet; one
    outside the egress prefixes never arrives there, and in IPv6 (IPv4 has the kernel's
    reverse path filter too) it and a neighbour's are counted by FAAS-EG-SRC's DROP."""
    p = egress_platform
    index = int(ipaddress.IPv6Address(functions["caller"])) & 0xffff
    own4 = str(ipaddress.IPv4Address("10.250.0.2") + 4 * index)
    own6 = str(ipaddress.IPv6Address("fd00:faa5:e::2") + (index << 64))
    ns = ("nsenter", f"--net={p.run_dir / 'netns' / 'caller'}", "python3", "-c", SPOOF)
    for src, dst in ((own4, WEB4), (own6, WEB6)):
        assert run(*ns, src, dst).stdout.startswith("connected"), src
    for tool, dst, outside, neighbour in (("iptables", WEB4, "192.0.2.7", "10.250.0.6"),
                                          ("ip6tables", WEB6, "2001:db8:1::99",
                                           "fd00:faa5:e:1::2")):
        count = ("INPUT", "-s", outside, "-j", "ACCEPT")  # the internet's, counting
        if run(*internet.argv(tool, "-w", "5", "-C", *count), check=False).returncode:
            run(*internet.argv(tool, "-w", "5", "-A", *count))
        for src in (outside, neighbour):
            before = dropped(netns, "FAAS-EG-SRC", "-A FAAS-EG-SRC ", tool)
            out = run(*ns, src, dst).stdout
            assert out.startswith("failed"), (src, out)
            if tool == "ip6tables":
                assert dropped(netns, "FAAS-EG-SRC", "-A FAAS-EG-SRC ", tool) > before, src
        listing = run(*internet.argv(tool, "-w", "5", "-v", "-S", "INPUT")).stdout
        [line] = [x for x in listing.splitlines() if f"-s {outside}/" in x]
        assert line.split(" -c ")[1].split()[0] == "0", line  # nothing arrived


def test_egress_past_roots_cap_is_refused_at_set(egress_platform, functions):
    """Review 13: max_egress_functions (2 here: caller and one more) caps what the
    controller asks netagent to build; past it, `set` says so and nothing changes."""
    p = egress_platform
    p.faasctl("set", "plain", "network=egress")
    try:
        bad = p.faasctl("set", "inside", "network=egress", check=False)
        assert bad.returncode != 0 and "max_egress_functions (2)" in bad.stderr, bad.stderr
        shown = json.loads(p.faasctl("--json", "info", "inside").stdout)
        assert shown["settings"]["network"] == "none"
    finally:
        p.faasctl("set", "plain", "network=none")
    poll("netagent synced", p.healthy, 20)

def test_egress_allow_opens_a_private_range(egress_platform, functions):
    p = egress_platform
    bad = p.faasctl("set", "caller", "egress_allow=10.99.0.0/33", check=False)
    assert bad.returncode != 0 and "CIDR" in bad.stderr
    for never in ("169.254.0.0/16", "fd00:faa5:1::/64", "127.0.0.1/32"):
        refused = p.faasctl("set", "caller", f"egress_allow={never}", check=False)
        assert refused.returncode != 0 and "may never reach" in refused.stderr, never
    assert json.loads(p.faasctl("--json", "info", "caller").stdout)["settings"][
        "egress_allow"] == []  # nothing changed
    p.faasctl("set", "caller", "egress_allow=10.99.0.0/16:80")
    poll("the private range open", lambda: fetch(p, functions["caller"], PRIVATE)
         .startswith("fetched hello"), 20)
    assert fetch(p, functions["caller"], METADATA).startswith("error connect")
    p.faasctl("set", "caller", "egress_allow=")
    poll("the private range closed again", lambda: fetch(p, functions["caller"], PRIVATE)
         .startswith("error connect"), 20)


def dropped(netns, chain: str, match: str, tool: str = "ip6tables") -> int:
    """Packets the DROP rule of ``chain`` holding ``match`` has dropped so far."""
    out = run(*netns.argv(tool, "-w", "5", "-v", "-S", chain)).stdout
    [line] = [x for x in out.splitlines() if match in x and x.endswith("-j DROP")]
    return int(line.split(" -c ")[1].split()[0])


def test_the_vpn_stays_unrouted_with_forwarding_on(egress_platform, internet, netns,
                                                   functions):
    """Egress turns IPv6 forwarding on; neither a function nor a LAN neighbour that
    routes the client prefix to this host gets a packet into the tunnel."""
    p = egress_platform
    p.faasctl("vpn", "add", "laptop", "--public-key", "A" * 43 + "=")  # fd00:faa5:0:100::2
    assert run(*netns.argv("cat", "/proc/sys/net/ipv6/conf/all/forwarding")).stdout == "1\n"
    fwd = f"FAAS-{p.interface}-FWD"
    before = (dropped(netns, fwd, f"-A {fwd} "),
              dropped(netns, "FAAS-EG-FWD", "-d fd00:faa5:0:100::/64"))
    assert fetch(p, functions["caller"], "fd00:faa5:0:100::2").startswith("error connect")
    run(*internet.argv("ip", "-6", "route", "replace", "fd00:faa5::/32", "via", PLATFORM6))
    out = run(*internet.argv("curl", "-s", "-g", "-m", "2", "http://[fd00:faa5:0:100::2]/"),
              check=False)
    assert out.returncode != 0
    assert dropped(netns, fwd, f"-A {fwd} ") > before[0]  # the neighbour's, at the tunnel
    assert dropped(netns, "FAAS-EG-FWD", "-d fd00:faa5:0:100::/64") > before[1]
    p.faasctl("vpn", "rm", "laptop")


def caller_veth(platform) -> str:
    veths = json.loads(run(*platform.netns.argv("ip", "-j", "link", "show", "type", "veth"))
                       .stdout)
    [name] = [v["ifname"] for v in veths if v["ifname"].startswith("fxeg")]
    return name


def test_a_veth_or_rules_undone_by_hand_are_put_back(egress_platform, functions, netns):
    p = egress_platform
    run(*netns.argv("ip", "link", "del", caller_veth(p)))  # takes the namespace's eth0 along
    run(*netns.argv("iptables", "-w", "5", "-F", "FAAS-EG-FWD"))
    poll("caller fetching again", lambda: fetch(p, functions["caller"], "www.example.com")
         .startswith("fetched hello"), 20)
    poll("the rules back", lambda: fetch(p, functions["caller"], PRIVATE)
         .startswith("error connect"), 20)


def test_netagent_killed_at_any_moment_heals(egress_platform, functions, netns):
    """kill -9 during its work, with the work half undone: the next netagent, synced
    by the controller, makes the same namespace whole again."""
    p = egress_platform
    pid = p.status()["netagent"]["pid"]
    run(*netns.argv("ip", "link", "del", caller_veth(p)))
    os.kill(pid, signal.SIGKILL)
    poll("another netagent, synced", lambda: p.status()["netagent"]["pid"] != pid
         and p.healthy(), 30)
    poll("caller fetching again", lambda: fetch(p, functions["caller"], "www.example.com")
         .startswith("fetched hello"), 20)
    for host, port in ((PLATFORM4, 8081), (PRIVATE, 80), (METADATA, 80)):
        assert fetch(p, functions["caller"], host, port).startswith("error connect"), host


def test_removing_the_function_removes_its_namespace_and_veth(egress_platform, image_tar,
                                                            functions):
    p = egress_platform
    deploy(p, image_tar, "brief", "network=egress")
    path = Path(p.run_dir) / "netns" / "brief"
    poll("brief's namespace", path.exists, 20)
    p.faasctl("rm", "brief")
    poll("brief's namespace gone", lambda: not path.exists(), 20)
    mounts = [line for line in open("/proc/self/mountinfo") if str(path) in line]
    assert not mounts
    veths = run(*p.netns.argv("ip", "-j", "link", "show", "type", "veth")).stdout
    assert len([v for v in json.loads(veths) if v["ifname"].startswith("fxeg")]) == 1
    assert os.stat(p.run_dir / "netns").st_mode & 0o777 == 0o700
