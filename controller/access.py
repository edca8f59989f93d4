"""Who is calling the HTTP API: an operator by uid, or a token of some role.

faasctl's socket lets the faas group in by file mode; the HTTP API must decide the same
thing about a TCP or unix connection. On loopback the kernel knows which user owns the
client's socket: ``/proc/net/tcp`` and ``/proc/net/tcp6`` list every socket of this
network namespace with its owner's uid (what identd reads), and the client's is the one
whose local address is our peer and whose remote address is our end of the connection.
On the unix socket SO_PEERCRED says it. An operator is root or a user whose primary or
supplementary group is the configured group, read from the user database (cached a few
seconds, so ``usermod -aG faas USER`` takes effect without a restart).

Tokens are for callers without a local uid (a CI job, a laptop over the VPN): ``faas_``
and 32 random bytes, of which only the SHA-256 is stored.
"""

from __future__ import annotations

import grp
import hashlib
import ipaddress
import pwd
import secrets
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.errors import Code, FaasError
from common.protocol import role_allows

TOKEN_PREFIX = "faas_"
CACHE_SECONDS = 3.0  # how long a uid's membership is trusted before the database is read
PROC_TABLES = {4: "/proc/net/tcp", 6: "/proc/net/tcp6"}
TIME_WAIT, LISTEN = "06", "0A"  # owned by no process (uid 0 in the table) / not a peer


def new_token() -> str:
    """A fresh token: shown once to whoever creates it, never stored."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What the state keeps of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    """Who sent a request: ``role`` None is an operator (every op), else a token's role."""

    who: str  # for logs and messages: "uid 1000 (alice)", "token ci"
    role: str | None = None

    def may(self, need: str) -> bool:
        return self.role is None or role_allows(self.role, need)


# --- the uid behind a loopback TCP connection ------------------------------------------


def _unmapped(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(host.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or v4-mapped 127.x: a peer on this host."""
    return _unmapped(host).is_loopback


def _proc_hex(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address as /proc/net/tcp* prints it: 32-bit words in host byte order."""
    raw = addr.packed
    return "".join(f"{w:08X}" for w in struct.unpack(f"={len(raw) // 4}I", raw))


def _forms(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[tuple[int, str]]:
    """(table, hex) pairs under which a socket of this address may be listed: an IPv4
    client may have used an AF_INET socket or an AF_INET6 one with a v4-mapped address."""
    if isinstance(addr, ipaddress.IPv4Address):
        return [(4, _proc_hex(addr)),
                (6, _proc_hex(ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + addr.packed)))]
    return [(6, _proc_hex(addr))]


def peer_uid(local: tuple[Any, ...], remote: tuple[Any, ...],
             tables: dict[int, str] = PROC_TABLES) -> int | None:
    """The uid owning the client socket of the connection (``local`` is our end,
    ``remote`` the client's, as getsockname/getpeername give them), or None when no
    socket of this network namespace is the client's (it is on another host)."""
    mine, theirs = _unmapped(local[0]), _unmapped(remote[0])
    for (table, client), (_, server) in zip(_forms(theirs), _forms(mine)):
        needle = f"{client}:{remote[1]:04X} {server}:{local[1]:04X} "
        with open(tables[table], encoding="ascii") as f:
            text = f.read()
        at = text.find(needle)
        while at >= 0:
            fields = text[at:text.find("\n", at)].split()
            # fields: local rem st tx:rx tr:when retrnsmt uid ...
            if fields[2] not in (TIME_WAIT, LISTEN):
                return int(fields[6])
            at = text.find(needle, at + 1)
    return None


def unix_peer(sock: socket.socket) -> tuple[int, int]:
    """(uid, gid) of the process at the other end of a unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, gid = struct.unpack("3i", creds)
    return uid, gid


# --- who is an operator ------------------------------------------------------------------


class Operators:
    """Root and the members of ``group``, from the user database, briefly cached."""

    def __init__(self, group: str, clock: Callable[[], float] = time.monotonic):
        self.group = group
        self.clock = clock
        self._cache: dict[int, tuple[float, bool, str]] = {}

    def name(self, uid: int) -> str:
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return "no passwd entry"

    def check(self, uid: int, gid: int | None = None) -> tuple[bool, str]:
        """(is an operator, "uid N (name)"). ``gid`` is the peer process's own group
        where the kernel tells it (unix sockets); TCP gives only the uid."""
        now = self.clock()
        hit = self._cache.get(uid)
        if hit is None or now - hit[0] > CACHE_SECONDS:
            hit = (now, *self._lookup(uid))
            if len(self._cache) > 1024:
                self._cache.clear()
            self._cache[uid] = hit
        _, member, who = hit
        if not member and gid is not None:
            try:
                member = gid == grp.getgrnam(self.group).gr_gid
            except KeyError:
                pass
        return member, who

    def _lookup(self, uid: int) -> tuple[bool, str]:
        if uid == 0:
            return True, "uid 0 (root)"
        try:
            user = pwd.getpwuid(uid)
        except KeyError:
            return False, f"uid {uid} (no passwd entry)"
        who = f"uid {uid} ({user.pw_name})"
        try:
            group = grp.getgrnam(self.group)
        except KeyError:
            return False, who
        return user.pw_gid == group.gr_gid or user.pw_name in group.gr_mem, who

    def refusal(self, who: str, uid: int | None) -> FaasError:
        """The 403 for a local caller who is neither operator nor token holder."""
        user = self.name(uid) if uid is not None else "USER"
        add = (f"add the user with usermod -aG {self.group} {user}" if uid is not None and
               user != "no passwd entry" else "run it as a user with a passwd entry")
        return FaasError(Code.FORBIDDEN, f"{who} is not root or in group {self.group}: {add},"
                         " or send a token (Authorization: Bearer ...; faasctl token create)",
                         {"reason": "not_operator"})


# --- tokens ----------------------------------------------------------------------------


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header, None without one."""
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise FaasError(Code.UNAUTHORIZED, "Authorization must be 'Bearer TOKEN' with a "
                        "token from faasctl token create", {"reason": "bad_authorization"})
    return value.strip()


def check_token(token: str, lookup: Callable[[str], dict[str, Any] | None],
                now: float) -> dict[str, Any]:
    """The stored row of a valid, unexpired token, else 401. Never echoes the token."""
    row = lookup(token_digest(token)) if token.startswith(TOKEN_PREFIX) else None
    if row is None:
        raise FaasError(Code.UNAUTHORIZED, "unknown token: it was removed or mistyped; an "
                        "operator can list tokens with faasctl token list",
                        {"reason": "unknown_token"})
    if row["expires"] is not None and row["expires"] <= now:
        raise FaasError(Code.UNAUTHORIZED, f"token {row['name']!r} has expired; an operator "
                        "can make a new one with faasctl token create",
                        {"reason": "expired_token", "name": row["name"]})
    return row
