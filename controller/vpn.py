"""VPN peers from the controller's side: keys, expiry, and the client's wg-quick config.

The controller (unprivileged) keeps the peer list in state.db; netagent (root) puts it
on the interface from ``sync``. A key pair the server makes for a peer comes from ``wg
genkey``/``wg pubkey`` over pipes (never argv), is printed once and is not stored: only
the public half is. The peer's config file itself is :mod:`common.wgconf`'s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Mapping
from typing import Any

from common import wgconf
from common.errors import Code, FaasError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def expiry(text: str | None, now: float | None = None) -> float | None:
    """Unix time ``text`` (``30m``, ``12h``, ``7d``, ``4w``) from now, or None."""
    if text is None:
        return None
    return (now if now is not None else time.time()) + int(text[:-1]) * UNITS[text[-1]]


async def _wg(argv: tuple[str, ...], stdin: bytes | None = None) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError:
        raise FaasError(Code.UNAVAILABLE, "wg is not installed: apt-get install "
                        "wireguard-tools") from None
    out, err = await proc.communicate(stdin)
    if proc.returncode != 0:
        raise FaasError(Code.INTERNAL, f"{' '.join(argv)} failed: {err.decode().strip()}")
    try:
        return wgconf.key_from(out.decode(errors="replace"), argv)
    except ValueError as exc:
        raise FaasError(Code.INTERNAL, str(exc)) from None


async def key_pair() -> tuple[str, str]:
    """(private, public), made by wg and passed through pipes only."""
    private = await _wg(wgconf.GENKEY)
    return private, await _wg(wgconf.PUBKEY, stdin=private.encode() + b"\n")


def check_endpoint(endpoint: str) -> str:
    """The ``vpn_endpoint`` setting, required for a client config."""
    if not endpoint:
        raise FaasError(Code.CONFLICT, "vpn_endpoint is not set, so a client would not know "
                        "where to connect: set vpn_endpoint = \"HOST:PORT\" (this host's "
                        "public name or address and wg_port) in /etc/faasd/faasd.toml and "
                        "restart the controller (faasd ctl restart controller)")
    return endpoint


PRIVILEGED = 1024  # below: only root binds (Linux's ip_unprivileged_port_start default)
Held = Mapping[str, Collection[int]]  # the runner's report: function address -> ports held


def peer_ports(specs: list[dict[str, Any]], held: Held | None) -> list[dict[str, Any]]:
    """The ports netagent opens to peers on each function address: those of the
    function's ``ports`` setting its listener is the runner's. ``held``: the runner's last
    report (``ping``), None while there is none from the runner we synced (down,
    restarted, not yet synced). A port the runner does not report held may be another
    program's (a local user binding it with IP_FREEBIND first, a host service on [::]:PORT
    the runner's bind then collides with), so it stays closed. Without a report for the
    address, ports < 1024 stay open: no local user can bind them, and the runner serves
    a new function or a new runner its functions before its next ping says so."""
    return [{"address": spec["address"],
             "ports": open_ports(spec["address"], spec["settings"]["ports"], held)}
            for spec in specs]


def open_ports(address: str, wanted: Collection[int], held: Held | None) -> list[int]:
    """Of the ports ``wanted`` on ``address``, those that may be opened to a caller (a
    VPN peer, or an egress function by ``may_call``): see :func:`peer_ports`."""
    holds = None if held is None else held.get(address)
    if holds is None:
        return [p for p in wanted if p < PRIVILEGED]
    return [p for p in wanted if p in holds]


def egress_targets(egress: list[dict[str, Any]], held: Held | None) -> list[dict[str, Any]]:
    """netagent's egress entries with each ``may_call`` target's ports cut to those the
    runner holds, as for peers; a target left with none is left out (nothing to open)."""
    out = []
    for entry in egress:
        targets = []
        for target in entry["may_call"]:
            ports = open_ports(target["address"], target["ports"], held)
            if ports:
                targets.append({**target, "ports": ports})
        out.append({**entry, "may_call": targets})
    return out
