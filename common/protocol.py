"""The wire protocol, whole: envelope, operations, codec and limits.

Every daemon and ``faasctl`` import this module and nothing else defines a message.

A request is ``{"v": 1, "id": ..., "op": ..., "args": {...}}``; a reply is
``{"v": 1, "id": ..., "ok": true, "result": ...}`` or
``{"v": 1, "id": ..., "ok": false, "error": {"code", "message", "details"}}``.
Bodies are msgpack, one ZeroMQ frame each. Operations are looked up in the static
table ``OPS`` by (service, name); a name off the wire is only ever a dictionary key.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import msgpack

from common.errors import Code, FaasError
from common.schema import Bool, Field, Float, Int, Record, Str

VERSION = 1

# Caps on what a peer may make us decode. A frame over MAX_FRAME is answered with
# too_large; ZeroMQ itself drops anything over twice that (socket option MAXMSGSIZE)
# so a hostile peer cannot make a daemon buffer without bound.
MAX_FRAME = 4 << 20
MAX_DEPTH = 16
MAX_ITEMS = 65536
ID_PATTERN = r"[A-Za-z0-9_-]{1,64}(\.[0-9]{1,9}){0,16}"

SERVICES = ("controller", "netagent", "dnsagent", "runner")
AGENTS = ("netagent", "dnsagent", "runner")


@dataclass(frozen=True)
class Op:
    """One operation: who serves it, its arguments, and how a client may call it."""

    name: str
    doc: str
    args: Record = field(default_factory=Record)
    idempotent: bool = True
    timeout: float = 5.0
    cli: bool = False  # exposed as a faasctl command (controller ops only)


# --- the operations ---------------------------------------------------------------

PING = Op(
    "ping",
    "Report liveness: boot id, version, pid, uptime, memory and whether a sync has "
    "been received since boot.",
    timeout=1.0,
)

STATUS = Op(
    "status",
    "Show every faasd process: state, pid, boot id, uptime, memory, last seen, sync.",
    timeout=3.0,
    cli=True,
)


def _sync(doc: str, state: dict[str, Field]) -> Op:
    return Op(
        "sync",
        doc,
        Record(
            fields={
                "generation": Int(help="increases with every change of desired state"),
                "state": Record(fields=state, help="the whole desired state for this agent"),
            }
        ),
        timeout=10.0,
    )


# The desired state each agent converges to. Empty records for now: later capabilities
# add fields here, and both sides see them at once.
NETAGENT_STATE: dict[str, Field] = {}
DNSAGENT_STATE: dict[str, Field] = {}
RUNNER_STATE: dict[str, Field] = {}

OPS: dict[str, dict[str, Op]] = {
    "controller": {op.name: op for op in (PING, STATUS)},
    "netagent": {op.name: op for op in (PING, _sync(
        "Converge the interface, addresses, peers and firewall to this state.",
        NETAGENT_STATE))},
    "dnsagent": {op.name: op for op in (PING, _sync(
        "Converge the faas. zone to this state.", DNSAGENT_STATE))},
    "runner": {op.name: op for op in (PING, _sync(
        "Converge listeners, pools and images to this state.", RUNNER_STATE))},
}

# What a ping reply carries; the controller checks it before trusting a peer.
PING_RESULT = Record(
    fields={
        "service": Str(choices=SERVICES),
        "version": Str(max_len=64),
        "protocol": Int(),
        "boot_id": Str(max_len=64, pattern=r"[0-9a-f]{8,64}"),
        "pid": Int(min=1),
        "uptime": Float(),
        "rss": Int(),
        "synced": Bool(),
        "generation": Int(),
    }
)


# --- codec ------------------------------------------------------------------------


def new_id() -> str:
    """A fresh request id: 12 hex digits, unique enough for logs and matching."""
    return secrets.token_hex(6)


def pack(obj: Any) -> bytes:
    """Encode one message body."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """Decode one message body within the caps, or raise bad_request / too_large."""
    if len(data) > MAX_FRAME:
        raise FaasError(Code.TOO_LARGE, f"frame of {len(data)} bytes exceeds {MAX_FRAME}",
                        {"max": MAX_FRAME})
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_array_len=MAX_ITEMS,
            max_map_len=MAX_ITEMS,
            max_ext_len=0,
            max_str_len=MAX_FRAME,
            max_bin_len=MAX_FRAME,
        )
    except Exception as exc:  # msgpack raises many types for bad input, all equal to us
        raise FaasError(Code.BAD_REQUEST, f"undecodable message: {type(exc).__name__}") from None
    _check_shape(obj)
    return obj


def _check_shape(obj: Any) -> None:
    """Refuse deep nesting and non-string map keys, without recursion."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (list, dict)) and depth > MAX_DEPTH:
            raise FaasError(Code.BAD_REQUEST, f"message nested deeper than {MAX_DEPTH}")
        if isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise FaasError(Code.BAD_REQUEST, "map keys must be strings")
                stack.append((v, depth + 1))


