"""netagent's egress part without root: what a sync may ask (checked against root's
prefixes before anything runs), the addresses it derives, and the rules it renders."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from common.errors import Code, FaasError
from common.settings import load, vpn_server
from netagent import egressfw
from netagent.egress import Egress, addresses, veth_name

SETTINGS = load({"FAAS_CONFIG": "/dev/null", "FAAS_ROOT": "/nonexistent",
                 "FAAS_RUN": "/nonexistent/run"})


async def _never(*argv, **kw):  # pragma: no cover - a plan runs nothing
    raise AssertionError(f"ran {argv}")


def egress() -> Egress:
    return Egress(SETTINGS, "/nonexistent/run/netns", _never, _never,
                  vpn_server(SETTINGS.vpn_prefix).ip)


def entry(name="fib", address="fd00:faa5:1::a", allow=(), calls=()):
    return {"name": name, "address": address, "egress_allow": list(allow),
            "may_call": [{"address": a, "ports": p} for a, p in calls]}


def test_addresses_come_from_the_functions_place_in_its_prefix():
    [plan] = egress().plan([entry()])
    assert (str(plan.host6), str(plan.ns6)) == ("fd00:faa5:e:a::1/64", "fd00:faa5:e:a::2/64")
    assert (str(plan.host4), str(plan.ns4)) == ("10.250.0.41/30", "10.250.0.42/30")
    assert plan.path == "/nonexistent/run/netns/fib"
    assert plan.veth == veth_name("fib", "fd00:faa5:1::a") and len(plan.veth) <= 15
    # another function that reuses the address later gets another veth
    assert veth_name("fob", "fd00:faa5:1::a") != plan.veth
    # neighbours never share a /30 or a /64
    a, b = addresses(10, ipaddress.IPv6Network("fd00::/48"), ipaddress.IPv4Network("10.0.0.0/16")
                     ), addresses(11, ipaddress.IPv6Network("fd00::/48"),
                                  ipaddress.IPv4Network("10.0.0.0/16"))
    assert not a[2].network.overlaps(b[2].network) and a[0].network != b[0].network


@pytest.mark.parametrize("bad,code", [
    (entry(address="fd00:faa5:2::a"), Code.FORBIDDEN),  # not a function address
    (entry(address="fd00:faa5:1::"), Code.FORBIDDEN),  # the prefix's own
    (entry(address="fd00:faa5:1::1:0"), Code.FORBIDDEN),  # past 10.250/16's 16384 /30s
    (entry(allow=["169.254.169.254/32"]), Code.FORBIDDEN),  # the metadata address
    (entry(allow=["127.0.0.0/8"]), Code.FORBIDDEN),
    (entry(allow=["fe80::/10"]), Code.FORBIDDEN),
    (entry(allow=["fd00:faa5::/32"]), Code.FORBIDDEN),  # the VPN and functions
    (entry(allow=["10.250.0.0/24"]), Code.FORBIDDEN),  # other egress functions
    (entry(allow=["10.0.0.0/8"]), Code.FORBIDDEN),  # holds egress_prefix4
    (entry(allow=["10.1.0.0/16 "]), Code.BAD_REQUEST),  # not as fnsettings writes it
    (entry(allow=["10.1.0.1/16"]), Code.BAD_REQUEST),  # host bits: not canonical
    (entry(calls=[("fd00:faa5:0:100::1", [80])]), Code.FORBIDDEN),  # the server, not a fn
    (entry(calls=[("fd00:faa5:1::b", [])]), Code.FORBIDDEN),
    (entry(calls=[("fd00:faa5:1::b", [80, 53])]), Code.BAD_REQUEST),  # not a ports value
    (entry(calls=[("fd00:faa5:1::b", [80, 80])]), Code.BAD_REQUEST),
    (entry(calls=[("fd00:faa5:1::b", list(range(1, 18)))]), Code.BAD_REQUEST),  # 17
])
def test_a_bad_entry_refuses_the_whole_sync(bad, code):
    with pytest.raises(FaasError) as info:
        egress().plan([entry(name="ok", address="fd00:faa5:1::c"), bad])
    assert info.value.code == code, info.value.message


def test_a_name_or_address_twice_is_refused():
    with pytest.raises(FaasError) as info:
        egress().plan([entry(), entry(name="fob")])
    assert info.value.code == Code.BAD_REQUEST


def test_rules_hold_the_deny_list_after_egress_allow_and_only_may_call_in():
    e = egress()
    [plan] = e.plan([entry(allow=["192.168.1.0/24:5432", "fd12::/48"],
                           calls=[("fd00:faa5:1::b", [80, 8080])])])
    v4 = egressfw.render(e.prefixes, [plan.rules], v6=False).splitlines()
    v6 = egressfw.render(e.prefixes, [plan.rules], v6=True).splitlines()
    fwd4 = [r for r in v4 if r.startswith("-A FAAS-EG-FWD")]
    allow = fwd4.index(f"-A FAAS-EG-FWD -i {plan.veth} -d 192.168.1.0/24 -p tcp -m tcp "
                       "--dport 5432 -j ACCEPT")
    deny = fwd4.index("-A FAAS-EG-FWD -i fxeg+ -d 192.168.0.0/16 -j DROP")
    assert allow < deny < fwd4.index("-A FAAS-EG-FWD -i fxeg+ -j ACCEPT") == len(fwd4) - 1
    for net in ("169.254.0.0/16", "10.0.0.0/8", "172.16.0.0/12", "100.64.0.0/10",
                "127.0.0.0/8", "10.250.0.0/16"):
        assert f"-A FAAS-EG-FWD -i fxeg+ -d {net} -j DROP" in v4
    for net in ("fd00:faa5:0:100::/64", "fd00:faa5:1::/64", "fd00:faa5::/32",
                "fd00:faa5:e::/48", "fc00::/7", "fe80::/10"):
        assert f"-A FAAS-EG-FWD -i fxeg+ -d {net} -j DROP" in v6
    assert f"-A FAAS-EG-FWD -i {plan.veth} -d fd12::/48 -j ACCEPT" in v6
    assert not any("fd12" in r for r in v4) and not any("192.168" in r and "ACCEPT" in r
                                                         for r in v6)
    # towards functions: replies only
    assert v4.index("-A FAAS-EG-FWD -o fxeg+ -j DROP") == \
        v4.index("-A FAAS-EG-FWD -o fxeg+ -m conntrack --ctstate ESTABLISHED,RELATED "
                 "-j ACCEPT") + 1
    # into the host: DNS on the server address and may_call, nothing else
    in6 = [r for r in v6 if r.startswith("-A FAAS-EG-IN") and "icmp" not in r]
    assert in6 == [
        "-A FAAS-EG-IN -j FAAS-EG-SRC",
        "-A FAAS-EG-IN -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A FAAS-EG-IN -d fd00:faa5:0:100::1/128 -p udp -m udp --dport 53 -j ACCEPT",
        "-A FAAS-EG-IN -d fd00:faa5:0:100::1/128 -p tcp -m tcp --dport 53 -j ACCEPT",
        f"-A FAAS-EG-IN -i {plan.veth} -d fd00:faa5:1::b/128 -p tcp -m multiport "
        "--dports 80,8080 -j ACCEPT",
        "-A FAAS-EG-IN -j DROP"]
    assert [r for r in v4 if r.startswith("-A FAAS-EG-IN")][-1] == "-A FAAS-EG-IN -j DROP"
    assert "-A FAAS-EG-NAT -s 10.250.0.0/16 ! -o fxeg+ -j MASQUERADE" in v4
    assert "-A FAAS-EG-NAT -s fd00:faa5:e::/48 ! -o fxeg+ -j MASQUERADE" in v6


class Tables:
    """iptables -S for a few chains, enough for the jump ordering."""

    def __init__(self, chains):
        self.chains = chains
        self.calls = []

    async def run(self, *argv, stdin=None):
        self.calls.append(argv)
        chain = argv[argv.index("-S") + 1] if "-S" in argv else None
        if chain is not None:
            return "\n".join([f"-P {chain} ACCEPT", *self.chains.get(chain, [])])
        if "-D" in argv:
            i = argv.index("-D")
            self.chains[argv[i + 1]].remove(f"-A {argv[i + 1]} {' '.join(argv[i + 2:])}")
        if "-I" in argv:
            i = argv.index("-I")
            self.chains.setdefault(argv[i + 1], []).insert(
                0, f"-A {argv[i + 1]} {' '.join(argv[i + 3:])}")
        return ""

    async def check(self, *argv):
        i = argv.index("-C")
        return f"-A {argv[i + 1]} {' '.join(argv[i + 2:])}" in self.chains.get(argv[i + 1], [])


def test_the_input_jump_is_kept_before_the_wireguard_chains():
    """The WireGuard EXT chain drops packets for the server address from any interface
    but the tunnel: our jump must come first, also after that one was re-inserted."""
    tables = Tables({"INPUT": ["-A INPUT ! -i wg0 -j FAAS-wg0-EXT",
                               "-A INPUT -i fxeg+ -j FAAS-EG-IN"]})
    fw = egressfw.EgressFirewall(tables.run, tables.check)

    asyncio.run(fw._first("ip6tables", "filter", "INPUT", ("-i", "fxeg+", "-j", "FAAS-EG-IN")))
    assert tables.chains["INPUT"] == ["-A INPUT -i fxeg+ -j FAAS-EG-IN",
                                      "-A INPUT ! -i wg0 -j FAAS-wg0-EXT"]
    tables.calls.clear()
    asyncio.run(fw._first("ip6tables", "filter", "INPUT", ("-i", "fxeg+", "-j", "FAAS-EG-IN")))
    assert not [c for c in tables.calls if "-I" in c or "-D" in c]  # already first: no change


class _Ctl:
    """What the controller's egress checks read: its settings and one function."""

    def __init__(self, address, **over):
        self.settings = load({"FAAS_CONFIG": "/dev/null", "FAAS_ROOT": "/nonexistent",
                              "FAAS_RUN": "/nonexistent/run",
                              **{f"FAAS_{k.upper()}": v for k, v in over.items()}})
        self.state = type("S", (), {"function": staticmethod(lambda n: {"address": address})})


