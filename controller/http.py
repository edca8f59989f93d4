"""The controller's HTTP API: the same operations faasctl reaches over ZeroMQ, for operators.

HTTP parsing is aiohttp's (a server maintained for hostile input); this module decides
who may call what. Endpoints are rows of ``ROUTES``, a static table: each names the
controller op whose protocol schema checks the arguments (path, query and body
together) before the op's handler, from the same handler table faasctl's requests reach,
runs. ``docs/openapi.json`` describes the same table and the unit tests hold the two
together.

Every request passes, in this order: the Host and Origin checks (DNS rebinding, CSRF),
the caller check (an operator by the uid of its loopback or unix socket, or a token),
the route, the Content-Type check for state-changing methods, the role check of a
token against the op's ``role`` in ``protocol.OPS``; only then is a byte of body read.
Bodies are streamed into the upload spool in CHUNK_SIZE pieces; answers are JSON, errors
``{"error": {"code", "message", "details"}}`` with a status that matches the code.

Why one module of this length: every check above, the listeners they depend on and the
connection cap are the boundary between local users and the API, and are read together
when that boundary is reviewed; the route table and bodies are ``controller/routes.py``,
the uid and token logic ``controller/access.py``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from common import rpc
from common.errors import Code, FaasError
from common.log import EventLog, request_id
from common.protocol import OPS, new_id
from common.rpc import Handler
from controller import access
from controller.access import Caller, Operators
from controller.routes import (
    BYTES,
    IDLE_SECONDS,
    IMAGE,
    JSON_BODY,
    NO_BODY,
    ROUTES,
    Answer,
    MethodNotAllowed,
    bytes_body,
    check_type,
    error_answer,
    json_answer,
    json_body,
    query_args,
    read_body,
)

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text format
MAX_HEADER = 8190  # one header line (aiohttp's limit); a longer one is 413
STORM_SECONDS = 10.0  # refused connections are logged once per this many seconds
# Where a request came in: loopback TCP, the unix socket, the VPN address.
LOCAL, UNIX, VPN = "local", "unix", "vpn"


@dataclass(frozen=True)
class Endpoints:
    """Where the API listens. ``listen`` (HOST:PORT, loopback) serves operators by uid
    and tokens; ``unix`` (a path, mode 0660 group ``unix_gid``) operators by
    SO_PEERCRED and tokens; ``vpn`` (the server's VPN address, port of ``listen``)
    tokens only."""

    listen: str
    unix: str | None = None
    unix_gid: int = -1
    vpn: str | None = None
    # On 127.0.0.1 also listen on [::1] at the same port: `localhost` may resolve to
    # ::1 first, and an operator's `curl localhost:PORT` must not reach whatever other
    # user could otherwise bind [::1]:PORT and collect its tokens and bodies.
    loopback_twin: bool = True


@dataclass(frozen=True)
class Tokens:
    """The token store as the API needs it: a lookup by digest, and a use to note."""

    lookup: Callable[[str], dict[str, Any] | None]
    used: Callable[[str, float], None]


NO_TOKENS = Tokens(lambda digest: None, lambda name, now: None)


class Storm:
    """A warning that may come thousands of times a second, logged at most once per
    ``interval`` with the count since the last line (the rest flushed by a timer)."""

    def __init__(self, log: EventLog, event: str, interval: float = STORM_SECONDS):
        self.log, self.event, self.interval = log, event, interval
        self.count = 0
        self.last = -interval
        self._flush: asyncio.TimerHandle | None = None

    def hit(self, **fields: Any) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.interval:
            self._emit(now, fields)
        elif self._flush is None:
            self._flush = asyncio.get_running_loop().call_at(
                self.last + self.interval, lambda: self._emit(time.monotonic(), fields))

    def _emit(self, now: float, fields: dict[str, Any]) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self.count:
            self.log.warning(self.event, count=self.count, per_seconds=self.interval, **fields)
        self.count, self.last = 0, now

    def close(self) -> None:
        """Log what is still counted; no timer left behind."""
        self._emit(time.monotonic(), {})


class HttpApi:
    """Serves the HTTP API over a handler table (the controller's, the one faasctl's
    requests reach) and an optional source of Prometheus text."""

    def __init__(self, handlers: dict[str, Handler], endpoints: Endpoints, log: EventLog, *,
                 operators: Operators, tokens: Tokens = NO_TOKENS,
                 metrics: Callable[[], Awaitable[str]] | None = None,
                 max_connections: int = 256):
        missing = set(OPS["controller"]) ^ set(handlers)
        if missing:
            raise ValueError(f"handlers and protocol.OPS differ on {sorted(missing)}")
        self.handlers = dict(handlers)
        self.endpoints = endpoints
        host, _, port = endpoints.listen.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.log = log
        self.operators = operators
        self.tokens = tokens
        self.metrics = metrics
        self.max_connections = max_connections
        self.open = 0  # connections now open, on every listener together
        self.others = 0  # of those, connections of callers who are not operators
        self.refused = Storm(log, "http_connections_refused")
        self.servers: list[asyncio.AbstractServer] = []
        self.managers: list[_Server] = []  # each listener's connections

    def _server(self, site: str) -> _Server:
        manager = _Server(self, site)
        self.managers.append(manager)
        return manager

    # --- listeners ------------------------------------------------------------------

    def hostnames(self) -> set[str]:
        """The names a Host header may give: this server's own, never a foreign one."""
        names = {"localhost", "127.0.0.1", "::1", self.host.lower()}
        if self.endpoints.vpn:
            names.add(self.endpoints.vpn.lower())
        return names

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        tcp = await loop.create_server(self._server(LOCAL), self.host, self.port,
                                       reuse_address=True)
        self.servers.append(tcp)
        self.port = tcp.sockets[0].getsockname()[1]  # the real one when port was 0
        self.log.info("http_listening", host=self.host, port=self.port)
        if self.endpoints.loopback_twin and self.host in ("127.0.0.1", "localhost"):
            await self._start_twin()
        if self.endpoints.unix:
            self.servers.append(await self._start_unix(self.endpoints.unix))
        if self.endpoints.vpn:
            sock = _freebind_socket(self.endpoints.vpn, self.port)
            self.servers.append(await loop.create_server(self._server(VPN), sock=sock))
            self.log.info("http_listening", host=self.endpoints.vpn, port=self.port,
                          tokens_only=True)

    async def _start_twin(self) -> None:
        """[::1] at the port of 127.0.0.1. Taken by someone else already: said loudly
        (the operator should use 127.0.0.1 or http.sock until that process is gone),
        and the API still serves on 127.0.0.1, which that process cannot take from us."""
        try:
            twin = await asyncio.get_running_loop().create_server(
                self._server(LOCAL), "::1", self.port, reuse_address=True)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                self.log.error("http_twin_taken", host="::1", port=self.port,
                               error=f"another process holds [::1]:{self.port}: a client "
                               f"of localhost:{self.port} may reach it instead of faasd; "
                               f"use http://127.0.0.1:{self.port} or http.sock, and find "
                               f"it with ss -ltnp 'sport = :{self.port}'")
            else:  # no IPv6 loopback on this host: nobody can bind it either
                self.log.info("http_twin_skipped", host="::1", error=str(exc))
            return
        self.servers.append(twin)
        self.log.info("http_listening", host="::1", port=self.port)

    async def _start_unix(self, path: str) -> asyncio.AbstractServer:
        """The unix socket, group-owned and 0660 from its first instant (umask)."""
        try:
            os.unlink(path)  # stale: the controller's lock says no other instance runs
        except FileNotFoundError:
            pass
        old = os.umask(0o117)
        try:
            server = await asyncio.get_running_loop().create_unix_server(
                self._server(UNIX), path)
        finally:
            os.umask(old)
        if self.endpoints.unix_gid >= 0:
            os.chown(path, -1, self.endpoints.unix_gid)
        self.log.info("http_listening", socket=path)
        return server

    async def stop(self) -> None:
        """Stop listening, end open connections (a request in flight gets a second),
        remove the unix socket."""
        for server in self.servers:
            server.close()
        for manager in self.managers:
            await manager.shutdown(1.0)
        for server in self.servers:
            await server.wait_closed()
        self.servers, self.managers = [], []
        self.refused.close()
        if self.endpoints.unix:
            try:
                os.unlink(self.endpoints.unix)
            except FileNotFoundError:
                pass

    # --- one request ------------------------------------------------------------------

    async def serve(self, req: web.BaseRequest, site: str) -> web.StreamResponse:
        """Answer one request; every failure becomes a documented error answer."""
        token = request_id.set(new_id())
        caller_token = rpc.caller.set(None)  # a kept-alive connection's next request starts over
        started = time.monotonic()
        caller: Caller | None = None
        try:
            try:
                if req.version < (1, 0):  # aiohttp takes a line without version as 0.9
                    raise FaasError(Code.BAD_REQUEST, "malformed request line: HTTP/1.x only")
                self._check_origin(req, site)
                caller = await self._caller(req, site)
                answer = await self._route(req, caller)
            except FaasError as exc:
                self.log.warning("http_refused", request=_line(req), code=exc.code.value,
                                 error=exc.message, caller=caller.who if caller else None)
                answer = error_answer(exc)
            except MethodNotAllowed as exc:
                answer = json_answer(405, {"error": {
                    "code": Code.BAD_REQUEST.value, "message": f"{_line(req)}: use "
                    f"{', '.join(exc.allowed)}", "details": {"allow": exc.allowed}}},
                    (("Allow", ", ".join(exc.allowed)),))
            except (ConnectionError, asyncio.CancelledError):
                raise
            except Exception as exc:  # a bug: the traceback stays here, the client gets a code
                self.log.error("http_failed", error=repr(exc), traceback=_traceback(exc))
                answer = error_answer(FaasError(Code.INTERNAL, "internal error in controller; "
                                                f"its log has request id {request_id.get()}"))
            self.log.debug("http_served", request=_line(req), status=answer.status,
                           caller=caller.who if caller else None,
                           ms=round((time.monotonic() - started) * 1e3, 2))
            resp = web.Response(status=answer.status, body=answer.data, headers={
                "Content-Type": answer.ctype, "X-Request-Id": request_id.get(),
                **dict(answer.headers)})
            if answer.status >= 400:
                resp.force_close()  # what follows a refused request is not worth reading
            return resp
        finally:
            rpc.caller.reset(caller_token)
            request_id.reset(token)

    def _check_origin(self, req: web.BaseRequest, site: str) -> None:
        """Refuse a foreign Host (DNS rebinding) and a cross-site Origin (CSRF)."""
        names = self.hostnames()
        host = req.headers.get("Host")
        if site != UNIX and host is not None and _hostname(host) not in names:
            raise FaasError(Code.FORBIDDEN, f"Host {host[:100]!r} is not this server: use "
                            "http://127.0.0.1:PORT or http://localhost:PORT",
                            {"reason": "foreign_host"})
        origin = req.headers.get("Origin")
        if origin is not None:
            scheme, sep, rest = origin.partition("://")
            if scheme.lower() != "http" or not sep or _hostname(rest) not in names:
                raise FaasError(Code.FORBIDDEN, f"Origin {origin[:100]!r} is another site: "
                                "the API takes no cross-site requests",
                                {"reason": "cross_site"})

    async def _caller(self, req: web.BaseRequest, site: str) -> Caller:
        """A token's holder, or an operator by the uid the kernel gives for the socket."""
        token = access.bearer(req.headers.get("Authorization"))
        if token is not None:
            now = time.time()
            row = access.check_token(token, self.tokens.lookup, now)
            self.tokens.used(row["name"], now)
            rpc.caller.set(f"token {row['name']}")
            return Caller(f"token {row['name']}", row["role"])
        if site == VPN:
            raise FaasError(Code.UNAUTHORIZED, "the API on the VPN address takes tokens only: "
                            "send Authorization: Bearer TOKEN (an operator makes one with "
                            "faasctl token create NAME --role deploy)", {"reason": "no_token"})
        transport = req.transport
        if transport is None:
            raise ConnectionResetError("client went away")
        uid: int | None
        gid: int | None = None
        if site == UNIX:
            uid, gid = access.unix_peer(transport.get_extra_info("socket"))
        else:
            local = transport.get_extra_info("sockname")
            remote = transport.get_extra_info("peername")
            if not access.is_loopback(remote[0]):
                raise FaasError(Code.UNAUTHORIZED, f"{remote[0]} is not on this host: send "
                                "Authorization: Bearer TOKEN", {"reason": "no_token"})
            uid = access.peer_uid(local, remote)
            if uid is None:
                raise FaasError(Code.FORBIDDEN, "the kernel lists no socket of this host for "
                                "your connection, so its user is unknown: send a token",
                                {"reason": "unknown_uid"})
        member, who = self.operators.check(uid, gid)
        if not member:
            raise self.operators.refusal(who, uid)
        rpc.caller.set(f"uid {uid}")
        return Caller(who)

    async def _route(self, req: web.BaseRequest, caller: Caller) -> Answer:
        """Find the route, check type and role, check the arguments with the op's
        schema, then call the op."""
        path = req.raw_path.partition("?")[0]
        segments = path.split("/")
        matched = [(r, p) for r in ROUTES if (p := r.match(segments)) is not None]
        if not matched:
            raise FaasError(Code.NOT_FOUND, f"no such endpoint {path[:200]}; see "
                            "docs/http.md", {"path": path[:200]})
        for route, params in matched:
            if route.method == req.method:
                break
        else:
            raise MethodNotAllowed(sorted({r.method for r, _ in matched}))
        check_type(req, route)
        if not caller.may(route.role):
            raise FaasError(Code.FORBIDDEN, f"{caller.who} has role {caller.role}; "
                            f"{req.method} {route.path} needs {route.role} (faasctl token "
                            f"create NAME --role {route.role})",
                            {"reason": "role", "role": caller.role, "needs": route.role})
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
            args.update(query_args(req.raw_path.partition("?")[2], op))
        if route.body == BYTES:
            assert route.body_field is not None
            args[route.body_field] = await bytes_body(req)
        elif route.body != NO_BODY:
            body = await json_body(req, required=route.body == JSON_BODY)
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
        """Check ``args`` with op's protocol schema and call its handler from the
        table. ``op`` comes from ROUTES only."""
        checked = OPS["controller"][op].args.check(args, "")
        return await self.handlers[op](checked)

    async def _new(self, req: web.BaseRequest) -> Any:
        """Deploy the request body (a docker save tarball) as function X-Image-Name,
        through the ops faasctl new uses: upload_begin, upload_chunk..., deploy."""
        name = req.headers.get("X-Image-Name", "")
        OPS["controller"]["upload_begin"].args.fields["name"].check(name, "X-Image-Name")
        begun = await self._call("upload_begin", {"name": name,
                                                  "tag": req.headers.get("X-Image-Tag") or None})
        upload = begun["upload"]
        try:
            offset = 0
            async for chunk in read_body(req):
                offset = (await self._call("upload_chunk", {
                    "upload": upload, "offset": offset, "data": chunk}))["received"]
        except BaseException:
            await self._call("upload_abort", {"upload": upload})
            raise
        return await self._call("deploy", {"upload": upload})

    async def _metrics(self) -> Answer:
        """Prometheus text from the controller, once it has any to give."""
        if self.metrics is None:
            raise FaasError(Code.NOT_FOUND, "this controller keeps no metrics yet")
        text = await self.metrics()
        return Answer(200, text.encode(), METRICS_TYPE)


# --- aiohttp's connection handling, with a cap and our error shape -----------------------


class _Server(web.Server):
    """aiohttp's low-level server for one listener: over the cap a connection is closed
    at once (counted in a storm line, not one warning each); parse errors answer in our
    error shape."""

    def __init__(self, api: HttpApi, site: str):
        async def handler(req: web.BaseRequest) -> web.StreamResponse:
            return await api.serve(req, site)
        super().__init__(handler, access_log=None, keepalive_timeout=IDLE_SECONDS,
                         max_line_size=MAX_HEADER, max_field_size=MAX_HEADER,
                         lingering_time=2.0)
        self.api = api
        self.site = site

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        if self.api.open >= self.api.max_connections:
            return _Refuse(self.api)
        return _Connection(self, loop=self._loop, **self._kwargs)


class _Refuse(asyncio.Protocol):
    """A connection over the cap: closed before a byte is read."""

    def __init__(self, api: HttpApi):
        self.api = api

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.api.refused.hit(max=self.api.max_connections)
        transport.close()


class _Connection(RequestHandler):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        api = self._manager.api  # type: ignore[union-attr]
        api.open += 1
        self._counted = self._manager
        self._other = not _operator_at(api, self._manager.site, transport)  # type: ignore
        if self._other:
            api.others += 1
        super().connection_made(transport)
        if self._other and api.others > api.max_connections - _kept(api.max_connections):
            api.refused.hit(max=api.max_connections)
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        counted = getattr(self, "_counted", None)
        if counted is not None:
            counted.api.open -= 1
            if self._other:
                counted.api.others -= 1
            self._counted = None
        super().connection_lost(exc)

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A request aiohttp could not parse: 400 (413 for an over-long line) in our
        shape, and the connection closed. The offending bytes are not echoed."""
        if isinstance(exc, http_exceptions.LineTooLong):
            error = FaasError(Code.TOO_LARGE, f"a request line or header over {MAX_HEADER} "
                              "bytes", {"max": MAX_HEADER})
        elif status >= 500:
            error = FaasError(Code.INTERNAL, "internal error in controller")
        else:
            error = FaasError(Code.BAD_REQUEST, f"malformed request: {type(exc).__name__}")
        answer = error_answer(error)
        resp = web.Response(status=answer.status, body=answer.data, headers={
            "Content-Type": answer.ctype, "X-Request-Id": new_id()})
        resp.force_close()
        return resp


def _kept(max_connections: int) -> int:
    """Connections only operators may use: a quarter of the cap, at least one."""
    return max(1, max_connections // 4)


def _operator_at(api: HttpApi, site: str, transport: asyncio.BaseTransport) -> bool:
    """Whether a new connection is an operator's, asked of the kernel at accept (what
    the request's own check will ask again): anyone else's idle connections must not
    fill every place, or one local user would lock the operators out of the API."""
    try:
        if site == UNIX:
            return api.operators.check(*access.unix_peer(transport.get_extra_info("socket")))[0]
        if site != LOCAL:
            return False
        local, remote = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
        if not access.is_loopback(remote[0]):
            return False
        uid = access.peer_uid(local, remote)
        return uid is not None and api.operators.check(uid)[0]
    except (OSError, TypeError, ValueError):  # gone already, or no addresses to ask about
        return False


def _freebind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on an address that may not exist yet (netagent adds the VPN
    address when it sets the interface up): IPV6_FREEBIND lets the bind succeed now."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


IPV6_FREEBIND = 78  # linux/in6.h; not in the socket module


def _hostname(host: str) -> str:
    """The name of a Host header value (or an Origin's host part), without its port;
    "" when it is not of the form NAME[:PORT] or [IPV6][:PORT]."""
    host = host.strip().lower()
    if host.startswith("["):
        name, sep, rest = host[1:].partition("]")
        return name if sep and (not rest or (rest[0] == ":" and rest[1:].isdigit())) else ""
    name, _, port = host.partition(":")
    return name if not port or port.isdigit() else ""


def _line(req: web.BaseRequest | None) -> str | None:
    return f"{req.method} {req.raw_path.partition('?')[0][:200]}" if req is not None else None


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))
