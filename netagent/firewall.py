"""netagent's ip6tables chains: VPN peers reach each function's ports and DNS, nothing else.

Three chains of its own per WireGuard interface, ``FAAS-<if>-IN`` (jumped to from INPUT
for packets arriving on the interface), ``FAAS-<if>-FWD`` (from FORWARD, for packets
arriving on or leaving by the interface) and
``FAAS-<if>-EXT`` (from INPUT for packets arriving anywhere else: only loopback may
reach function addresses and the DNS server without the tunnel). Function
addresses are local to this host, so a peer's request is INPUT traffic; nothing arriving
on the tunnel is ever forwarded anywhere (IPv6 forwarding stays as the host has it).

The chains are written whole with one ``ip6tables-restore --noflush`` (declaring a chain
flushes it, so the new rules replace the old in one atomic batch); the jumps are added
once, checked with ``-C`` first; removal takes the jumps out and then flushes and
deletes the chains in one batch. ``-w`` always: another tool may hold the xtables lock.

A function's ports (its ``ports`` setting, 80 unless set) are one rule per function
address, ``-m multiport --dports`` with at most :data:`MULTIPORT_MAX` ports per rule
(the match's limit), so a peer reaches exactly those ports of exactly that address.

The whole batch grows with the number of functions (about 40 ms for 400 rules on 2
cores), and a deploy syncs netagent twice: so once the chains were written whole, a sync
that changes only ports writes only the difference, ``-D`` for a rule that went and
``-I ... 1`` for a new one (every port rule is an ACCEPT of its own address: their order
does not matter), and one that changes nothing runs nothing. Anything else, a failed
difference, or drift found by the repair loop (:meth:`Firewall.forget`) writes them whole
again (docs/operations.md, "Scale").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Mapping, Sequence

from common.errors import FaasError

Run = Callable[..., Awaitable[str]]
Check = Callable[..., Awaitable[bool]]
Ports = Mapping[ipaddress.IPv6Address, Sequence[int]]  # a function address's TCP ports
MULTIPORT_MAX = 15  # ports one multiport match may list

# ICMPv6 a peer needs for the tunnel's traffic to work (PMTU discovery above all), plus
# echo to the server's VPN address, so `ping` says whether the tunnel is up.
ICMP_ERRORS = ("destination-unreachable", "packet-too-big", "time-exceeded",
               "parameter-problem")


def chain_names(interface: str) -> tuple[str, str, str]:
    """(input, forward, elsewhere) chains of one interface; at most 28 characters each."""
    return f"FAAS-{interface}-IN", f"FAAS-{interface}-FWD", f"FAAS-{interface}-EXT"


def port_rules(chain: str, ports: Ports) -> list[str]:
    """ACCEPT rules for each function address's ports, in address order."""
    rules = []
    for address in sorted(ports):
        listed = list(ports[address])
        for i in range(0, len(listed), MULTIPORT_MAX):
            chunk = ",".join(str(p) for p in listed[i:i + MULTIPORT_MAX])
            rules.append(f"-A {chain} -d {address}/128 -p tcp -m multiport --dports {chunk} "
                         "-j ACCEPT")
    return rules


def render(interface: str, function_prefix: ipaddress.IPv6Network,
           server: ipaddress.IPv6Address, ports: Ports | None = None) -> str:
    """The ip6tables-restore batch that (re)fills both chains; ``ports``: the TCP ports
    peers may reach, by function address (none: no function is reachable)."""
    chain_in, chain_fwd, chain_ext = chain_names(interface)
    rules = [
        f"-A {chain_in} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        *(f"-A {chain_in} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j ACCEPT"
          for t in ICMP_ERRORS),
        f"-A {chain_in} -d {server}/128 -p ipv6-icmp -m icmp6 --icmpv6-type echo-request "
        "-j ACCEPT",
        *port_rules(chain_in, ports or {}),
        f"-A {chain_in} -d {server}/128 -p udp -m udp --dport 53 -j ACCEPT",
        f"-A {chain_in} -d {server}/128 -p tcp -m tcp --dport 53 -j ACCEPT",
        f"-A {chain_in} -j DROP",
        f"-A {chain_fwd} -j DROP",
        # Linux answers for a local address on any interface: a neighbour on the LAN
        # that routes the prefix here must not reach functions or DNS without the VPN.
        # The host itself (loopback) may.
        f"-A {chain_ext} -i lo -j RETURN",
        f"-A {chain_ext} -d {function_prefix} -j DROP",
        f"-A {chain_ext} -d {server}/128 -j DROP",
    ]
    return "\n".join(["*filter", *(f":{c} - [0:0]" for c in chain_names(interface)),
                      *rules, "COMMIT", ""])