def test_the_controller_refuses_at_set_what_netagent_would_refuse_at_sync():
    from controller.main import Controller
    Controller.check_egress_room(_Ctl("fd00:faa5:1::3f", egress_prefix4="10.1.0.0/24"), "fib")
    with pytest.raises(FaasError) as info:  # a /24 holds 64 /30s: ::40 is the 65th
        Controller.check_egress_room(_Ctl("fd00:faa5:1::40", egress_prefix4="10.1.0.0/24"),
                                     "fib")
    assert info.value.code == Code.CONFLICT and "widen" in info.value.message
    ctl = _Ctl("fd00:faa5:1::a")
    Controller.check_egress_allow(ctl, "192.168.1.0/24:5432,fd12::/48")
    Controller.check_egress_allow(ctl, "not a cidr")  # left to the parser's bad_request
    for never in ("169.254.169.254/32", "fd00:faa5:1::/64", "10.250.1.0/24", "::1/128"):
        with pytest.raises(FaasError) as info:
            Controller.check_egress_allow(ctl, never)
        assert info.value.code == Code.FORBIDDEN, never


def test_namespaces_compare_before_they_act(tmp_path):
    """A namespace as planned: nothing runs (and after one look, not even a look inside);
    its veth gone: the pair is made again and moved into the same namespace."""
    [p] = egress().plan([entry()])
    calls: list[tuple[str, ...]] = []

    async def run(*argv, stdin=None):
        calls.append(argv)
        return ""

    async def check(*argv):
        return False

    from netagent.egress import Namespaces
    ns = Namespaces(str(tmp_path), run, check)
    ns.mounted = lambda: {"fib"}  # type: ignore[method-assign]
    looks = []

    async def ns_state(path):
        looks.append(path)
        return sorted([str(p.ns4), str(p.ns6)]) + [f"via {p.host4.ip}", f"via {p.host6.ip}"]
    ns.ns_state = ns_state  # type: ignore[method-assign]
    host = {p.veth: sorted([str(p.host4), str(p.host6)])}
    assert asyncio.run(ns.converge(p, host)) is False and calls == [] and len(looks) == 1
    assert asyncio.run(ns.converge(p, host)) is False and calls == [] and len(looks) == 1
    assert asyncio.run(ns.converge(p, {})) is True  # the host side is gone
    made = [c for c in calls if c[:3] == ("ip", "link", "add")]
    assert made == [("ip", "link", "add", p.veth, "type", "veth", "peer", "name",
                     "fyeg" + p.veth[4:])]
    assert ("ip", "link", "set", "fyeg" + p.veth[4:], "netns", p.path) in calls
    assert ("nsenter", f"--net={p.path}", "ip", "-6", "route", "replace", "default", "via",
            str(p.host6.ip)) in calls


