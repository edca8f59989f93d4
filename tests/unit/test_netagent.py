"""netagent's logic with a fake OS seam: checks before anything runs, converge that
compares before it acts, and firewall batches."""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
from typing import Any

import pytest

from common import protocol
from common.errors import Code, FaasError
from common.log import EventLog
from common.settings import load, vpn_server
from netagent import firewall
from netagent.main import NetAgent

KEY_A, KEY_B = "A" * 43 + "=", "B" * 43 + "="


class FakeNet:
    """Records what netagent asks of the OS; holds an interface's state in memory."""

    def __init__(self):
        self.interface = "wg0"
        self.calls: list[tuple[Any, ...]] = []
        self.link = False
        self.addrs: set[ipaddress.IPv6Interface] = {ipaddress.IPv6Interface("fd00:99::1/64")}
        self.wg_peers: dict[str, dict[str, Any]] = {}
        self.port = 0

    async def link_exists(self): return self.link
    async def create_link(self):
        self.link = True
        self.calls.append(("create",))
        return "fake"

    async def ensure_key(self, path): self.calls.append(("key", path))
    async def listen_port(self): return self.port
    async def public_key(self): return KEY_A if self.port else ""
    async def configure(self, path, port):
        self.port = port
        self.calls.append(("configure",))

    async def set_up(self): pass
    async def addresses(self): return sorted(self.addrs)
    async def add_address(self, a):
        self.addrs.add(a)
        self.calls.append(("add", str(a)))

    async def del_address(self, a):
        self.addrs.discard(a)
        self.calls.append(("del", str(a)))

    async def route(self, prefix): pass
    async def peers(self): return self.wg_peers

    async def set_peer(self, key, net, endpoint=None, keepalive=0):
        self.wg_peers[key] = {"allowed_ips": [str(net)], "endpoint": endpoint}
        self.calls.append(("peer", key))

    async def remove_peer(self, key):
        del self.wg_peers[key]
        self.calls.append(("unpeer", key))


class FakeFirewall:
    def __init__(self): self.applied, self.ports = 0, None
    async def apply(self, prefix, server, ports=None): self.applied, self.ports = \
        self.applied + 1, ports
    async def installed(self, prefix=None, server=None, ports=None): return self.applied > 0
    def forget(self): pass


class FakeEgress:
    """The egress part, tested on its own in test_egress_units.py."""

    def __init__(self): self.converged: list[Any] = []
    def plan(self, entries): return list(entries)
    async def converge(self, plans):
        self.converged.append(plans)
        return {}
    async def drift(self, plans): return None


@pytest.fixture
def agent(tmp_path):
    settings = load({"FAAS_ROOT": str(tmp_path), "FAAS_RUN": str(tmp_path / "run"),
                     "FAAS_CONFIG": "/dev/null"})
    a = NetAgent(settings, EventLog("netagent", stream=io.StringIO()))
    a.net = FakeNet()
    a.firewall = FakeFirewall()
    a.egress = FakeEgress()
    return a


def converge(agent, addresses=(), peers=()):
    asyncio.run(agent.converge({"addresses": list(addresses), "peers": list(peers),
                                "egress": []}))


def test_converge_builds_everything_then_changes_nothing(agent):
    peer = {"public_key": KEY_A, "address": "fd00:faa5:0:100::2"}
    converge(agent, ["fd00:faa5:1::a"], [peer])
    assert agent.net.addrs == {ipaddress.IPv6Interface(a) for a in (
        "fd00:99::1/64", "fd00:faa5:1::a/128", "fd00:faa5:0:100::1/64")}  # others untouched
    assert agent.net.wg_peers == {KEY_A: {"allowed_ips": ["fd00:faa5:0:100::2/128"],
                                          "endpoint": None}}
    agent.net.calls.clear()
    converge(agent, ["fd00:faa5:1::a"], [peer])
    assert [c for c in agent.net.calls if c[0] != "key"] == []  # a resync acts on nothing


