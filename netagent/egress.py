"""network=egress functions: one network namespace each, a veth to the host, NAT out.

netagent (root) owns them (docs/network.md "Egress"). From each sync's ``egress`` list it
makes, for every function, a namespace held by a bind mount at ``$FAAS_RUN/netns/<name>``
(the runner's containers join it), a veth pair (host side ``fxeg`` + 10 hex digits of the
name and address, namespace side ``eth0``), addresses derived from the function's own
place in ``function_prefix`` (index ``i``: ``egress_prefix``'s ``i``-th /64 and
``egress_prefix4``'s ``i``-th /30, host side ``::1`` and ``.1``, namespace side ``::2``
and ``.2``) and default routes through the host. Nothing the controller sends is an
address of its own: it names a function address, which must lie in ``function_prefix``,
and root's prefixes say the rest. Namespaces, veths and rules of functions no longer
listed are removed; every step compares before it acts.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
from dataclasses import dataclass
from typing import Any

from common import egressnets
from common.errors import Code, FaasError
from common.fnsettings import BY_KEY
from common.paths import root_dir
from netagent.egressfw import DENY4, DENY6, VETH_PREFIX, EgressFirewall, Net, Prefixes, Rules
from netagent.firewall import Check, Run

NS_IF = "eth0"  # the namespace's side of the veth


@dataclass(frozen=True)
class Plan:
    """One egress function as netagent will make it."""

    name: str
    path: str  # the namespace's bind mount
    veth: str
    host6: ipaddress.IPv6Interface
    ns6: ipaddress.IPv6Interface
    host4: ipaddress.IPv4Interface
    ns4: ipaddress.IPv4Interface
    rules: Rules


def veth_name(name: str, address: str) -> str:
    """The host side's name: stable for a function, new for another of the same address."""
    return VETH_PREFIX + hashlib.sha256(f"{name}/{address}".encode()).hexdigest()[:10]


def addresses(index: int, egress6: ipaddress.IPv6Network, egress4: ipaddress.IPv4Network
              ) -> tuple[ipaddress.IPv6Interface, ...] | tuple[ipaddress.IPv4Interface, ...]:
    """(host6, ns6, host4, ns4) of the function at ``index`` in function_prefix."""
    net6 = int(egress6.network_address) + (index << 64)
    net4 = int(egress4.network_address) + index * 4
    return (ipaddress.IPv6Interface((net6 + 1, 64)), ipaddress.IPv6Interface((net6 + 2, 64)),
            ipaddress.IPv4Interface((net4 + 1, 30)), ipaddress.IPv4Interface((net4 + 2, 30)))


def check_allow(items: list[str], forbidden: list[Any], where: str) -> tuple[Any, ...]:
    """``egress_allow`` as fnsettings would have made it, not opening any of faasd's own
    prefixes, loopback, link-local (the metadata address) or multicast."""
    if not BY_KEY["egress_allow"].canonical(items):
        raise FaasError(Code.BAD_REQUEST, f"{where}.egress_allow is not a value `faasctl "
                        "set` could make (CIDR or CIDR:PORT)", {"field": f"{where}.egress_allow"})
    for item in items:
        bad = egressnets.conflict(item, forbidden)
        if bad:
            raise FaasError(Code.FORBIDDEN, f"{where}.egress_allow {item} overlaps {bad}, "
                            "which an egress function may never reach",
                            {"field": f"{where}.egress_allow"})
    return tuple(egressnets.parse(item) for item in items)