def test_sixteen_may_call_ports_take_two_multiport_rules():
    """Review 13: ip6tables' multiport match takes at most 15 ports ("too many ports
    specified"); a target serving 16 got one rule and every sync failed from then on."""
    e = egress()
    [plan] = e.plan([entry(calls=[("fd00:faa5:1::b", list(range(8000, 8016)))])])
    v6 = egressfw.render(e.prefixes, [plan.rules], v6=True).splitlines()
    rules = [r for r in v6 if "--dports" in r]
    assert [r.split("--dports ")[1].split()[0].count(",") + 1 for r in rules] == [15, 1]
    assert sorted(int(p) for r in rules for p in r.split("--dports ")[1].split()[0]
                  .split(",")) == list(range(8000, 8016))


def test_only_the_functions_own_source_gets_past_its_veth():
    """Review 13: a function may send with any source (IP_FREEBIND, raw sockets); from
    its veth only its namespace's own address goes on, in both families, into the host
    and forwarded; IPv6 link-local only into the host (neighbour discovery)."""
    e = egress()
    plans = e.plan([entry(), entry(name="fob", address="fd00:faa5:1::b")])
    for v6 in (False, True):
        lines = egressfw.render(e.prefixes, [p.rules for p in plans], v6).splitlines()
        src = [r for r in lines if r.startswith("-A FAAS-EG-SRC")]
        want = [f"-A FAAS-EG-SRC -i {p.veth} -s {(p.ns6 if v6 else p.ns4).ip}/"
                f"{128 if v6 else 32} -j RETURN" for p in plans]
        assert src == want + (["-A FAAS-EG-SRC -s fe80::/10 -j RETURN"] if v6 else []) + [
            "-A FAAS-EG-SRC -j DROP"]
        first_in = next(r for r in lines if r.startswith("-A FAAS-EG-IN"))
        assert first_in == "-A FAAS-EG-IN -j FAAS-EG-SRC"  # before even ESTABLISHED
        fwd = [r for r in lines if r.startswith("-A FAAS-EG-FWD -i")]
        jump = fwd.index("-A FAAS-EG-FWD -i fxeg+ -j FAAS-EG-SRC")
        assert jump == (1 if v6 else 0)  # before egress_allow and the rest
        if v6:
            assert fwd[0] == "-A FAAS-EG-FWD -i fxeg+ -s fe80::/10 -j DROP"
        assert ":FAAS-EG-SRC - [0:0]" in lines