def test_converge_removes_what_should_not_be_there(agent):
    converge(agent, ["fd00:faa5:1::a", "fd00:faa5:1::b"],
             [{"public_key": KEY_A, "address": "fd00:faa5:0:100::2"},
              {"public_key": KEY_B, "address": "fd00:faa5:0:100::3"}])
    converge(agent, ["fd00:faa5:1::b"], [{"public_key": KEY_B, "address": "fd00:faa5:0:100::3"}])
    assert ("del", "fd00:faa5:1::a/128") in agent.net.calls
    assert set(agent.net.wg_peers) == {KEY_B}


@pytest.mark.parametrize("peers,code", [
    # outside what root's settings allow: forbidden (was bad_request before issue 11)
    ([{"public_key": KEY_A, "address": "fd00:faa5:0:100::1"}], Code.FORBIDDEN),  # server's
    ([{"public_key": KEY_A, "address": "fd00:faa5:0:100::"}], Code.FORBIDDEN),  # anycast
    ([{"public_key": KEY_A, "address": "fd00:faa5:1::a"}], Code.FORBIDDEN),  # not VPN
    ([{"public_key": KEY_A, "address": "fd00:faa5:0:100::2"},
      {"public_key": KEY_A, "address": "fd00:faa5:0:100::3"}], Code.BAD_REQUEST),  # key twice
    ([{"public_key": KEY_A, "address": "fd00:faa5:0:100::2"},
      {"public_key": KEY_B, "address": "fd00:faa5:0:100::2"}], Code.BAD_REQUEST),  # addr twice
])
def test_bad_peers_refuse_the_whole_sync_before_anything_runs(agent, peers, code):
    with pytest.raises(FaasError) as info:
        converge(agent, ["fd00:faa5:1::a"], peers)
    assert info.value.code is code
    assert agent.net.calls == [] and agent.firewall.applied == 0


GOOD_PEER = {"public_key": KEY_A, "address": "fd00:faa5:0:100::2"}
KEY_C = base64.b64encode(bytes(range(32))).decode()  # canonical, as the wire schema wants


def sync(agent, state, generation=5):
    """A sync as the faas user would send it: through the wire schema, then the op."""
    from common import protocol
    req = protocol.parse_request(protocol.make_request(
        "sync", {"generation": generation, "state": state}, "rogue1"), "netagent")
    return asyncio.run(agent.op_sync(req.args))


@pytest.mark.parametrize("state,code", [
    ({"addresses": ["::1"], "peers": [GOOD_PEER]}, Code.FORBIDDEN),  # loopback
    ({"addresses": ["fd00:faa5:2::a"], "peers": [GOOD_PEER]}, Code.FORBIDDEN),  # other prefix
    ({"addresses": ["fd00:faa5:1::"], "peers": [GOOD_PEER]}, Code.FORBIDDEN),  # its anycast
    ({"addresses": ["fd00:faa5:0:100::1"], "peers": [GOOD_PEER]}, Code.FORBIDDEN),  # VPN's
    ({"addresses": ["fd00:faa5:1::a"],
      "peers": [{"public_key": KEY_C, "address": "2001:db8::2"}]}, Code.FORBIDDEN),
    ({"addresses": ["not-an-address"], "peers": [GOOD_PEER]}, Code.BAD_REQUEST),
    ({"addresses": ["fd00:faa5:1::a%wg0"], "peers": [GOOD_PEER]}, Code.BAD_REQUEST),
    ({"addresses": ["fd00:faa5:1::a"],
      "peers": [{"public_key": "short=", "address": "fd00:faa5:0:100::3"}]}, Code.BAD_REQUEST),
    ({"addresses": ["fd00:faa5:1::a"], "peers": [], "interface": "eth0"}, Code.BAD_REQUEST),
])
def test_rogue_sync_is_refused_and_changes_nothing(agent, state, code):
    """One field out of bounds per case (issue 11): refused with its code, the interface,
    the generation and the digest the controller watches all as they were."""
    first = sync(agent, {"addresses": ["fd00:faa5:1::a"], "peers": [GOOD_PEER]})
    before = (set(agent.net.addrs), dict(agent.net.wg_peers), agent.generation, agent.digest)
    agent.net.calls.clear()
    with pytest.raises(FaasError) as info:
        sync(agent, state, generation=6)
    assert info.value.code is code
    assert agent.net.calls == []
    assert (set(agent.net.addrs), dict(agent.net.wg_peers), agent.generation,
            agent.digest) == before
    assert first["digest"] == agent.digest and len(agent.digest) == 64


