"""netagent (root): owns the WireGuard interface, addresses, peers and its firewall chains.

It offers only narrow verbs (see common.protocol.OPS["netagent"]) and converges to the
whole desired state the controller sends with ``sync``. Every argument is checked
against the configured interface and prefixes before anything runs: one bad address or
peer refuses the whole sync and changes nothing. Its endpoint is mode 0600 and owned by
the controller's user: nobody else may talk to it.

What it converges, in order (docs/network.md):

1. the interface (kernel WireGuard, else wireguard-go; either outlives netagent), up;
2. the server key, generated once into ``$FAAS_ROOT/wireguard/private.key`` (0600) and
   given to ``wg`` by path; the listen port;
3. the firewall chains, before any peer can send a packet;
4. addresses: the VPN server address (``::1/64`` of ``vpn_prefix``) and one /128 per
   function; addresses in those prefixes that should not be there are removed, others
   are not touched; the route for the function prefix;
5. peers: each key with exactly its own /128 as allowed-ips; any other peer is removed;
6. network=egress functions: their firewall chains, namespaces, veths and forwarding;
   those of functions no longer listed are removed (netagent/egress.py).

A restart changes nothing that was right: every step compares before it acts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import sys
from typing import Any

from common import fnsettings, layout
from common.daemon import AgentDaemon, run_main
from common.errors import Code, FaasError
from common.files import atomic_write
from common.rpc import Handler
from common.settings import EX_CONFIG, SettingsError, load, vpn_server
from netagent.egress import Egress, Plan
from netagent.firewall import Firewall, Ports
from netagent.net import Net

KEEPALIVE = 25  # seconds, for a peer the server greets first (see set_peer)
HEAL_SECONDS = 1.0  # how often the interface is compared with the desired state
ENDPOINT_SAVE_TICKS = 2  # peer endpoints are saved every this many checks


class NetAgent(AgentDaemon):
    """The root network agent."""

    service = "netagent"
    socket_mode = 0o600

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.net = Net(self.settings.wg_interface)
        self.firewall = Firewall(self.settings.wg_interface, self.net.run, self.net.check)
        self.function_prefix = ipaddress.IPv6Network(self.settings.function_prefix)
        self.vpn_prefix = ipaddress.IPv6Network(self.settings.vpn_prefix)
        self.server = vpn_server(self.vpn_prefix)
        self.key_path = layout.of(self.settings).wg_private_key
        self.endpoints_path = layout.of(self.settings).wg_endpoints
        self.endpoints = self.load_endpoints()
        self.egress = Egress(self.settings, layout.of(self.settings).netns, self.net.run,
                             self.net.check, self.server.ip)
        self._lock = asyncio.Lock()
        # the last state that passed its checks: the drift check holds the interface to it
        self.desired: tuple[set[ipaddress.IPv6Interface],
                            dict[str, ipaddress.IPv6Network], Ports, list[Plan]] | None = None
        # its digest while no converge to it has succeeded yet (a step failed), else None
        self.pending: str | None = None

    def handlers(self) -> dict[str, Handler]:
        return {**super().handlers(), "wg_info": self.op_wg_info, "peers": self.op_peers}

    # --- checks ----------------------------------------------------------------------

    def check_addresses(self, addresses: list[str]) -> set[ipaddress.IPv6Interface]:
        """Every function address must lie inside the function prefix (root's setting:
        the controller may not make us hold any other address): else forbidden."""
        wanted = set()
        for addr in addresses:
            ip = ipaddress.IPv6Address(addr)
            if ip not in self.function_prefix or ip == self.function_prefix.network_address:
                raise FaasError(Code.FORBIDDEN, f"{addr} is not a function address of the "
                                f"function prefix {self.function_prefix}", {"address": addr})
            wanted.add(ipaddress.IPv6Interface(f"{ip}/128"))
        return wanted

    def check_peers(self, peers: list[dict[str, str]]) -> dict[str, ipaddress.IPv6Network]:
        """Each peer: a key (the schema checked its form) and its own /128 inside the VPN
        prefix, not the server's (else forbidden); no key or address twice."""
        wanted: dict[str, ipaddress.IPv6Network] = {}
        seen: set[ipaddress.IPv6Address] = set()
        for peer in peers:
            key, ip = peer["public_key"], ipaddress.IPv6Address(peer["address"])
            if ip not in self.vpn_prefix or ip == self.server.ip \
                    or ip == self.vpn_prefix.network_address:
                raise FaasError(Code.FORBIDDEN, f"peer address {ip} is not a peer address "
                                f"of the VPN prefix {self.vpn_prefix} (if vpn_prefix was "
                                "changed, remove the peers of the old one with faasctl vpn "
                                "rm, or set it back)", {"address": str(ip)})
            if key in wanted or ip in seen:
                raise FaasError(Code.BAD_REQUEST, f"peer {key} or address {ip} appears twice",
                                {"public_key": key, "address": str(ip)})
            wanted[key] = ipaddress.IPv6Network(f"{ip}/128")
            seen.add(ip)
        return wanted

    def check_ports(self, functions: set[ipaddress.IPv6Interface],
                    ports: list[dict[str, Any]]) -> Ports:
        """The TCP ports peers may reach, by function address: each entry's address one
        of this sync's function addresses, its ports none (the runner holds none of them
        yet) or a value the ``ports`` setting could have (1-16 ports, none twice, not 53),
        else bad_request; an address without an entry gets 80 (what every function served
        before ``ports`` existed)."""
        out: dict[ipaddress.IPv6Address, list[int]] = {i.ip: [80] for i in functions}
        seen: set[ipaddress.IPv6Address] = set()
        for i, entry in enumerate(ports):
            ip = ipaddress.IPv6Address(entry["address"])
            if ip not in out or ip in seen:
                raise FaasError(Code.BAD_REQUEST, f"ports[{i}]: {ip} is not a function "
                                "address of this sync, or appears twice",
                                {"field": f"ports[{i}].address"})
            if entry["ports"] and not fnsettings.BY_KEY["ports"].canonical(entry["ports"]):
                raise FaasError(Code.BAD_REQUEST, f"ports[{i}]: {entry['ports']!r:.80} is "
                                "not 1-16 TCP ports, none twice, not 53",
                                {"field": f"ports[{i}].ports"})
            out[ip] = list(entry["ports"])
            seen.add(ip)
        return out

    # --- converging ------------------------------------------------------------------

    async def converge(self, state: dict[str, Any]) -> None:
        functions = self.check_addresses(state["addresses"])
        ports = self.check_ports(functions, state.get("ports", []))
        addresses = functions | {self.server}
        peers = self.check_peers(state["peers"])
        plans = self.egress.plan(state.get("egress", []))
        async with self._lock:  # a sync and the drift check, one at a time
            # The state is wanted once it passed its checks: the repair loop retries this
            # one if a step fails, never an older one (which would put back a removed
            # peer every second). The digest we report stays the last converged one
            # until this state is whole (op_sync, or the repair loop).
            self.desired = (addresses, peers, ports, plans)
            self.pending = self.offered or "unknown"
            await self._converge(addresses, peers, ports, plans)
            self.pending = None

    async def _converge(self, addresses: set[ipaddress.IPv6Interface],
                        peers: dict[str, ipaddress.IPv6Network], ports: Ports,
                        plans: list[Plan]) -> None:
        if not await self.net.link_exists():
            kind = await self.net.create_link()
            self.log.info("interface_created", interface=self.net.interface, kind=kind)
        await self.net.ensure_key(self.key_path)
        if await self.net.listen_port() != self.settings.wg_port or \
                not await self.net.public_key():
            await self.net.configure(self.key_path, self.settings.wg_port)
        await self.firewall.apply(self.function_prefix, self.server.ip, ports)
        await self.net.set_up()
        await self.converge_addresses(addresses)
        await self.net.route(self.function_prefix)
        await self.converge_peers(peers)
        done = await self.egress.converge(plans)
        if any(done.values()):
            self.log.info("egress_converged", **done)

    async def converge_addresses(self, wanted: set[ipaddress.IPv6Interface]) -> None:
        have = {a for a in await self.net.addresses()
                if a.ip in self.function_prefix or a.ip in self.vpn_prefix}
        for iface in sorted(wanted - have):
            await self.net.add_address(iface)
            self.log.info("address_added", address=str(iface))
        for iface in sorted(have - wanted):
            await self.net.del_address(iface)
            self.log.info("address_removed", address=str(iface))

    async def converge_peers(self, wanted: dict[str, ipaddress.IPv6Network]) -> None:
        have = await self.net.peers()
        for key, net in wanted.items():
            if have.get(key, {}).get("allowed_ips") != [str(net)]:
                endpoint = None if key in have else self.endpoints.get(key)
                await self.net.set_peer(key, net, endpoint, KEEPALIVE)
                self.log.info("peer_set", public_key=key, address=str(net.network_address),
                              endpoint=endpoint)
        for key in sorted(set(have) - set(wanted)):
            await self.net.remove_peer(key)
            self.log.info("peer_removed", public_key=key)

    # --- where peers were last seen -----------------------------------------------------

    def load_endpoints(self) -> dict[str, str]:
        """Peer endpoints remembered from the interface (a new interface knows none)."""
        try:
            with open(self.endpoints_path, encoding="utf-8") as f:
                data = json.load(f)
        except (FileNotFoundError, ValueError):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} \
            if isinstance(data, dict) else {}

    async def background(self) -> None:
        """Every second, put back what someone changed behind our back (an address
        deleted, the interface or the firewall gone, a peer removed); every few
        seconds, remember where each peer was last seen (root-only file), so after a
        restart that lost the interface the server greets them first."""
        tick = 0
        said: tuple[str, str] | None = None  # the last failure logged: logged once, not
        # every second while a step keeps failing the same way
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), HEAL_SECONDS)
                return
            except TimeoutError:
                pass
            tick += 1
            if self.desired is None:
                continue
            try:
                await self.repair(quiet=said is not None)
                if tick % ENDPOINT_SAVE_TICKS == 0:
                    await self.save_endpoints()
                if said is not None and not self.pending:
                    self.log.info("drift_check_recovered", after=said[1])
                said = None
            except FaasError as exc:  # the next tick tries again
                if said != ("warning", exc.message):
                    said = ("warning", exc.message)
                    self.log.warning("drift_check_failed", error=exc.message,
                                     retry="every second, logged once")
            except Exception as exc:  # never let the repair loop die quietly
                if said != ("error", repr(exc)):
                    said = ("error", repr(exc))
                    self.log.error("drift_check_failed", error=repr(exc),
                                   retry="every second, logged once")

    async def repair(self, quiet: bool = False) -> None:
        """One tick of the repair loop: converge again to the desired state if a step of
        its sync failed or something drifted from it; report its digest once whole."""
        async with self._lock:
            if self.desired is None:
                return
            drift = "unconverged" if self.pending else await self.drift(*self.desired)
            if drift and not (quiet and drift == "unconverged"):  # retrying: said once
                self.log.warning("drift_repaired", what=drift)
                await self._converge(*self.desired)
                if self.pending:  # the state a failed sync wanted, whole at last
                    self.digest, self.synced, self.pending = self.pending, True, None

    async def drift(self, addresses: set[ipaddress.IPv6Interface],
                    peers: dict[str, ipaddress.IPv6Network], ports: Ports,
                    plans: list[Plan]) -> str | None:
        """What differs from the desired state, cheaply, or None."""
        if not await self.net.link_exists():
            return "interface missing"
        have = {a for a in await self.net.addresses()
                if a.ip in self.function_prefix or a.ip in self.vpn_prefix}
        if have != addresses:
            return "addresses"
        if not await self.firewall.installed(self.function_prefix, self.server.ip, ports):
            return "firewall"
        current = await self.net.peers()
        if {k: p["allowed_ips"] for k, p in current.items()} != \
                {k: [str(n)] for k, n in peers.items()}:
            return "peers"
        return await self.egress.drift(plans)

    async def save_endpoints(self) -> None:
        current = await self.net.peers()
        merged = {k: p["endpoint"] or self.endpoints[k] for k, p in current.items()
                  if p["endpoint"] or k in self.endpoints}
        if merged != self.endpoints:
            self.endpoints = merged
            atomic_write(self.endpoints_path, json.dumps(merged).encode())

    # --- read-only verbs ---------------------------------------------------------------

    async def op_wg_info(self, args: dict[str, Any]) -> dict[str, Any]:
        """What a client config needs from this side of the tunnel."""
        if not await self.net.link_exists() or not os.path.exists(self.key_path):
            raise FaasError(Code.UNAVAILABLE, f"{self.net.interface} is not set up yet: "
                            "netagent has not had its first sync")
        return {"interface": self.net.interface, "public_key": await self.net.public_key(),
                "listen_port": await self.net.listen_port(),
                "server_address": str(self.server.ip)}

    async def op_peers(self, args: dict[str, Any]) -> dict[str, Any]:
        """Every peer the interface has, with handshake and byte counters."""
        if not await self.net.link_exists():
            return {"peers": []}
        return {"peers": [{"public_key": k, **v} for k, v in (await self.net.peers()).items()]}


async def teardown(settings: Any) -> None:
    """``faas-netagent --remove``: the interface first (so no packet arrives unfiltered),
    then the firewall chains, then the egress namespaces, veths and chains. Run by
    ``faasd down`` once supervisord has stopped."""
    net = Net(settings.wg_interface)
    await net.delete_link()
    await Firewall(settings.wg_interface, net.run, net.check).remove()
    egress = Egress(settings, layout.of(settings).netns, net.run, net.check,
                    vpn_server(settings.vpn_prefix).ip)
    await egress.ns.remove_except(set(), set())
    await egress.ns.unmount_dir()
    await egress.firewall.remove()


def main() -> None:
    """Console script faas-netagent (``--remove``: take the interface and chains away)."""
    if sys.argv[1:] == ["--remove"]:
        try:
            settings = load()
        except SettingsError as exc:
            print(f"faas-netagent: {exc}", file=sys.stderr)
            sys.exit(EX_CONFIG)
        asyncio.run(teardown(settings))
        return
    run_main(NetAgent)