@pytest.mark.parametrize("never", ["168.63.129.16/32", "100.100.100.0/24",
                                   "fd00:ec2::254/128", "fd00:ec2::/32"])
def test_the_other_clouds_metadata_may_never_be_allowed(never):
    """Review 13: Azure's WireServer, Alibaba's and AWS's IPv6 metadata addresses, like
    169.254.169.254: egress_allow may not open them (netagent and the controller)."""
    with pytest.raises(FaasError) as info:
        egress().plan([entry(allow=[never])])
    assert info.value.code == Code.FORBIDDEN
    from controller.main import Controller
    with pytest.raises(FaasError):
        Controller.check_egress_allow(_Ctl("fd00:faa5:1::a"), never)


ROUTES = {"-4": [{"dst": "default", "gateway": "203.0.113.1", "dev": "eth0"},
                 {"dst": "203.0.113.0/24", "dev": "eth0", "protocol": "kernel"},
                 {"dst": "198.51.100.7", "dev": "eth1"},  # a host route, no length
                 {"dst": "192.168.7.0/24", "dev": "eth1"},  # in 192.168/16 already
                 {"dst": "10.250.0.40/30", "dev": "fxeg0123456789"},  # ours
                 {"dst": "192.0.2.0/24", "dev": "eth1", "type": "blackhole"}],
          "-6": [{"dst": "default", "gateway": "2001:db8:1::1", "dev": "eth0"},
                 {"dst": "2001:db8:1::/64", "dev": "eth0"},
                 {"dst": "fe80::/64", "dev": "eth0"},
                 {"dst": "fd00:faa5:1::/64", "dev": "wg0"}]}


