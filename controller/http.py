"""The controller's HTTP API on loopback: the same operations faasctl reaches over ZeroMQ.

A deliberately small HTTP/1.1 server on asyncio streams: one request per connection,
bodies streamed straight into the spool (``Content-Length`` or chunked), JSON answers,
errors as ``{"error": {"code", "message", "details"}}`` with a status that matches the
code. Endpoints are rows of ``ROUTES``, a static table: each names the controller op
whose protocol schema checks the arguments (path, query and body together) before its
``op_*`` method, the very one faasctl's requests reach, runs. ``docs/openapi.json``
describes the same table and the unit tests hold the two together.
"""

from __future__ import annotations

import asyncio
import json
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from common.errors import Code, FaasError
from common.log import EventLog, request_id
from common.protocol import CHUNK_SIZE, OPS, Op, new_id
from common.schema import Float, Int

if TYPE_CHECKING:
    from controller.main import Controller

HTTP_STATUS = {
    Code.BAD_REQUEST: 400, Code.VERSION_MISMATCH: 400, Code.FORBIDDEN: 403,
    Code.NOT_FOUND: 404, Code.CONFLICT: 409, Code.TOO_LARGE: 413, Code.BAD_IMAGE: 422,
    Code.INTERNAL: 500, Code.UNAVAILABLE: 503, Code.TIMEOUT: 504,
}
REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
           413: "Content Too Large", 422: "Unprocessable Content",
           500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout"}
JSON_TYPE = "application/json"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text format
MAX_HEADER = 64 << 10
MAX_JSON = 1 << 20  # a JSON request body; SET's largest legal argument fits easily
LINGER_SECONDS = 2.0  # reading what a refused client still sends, so it sees our answer
IDLE_SECONDS = 60.0  # a client that sends nothing for this long is dropped without answer

# What a route does with the request body.
NO_BODY, JSON_BODY, OPTIONAL_JSON, IMAGE = "none", "json", "optional json", "image"


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
)


@dataclass
class Request:
    """One request as read so far; ``body_done`` says whether its body was consumed."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    body_done: bool = False

    @property
    def has_body(self) -> bool:
        return ("transfer-encoding" in self.headers
                or self.headers.get("content-length", "0").strip() not in ("", "0"))


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


class HttpApi:
    """Serves the HTTP API for one controller."""

    def __init__(self, controller: Controller, listen: str, log: EventLog):
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.controller = controller
        self.log = log
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.host, self.port,
                                                 limit=MAX_HEADER, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]  # the real one when port was 0
        self.log.info("http_listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        token = request_id.set(new_id())
        started = time.monotonic()
        req: Request | None = None
        try:
            try:
                method, target, headers = await _read_head(reader)
                path, _, query = target.partition("?")
                req = Request(method, path, query, headers, reader, writer)
                answer = await self._route(req)
            except FaasError as exc:
                self.log.warning("http_refused", request=_line(req), code=exc.code.value,
                                 error=exc.message)
                answer = error_answer(exc)
            except _MethodNotAllowed as exc:
                answer = json_answer(405, {"error": {
                    "code": Code.BAD_REQUEST.value, "message": f"{_line(req)}: use "
                    f"{', '.join(exc.allowed)}", "details": {"allow": exc.allowed}}},
                    (("Allow", ", ".join(exc.allowed)),))
            except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                raise
            except Exception as exc:  # a bug: the traceback stays here, the client gets a code
                self.log.error("http_failed", error=repr(exc), traceback=_traceback(exc))
                answer = error_answer(FaasError(Code.INTERNAL, "internal error in controller; "
                                                f"its log has request id {request_id.get()}"))
            await self._write(writer, answer)
            self.log.debug("http_served", request=_line(req), status=answer.status,
                           ms=round((time.monotonic() - started) * 1e3, 2))
            if req is None or not req.body_done:
                await _linger(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except TimeoutError:
            self.log.warning("http_idle", request=_line(req), seconds=IDLE_SECONDS)
        except Exception as exc:  # never let one connection take the server down
            self.log.error("http_failed", error=repr(exc))
        finally:
            writer.close()
            request_id.reset(token)

    async def _write(self, writer: asyncio.StreamWriter, answer: Answer) -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in answer.headers)
        writer.write(f"HTTP/1.1 {answer.status} {REASONS[answer.status]}\r\nContent-Type: "
                     f"{answer.ctype}\r\nContent-Length: {len(answer.data)}\r\nConnection: "
                     f"close\r\nX-Request-Id: {request_id.get()}\r\n{extra}\r\n".encode()
                     + answer.data)
        await writer.drain()

    async def _route(self, req: Request) -> Answer:
        """Find the route, check the arguments with the op's schema, then call the op."""
        segments = req.path.split("/")
        matched = [(r, p) for r in ROUTES if (p := r.match(segments)) is not None]
        if not matched:
            raise FaasError(Code.NOT_FOUND, f"no such endpoint {req.path[:200]}; see "
                            "docs/http.md", {"path": req.path[:200]})
        for route, params in matched:
            if route.method == req.method:
                break
        else:
            raise _MethodNotAllowed(sorted({r.method for r, _ in matched}))
        if route.path == "/healthz":
            return json_answer(200, {"ok": True})
        if route.path == "/metrics":
            return await self._metrics()
        op = route.schema
        for key, value in params.items():  # the name is checked before a byte of body
            op.args.fields[key].check(value, key)
        if route.body == IMAGE:
            return json_answer(200, await self._new(req))
        args: dict[str, Any] = dict(params)
        if route.query:
            args.update(_query_args(req.query, op))
        if route.body != NO_BODY:
            body = await _json_body(req, required=route.body == JSON_BODY)
            if route.body_field is not None:
                args[route.body_field] = body
            else:
                clash = sorted(set(body) & set(args))
                if clash:
                    raise FaasError(Code.BAD_REQUEST, f"{', '.join(clash)}: given in the path, "
                                    "not the body", {"field": clash[0]})
                args.update(body)
        return json_answer(200, route.answer(await self._call(route.op, args)))

    async def _call(self, op: str, args: dict[str, Any]) -> Any:
        """Check ``args`` with op's protocol schema and call the controller's op_<op>,
        the method faasctl's request for op reaches. ``op`` comes from ROUTES only."""
        checked = OPS["controller"][op].args.check(args, "")
        return await getattr(self.controller, f"op_{op}")(checked)

    async def _new(self, req: Request) -> Any:
        """Deploy the request body (a docker save tarball) as function X-Image-Name,
        through the ops faasctl new uses: upload_begin, upload_chunk..., deploy."""
        name = req.headers.get("x-image-name", "")
        OPS["controller"]["upload_begin"].args.fields["name"].check(name, "X-Image-Name")
        begun = await self._call("upload_begin", {"name": name,
                                                  "tag": req.headers.get("x-image-tag") or None})
        upload = begun["upload"]
        try:
            offset = 0
            async for chunk in _body(req):
                offset = (await self._call("upload_chunk", {
                    "upload": upload, "offset": offset, "data": chunk}))["received"]
        except BaseException:
            await self._call("upload_abort", {"upload": upload})
            raise
        return await self._call("deploy", {"upload": upload})

    async def _metrics(self) -> Answer:
        """Prometheus text from the controller, once it has any to give."""
        metrics_text = getattr(self.controller, "metrics_text", None)
        if metrics_text is None:
            raise FaasError(Code.NOT_FOUND, "this controller keeps no metrics yet")
        text = await metrics_text()
        return Answer(200, text.encode(), METRICS_TYPE)


