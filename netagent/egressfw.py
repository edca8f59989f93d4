"""The firewall of network=egress functions: the world yes, nothing of the host's own.

Chains of their own in iptables and ip6tables (docs/network.md "Egress"):

- ``FAAS-EG-IN`` (jumped to first from INPUT for packets from any egress veth): replies,
  ICMPv6 neighbour discovery and errors, DNS to the server's VPN address, TCP to the
  addresses and ports of the functions each may call; everything else is dropped, so a
  function reaches no address or service of this host (API, ZeroMQ, named's control
  port, ssh) whatever it listens on.
- ``FAAS-EG-FWD`` (jumped to first from FORWARD for packets from or to an egress veth):
  towards a function only replies; from a function its ``egress_allow`` first, then
  :data:`DENY4`/:data:`DENY6` and faasd's own prefixes dropped, the rest accepted.
- ``FAAS-EG-NAT`` (nat, from POSTROUTING): the egress prefixes masqueraded on the way
  out of any other interface.

Written whole with one ``*-restore --noflush`` batch per family and table, like
netagent/firewall.py; the jumps are checked with ``-C`` and kept first in their chains
(the WireGuard interface's EXT chain would otherwise drop DNS to the server address).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from netagent.firewall import ICMP_ERRORS, MULTIPORT_MAX, Check, Run

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
VETH_PREFIX = "fxeg"  # host side of every egress veth: fxeg + 10 hex digits
CHAIN_IN, CHAIN_FWD, CHAIN_NAT = "FAAS-EG-IN", "FAAS-EG-FWD", "FAAS-EG-NAT"
CHAIN_SRC = "FAAS-EG-SRC"  # from FAAS-EG-IN and FAAS-EG-FWD: each veth's own source only
FILTER_CHAINS = (CHAIN_IN, CHAIN_FWD, CHAIN_SRC)

# Never reachable from an egress function, unless egress_allow lists a part of a
# private range (never of loopback, link-local, metadata or multicast: refused there).
# The clouds' metadata services outside link-local: Azure's WireServer, Alibaba's.
# NAT64 and 6to4 embed IPv4 addresses the IPv4 list would deny.
DENY4 = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
         "172.16.0.0/12", "192.168.0.0/16", "192.0.0.0/24", "198.18.0.0/15",
         "224.0.0.0/4", "240.0.0.0/4", "168.63.129.16/32", "100.100.100.200/32")
DENY6 = ("::/128", "::1/128", "::ffff:0:0/96", "fe80::/10", "fc00::/7", "ff00::/8",
         "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16")


@dataclass(frozen=True)
class Rules:
    """One egress function's share of the chains."""

    veth: str
    allow: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None], ...]
    calls: tuple[tuple[ipaddress.IPv6Address, tuple[int, ...]], ...]
    # the namespace's own addresses: the only sources let in from the veth
    sources: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()


@dataclass(frozen=True)
class Prefixes:
    """Root's settings the rules are made of."""

    server: ipaddress.IPv6Address  # the VPN server address, where named answers
    own6: tuple[ipaddress.IPv6Network, ...]  # vpn, function, client, egress prefixes
    egress6: ipaddress.IPv6Network
    egress4: ipaddress.IPv4Network


def render(prefixes: Prefixes, functions: Sequence[Rules], v6: bool,
           lan: Sequence[Net] = ()) -> str:
    """The filter and nat batch of one family; ``lan``: the host's connected routes'
    prefixes (its LAN), denied like the private ranges."""
    veths = f"{VETH_PREFIX}+"
    est = "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
    # Sources first (a function may send from any address: IP_FREEBIND, raw sockets):
    # from each veth only its namespace's own address, and in IPv6 link-local to the
    # host (neighbour discovery); Linux never forwards a link-local source anyway.
    src = [f"-A {CHAIN_SRC} -i {fn.veth} -s {a}/{a.max_prefixlen} -j RETURN"
           for fn in functions for a in fn.sources if (a.version == 6) == v6]
    if v6:
        src.append(f"-A {CHAIN_SRC} -s fe80::/10 -j RETURN")
    src.append(f"-A {CHAIN_SRC} -j DROP")
    rules = [f"-A {CHAIN_IN} -j {CHAIN_SRC}", f"-A {CHAIN_IN} {est}"]
    if v6:
        rules += [f"-A {CHAIN_IN} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j ACCEPT"
                  for t in ("neighbour-solicitation", "neighbour-advertisement",
                            "router-solicitation", *ICMP_ERRORS)]
        rules += [f"-A {CHAIN_IN} -d {prefixes.server}/128 -p {p} -m {p} --dport 53 -j ACCEPT"
                  for p in ("udp", "tcp")]
        for fn in functions:
            for address, ports in fn.calls:  # at most MULTIPORT_MAX ports a rule
                rules += [f"-A {CHAIN_IN} -i {fn.veth} -d {address}/128 -p tcp -m multiport "
                          f"--dports {','.join(map(str, ports[i:i + MULTIPORT_MAX]))} -j ACCEPT"
                          for i in range(0, len(ports), MULTIPORT_MAX)]
    rules.append(f"-A {CHAIN_IN} -j DROP")
    rules += [f"-A {CHAIN_FWD} -o {veths} {est}", f"-A {CHAIN_FWD} -o {veths} -j DROP"]
    if v6:
        rules.append(f"-A {CHAIN_FWD} -i {veths} -s fe80::/10 -j DROP")
    rules += [f"-A {CHAIN_FWD} -i {veths} -j {CHAIN_SRC}", *src]
    for fn in functions:
        for net, port in fn.allow:
            if (net.version == 6) != v6:
                continue
            if port is None:
                rules.append(f"-A {CHAIN_FWD} -i {fn.veth} -d {net} -j ACCEPT")
            else:
                rules += [f"-A {CHAIN_FWD} -i {fn.veth} -d {net} -p {p} -m {p} --dport {port} "
                          "-j ACCEPT" for p in ("tcp", "udp")]
    if v6:
        deny = [*map(str, prefixes.own6), *DENY6]
    else:
        deny = [str(prefixes.egress4), *DENY4]
    deny += [str(net) for net in lan if (net.version == 6) == v6]
    rules += [f"-A {CHAIN_FWD} -i {veths} -d {net} -j DROP" for net in deny]
    rules.append(f"-A {CHAIN_FWD} -i {veths} -j ACCEPT")
    egress = prefixes.egress6 if v6 else prefixes.egress4
    return "\n".join([
        "*filter", *(f":{c} - [0:0]" for c in FILTER_CHAINS), *rules, "COMMIT",
        "*nat", f":{CHAIN_NAT} - [0:0]",
        f"-A {CHAIN_NAT} -s {egress} ! -o {veths} -j MASQUERADE", "COMMIT", ""])