def plan(entries: list[dict[str, Any]], *, netns_dir: str,
         function_prefix: ipaddress.IPv6Network, egress6: ipaddress.IPv6Network,
         egress4: ipaddress.IPv4Network, forbidden: list[Any]) -> list[Plan]:
    """Check a sync's ``egress`` list against root's prefixes: one bad entry refuses
    the whole sync (bad_request or forbidden) before anything changes."""
    room = egressnets.room(str(egress6), str(egress4))
    plans, seen = [], set()
    for i, entry in enumerate(entries):
        where, name = f"egress[{i}]", entry["name"]
        address = ipaddress.IPv6Address(entry["address"])
        if address not in function_prefix or address == function_prefix.network_address:
            raise FaasError(Code.FORBIDDEN, f"{where}.address {address} is not in the "
                            f"function prefix {function_prefix}", {"field": f"{where}.address"})
        index = int(address) - int(function_prefix.network_address)
        if index >= room:
            raise FaasError(Code.FORBIDDEN, f"{where}: {name}'s address {address} is past "
                            f"what egress_prefix and egress_prefix4 can hold ({room} "
                            "functions): widen them", {"field": f"{where}.address"})
        if name in seen or address in seen:
            raise FaasError(Code.BAD_REQUEST, f"{where}: {name} or {address} appears twice",
                            {"field": where})
        seen |= {name, address}
        calls = []
        for target in entry["may_call"]:
            to = ipaddress.IPv6Address(target["address"])
            if to not in function_prefix or not target["ports"]:
                raise FaasError(Code.FORBIDDEN, f"{where}.may_call {to} is not a function "
                                "address with ports", {"field": f"{where}.may_call"})
            if not BY_KEY["ports"].canonical(target["ports"]):
                raise FaasError(Code.BAD_REQUEST, f"{where}.may_call {to}: "
                                f"{target['ports']!r:.80} is not a value the ports setting "
                                "could have (1-16 TCP ports, none twice, not 53)",
                                {"field": f"{where}.may_call"})
            calls.append((to, tuple(sorted(set(target["ports"])))))
        host6, ns6, host4, ns4 = addresses(index, egress6, egress4)
        veth = veth_name(name, str(address))
        plans.append(Plan(name, os.path.join(netns_dir, name), veth, host6, ns6, host4, ns4,
                          Rules(veth, check_allow(entry["egress_allow"], forbidden, where),
                                tuple(calls), (ns4.ip, ns6.ip))))
    return plans


