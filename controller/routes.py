"""The HTTP API's routes and request bodies: what each endpoint calls and how its
arguments are read, independent of who may call it (controller/http.py decides that).

``ROUTES`` is a static table; each row names the controller op whose protocol schema
checks its arguments. ``docs/openapi.json`` describes the same table.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import http_exceptions, web

from common.errors import Code, FaasError
from common.protocol import CHUNK_SIZE, OPS, SECRET_MAX, Op
from common.schema import Float, Int

HTTP_STATUS = {
    Code.BAD_REQUEST: 400, Code.VERSION_MISMATCH: 400, Code.UNAUTHORIZED: 401,
    Code.FORBIDDEN: 403, Code.NOT_FOUND: 404, Code.CONFLICT: 409, Code.TOO_LARGE: 413,
    Code.BAD_IMAGE: 422, Code.INTERNAL: 500, Code.UNAVAILABLE: 503, Code.TIMEOUT: 504,
}
JSON_TYPE = "application/json"
JSON_TYPE = "application/json"
MAX_JSON = 1 << 20  # a JSON request body; SET's largest legal argument fits easily
IDLE_SECONDS = 60.0  # a client that sends nothing for this long is dropped without answer
CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
BODY_TYPES = frozenset({"application/json", "application/octet-stream"})
IMAGE_TYPES = BODY_TYPES | {"application/x-tar"}

# What a route does with the request body.
NO_BODY, JSON_BODY, OPTIONAL_JSON, IMAGE = "none", "json", "optional json", "image"
BYTES = "bytes"  # the whole body is the argument body_field (a secret's value)

def _same(result: Any) -> Any:
    return result


@dataclass(frozen=True)
class Route:
    """One endpoint: a method, an OpenAPI path template and the controller op behind it.

    ``{name}`` in ``path`` matches one path segment and becomes the argument ``name``.
    A JSON body is merged into the arguments, or is the argument ``body_field`` whole;
    ``query`` routes take their arguments from the query string too. ``answer`` shapes
    the op's result for HTTP (most answer it as faasctl --json prints it).
    """

    method: str
    path: str
    op: str | None = None
    body: str = NO_BODY
    body_field: str | None = None
    query: bool = False
    answer: Callable[[Any], Any] = _same

    @property
    def schema(self) -> Op:
        """The protocol op whose argument schema checks this route's input."""
        assert self.op is not None
        return OPS["controller"][self.op]

    @property
    def role(self) -> str:
        """The least token role that may call it: its op's, declared in protocol.OPS;
        /healthz and /metrics only read."""
        return self.schema.role if self.op is not None else "read"

    def match(self, segments: list[str]) -> dict[str, str] | None:
        """The path parameters if ``segments`` fit this route's template, else None."""
        template = self.path.split("/")
        if len(template) != len(segments):
            return None
        params = {}
        for want, got in zip(template, segments):
            if want.startswith("{"):
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params


ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz"),
    Route("GET", "/metrics"),
    Route("GET", "/api/status", "status"),
    Route("POST", "/api/new", "upload_begin", body=IMAGE),
    Route("GET", "/api/list", "list", answer=lambda r: r["functions"]),
    Route("GET", "/api/functions/{name}", "info"),
    Route("DELETE", "/api/functions/{name}", "rm"),
    Route("GET", "/api/functions/{name}/versions", "versions"),
    Route("POST", "/api/functions/{name}/rollback", "rollback", body=OPTIONAL_JSON),
    Route("GET", "/api/functions/{name}/settings", "info",
          answer=lambda r: {"name": r["name"], "settings": r["settings"]}),
    Route("PATCH", "/api/functions/{name}/settings", "set", body=JSON_BODY,
          body_field="settings"),
    Route("POST", "/api/functions/{name}/settings", "set", body=JSON_BODY,
          body_field="settings"),
    Route("GET", "/api/functions/{name}/logs", "logs", query=True),
    Route("GET", "/api/peers", "vpn_list"),
    Route("POST", "/api/peers", "vpn_add", body=JSON_BODY),
    Route("DELETE", "/api/peers/{name}", "vpn_rm"),
    Route("POST", "/api/peers/{name}/disable", "vpn_disable"),
    Route("POST", "/api/peers/{name}/enable", "vpn_enable"),
    Route("GET", "/api/tokens", "token_list", answer=lambda r: r["tokens"]),
    Route("POST", "/api/tokens", "token_create", body=JSON_BODY),
    Route("DELETE", "/api/tokens/{name}", "token_rm"),
    Route("GET", "/api/volumes", "volume_list", answer=lambda r: r["volumes"]),
    Route("POST", "/api/volumes", "volume_create", body=JSON_BODY),
    Route("DELETE", "/api/volumes/{name}", "volume_rm"),
    Route("GET", "/api/secrets", "secret_list", answer=lambda r: r["secrets"]),
    Route("PUT", "/api/secrets/{name}", "secret_create", body=BYTES, body_field="value"),
    Route("DELETE", "/api/secrets/{name}", "secret_rm"),
)


@dataclass
class Answer:
    """What goes back: a status, the body's bytes and their type, extra headers."""

    status: int
    data: bytes
    ctype: str = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = ()


