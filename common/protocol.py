"""The wire protocol, whole: envelope, operations, codec and limits.

Every daemon and ``faasctl`` import this module and nothing else defines a message.

A request is ``{"v": 1, "id": ..., "op": ..., "args": {...}}``; a reply is
``{"v": 1, "id": ..., "ok": true, "result": ...}`` or
``{"v": 1, "id": ..., "ok": false, "error": {"code", "message", "details"}}``.
Bodies are msgpack, one ZeroMQ frame each. Operations are looked up in the static
table ``OPS`` by (service, name); a name off the wire is only ever a dictionary key.

Why one module of this length: the whole wire protocol in one place is the point (every
message any daemon sends is here, and nowhere else); field types are
``common/schema.py``'s, per-function settings ``common/fnsettings.py``'s.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any

import msgpack

from common import fnsettings
from common.errors import Code, FaasError
from common.schema import Bool, Bytes, Field, Float, Int, IPv6, List, MapOf, Record, Str, WgKey

VERSION = 1

# Caps on what a peer may make us decode. A frame over MAX_FRAME is answered with
# too_large; ZeroMQ itself drops anything over twice that (socket option MAXMSGSIZE)
# so a hostile peer cannot make a daemon buffer without bound.
MAX_FRAME = 4 << 20
MAX_DEPTH = 16
MAX_ITEMS = 65536
ID_PATTERN = r"[A-Za-z0-9_-]{1,64}(\.[0-9]{1,9}){0,16}"

SERVICES = ("controller", "netagent", "dnsagent", "runner")

# HTTP API token roles, each allowed what the ones before it are. Every controller op
# names the least role that may call it (Op.role), declared once in the table below;
# faasctl over the controller socket and operators on HTTP are not limited by roles.
ROLES = ("read", "deploy", "admin")


def role_allows(have: str, need: str) -> bool:
    """Whether a token of role ``have`` may call an op that needs ``need``."""
    return ROLES.index(have) >= ROLES.index(need)
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
    positional: tuple[str, ...] = ()  # args faasctl takes as positional arguments
    group: str = ""  # faasctl GROUP COMMAND: op "vpn_add" is `faasctl vpn add`
    # The least HTTP API token role that may call it (see ROLES); operators may call all.
    role: str = "admin"
    epilog: str = ""  # shown as written after the arguments in `faasctl CMD --help`

    @property
    def command(self) -> str:
        """The faasctl (sub)command name."""
        return self.name.removeprefix(f"{self.group}_") if self.group else self.name


# Function names are DNS labels under faas.; a few are kept for the zone itself.
NAME_PATTERN = fnsettings.NAME_PATTERN
RESERVED_NAMES = frozenset({"ns"})


@dataclass(frozen=True)
class FunctionName(Str):
    """A function name: a DNS label, not reserved."""

    max_len: int = 63
    pattern: str | None = NAME_PATTERN
    help: str = "function name: a DNS label (a-z, 0-9, inner '-'), at most 63 characters"

    def check(self, value: Any, path: str) -> str:
        if isinstance(value, str) and not re.fullmatch(NAME_PATTERN, value):
            raise FaasError(Code.BAD_REQUEST, f"{path}: {value[:80]!r} is not a function name: "
                            "use 1-63 of a-z, 0-9 and '-', starting and ending with a letter "
                            "or digit (it becomes NAME.faas)", {"field": path})
        value = super().check(value, path)
        if value in RESERVED_NAMES:
            raise FaasError(Code.BAD_REQUEST, f"{path}: {value!r} is reserved; pick another "
                            "name", {"field": path})
        return value


UPLOAD_ID = Str(max_len=32, pattern=r"[0-9a-f]{32}", help="upload id from upload_begin")
DIGEST = Str(max_len=71, pattern=r"sha256:[0-9a-f]{64}", help="image digest")
CHUNK_SIZE = 1 << 20  # bytes per upload_chunk; MAX_FRAME leaves room for the envelope
UPLOAD_WINDOW = 4  # chunks a client may have in flight: the controller's flow control


# --- the operations ---------------------------------------------------------------

PING = Op(
    "ping",
    "Report liveness: boot id, version, pid, uptime, memory and whether a sync has "
    "been received since boot.",
    timeout=1.0, role="read")

STATUS = Op(
    "status",
    "Show every faasd process: state, pid, boot id, uptime, memory, last seen, sync.",
    timeout=3.0,
    cli=True, role="read")


NAME_ARGS = Record(fields={"name": FunctionName()})

UPLOAD_BEGIN = Op(
    "upload_begin",
    "Start uploading an image for function NAME; the name is checked before any byte is "
    "stored.",
    Record(fields={
        "name": FunctionName(),
        "tag": Str(required=False, max_len=256, help="image to pick from a multi-image archive"),
    }),
    idempotent=False, role="deploy")
UPLOAD_CHUNK = Op(
    "upload_chunk",
    "Append bytes to an upload at OFFSET (in order; a repeated chunk is acknowledged again).",
    Record(fields={"upload": UPLOAD_ID, "offset": Int(), "data": Bytes(max_len=CHUNK_SIZE)}),
    timeout=30.0, role="deploy")
UPLOAD_ABORT = Op("upload_abort", "Drop an upload and its spooled bytes.",
                  Record(fields={"upload": UPLOAD_ID}), role="deploy")
DEPLOY = Op(
    "deploy",
    "Verify and extract an uploaded image and make it the function's new version.",
    Record(fields={"upload": UPLOAD_ID}),
    idempotent=False,
    timeout=3600.0, role="deploy")
DEPLOY_PROGRESS = Op("deploy_progress", "Phase and byte counts of an upload or deploy.",
                     Record(fields={"upload": UPLOAD_ID}), timeout=3.0, role="deploy")
LIST = Op("list", "List deployed functions: name, address, version, command.", cli=True,
          role="read")
INFO = Op("info", "Show one function: address, current version, image, every version.",
          NAME_ARGS, cli=True, positional=("name",), role="read")
IP = Op("ip", "Print the IPv6 address of function NAME.", NAME_ARGS, cli=True,
        positional=("name",), role="read")
VERSIONS = Op("versions", "List the versions of function NAME, oldest first.", NAME_ARGS,
              cli=True, positional=("name",), role="read")
ROLLBACK = Op(
    "rollback",
    "Serve an earlier version of NAME: VERSION, else the one before the current.",
    Record(fields={"name": FunctionName(),
                   "version": Int(min=1, required=False, help="version to serve")}),
    idempotent=False,
    cli=True,
    positional=("name", "version"), role="deploy")
REMOVE = Op("rm", "Remove function NAME and every version; frees images no version uses.",
            NAME_ARGS, idempotent=False, cli=True, positional=("name",), role="deploy")

SET = Op(
    "set",
    f"Change settings of function NAME: KEY=VALUE ... ({fnsettings.keys_text()}; env.NAME= "
    "removes). Connections in flight are not dropped.",
    Record(fields={
        "name": FunctionName(),
        "settings": MapOf(key=Str(max_len=140, pattern=r"(env\.)?[A-Za-z_][A-Za-z0-9_]*"),
                          value=Str(max_len=fnsettings.VALUE_MAX), max_items=64,
                          help="KEY=VALUE pairs"),
    }),
    cli=True,
    positional=("name", "settings"), role="deploy", epilog=fnsettings.cli_help())

LOGS = Op(
    "logs",
    "Show the output of function NAME's containers, each line with its request id.",
    Record(fields={
        "name": FunctionName(),
        "since": Float(required=False, help="only lines newer than this unix time"),
        "offset": Int(required=False, help="continue from this byte offset (follow)"),
    }),
    timeout=5.0, role="read")

# --- the VPN -------------------------------------------------------------------------

PEER_NAME = Str(max_len=63, pattern=NAME_PATTERN,
                help="peer name: a DNS label (a-z, 0-9, inner '-'), at most 63 characters")
PEER_ARGS = Record(fields={"name": PEER_NAME})
VPN_ADD = Op(
    "vpn_add",
    "Add a VPN peer NAME: allocate its address and print a complete wg-quick client "
    "config. With --public-key the server never sees a private key; without, one is "
    "made, printed once and not kept.",
    Record(fields={
        "name": PEER_NAME,
        "public_key": WgKey(required=False),
        "expires": Str(required=False, max_len=16, pattern=r"[1-9][0-9]{0,6}[smhdw]",
                       help="disable the peer after this long: 30m, 12h, 7d, 4w"),
    }),
    idempotent=False, cli=True, positional=("name",), group="vpn", timeout=10.0,
)
VPN_LIST = Op("vpn_list", "List VPN peers: name, address, state, last handshake, bytes "
              "in and out.", cli=True, group="vpn", role="read")
VPN_REMOVE = Op("vpn_rm", "Remove VPN peer NAME; its tunnel stops at once.", PEER_ARGS,
                idempotent=False, cli=True, positional=("name",), group="vpn")
VPN_DISABLE = Op("vpn_disable", "Disable VPN peer NAME (kept, but its tunnel stops).",
                 PEER_ARGS, cli=True, positional=("name",), group="vpn")
VPN_ENABLE = Op("vpn_enable", "Enable VPN peer NAME again (an expiry is cleared).",
                PEER_ARGS, cli=True, positional=("name",), group="vpn")

# --- HTTP API tokens --------------------------------------------------------------------

TOKEN_NAME = Str(max_len=63, pattern=NAME_PATTERN,
                 help="token name: a DNS label (a-z, 0-9, inner '-'), at most 63 characters")
TOKEN_CREATE = Op(
    "token_create",
    "Create an HTTP API token NAME for automation (CI, a deploy over the VPN) and print "
    "it once; only its SHA-256 is kept. Roles: read, deploy (read + new, set, rollback, "
    "rm), admin (everything, VPN peers and tokens too).",
    Record(fields={
        "name": TOKEN_NAME,
        "role": Str(required=False, default="read", choices=ROLES,
                    help="what the token may do: read, deploy or admin (default read)"),
        "expires": Str(required=False, max_len=16, pattern=r"[1-9][0-9]{0,6}[smhdw]",
                       help="the token stops working after this long: 12h, 30d, 4w"),
    }),
    idempotent=False, cli=True, positional=("name",), group="token",
)
TOKEN_LIST = Op("token_list", "List HTTP API tokens: name, role, created, expires, last "
                "used (never the token).", cli=True, group="token")
TOKEN_REMOVE = Op("token_rm", "Remove HTTP API token NAME; it stops working at once.",
                  Record(fields={"name": TOKEN_NAME}), idempotent=False, cli=True,
                  positional=("name",), group="token")

# --- volumes (docs/volumes.md) ------------------------------------------------------------

VOLUME_NAME = Str(max_len=63, pattern=NAME_PATTERN,
                  help="volume name: a DNS label (a-z, 0-9, inner '-'), at most 63 characters")
VOLUME_ARGS = Record(fields={"name": VOLUME_NAME})
# Creating and removing a volume take the host's disk and destroy data: admin. Mounting
# one is `set mounts=`, a deploy.
VOLUME_CREATE = Op(
    "volume_create",
    "Create volume NAME of --size bytes (512M, 1G): an ext4 filesystem of that size, "
    "mounted into functions with `faasctl set FN mounts=NAME:/path[:ro]`.",
    Record(fields={"name": VOLUME_NAME,
                   "size": Str(max_len=24, pattern=r"[0-9]{1,16}([KMGkmg]i?[Bb]?|[Bb])?",
                               help="its size: bytes, or with K, M or G")}),
    idempotent=False, cli=True, positional=("name",), group="volume", timeout=330.0)
VOLUME_LIST = Op("volume_list", "List volumes: size, used, and the functions that mount "
                 "each.", cli=True, group="volume", role="read")
VOLUME_REMOVE = Op("volume_rm", "Remove volume NAME and every file in it; refused while a "
                   "function mounts it.", VOLUME_ARGS, idempotent=False, cli=True,
                   positional=("name",), group="volume", timeout=60.0)
RUNNER_VOLUME_CREATE = Op(
    "volume_create", "Make and mount a volume of SIZE bytes, within this host's bounds.",
    Record(fields={"name": VOLUME_NAME, "size": Int(min=1)}), idempotent=False,
    timeout=320.0)
RUNNER_VOLUME_LIST = Op("volume_list", "Every volume: size, used, free, mounted.",
                        timeout=10.0)
RUNNER_VOLUME_REMOVE = Op("volume_rm", "Unmount and delete a volume no function of the "
                          "desired state mounts.", VOLUME_ARGS, idempotent=False,
                          timeout=50.0)
# --- secrets (docs/security.md "Secrets") ------------------------------------------------

SECRET_MAX = 64 << 10  # bytes of one secret's value: keys, passwords, certificates
SECRET_NAME = Str(max_len=63, pattern=NAME_PATTERN,
                  help="secret name: a DNS label (a-z, 0-9, inner '-'), at most 63 characters")
SECRET_VALUE = Bytes(max_len=SECRET_MAX, help="the secret's value (never printed)")
SECRET_ARGS = Record(fields={"name": SECRET_NAME})
SECRET_CREATE = Op(
    "secret_create",
    "Create or replace secret NAME from stdin or -f FILE. Functions with secrets=NAME "
    "read it at /run/secrets/NAME; a replaced value reaches the next container started. "
    "The value is kept by root and never printed.",
    Record(fields={"name": SECRET_NAME, "value": SECRET_VALUE}),
    cli=True, positional=("name",), group="secret", timeout=10.0)
SECRET_LIST = Op("secret_list", "List secrets: name, size and when last set (never a value).",
                 cli=True, group="secret", role="read")
SECRET_REMOVE = Op("secret_rm", "Remove secret NAME; refused while a function uses it.",
                   SECRET_ARGS, idempotent=False, cli=True, positional=("name",),
                   group="secret", timeout=10.0)
# The runner's: it holds the values (root only), and refuses to remove one its desired
# state uses, whatever the controller says.
SECRET_PUT = Op("secret_put", "Store a secret's value (root 0600, atomic).",
                Record(fields={"name": SECRET_NAME, "value": SECRET_VALUE}), timeout=10.0)
SECRET_NAMES = Op("secret_list", "Every stored secret: name, size, mtime.", timeout=5.0)
SECRET_DELETE = Op("secret_rm", "Delete a secret no function of the desired state uses.",
                   SECRET_ARGS, idempotent=False, timeout=10.0)

RUNNER_STATS = Op("stats", "Every served function's pool (idle, busy, starting, waiting) "
                   "and counters (hand-overs, outcomes, latency histogram).", timeout=3.0)
STATS = Op("stats", "Live figures: every function's pool and counters from the runner, "
           "every agent's health.", timeout=5.0, role="read")

WG_INFO = Op("wg_info", "The WireGuard interface's name, public key, listen port and "
             "server address.", timeout=5.0)
PEERS = Op("peers", "Every peer on the interface: key, allowed ips, endpoint, last "
           "handshake, bytes in and out.", timeout=5.0)


def _setting_field(s: fnsettings.FnSetting) -> Field:
    """The wire type of one per-function setting, with the table's range. The top of a
    setting a host maximum caps is left to the runner's check (runner/bounds.py), so a
    value above root's maximum is refused as forbidden, not as a malformed request."""
    if s.type is bool:
        return Bool(help=s.help)
    if s.type is str:
        return Str(max_len=64, help=s.help)
    if s.type is list:
        item = Int(min=1, max=65535) if isinstance(s.default and s.default[0], int) \
            else Str(max_len=128)
        return List(item=item, max_items=int(s.hi), help=s.help)
    capped = s.key in fnsettings.HOST_MAXIMA
    if s.type is int:
        return Int(min=int(s.lo), **({} if capped else {"max": int(s.hi)}), help=s.help)
    return Float(min=s.lo, **({} if capped else {"max": s.hi}), help=s.help)