class Namespaces:
    """The namespaces and veths, through netagent's command runners."""

    def __init__(self, netns_dir: str, run: Run, check: Check):
        self.dir, self.run, self.check = netns_dir, run, check
        # plans made whole since this netagent started: a sync looks inside their
        # namespaces no more (3 nsenter each); their host side is still compared
        self.done: dict[str, Plan] = {}

    def mounted(self) -> set[str]:
        """Names whose namespace bind mount is in place."""
        out = set()
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and os.path.dirname(fields[4]) == self.dir:
                    out.add(os.path.basename(fields[4]))
        return out

    async def private_dir(self) -> None:
        """The directory, a real root-owned 0700 one (never one the faas group planted
        in $FAAS_RUN), a private mount of its own: a namespace bind mount under a shared
        mount would propagate (and ``unshare`` refuses it)."""
        try:
            root_dir(self.dir, 0o700)
        except Exception as exc:
            raise FaasError(Code.UNAVAILABLE, str(exc)) from None
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            own = [line.split() for line in f if line.split()[4] == self.dir]
        if not own:
            await self.run("mount", "--bind", self.dir, self.dir)
        if not own or any("shared:" in " ".join(m[6:m.index("-")]) for m in own):
            await self.run("mount", "--make-private", self.dir)

    async def host_veths(self) -> dict[str, list[str]]:
        """Our veths on the host: name -> its addresses (CIDR)."""
        out = json.loads(await self.run("ip", "-j", "addr", "show", "type", "veth") or "[]")
        return {link["ifname"]: sorted(f"{a['local']}/{a['prefixlen']}"
                                      for a in link.get("addr_info", [])
                                      if a.get("scope") == "global")
                for link in out if link.get("ifname", "").startswith(VETH_PREFIX)}

    async def ns_state(self, path: str) -> list[str]:
        """The namespace's eth0 addresses and default gateways, as sorted text."""
        out = json.loads(await self.run("nsenter", f"--net={path}", "ip", "-j", "addr", "show",
                                        "dev", NS_IF) or "[]")
        have = sorted(f"{a['local']}/{a['prefixlen']}" for link in out
                      for a in link.get("addr_info", []) if a.get("scope") == "global")
        for family in ("-4", "-6"):
            routes = json.loads(await self.run("nsenter", f"--net={path}", "ip", family, "-j",
                                               "route", "show", "default") or "[]")
            have += sorted(f"via {r.get('gateway')}" for r in routes)
        return have

    async def converge(self, p: Plan, host: dict[str, list[str]]) -> bool:
        """Make one function's namespace and veth as planned; True if anything changed."""
        want_ns = sorted([str(p.ns4), str(p.ns6)]) + [f"via {p.host4.ip}", f"via {p.host6.ip}"]
        want_host = sorted([str(p.host4), str(p.host6)])
        mounted = p.name in self.mounted()
        if self.done.get(p.name) == p and mounted and host.get(p.veth) == want_host:
            return False
        self.done.pop(p.name, None)
        fresh = False
        if not mounted:
            if not os.path.exists(p.path):
                with open(p.path, "x"):
                    pass
            await self.run("unshare", f"--net={p.path}", "true")
            fresh = True
        have_ns = [] if fresh else await self.ns_state_or_empty(p.path)
        if not fresh and have_ns == want_ns and host.get(p.veth) == want_host:
            self.done[p.name] = p
            return False
        ns = ("nsenter", f"--net={p.path}")
        await self.run(*ns, "ip", "link", "set", "lo", "up")
        if p.veth not in host or not have_ns:
            if p.veth in host:
                await self.run("ip", "link", "del", p.veth)
            if await self.check(*ns, "ip", "link", "show", NS_IF):
                await self.run(*ns, "ip", "link", "del", NS_IF)
            peer = "fyeg" + p.veth[4:]
            await self.run("ip", "link", "add", p.veth, "type", "veth", "peer", "name", peer)
            await self.run("ip", "link", "set", peer, "netns", p.path)
            await self.run(*ns, "ip", "link", "set", peer, "name", NS_IF)
        await self.run("ip", "addr", "replace", str(p.host4), "dev", p.veth)
        await self.run("ip", "-6", "addr", "replace", str(p.host6), "dev", p.veth, "nodad")
        await self.run("ip", "link", "set", p.veth, "up")
        await self.run(*ns, "ip", "addr", "replace", str(p.ns4), "dev", NS_IF)
        await self.run(*ns, "ip", "-6", "addr", "replace", str(p.ns6), "dev", NS_IF, "nodad")
        await self.run(*ns, "ip", "link", "set", NS_IF, "up")
        await self.run(*ns, "ip", "route", "replace", "default", "via", str(p.host4.ip))
        await self.run(*ns, "ip", "-6", "route", "replace", "default", "via", str(p.host6.ip))
        self.done[p.name] = p
        return True

    async def ns_state_or_empty(self, path: str) -> list[str]:
        try:
            return await self.ns_state(path)
        except FaasError:  # no eth0 (a veth deleted by hand takes its peer along)
            return []

    async def unmount_dir(self) -> None:
        """Take the directory's own bind mount away (``faas-netagent --remove``)."""
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            count = sum(1 for line in f if line.split()[4] == self.dir)
        for _ in range(count):
            await self.run("umount", self.dir)

    async def remove_except(self, keep: set[str], veths: set[str]) -> list[str]:
        """Delete our veths and namespaces that no plan names; the names removed."""
        removed = []
        for veth in sorted(set(await self.host_veths()) - veths):
            await self.run("ip", "link", "del", veth)
        mounted = self.mounted()
        names = set(os.listdir(self.dir)) if os.path.isdir(self.dir) else set()
        for name in sorted((names | mounted) - keep):
            path = os.path.join(self.dir, name)
            if name in mounted:
                await self.run("umount", "--lazy", path)
            if os.path.lexists(path):
                os.unlink(path)
            self.done.pop(name, None)
            removed.append(name)
        return removed


def _write(path: str, value: str) -> bool:
    """Set a sysctl file unless it already holds ``value``; True if it changed."""
    with open(path, encoding="ascii") as f:
        if f.read().strip() == value:
            return False
    with open(path, "w", encoding="ascii") as f:
        f.write(value)
    return True


async def forwarding(run: Run, veths: list[str]) -> list[str]:
    """Forwarding where egress needs it, and nowhere else we can avoid: IPv4 per
    interface (each egress veth, and the interfaces of the default routes, for the
    replies); IPv6 only has the global switch, which makes every interface ignore
    router advertisements unless accept_ra is 2, so accept_ra 1 becomes 2 first.
    What changed, for the log."""
    changed = []
    conf4, conf6 = "/proc/sys/net/ipv4/conf", "/proc/sys/net/ipv6/conf"
    routes = json.loads(await run("ip", "-4", "-j", "route", "show", "default") or "[]")
    for dev in sorted({*veths, *(r["dev"] for r in routes if r.get("dev"))}):
        if os.path.isdir(os.path.join(conf4, dev)) and \
                _write(os.path.join(conf4, dev, "forwarding"), "1"):
            changed.append(f"ipv4 {dev} forwarding")
    with open(os.path.join(conf6, "all", "forwarding"), encoding="ascii") as f:
        on = f.read().strip() == "1"
    if not on:
        for dev in sorted(os.listdir(conf6)):
            ra = os.path.join(conf6, dev, "accept_ra")
            if os.path.exists(ra) and _write_if(ra, "1", "2"):
                changed.append(f"ipv6 {dev} accept_ra 2")
        _write(os.path.join(conf6, "all", "forwarding"), "1")
        changed.append("ipv6 forwarding")
    return changed


