"""What an egress function's ``egress_allow`` may open: one rule for the controller (at
``faasctl set``, so the operator learns it at once) and netagent (at every sync, since
it trusts no sender).

Never loopback, link-local (the cloud metadata address 169.254.169.254 among it), the
other clouds' metadata addresses, multicast or unspecified ranges, and never faasd's own
prefixes: the VPN, functions, clients, and the egress prefixes themselves.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Union

Net = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

NEVER: tuple[Net, ...] = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "::ffff:0:0/96", "fe80::/10", "ff00::/8",
    # the clouds' metadata services outside link-local: Azure's WireServer, Alibaba's,
    # AWS's IPv6 one
    "168.63.129.16/32", "100.100.100.200/32", "fd00:ec2::254/128"))


def own_prefixes(settings: Any) -> list[Net]:
    """faasd's prefixes of a Settings, which egress_allow may not reach into."""
    return [ipaddress.ip_network(getattr(settings, k)) for k in (
        "vpn_prefix", "function_prefix", "client_prefix", "egress_prefix", "egress_prefix4")]


def parse(item: str) -> tuple[Net, int | None]:
    """``CIDR`` or ``CIDR:PORT`` as common.fnsettings writes it."""
    if "/" in item and ":" in item.rsplit("/", 1)[1]:
        net, port = item.rsplit(":", 1)
        return ipaddress.ip_network(net), int(port)
    return ipaddress.ip_network(item), None


def conflict(item: str, own: list[Net]) -> Net | None:
    """The range of NEVER or ``own`` that ``item`` reaches into, or None."""
    net, _ = parse(item)
    return next((n for n in (*NEVER, *own) if n.version == net.version and n.overlaps(net)),
                None)


def room(egress_prefix: str, egress_prefix4: str) -> int:
    """How many functions the egress prefixes hold: a /64 and a /30 each, by the index
    of the function's address in function_prefix."""
    six, four = ipaddress.IPv6Network(egress_prefix), ipaddress.IPv4Network(egress_prefix4)
    return min(1 << (64 - six.prefixlen), 1 << (30 - four.prefixlen))


def index(address: str, function_prefix: str) -> int:
    """A function's place in function_prefix: ``::a`` is 10."""
    return int(ipaddress.IPv6Address(address)) - int(
        ipaddress.IPv6Network(function_prefix).network_address)


def over_caps(functions: int, calls: int, settings: Any) -> str | None:
    """What ``functions`` egress functions with ``calls`` may_call entries in all pass of
    root's caps (max_egress_functions, max_egress_calls), or None."""
    if functions > settings.max_egress_functions:
        return (f"{functions} network=egress functions, more than this host's "
                f"max_egress_functions ({settings.max_egress_functions})")
    if calls > settings.max_egress_calls:
        return (f"{calls} may_call entries of network=egress functions, more than this "
                f"host's max_egress_calls ({settings.max_egress_calls})")
    return None