FN_A, FN_B = "fd00:faa5:1::a", "fd00:faa5:1::b"


def test_sync_gives_the_firewall_each_functions_ports_80_by_default(agent):
    sync(agent, {"addresses": [FN_A, FN_B], "peers": [GOOD_PEER],
                 "ports": [{"address": FN_B, "ports": [5432, 80]}]})
    assert agent.firewall.ports == {ipaddress.IPv6Address(FN_A): [80],
                                    ipaddress.IPv6Address(FN_B): [5432, 80]}
    assert agent.desired[2] == agent.firewall.ports  # what the drift check holds it to


def test_an_empty_ports_list_opens_nothing_of_that_address(agent):
    """The runner holds none of the function's ports yet (another program took them):
    the controller sends none, and the firewall opens nothing of that address."""
    sync(agent, {"addresses": [FN_A, FN_B], "peers": [GOOD_PEER],
                 "ports": [{"address": FN_A, "ports": []}, {"address": FN_B, "ports": [80]}]})
    assert agent.firewall.ports == {ipaddress.IPv6Address(FN_A): [],
                                    ipaddress.IPv6Address(FN_B): [80]}
    rules = firewall.port_rules("FAAS-wg0-IN", agent.firewall.ports)
    assert rules == [f"-A FAAS-wg0-IN -d {FN_B}/128 -p tcp -m multiport --dports 80 -j ACCEPT"]


@pytest.mark.parametrize("ports", [
    [{"address": "fd00:faa5:1::c", "ports": [80]}],  # not a function of this sync
    [{"address": FN_A, "ports": [80]}, {"address": FN_A, "ports": [81]}],  # twice
    [{"address": FN_A, "ports": [53]}],  # the VPN's DNS
    [{"address": FN_A, "ports": [80, 80]}],  # a port twice
])
def test_bad_ports_refuse_the_whole_sync(agent, ports):
    sync(agent, {"addresses": [FN_A], "peers": [GOOD_PEER]})
    before = (agent.firewall.applied, agent.firewall.ports, agent.digest)
    with pytest.raises(FaasError) as info:
        sync(agent, {"addresses": [FN_A], "peers": [GOOD_PEER], "ports": ports}, 6)
    assert info.value.code is Code.BAD_REQUEST
    assert (agent.firewall.applied, agent.firewall.ports, agent.digest) == before


def test_more_than_sixteen_ports_is_refused_by_the_schema(agent):
    with pytest.raises(FaasError) as info:
        sync(agent, {"addresses": [FN_A], "peers": [],
                     "ports": [{"address": FN_A, "ports": list(range(1000, 1017))}]})
    assert info.value.code is Code.BAD_REQUEST and agent.firewall.applied == 0


def test_sync_reports_the_digest_of_what_it_converged_to(agent):
    from common import protocol
    state = {"addresses": ["fd00:faa5:1::a", "fd00:faa5:1::b"], "peers": [GOOD_PEER]}
    sync(agent, state)
    assert asyncio.run(agent.op_ping({}))["digest"] == protocol.state_digest("netagent", state)
    sync(agent, {"addresses": ["fd00:faa5:1::a"], "peers": [GOOD_PEER]})  # same generation
    assert agent.digest != protocol.state_digest("netagent", state)


def test_server_address_is_one_of_the_vpn_prefix():
    assert str(vpn_server("fd00:faa5:0:100::/64")) == \
        "fd00:faa5:0:100::1/64"