FUNCTION_SETTINGS = Record(fields={
    **{s.key: _setting_field(s) for s in fnsettings.FN_SETTINGS},
    "env": MapOf(key=Str(max_len=fnsettings.ENV_NAME_MAX),
                 value=Str(max_len=fnsettings.VALUE_MAX), max_items=fnsettings.MAX_ENV),
})
# No image config (command, user, env, workdir): the runner takes those from its own
# record of the image it extracted, so a sync cannot choose what a container runs or as
# whom. A spec that still carries "config" is refused as an unknown field.
FUNCTION_SPEC = Record(fields={
    "name": FunctionName(), "address": IPv6(), "digest": DIGEST,
    "settings": FUNCTION_SETTINGS,
})

IMAGE_ADD = Op(
    "image_add",
    "Extract the spooled upload into a rootfs keyed by its digest (nothing if already "
    "there) and return the image's digest and config.",
    Record(fields={"upload": UPLOAD_ID, "tag": Str(required=False, max_len=256)}),
    idempotent=False,
    timeout=3600.0,
)
IMAGE_PROGRESS = Op("image_progress", "Phase and byte counts of an extraction.",
                    Record(fields={"upload": UPLOAD_ID}), timeout=2.0)


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
PEER = Record(fields={"public_key": WgKey(), "address": IPv6()})
# A function that may reach another's address on these TCP ports (its `ports` setting).
EGRESS_TARGET = Record(fields={"address": IPv6(), "ports": List(item=Int(min=1, max=65535),
                                                                 max_items=16)})