def jumps(interface: str) -> list[tuple[str, ...]]:
    """The rule specs (without -A/-I/-C/-D) that send the interface's traffic to us."""
    chain_in, chain_fwd, chain_ext = chain_names(interface)
    return [("INPUT", "-i", interface, "-j", chain_in),
            ("FORWARD", "-i", interface, "-j", chain_fwd),
            # into the tunnel too: with IPv6 forwarding on (egress functions turn it on),
            # a LAN neighbour routing the client prefix here must not reach the peers
            ("FORWARD", "-o", interface, "-j", chain_fwd),
            ("INPUT", "!", "-i", interface, "-j", chain_ext)]


class Firewall:
    """The chains of one interface, through the caller's command runners."""

    def __init__(self, interface: str, run: Run, check: Check):
        self.interface = interface
        self.run = run  # run(*argv, stdin=bytes|None) -> stdout; raises on failure
        self.check = check  # check(*argv) -> True when the command exits 0
        # What the chains hold since we last wrote them whole, jumps included: (prefix,
        # server, port rules); None: unknown, the next apply writes them whole.
        self.applied: tuple[ipaddress.IPv6Network, ipaddress.IPv6Address,
                            frozenset[str]] | None = None

    def forget(self) -> None:
        """Someone changed the chains (the repair loop found drift): write them whole."""
        self.applied = None

    async def apply(self, function_prefix: ipaddress.IPv6Network,
                    server: ipaddress.IPv6Address, ports: Ports | None = None) -> None:
        """Fill both chains, then make sure the jumps to them exist (first in their
        built-in chains, so no earlier ACCEPT lets a peer past them); after a whole
        write, only the port rules that changed."""
        chain_in = chain_names(self.interface)[0]
        rules = frozenset(port_rules(chain_in, ports or {}))
        last, self.applied = self.applied, None  # unknown until this one is done
        if last is not None and last[:2] == (function_prefix, server):
            if await self._difference(last[2], rules):
                self.applied = (function_prefix, server, rules)
                return
        batch = render(self.interface, function_prefix, server, ports)
        await self.run("ip6tables-restore", "-w", "5", "--noflush", stdin=batch.encode())
        for chain, *spec in jumps(self.interface):
            if not await self.check("ip6tables", "-w", "5", "-C", chain, *spec):
                await self.run("ip6tables", "-w", "5", "-I", chain, "1", *spec)
        self.applied = (function_prefix, server, rules)

    async def _difference(self, have: frozenset[str], want: frozenset[str]) -> bool:
        """Delete the port rules that went, insert the new ones, in one batch (atomic);
        False if it failed (a rule to delete was not there: someone changed the chain)."""
        if have == want:
            return True
        chain_in = chain_names(self.interface)[0]
        lines = [f"-D {r[3:]}" for r in sorted(have - want)]
        lines += [f"-I {chain_in} 1 {r[len(chain_in) + 4:]}" for r in sorted(want - have)]
        try:
            await self.run("ip6tables-restore", "-w", "5", "--noflush",
                           stdin="\n".join(["*filter", *lines, "COMMIT", ""]).encode())
        except FaasError:
            return False
        return True

    async def installed(self, function_prefix: ipaddress.IPv6Network | None = None,
                        server: ipaddress.IPv6Address | None = None,
                        ports: Ports | None = None) -> bool:
        """Every jump is in place and, given the prefix and server, every chain holds as
        many rules as :func:`render` writes (a chain flushed by hand is caught). One
        listing of the table: netagent asks this every second."""
        listing = (await self.run("ip6tables", "-w", "5", "-S")).splitlines()
        if any(f"-A {' '.join(jump)}" not in listing for jump in jumps(self.interface)):
            return False
        if function_prefix is None or server is None:
            return True
        want = render(self.interface, function_prefix, server, ports).splitlines()
        for chain in chain_names(self.interface):
            have = sum(1 for line in listing if line.startswith(f"-A {chain} "))
            if have != sum(1 for line in want if line.startswith(f"-A {chain} ")):
                return False
        return True

    async def remove(self) -> None:
        """Take the jumps out (every copy), then flush and delete the chains."""
        for chain, *spec in jumps(self.interface):
            while await self.check("ip6tables", "-w", "5", "-C", chain, *spec):
                await self.run("ip6tables", "-w", "5", "-D", chain, *spec)
        names = [c for c in chain_names(self.interface)
                 if await self.check("ip6tables", "-w", "5", "-S", c)]
        if names:
            batch = ["*filter", *(f"-F {c}" for c in names), *(f"-X {c}" for c in names),
                     "COMMIT", ""]
            await self.run("ip6tables-restore", "-w", "5", "--noflush",
                           stdin="\n".join(batch).encode())