def test_firewall_batch_allows_each_functions_ports_and_dns_then_drops():
    a, b = ipaddress.IPv6Address("fd00:faa5:1::a"), ipaddress.IPv6Address("fd00:faa5:1::b")
    batch = firewall.render("wg0", ipaddress.IPv6Network("fd00:faa5:1::/64"),
                            ipaddress.IPv6Address("fd00:faa5:0:100::1"),
                            {b: [5432, 80], a: [80]})
    lines = batch.splitlines()
    assert lines[:4] == ["*filter", ":FAAS-wg0-IN - [0:0]", ":FAAS-wg0-FWD - [0:0]",
                         ":FAAS-wg0-EXT - [0:0]"]
    accepts = [line for line in lines if "--dports" in line]
    assert accepts == [  # exactly these ports of exactly these addresses, nothing prefix-wide
        "-A FAAS-wg0-IN -d fd00:faa5:1::a/128 -p tcp -m multiport --dports 80 -j ACCEPT",
        "-A FAAS-wg0-IN -d fd00:faa5:1::b/128 -p tcp -m multiport --dports 5432,80 -j ACCEPT"]
    assert not any("--dport 80" in line or "fd00:faa5:1::/64 -p tcp" in line for line in lines)
    assert "-A FAAS-wg0-IN -d fd00:faa5:0:100::1/128 -p udp -m udp --dport 53 -j ACCEPT" in lines
    ins = [line for line in lines if line.startswith("-A FAAS-wg0-IN")]
    assert ins[-1] == "-A FAAS-wg0-IN -j DROP"
    assert "-A FAAS-wg0-FWD -j DROP" in lines and lines[-1] == "COMMIT"
    ext = [line for line in lines if line.startswith("-A FAAS-wg0-EXT")]
    assert ext == ["-A FAAS-wg0-EXT -i lo -j RETURN",
                   "-A FAAS-wg0-EXT -d fd00:faa5:1::/64 -j DROP",
                   "-A FAAS-wg0-EXT -d fd00:faa5:0:100::1/128 -j DROP"]


def test_firewall_splits_sixteen_ports_over_two_multiport_rules():
    a = ipaddress.IPv6Address("fd00:faa5:1::a")
    ports = list(range(1000, 1016))
    lines = firewall.render("wg0", ipaddress.IPv6Network("fd00:faa5:1::/64"),
                            ipaddress.IPv6Address("fd00:faa5:0:100::1"), {a: ports}
                            ).splitlines()
    rules = [line.split("--dports ")[1].split()[0] for line in lines if "--dports" in line]
    assert rules == [",".join(map(str, ports[:15])), "1015"]
    assert all(len(r.split(",")) <= firewall.MULTIPORT_MAX for r in rules)
    # no function at all: no port of the prefix is open
    empty = firewall.render("wg0", ipaddress.IPv6Network("fd00:faa5:1::/64"),
                            ipaddress.IPv6Address("fd00:faa5:0:100::1"))
    assert "-p tcp -m multiport" not in empty


def test_chain_names_fit_iptables_for_the_longest_interface_name():
    assert all(len(c) <= 28 for c in firewall.chain_names("x" * 15))


def test_firewall_apply_adds_jumps_once_and_remove_takes_all_away():
    rules: set[tuple[str, ...]] = set()
    ran: list[tuple[str, ...]] = []

    async def run_(*argv, stdin=None):
        if argv[3:] != ("-S",):  # record what changes the table, not the listings
            ran.append(argv)
        if argv[3] == "-I":
            rules.add((argv[4], *argv[6:]))
        if argv[3] == "-D":
            rules.discard((argv[4], *argv[5:]))
        if argv[3:] == ("-S",):  # the whole table, as ip6tables lists it
            return "\n".join("-A " + " ".join(rule) for rule in sorted(rules))
        return ""

    async def check(*argv):
        return argv[3] == "-S" or (argv[4], *argv[5:]) in rules

    fw = firewall.Firewall("wg0", run_, check)
    prefix, server = ipaddress.IPv6Network("fd00:faa5:1::/64"), ipaddress.IPv6Address("fd00::1")
    asyncio.run(fw.apply(prefix, server))
    asyncio.run(fw.apply(prefix, server))
    assert len(rules) == 4 and sum(1 for a in ran if a[3] == "-I") == 4
    assert ("FORWARD", "-o", "wg0", "-j", "FAAS-wg0-FWD") in rules  # the VPN stays unrouted
    assert asyncio.run(fw.installed())
    asyncio.run(fw.remove())
    assert rules == set() and not asyncio.run(fw.installed())
    assert ran[-1][0] == "ip6tables-restore"