def test_the_hosts_lan_is_denied_unless_allowed_and_a_new_route_is_drift():
    """Review 13: the host's own connected routes (its LAN, public or not) are denied
    like the private ranges, read at every converge; egress_allow comes first."""
    routes = {k: list(v) for k, v in ROUTES.items()}

    async def run(*argv, **kw):
        assert argv[:2] == ("ip", argv[1]) and argv[2:] == ("-j", "route", "show"), argv
        return __import__("json").dumps(routes[argv[1]])
    e = Egress(SETTINGS, "/nonexistent/run/netns", run, _never,
               vpn_server(SETTINGS.vpn_prefix).ip)
    lan = asyncio.run(e.connected())
    assert [str(n) for n in lan] == ["198.51.100.7/32", "203.0.113.0/24", "2001:db8:1::/64"]
    [plan] = e.plan([entry(allow=["203.0.113.5/32:80"])])
    v4 = egressfw.render(e.prefixes, [plan.rules], False, lan).splitlines()
    v6 = egressfw.render(e.prefixes, [plan.rules], True, lan).splitlines()
    allow = v4.index(f"-A FAAS-EG-FWD -i {plan.veth} -d 203.0.113.5/32 -p tcp -m tcp "
                     "--dport 80 -j ACCEPT")
    assert allow < v4.index("-A FAAS-EG-FWD -i fxeg+ -d 203.0.113.0/24 -j DROP")
    assert "-A FAAS-EG-FWD -i fxeg+ -d 2001:db8:1::/64 -j DROP" in v6
    assert not any("2001:db8" in r for r in v4)
    e.lan = lan
    routes["-4"].append({"dst": "198.18.0.0/24", "dev": "eth1"})  # in 198.18/15: nothing
    assert asyncio.run(e.connected()) == lan
    routes["-6"].append({"dst": "2001:db8:9::/48", "dev": "eth1"})
    assert asyncio.run(e.connected()) != lan


def test_the_deny_list_holds_the_other_metadata_nat64_and_6to4():
    e = egress()
    [plan] = e.plan([entry()])
    v4 = egressfw.render(e.prefixes, [plan.rules], v6=False).splitlines()
    v6 = egressfw.render(e.prefixes, [plan.rules], v6=True).splitlines()
    for net in ("168.63.129.16/32", "100.100.100.200/32"):
        assert f"-A FAAS-EG-FWD -i fxeg+ -d {net} -j DROP" in v4
    for net in ("64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "fc00::/7"):
        assert f"-A FAAS-EG-FWD -i fxeg+ -d {net} -j DROP" in v6


def test_a_sync_past_roots_egress_caps_is_forbidden():
    """Review 13: netagent builds no more egress functions or may_call rules than root's
    max_egress_functions and max_egress_calls allow, whatever the controller sends."""
    caps = load({"FAAS_CONFIG": "/dev/null", "FAAS_ROOT": "/nonexistent",
                 "FAAS_RUN": "/nonexistent/run", "FAAS_MAX_EGRESS_FUNCTIONS": "2",
                 "FAAS_MAX_EGRESS_CALLS": "2"})
    e = Egress(caps, "/nonexistent/run/netns", _never, _never, vpn_server(caps.vpn_prefix).ip)
    call = ("fd00:faa5:1::f", [80])
    e.plan([entry(calls=[call, call]), entry(name="b", address="fd00:faa5:1::b")])
    for over in ([entry(), entry(name="b", address="fd00:faa5:1::b"),
                  entry(name="c", address="fd00:faa5:1::c")],
                 [entry(calls=[call, call]), entry(name="b", address="fd00:faa5:1::b",
                                                   calls=[call])]):
        with pytest.raises(FaasError) as info:
            e.plan(over)
        assert info.value.code == Code.FORBIDDEN and "max_egress" in info.value.message