EGRESS = Record(fields={
    "name": FunctionName(),
    "address": IPv6(help="the function's own address: netagent derives the namespace's "
                    "addresses from its place in function_prefix"),
    "egress_allow": List(item=Str(max_len=64), max_items=64,
                         help="private CIDR or CIDR:PORT it may reach (fnsettings syntax)"),
    "may_call": List(item=EGRESS_TARGET, max_items=64,
                     help="functions it may reach: address and ports"),
})
NETAGENT_STATE: dict[str, Field] = {
    "addresses": List(item=IPv6(), max_items=65536, required=False, default=[], memo=True,
                      help="function addresses (/128) to hold on the WireGuard interface"),
    "peers": List(item=PEER, max_items=65536, required=False, default=[], memo=True,
                  help="VPN peers: each key may send from exactly its own /128"),
    "egress": List(item=EGRESS, max_items=16384, required=False, default=[],
                   help="network=egress functions: a namespace, veth, NAT and firewall each"),
    "ports": List(item=Record(fields={
        "address": IPv6(), "ports": List(item=Int(min=1, max=65535), max_items=16)}),
        max_items=65536, required=False, default=[], memo=True,
        help="the TCP ports peers may reach on each function address (those of its "
             "ports setting the runner holds; none: an empty list); an address of "
             "addresses without an entry: 80"),
}
DNS_RECORD = Record(fields={"name": FunctionName(), "address": IPv6()})
DNSAGENT_STATE: dict[str, Field] = {
    "records": List(item=DNS_RECORD, max_items=65536, required=False, default=[], memo=True,
                    help="one AAAA record <name>.faas per function"),
}
RUNNER_STATE: dict[str, Field] = {
    "images": List(item=DIGEST, max_items=65536, required=False, default=[],
                   help="image digests whose rootfs must be kept; others are removed"),
    "functions": List(item=FUNCTION_SPEC, max_items=65536, required=False, default=[],
                      memo=True,
                      help="functions to serve: listener, version, settings"),
    "peers": List(item=Record(fields={"name": PEER_NAME, "address": IPv6()}),
                  max_items=65536, required=False, default=[],
                  help="VPN peers by address, so a function knows (and allows) its caller"),
}