def _write_if(path: str, old: str, new: str) -> bool:
    with open(path, encoding="ascii") as f:
        if f.read().strip() != old:
            return False
    return _write(path, new)


class Egress:
    """netagent's egress part: plans from a sync, converging, drift, removal."""

    def __init__(self, settings: Any, netns_dir: str, run: Run, check: Check,
                 server: ipaddress.IPv6Address):
        self.settings = settings
        self.function_prefix = ipaddress.IPv6Network(settings.function_prefix)
        self.egress6 = ipaddress.IPv6Network(settings.egress_prefix)
        self.egress4 = ipaddress.IPv4Network(settings.egress_prefix4)
        own6 = tuple(ipaddress.IPv6Network(p) for p in (
            settings.vpn_prefix, settings.function_prefix, settings.client_prefix,
            settings.egress_prefix))
        self.forbidden = egressnets.own_prefixes(settings)
        self.prefixes = Prefixes(server, own6, self.egress6, self.egress4)
        self.run = run
        self.ns = Namespaces(netns_dir, run, check)
        self.firewall = EgressFirewall(run, check)
        self.lan: list[Net] = []  # the host's connected prefixes the rules were made with
        self.denied = [ipaddress.ip_network(n) for n in (*DENY4, *DENY6)] + \
            [*own6, self.egress4]

    async def connected(self) -> list[Net]:
        """The prefixes of the host's own connected (non-default) routes, its LAN, that
        the deny list does not hold already; our veths' aside."""
        out: set[Net] = set()
        for family in ("-4", "-6"):
            for r in json.loads(await self.run("ip", family, "-j", "route", "show") or "[]"):
                if r.get("dst", "default") == "default" or r.get("type", "unicast") != \
                        "unicast" or str(r.get("dev", "")).startswith(VETH_PREFIX):
                    continue
                net = ipaddress.ip_network(r["dst"], strict=False)
                if not any(d.version == net.version and net.subnet_of(d)  # type: ignore
                           for d in self.denied):
                    out.add(net)
        return sorted(out, key=lambda n: (n.version, n))

    def plan(self, entries: list[dict[str, Any]]) -> list[Plan]:
        bad = egressnets.over_caps(len(entries), sum(len(e["may_call"]) for e in entries),
                                   self.settings)
        if bad:  # root's caps on what the controller may make us build
            raise FaasError(Code.FORBIDDEN, f"egress: {bad}", {"field": "egress"})
        return plan(entries, netns_dir=self.ns.dir, function_prefix=self.function_prefix,
                    egress6=self.egress6, egress4=self.egress4, forbidden=self.forbidden)

    async def converge(self, plans: list[Plan]) -> dict[str, list[str]]:
        """Firewall first (no veth forwards unfiltered), then namespaces and veths, the
        forwarding switches, and last the removal of what no plan names."""
        made: list[str] = []
        if plans:  # none: no veth, so no rule matters (and no iptables is needed)
            self.lan = await self.connected()
            await self.firewall.apply(self.prefixes, [p.rules for p in plans], self.lan)
            await self.ns.private_dir()
            host = await self.ns.host_veths()
            made = [p.name for p in plans if await self.ns.converge(p, host)]
        sysctls = await forwarding(self.run, [p.veth for p in plans]) if plans else []
        removed = await self.ns.remove_except({p.name for p in plans}, {p.veth for p in plans})
        return {"made": made, "removed": removed, "sysctls": sysctls}

    async def drift(self, plans: list[Plan]) -> str | None:
        """What differs, cheaply: a namespace or veth missing or extra, the firewall."""
        if {p.name for p in plans} != self.ns.mounted():
            return "egress namespaces"
        host = await self.ns.host_veths()
        if set(host) != {p.veth for p in plans} or any(
                host[p.veth] != sorted([str(p.host4), str(p.host6)]) for p in plans):
            return "egress veths"
        if plans and await self.connected() != self.lan:
            return "egress routes"  # the host's LAN changed: its prefixes denied anew
        if plans and not await self.firewall.installed(self.prefixes,
                                                       [p.rules for p in plans], self.lan):
            return "egress firewall"
        return None
