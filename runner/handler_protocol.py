"""The handler protocol's control packets, the runner's side (docs/handler-protocol.md):
the one place the runner writes ``conn`` and reads ``done``.

The handler's side is ``sdk/faas_handler.py`` (``parse_conn``, ``done_packet``), which
stays standard-library only and imports nothing of faasd; tests/fixtures/
handler_packets.json holds both sides to the same examples (tests/sdk/
test_handler_packets.py). Every reused container's request passes through here, so the
common case costs no ``json`` call: a request id from ``common.protocol.new_id`` is hex
and goes in as is, a client's address is quoted once (clients come back).
"""

from __future__ import annotations

import functools
import json

CONTROL_PACKET = 4096  # the most the runner reads of a handler's packet


def conn_packet(request_id: str, remote: str, deadline: float, port: int = 80,
                peer: str | None = None) -> bytes:
    """``{"type": "conn", "id": ..., "remote": ..., "deadline": ..., "port": ...,
    "peer": ...}``: what json.dumps writes, without its cost for the ids the runner
    makes. The members of version 1.0 come first, as they always have (1.1 added ``port``
    and ``peer`` after them: a handler that looks for ``"type": "conn"`` still finds it)."""
    rid = f'"{request_id}"' if request_id.isascii() and request_id.isalnum() \
        else json.dumps(request_id)
    return (f'{{"type": "conn", "id": {rid}, "remote": {_quoted(remote)}, '
            f'"deadline": {deadline!r}, "port": {int(port)}, '
            f'"peer": {"null" if peer is None else _quoted(peer)}}}').encode()


def done_packet(request_id: str) -> bytes:
    """The ``done`` for ``request_id`` in the bytes the SDK and most handlers write, so
    :func:`is_done` is mostly one comparison (give it this as ``expected``)."""
    if request_id.isascii() and request_id.isalnum():
        return f'{{"type": "done", "id": "{request_id}"}}'.encode()
    return json.dumps({"type": "done", "id": request_id}).encode()


def is_done(packet: bytes, request_id: str | None, expected: bytes = b"") -> bool:
    """Whether ``packet`` is the ``done`` of ``request_id``: ``expected`` (its
    :func:`done_packet`) byte for byte, or any JSON object of type ``done`` with that id
    (other members ignored). Anything else is a packet to ignore, as the protocol says."""
    if expected and packet == expected:
        return True
    try:
        msg = json.loads(packet)
    except ValueError:
        return False
    return isinstance(msg, dict) and msg.get("type") == "done" and msg.get("id") == request_id


@functools.lru_cache(maxsize=1024)
def _quoted(text: str) -> str:
    """A JSON string (clients come back: their addresses are quoted once)."""
    return json.dumps(text)