OPS: dict[str, dict[str, Op]] = {
    "controller": {op.name: op for op in (
        PING, STATUS, UPLOAD_BEGIN, UPLOAD_CHUNK, UPLOAD_ABORT, DEPLOY, DEPLOY_PROGRESS,
        LIST, INFO, IP, VERSIONS, ROLLBACK, REMOVE, SET, LOGS,
        VPN_ADD, VPN_LIST, VPN_REMOVE, VPN_DISABLE, VPN_ENABLE, STATS,
        TOKEN_CREATE, TOKEN_LIST, TOKEN_REMOVE, SECRET_CREATE, SECRET_LIST, SECRET_REMOVE,
        VOLUME_CREATE, VOLUME_LIST, VOLUME_REMOVE)},
    "netagent": {op.name: op for op in (PING, WG_INFO, PEERS, _sync(
        "Converge the interface, addresses, peers and firewall to this state.",
        NETAGENT_STATE))},
    "dnsagent": {op.name: op for op in (PING, _sync(
        "Converge the faas. zone to this state.", DNSAGENT_STATE))},
    "runner": {op.name: op for op in (PING, IMAGE_ADD, IMAGE_PROGRESS, RUNNER_STATS, _sync(
        "Converge listeners, pools and images to this state.", RUNNER_STATE),
        SECRET_PUT, SECRET_NAMES, SECRET_DELETE,
        RUNNER_VOLUME_CREATE, RUNNER_VOLUME_LIST, RUNNER_VOLUME_REMOVE)},
}