class _MethodNotAllowed(Exception):
    def __init__(self, allowed: list[str]):
        super().__init__(", ".join(allowed))
        self.allowed = allowed


def _query_args(query: str, op: Op) -> dict[str, Any]:
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


async def _json_body(req: Request, required: bool) -> Any:
    """The request body as a JSON object, at most MAX_JSON bytes of it."""
    if not req.has_body:
        req.body_done = True
        if required:
            raise FaasError(Code.BAD_REQUEST, "send a JSON object as the body")
        return {}
    length = req.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_JSON:
        raise FaasError(Code.TOO_LARGE, f"JSON body over {MAX_JSON} bytes", {"max": MAX_JSON})
    data = bytearray()
    async for chunk in _body(req):
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


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _line(req: Request | None) -> str | None:
    return f"{req.method} {req.path[:200]}" if req is not None else None


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    try:
        head = await _idle(reader.readuntil(b"\r\n\r\n"))
    except asyncio.LimitOverrunError:
        raise FaasError(Code.TOO_LARGE, f"request head over {MAX_HEADER} bytes") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise FaasError(Code.BAD_REQUEST, "malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            key, sep, value = line.partition(":")
            if not sep:
                raise FaasError(Code.BAD_REQUEST, f"malformed header line {line[:40]!r}")
            headers[key.strip().lower()] = value.strip()
    return parts[0], parts[1], headers


async def _body(req: Request) -> AsyncIterator[bytes]:
    """The request body in chunks of at most CHUNK_SIZE; never all of it at once."""
    chunked = req.headers.get("transfer-encoding", "").lower() == "chunked"
    if not chunked and not req.headers.get("content-length", "").isdigit():
        raise FaasError(Code.BAD_REQUEST, "send the body with Content-Length (curl "
                        "--data-binary @image.tar) or chunked")
    if req.headers.get("expect", "").lower() == "100-continue":
        # curl asks before sending a large body; answering at once spares it a 1 s wait
        req.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    pieces = _chunked(req.reader) if chunked else _sized(req.reader,
                                                         int(req.headers["content-length"]))
    async for data in pieces:
        yield data
    req.body_done = True


async def _sized(reader: asyncio.StreamReader, left: int) -> AsyncIterator[bytes]:
    while left > 0:
        data = await _idle(reader.read(min(left, CHUNK_SIZE)))
        if not data:
            raise FaasError(Code.BAD_REQUEST, f"body ended {left} bytes early")
        left -= len(data)
        yield data


async def _chunked(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        try:
            size = int((await _idle(reader.readuntil(b"\r\n"))).split(b";")[0].strip(), 16)
        except (ValueError, asyncio.LimitOverrunError):
            raise FaasError(Code.BAD_REQUEST, "malformed chunk size") from None
        if size == 0:
            await _trailer(reader)
            return
        while size:
            data = await _idle(reader.readexactly(min(size, CHUNK_SIZE)))
            size -= len(data)
            yield data
        if await _idle(reader.readexactly(2)) != b"\r\n":
            raise FaasError(Code.BAD_REQUEST, "malformed chunk: no CRLF after its data")


async def _trailer(reader: asyncio.StreamReader) -> None:
    try:
        while (await _idle(reader.readuntil(b"\r\n"))) != b"\r\n":
            pass
    except asyncio.LimitOverrunError:
        raise FaasError(Code.BAD_REQUEST, "malformed chunked trailer") from None


async def _idle(read: Awaitable[bytes]) -> bytes:
    """One read from the client, which must send something within IDLE_SECONDS."""
    return await asyncio.wait_for(read, IDLE_SECONDS)


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After answering a request whose body we did not read (or that had none): end
    our side, then read and drop what the client still sends until it closes. Closing
    with unread bytes would reset the connection, and a reset can destroy the answer
    before the client has read it."""
    try:
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER_SECONDS):
            while await reader.read(CHUNK_SIZE):
                pass
    except (TimeoutError, OSError):
        pass