@dataclass
class Request:
    """A validated request: its op comes from the table, its args fit the schema."""

    id: str
    op: Op
    args: dict[str, Any]


def make_request(op: str, args: dict[str, Any], request_id: str) -> bytes:
    """Encode a request; the caller's op and args are checked on the far side."""
    return pack({"v": VERSION, "id": request_id, "op": op, "args": args})


def make_reply(request_id: str | None, result: Any) -> bytes:
    """Encode a success reply."""
    return pack({"v": VERSION, "id": request_id, "ok": True, "result": result})


def make_error(request_id: str | None, err: FaasError) -> bytes:
    """Encode an error reply."""
    return pack({"v": VERSION, "id": request_id, "ok": False, "error": err.to_wire()})


def peek_id(obj: Any) -> str | None:
    """The request id of a decoded message, if it has a well-formed one."""
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, str) and re.fullmatch(ID_PATTERN, rid):
            return rid
    return None


def parse_request(data: bytes, service: str) -> Request:
    """Decode and validate a request for ``service``; raise FaasError on any fault."""
    obj = unpack(data)
    try:
        return _check_request(obj, service)
    except FaasError as exc:
        exc.request_id = peek_id(obj)  # so the refusal still reaches the right caller
        raise


def _check_request(obj: Any, service: str) -> Request:
    if not isinstance(obj, dict):
        raise FaasError(Code.BAD_REQUEST, "request must be a map")
    extra = set(obj) - {"v", "id", "op", "args"}
    if extra:
        raise FaasError(Code.BAD_REQUEST, f"unknown envelope field(s): {', '.join(sorted(extra))}")
    if obj.get("v") != VERSION or isinstance(obj.get("v"), bool):
        raise FaasError(Code.VERSION_MISMATCH,
                        f"protocol version {obj.get('v')!r:.20} not supported; this side speaks "
                        f"{VERSION}: upgrade the older side", {"supported": [VERSION]})
    rid = peek_id(obj)
    if rid is None:
        raise FaasError(Code.BAD_REQUEST, "request id missing or malformed")
    name = obj.get("op")
    op = OPS[service].get(name) if isinstance(name, str) else None
    if op is None:
        raise FaasError(Code.BAD_REQUEST, f"unknown op {name!r:.64} for {service}",
                        {"ops": sorted(OPS[service])})
    if "args" not in obj:
        raise FaasError(Code.BAD_REQUEST, "args is required (send {} for none)")
    return Request(rid, op, op.args.check(obj["args"], "args"))


@dataclass
class Reply:
    """A decoded reply."""

    id: str | None
    ok: bool
    result: Any = None
    error: FaasError | None = None


def parse_reply(data: bytes) -> Reply:
    """Decode a reply; a malformed one becomes an internal error."""
    try:
        obj = unpack(data)
    except FaasError as exc:
        return Reply(None, False, error=FaasError(Code.INTERNAL, f"bad reply: {exc.message}"))
    if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
        return Reply(None, False, error=FaasError(Code.INTERNAL, "bad reply envelope"))
    rid = peek_id(obj)
    if obj.get("v") != VERSION:
        return Reply(rid, False, error=FaasError(
            Code.VERSION_MISMATCH, f"peer speaks protocol {obj.get('v')!r:.20}, not {VERSION}"))
    if obj["ok"]:
        return Reply(rid, True, result=obj.get("result"))
    return Reply(rid, False, error=FaasError.from_wire(obj.get("error")))