def test_a_recreated_peer_is_greeted_at_its_remembered_endpoint(agent):
    agent.endpoints = {KEY_A: "[fdff:1::2]:40000"}
    converge(agent, [], [{"public_key": KEY_A, "address": "fd00:faa5:0:100::2"}])
    assert agent.net.wg_peers[KEY_A]["endpoint"] == "[fdff:1::2]:40000"


def test_drift_is_found_and_repaired(agent):
    converge(agent, ["fd00:faa5:1::a"], [{"public_key": KEY_A, "address": "fd00:faa5:0:100::2"}])
    assert asyncio.run(agent.drift(*agent.desired)) is None
    agent.net.addrs.discard(ipaddress.IPv6Interface("fd00:faa5:1::a/128"))  # behind our back
    assert asyncio.run(agent.drift(*agent.desired)) == "addresses"
    agent.net.wg_peers.clear()
    asyncio.run(agent._converge(*agent.desired))
    assert asyncio.run(agent.drift(*agent.desired)) is None
    assert ipaddress.IPv6Interface("fd00:faa5:1::a/128") in agent.net.addrs


def as_served(args: dict[str, Any]) -> dict[str, Any]:
    """A sync's arguments as the RPC server hands them to op_sync: through its schema."""
    return protocol.OPS["netagent"]["sync"].args.check(args, "args")


def test_a_failed_step_leaves_the_new_state_wanted_never_an_older_one(agent):
    """Review 13: a lasting egress failure (16 ports in one ip6tables rule) made the
    repair loop re-apply the previous state every second, putting revoked peers back."""
    a = {"public_key": KEY_A, "address": "fd00:faa5:0:100::2"}
    b = {"public_key": "B" * 42 + "A=", "address": "fd00:faa5:0:100::3"}
    asyncio.run(agent.op_sync(as_served({"generation": 1, "state": {
        "addresses": ["fd00:faa5:1::a"], "peers": [a, b], "egress": []}})))
    old_digest = agent.digest
    failing = True

    async def egress_converge(plans):
        if failing:
            raise FaasError(Code.INTERNAL, "ip6tables-restore: too many ports specified")
        return {}
    agent.egress.converge = egress_converge
    state = {"addresses": ["fd00:faa5:1::a", "fd00:faa5:1::b"], "peers": [b],
             "egress": [{"name": "fetcher", "address": "fd00:faa5:1::b", "egress_allow": [],
                         "may_call": [{"address": "fd00:faa5:1::a",
                                       "ports": list(range(8000, 8016))}]}]}
    with pytest.raises(FaasError):
        asyncio.run(agent.op_sync(as_served({"generation": 2, "state": state})))
    for _ in range(3):  # the repair loop's ticks while the egress step still fails
        with pytest.raises(FaasError):
            asyncio.run(agent.repair())
        assert set(agent.net.wg_peers) == {b["public_key"]}  # the revoked peer stays out
        assert ipaddress.IPv6Interface("fd00:faa5:1::b/128") in agent.net.addrs
        assert agent.digest == old_digest  # not converged: the controller can tell
    failing = False
    asyncio.run(agent.repair())
    assert agent.digest == protocol.state_digest("netagent", state) and agent.pending is None
    agent.net.calls.clear()
    asyncio.run(agent.repair())  # whole now: the drift check finds nothing to do
    assert agent.net.calls == []