JUMPS = (("filter", "INPUT", ("-i", f"{VETH_PREFIX}+", "-j", CHAIN_IN)),
         ("filter", "FORWARD", ("-i", f"{VETH_PREFIX}+", "-j", CHAIN_FWD)),
         ("filter", "FORWARD", ("-o", f"{VETH_PREFIX}+", "-j", CHAIN_FWD)),
         ("nat", "POSTROUTING", ("-j", CHAIN_NAT)))


class EgressFirewall:
    """Both families' chains, through netagent's command runners."""

    def __init__(self, run: Run, check: Check):
        self.run, self.check = run, check

    async def apply(self, prefixes: Prefixes, functions: Sequence[Rules],
                    lan: Sequence[Net] = ()) -> None:
        """Refill every chain atomically per family, then put each jump first."""
        for v6, tool in ((False, "iptables"), (True, "ip6tables")):
            batch = render(prefixes, functions, v6, lan)
            await self.run(f"{tool}-restore", "-w", "5", "--noflush", stdin=batch.encode())
            for table, chain, spec in JUMPS:
                await self._first(tool, table, chain, spec)

    async def _first(self, tool: str, table: str, chain: str, spec: tuple[str, ...]) -> None:
        listing = (await self.run(tool, "-w", "5", "-t", table, "-S", chain)).splitlines()
        rules = [line for line in listing if line.startswith(f"-A {chain} ")]
        ours = f"-A {chain} {' '.join(spec)}"
        # another jump inserted at 1 since (the WireGuard chains' repair) goes after ours
        first = [r for r in rules if not r.startswith(f"-A {chain} -i {VETH_PREFIX}+ ")
                 and not r.startswith(f"-A {chain} -o {VETH_PREFIX}+ ")]
        position = rules.index(ours) if ours in rules else -1
        if position != -1 and (not first or rules.index(first[0]) > position):
            return
        while await self.check(tool, "-w", "5", "-t", table, "-C", chain, *spec):
            await self.run(tool, "-w", "5", "-t", table, "-D", chain, *spec)
        await self.run(tool, "-w", "5", "-t", table, "-I", chain, "1", *spec)

    async def installed(self, prefixes: Prefixes, functions: Sequence[Rules],
                        lan: Sequence[Net] = ()) -> bool:
        """Every jump present and every chain as long as :func:`render` makes it."""
        for v6, tool in ((False, "iptables"), (True, "ip6tables")):
            want = render(prefixes, functions, v6, lan).splitlines()
            for table in ("filter", "nat"):
                listing = (await self.run(tool, "-w", "5", "-t", table, "-S")).splitlines()
                for t, chain, spec in JUMPS:
                    if t == table and f"-A {chain} {' '.join(spec)}" not in listing:
                        return False
                for chain in (FILTER_CHAINS if table == "filter" else (CHAIN_NAT,)):
                    have = sum(1 for line in listing if line.startswith(f"-A {chain} "))
                    if have != sum(1 for line in want if line.startswith(f"-A {chain} ")):
                        return False
        return True

    async def remove(self) -> None:
        """Jumps out, then the chains (``faas-netagent --remove``)."""
        for tool in ("iptables", "ip6tables"):
            for table, chain, spec in JUMPS:
                while await self.check(tool, "-w", "5", "-t", table, "-C", chain, *spec):
                    await self.run(tool, "-w", "5", "-t", table, "-D", chain, *spec)
            for table, chains in (("filter", FILTER_CHAINS), ("nat", (CHAIN_NAT,))):
                names = [c for c in chains
                         if await self.check(tool, "-w", "5", "-t", table, "-S", c)]
                if names:
                    batch = [f"*{table}", *(f"-F {c}" for c in names),
                             *(f"-X {c}" for c in names), "COMMIT", ""]
                    await self.run(f"{tool}-restore", "-w", "5", "--noflush",
                                   stdin="\n".join(batch).encode())