# A function address and the ports of its `ports` setting the runner holds a listener on.
HELD = Record(fields={"address": IPv6(), "ports": List(item=Int(min=1, max=65535),
                                                       max_items=16)})
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
        "digest": Str(max_len=64, pattern=r"([0-9a-f]{64})?", required=False, default="",
                      help="state_digest of the desired state the agent last converged to"),
        "held": List(item=HELD, max_items=65536, required=False,
                     help="the runner's: the ports it holds a listener on, by function "
                          "address (netagent opens no other port >= 1024 to peers)"),
    }
)


def state_schema(service: str) -> Field:
    """The schema of an agent's desired state: the ``state`` argument of its sync."""
    return OPS[service]["sync"].args.fields["state"]


def state_digest(service: str, state: Any, checked: bool = False) -> str:
    """sha256 of an agent's desired state as its sync schema reads it (so both sides
    compute it from the same normalized values), over its msgpack encoding. An agent
    reports the digest of what it last converged to; the controller resyncs when it is
    not the digest of what it wants, whatever the generation numbers say. ``checked``:
    ``state`` already came out of :func:`state_schema`'s check (a sync's arguments, the
    controller's cache): checking it again would cost as much as the sync's own check,
    once per function (docs/operations.md, "Scale").

    msgpack, not JSON with sorted keys (five times slower at 1,000 functions): the check
    writes every record's keys in its schema's order and keeps lists and maps in the
    order sent, so the controller and the agent it synced encode the same bytes."""
    if not checked:
        state = state_schema(service).check(state, "state")
    return hashlib.sha256(pack(state)).hexdigest()


# --- codec ------------------------------------------------------------------------


def new_id() -> str:
    """A fresh request id: 12 hex digits, unique enough for logs and matching. Not a
    secret (the runner makes one per connection: no system call for it)."""
    return f"{random.getrandbits(48):012x}"


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
