"""The keeper's wire format: file descriptors held under keys, over a unix socket.

The keeper (``keeper/main.py``) is an fd store, as systemd's ``FDSTORE=1`` is for a
service: the runner gives it a copy of every listening socket and of every connection
it has accepted but not yet handed to a container, and takes them back when it starts
again. Connections that arrive while the runner is away wait in the kernel's backlog of
a listener the keeper still holds; those the runner had accepted are given to the next
runner instead of being reset.

One SOCK_SEQPACKET message is one msgpack map, with its descriptors (SCM_RIGHTS) in the
order of its items:

- ``{"op": "hold", "items": [{"key", "meta"}...], "reset": bool}``: keep these (a key
  held already is replaced); ``reset`` first closes everything held, so a runner that
  lost its keeper re-holds its whole set in one step.
- ``{"op": "drop", "keys": [...]}``: close these.
- ``{"op": "take"}``: send back everything, as ``{"op": "held", "items": [...],
  "last": bool}`` messages, descriptors attached; what is taken stays held.

Only the peer with uid 0 may talk to the keeper (SO_PEERCRED); nothing in a message is
executed or used as a path. Keys are short strings the runner chooses
(``listen [addr]:port``, ``conn <boot id> <n>``); ``meta`` is a flat map the keeper
never reads.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

import msgpack

BATCH = 200  # descriptors per message: the kernel's SCM_MAX_FD is 253
MAX_MESSAGE = 256 << 10  # bytes of one message (BATCH items of short keys and meta)
MAX_KEY = 200
_FD_SPACE = socket.CMSG_SPACE(BATCH * array.array("i").itemsize)
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class WireError(Exception):
    """A message that is not one of ours: the connection is closed."""


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end (the kernel's word, not the peer's)."""
    return _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                        _CRED.size))[1]


def listen_key(address: str, port: int) -> str:
    return f"listen [{address}]:{port}"


def encode(message: dict[str, Any]) -> bytes:
    data = msgpack.packb(message, use_bin_type=True)
    if len(data) > MAX_MESSAGE:
        raise WireError(f"a message of {len(data)} bytes (at most {MAX_MESSAGE})")
    return data


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | tuple = ()) -> None:
    """One message with its descriptors (raises BlockingIOError on a full buffer)."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([encode(message)], ancillary)


def receive(sock: socket.socket, flags: int = 0
            ) -> tuple[dict[str, Any], list[int]] | None:
    """The next message and its descriptors (owned by the caller from here); None at
    the end of the stream. A malformed message has its descriptors closed, then raises."""
    data, ancillary, flags, _ = sock.recvmsg(MAX_MESSAGE, _FD_SPACE,
                                               socket.MSG_CMSG_CLOEXEC | flags)
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % array.array("i").itemsize
            fds.extend(array.array("i", payload[:usable]))
    if not data and not fds:
        return None
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise WireError("a truncated message")
        message = msgpack.unpackb(data, raw=False)
        check(message, len(fds))
    except (WireError, ValueError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as exc:
        close_all(fds)
        raise WireError(str(exc)) from None
    return message, fds


def check(message: Any, nfds: int) -> None:
    """The shape of a message, and one descriptor per held item."""
    if not isinstance(message, dict) or message.get("op") not in ("hold", "drop", "take",
                                                                    "held"):
        raise WireError("not a keeper message")
    op = message["op"]
    if op in ("hold", "held"):
        items = message.get("items")
        if not isinstance(items, list) or len(items) != nfds or nfds > BATCH:
            raise WireError(f"{op}: one descriptor per item, at most {BATCH}")
        for item in items:
            if not (isinstance(item, dict) and _key(item.get("key"))
                    and isinstance(item.get("meta", {}), dict)):
                raise WireError(f"{op}: an item without a usable key")
    elif nfds:
        raise WireError(f"{op} carries no descriptors")
    if op == "drop" and not (isinstance(message.get("keys"), list)
                             and all(_key(k) for k in message["keys"])):
        raise WireError("drop: keys must be a list of keys")


def _key(key: Any) -> bool:
    return isinstance(key, str) and 0 < len(key) <= MAX_KEY


def batches(items: list[tuple[str, dict[str, Any], int]]
            ) -> Iterator[tuple[list[dict[str, Any]], list[int]]]:
    """(key, meta, fd) items as messages' item lists and descriptors, BATCH at a time."""
    for i in range(0, len(items), BATCH):
        chunk = items[i:i + BATCH]
        yield [{"key": k, "meta": m} for k, m, _ in chunk], [fd for _, _, fd in chunk]


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