def json_answer(status: int, body: Any, headers: tuple[tuple[str, str], ...] = ()) -> Answer:
    return Answer(status, json.dumps(body, indent=1).encode() + b"\n", JSON_TYPE, headers)


def error_answer(exc: FaasError) -> Answer:
    return json_answer(HTTP_STATUS[exc.code], {"error": exc.to_wire()})


class MethodNotAllowed(Exception):
    def __init__(self, allowed: list[str]):
        super().__init__(", ".join(allowed))
        self.allowed = allowed


def check_type(req: web.BaseRequest, route: Route) -> None:
    """A state-changing request must say its body is JSON or bytes: an HTML form can
    only send the three "simple" types cross-site, so a form can never get here. POST
    /api/new may carry any type when X-Image-Name is given (the guide's plain curl
    --data-binary sends a form type): no browser sends a custom header cross-site
    without a preflight, and the API grants no preflight."""
    if req.method not in CHANGING:
        return
    ctype = req.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if route.body == IMAGE and ("X-Image-Name" in req.headers or ctype in IMAGE_TYPES):
        return
    if ctype not in BODY_TYPES:
        raise FaasError(Code.FORBIDDEN, f"{req.method} needs Content-Type: application/json "
                        f"(or application/octet-stream), not {ctype[:60] or 'none'}: a "
                        "browser form must not be able to send this request",
                        {"reason": "content_type"})


def query_args(query: str, op: Op) -> dict[str, Any]:
    """Query parameters as op arguments: numbers for the schema's Int and Float fields.
    Unknown names are left for the schema to refuse."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query),
                          max_num_fields=32)
    except ValueError:
        raise FaasError(Code.BAD_REQUEST, "malformed query string") from None
    args: dict[str, Any] = {}
    for key, text in pairs:
        if key in args:
            raise FaasError(Code.BAD_REQUEST, f"{key}: given twice", {"field": key})
        kind = op.args.fields.get(key)
        try:
            args[key] = (int(text) if isinstance(kind, Int) else
                         float(text) if isinstance(kind, Float) else text)
        except ValueError:
            raise FaasError(Code.BAD_REQUEST, f"{key}: {text[:40]!r} is not a number",
                            {"field": key}) from None
    return args


def has_body(req: web.BaseRequest) -> bool:
    return ("Transfer-Encoding" in req.headers
            or req.headers.get("Content-Length", "0").strip() not in ("", "0"))


async def json_body(req: web.BaseRequest, required: bool) -> Any:
    """The request body as a JSON object, at most MAX_JSON bytes of it."""
    if not has_body(req):
        if required:
            raise FaasError(Code.BAD_REQUEST, "send a JSON object as the body")
        return {}
    length = req.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > MAX_JSON:
        raise FaasError(Code.TOO_LARGE, f"JSON body over {MAX_JSON} bytes", {"max": MAX_JSON})
    data = bytearray()
    async for chunk in read_body(req):
        data += chunk
        if len(data) > MAX_JSON:
            raise FaasError(Code.TOO_LARGE, f"JSON body over {MAX_JSON} bytes",
                            {"max": MAX_JSON})
    try:
        body = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise FaasError(Code.BAD_REQUEST, f"body is not JSON: {str(exc)[:100]}") from None
    if not isinstance(body, dict):
        raise FaasError(Code.BAD_REQUEST, f"body must be a JSON object, not "
                        f"{type(body).__name__}")
    return body


async def bytes_body(req: web.BaseRequest, cap: int = SECRET_MAX) -> bytes:
    """The whole request body as bytes, at most ``cap`` of them (a secret's value: no
    error or log line ever quotes it)."""
    if not has_body(req):
        return b""
    data = bytearray()
    async for chunk in read_body(req):
        data += chunk
        if len(data) > cap:
            raise FaasError(Code.TOO_LARGE, f"body over {cap} bytes", {"max": cap})
    return bytes(data)


async def read_body(req: web.BaseRequest) -> AsyncIterator[bytes]:
    """The request body in pieces of CHUNK_SIZE (the last may be shorter); never all of
    it at once. Each read must make progress within IDLE_SECONDS."""
    chunked = req.headers.get("Transfer-Encoding", "").lower() == "chunked"
    if not chunked and not req.headers.get("Content-Length", "").isdigit():
        raise FaasError(Code.BAD_REQUEST, "send the body with Content-Length (curl "
                        "--data-binary @image.tar) or chunked")
    if req.headers.get("Expect", "").lower() == "100-continue":
        # curl asks before sending a large body; answering at once spares it a 1 s wait
        await req.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    piece = bytearray()
    try:
        while True:
            async with asyncio.timeout(IDLE_SECONDS):
                data = await req.content.read(CHUNK_SIZE - len(piece))
            if not data:
                break
            piece += data
            if len(piece) == CHUNK_SIZE:
                yield bytes(piece)
                piece.clear()
    except http_exceptions.HttpProcessingError as exc:
        raise FaasError(Code.BAD_REQUEST, f"malformed body: {type(exc).__name__}") from None
    if piece:
        yield bytes(piece)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
