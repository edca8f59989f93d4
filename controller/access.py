"""Who is calling the HTTP API: an operator by uid, or a token of some role.

faasctl's socket lets the faas group in by file mode; the HTTP API must decide the same
thing about a TCP or unix connection. On loopback the kernel knows which user owns the
client's socket (what identd reads from ``/proc/net/tcp``): we ask sock_diag (netlink)
for the socket of this network namespace whose source is our peer and whose destination
is our end of the connection, an exact lookup that costs tens of microseconds where
reading ``/proc/net/tcp*`` costs milliseconds on a busy host.
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


# linux/sock_diag.h, linux/inet_diag.h
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
NLM_F_REQUEST = 1
TCP_TIME_WAIT, TCP_LISTEN = 6, 10  # owned by no process (uid 0) / not a peer
NO_COOKIE = 0xFFFFFFFF
_REQUEST = struct.Struct("=IHHII BBBxI HH16s16sI II")  # nlmsghdr + inet_diag_req_v2
_ANSWER = struct.Struct("=IHHII BBBB HH16s16sI II IIIII")  # nlmsghdr + inet_diag_msg


def _diag(family: int, src: bytes, sport: int, dst: bytes, dport: int) -> int | None:
    """sock_diag's answer for the TCP socket with exactly this 4-tuple: its uid, or
    None when the kernel has no such socket (a hash lookup, not a walk of the table)."""
    req = _REQUEST.pack(_REQUEST.size, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0,
                        family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF,
                        socket.htons(sport), socket.htons(dport), src.ljust(16, b"\0"),
                        dst.ljust(16, b"\0"), 0, NO_COOKIE, NO_COOKIE)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.sendto(req, (0, 0))
        data = nl.recv(8192)
    if len(data) < _ANSWER.size or struct.unpack_from("=H", data, 4)[0] != SOCK_DIAG_BY_FAMILY:
        return None  # NLMSG_ERROR with ENOENT: no such socket here
    fields = _ANSWER.unpack_from(data)
    state, uid = fields[6], fields[-2]
    return None if state in (TCP_TIME_WAIT, TCP_LISTEN) else uid


def _forms(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[tuple[int, bytes]]:
    """(family, address) under which a socket of this address may be known: an IPv4
    client may have used an AF_INET socket or an AF_INET6 one with a v4-mapped address."""
    if isinstance(addr, ipaddress.IPv4Address):
        return [(socket.AF_INET, addr.packed),
                (socket.AF_INET6, b"\0" * 10 + b"\xff\xff" + addr.packed)]
    return [(socket.AF_INET6, addr.packed)]


def peer_uid(local: tuple[Any, ...], remote: tuple[Any, ...]) -> int | None:
    """The uid owning the client socket of a TCP connection (``local`` is our end,
    ``remote`` the client's, as getsockname/getpeername give them), or None when no
    socket of this network namespace is the client's (it is on another host). The
    client's socket is the one whose source is our peer and whose destination is us."""
    mine, theirs = _unmapped(local[0]), _unmapped(remote[0])
    for (family, client), (_, server) in zip(_forms(theirs), _forms(mine)):
        uid = _diag(family, client, remote[1], server, local[1])
        if uid is not None:
            return uid
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
