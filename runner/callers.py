"""Who is calling: a connection's source address as a VPN peer's name, and ``allow``.

Each WireGuard peer owns exactly one /128 of ``vpn_prefix`` (netagent sets it as the
peer's AllowedIPs, so the kernel drops a packet from that key with any other source), and
the controller sends the runner every peer's (name, address) in its sync. The runner
holds that list to root's bound: every address inside ``vpn_prefix`` (the settings
file), not the prefix's own address nor the server's, no name or address twice.

A source address then means:

- outside ``vpn_prefix``, or the server's own VPN address: a **local** caller (this host:
  loopback, the host's own addresses). ``peer`` is None and ``allow`` never refuses it.
- a peer's /128: that peer; it passes ``allow`` when ``allow`` lists its name or ``*``.
- any other address of ``vpn_prefix`` (a peer removed since, or not yet synced): no
  name (``peer`` None), and it passes only ``allow = *``.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from common.errors import Code, FaasError
from common.settings import vpn_server

ANY = "*"


class Callers:
    """The peers the runner was last synced with, by address."""

    def __init__(self, vpn_prefix: ipaddress.IPv6Network):
        self.prefix = vpn_prefix
        self.server = vpn_server(vpn_prefix).ip
        self.names: dict[str, str] = {}  # by the address as accept() writes it

    def check(self, peers: Sequence[Mapping[str, Any]]) -> dict[str, str]:
        """Raise forbidden (outside root's bound) or bad_request (twice) for the first
        peer that does not fit; else their names by address (compressed form)."""
        names: dict[str, str] = {}
        seen: set[str] = set()
        for i, peer in enumerate(peers):
            name, ip = peer["name"], ipaddress.IPv6Address(peer["address"])
            if ip not in self.prefix or ip in (self.server, self.prefix.network_address):
                raise FaasError(Code.FORBIDDEN, f"peer {name}: {ip} is not a peer address of "
                                f"{self.prefix} (vpn_prefix)",
                                {"field": f"peers[{i}].address", "peer": name})
            if str(ip) in names or name in seen:
                raise FaasError(Code.BAD_REQUEST, f"peer {name} or address {ip} appears "
                                "twice", {"field": f"peers[{i}]", "peer": name})
            names[str(ip)] = name
            seen.add(name)
        return names

    def update(self, names: dict[str, str]) -> None:
        """Take the peers of a sync (from :meth:`check`)."""
        self.names = names

    def identify(self, remote: str) -> tuple[str | None, bool]:
        """(peer name or None, whether the caller is local). Every accepted connection
        asks: a peer is one dict lookup, any other address is parsed once (clients come
        back)."""
        name = self.names.get(remote)
        if name is not None:
            return name, False
        return None, _local(self.prefix, self.server, remote)

    @staticmethod
    def allowed(allow: Sequence[str], peer: str | None, local: bool) -> bool:
        """Whether ``allow`` lets this caller in."""
        return local or ANY in allow or (peer is not None and peer in allow)


@functools.lru_cache(maxsize=4096)
def _local(prefix: ipaddress.IPv6Network, server: ipaddress.IPv6Address, remote: str) -> bool:
    """Whether ``remote`` is this host's: outside the VPN prefix, or the server's own."""
    try:
        ip = ipaddress.IPv6Address(remote)
    except ValueError:  # an IPv4 caller of an IPv6 listener never gets here
        return True
    return ip not in prefix or ip == server
