"""The controller's HTTP API on loopback: the seeds' ``POST /api/new`` and friends.

A deliberately small HTTP/1.1 server on asyncio streams: one request per connection,
bodies streamed straight into the spool (``Content-Length`` or chunked), JSON answers,
errors as ``{"error": {"code", "message", "details"}}`` with a status that matches the
code. It speaks for the same controller methods faasctl reaches over ZeroMQ.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, AsyncIterator

from common.errors import Code, FaasError
from common.log import EventLog, request_id
from common.protocol import CHUNK_SIZE, FunctionName, new_id

if TYPE_CHECKING:
    from controller.main import Controller

HTTP_STATUS = {
    Code.BAD_REQUEST: 400, Code.VERSION_MISMATCH: 400, Code.FORBIDDEN: 403,
    Code.NOT_FOUND: 404, Code.CONFLICT: 409, Code.TOO_LARGE: 413, Code.BAD_IMAGE: 422,
    Code.INTERNAL: 500, Code.UNAVAILABLE: 503, Code.TIMEOUT: 504,
}
REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large",
           422: "Unprocessable Content", 500: "Internal Server Error",
           503: "Service Unavailable", 504: "Gateway Timeout"}
MAX_HEADER = 64 << 10


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
        self.log.info("http_listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        token = request_id.set(new_id())
        try:
            try:
                method, path, headers = await _read_head(reader)
                status, body = 200, await self._route(method, path, headers, reader)
            except FaasError as exc:
                status, body = HTTP_STATUS[exc.code], {"error": exc.to_wire()}
            except _MethodNotAllowed as exc:
                status, body = 405, {"error": {"code": "bad_request", "message": str(exc),
                                               "details": {}}}
            data = json.dumps(body, indent=1).encode() + b"\n"
            writer.write(f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: "
                         f"application/json\r\nContent-Length: {len(data)}\r\nConnection: close"
                         f"\r\nX-Request-Id: {request_id.get()}\r\n\r\n".encode() + data)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # a bug: log it, never leave the client hanging silently
            self.log.error("http_failed", error=repr(exc))
        finally:
            writer.close()
            request_id.reset(token)

    async def _route(self, method: str, path: str, headers: dict[str, str],
                     reader: asyncio.StreamReader) -> Any:
        c = self.controller
        path = path.split("?", 1)[0]
        if path == "/healthz":
            _allow(method, "GET")
            return {"ok": True}
        if path == "/api/list":
            _allow(method, "GET")
            return (await c.op_list({}))["functions"]
        if path == "/api/new":
            _allow(method, "POST")
            return await self._new(headers, reader)
        if path.startswith("/api/functions/"):
            name = FunctionName().check(path[len("/api/functions/"):], "name")
            if method == "DELETE":
                return await c.op_rm({"name": name})
            _allow(method, "GET")
            return await c.op_info({"name": name})
        raise FaasError(Code.NOT_FOUND, f"no such endpoint {path}; see docs/http.md")

    async def _new(self, headers: dict[str, str], reader: asyncio.StreamReader) -> Any:
        """Deploy the request body (a docker save tarball) as function X-Image-Name."""
        name = FunctionName().check(headers.get("x-image-name", ""), "X-Image-Name")
        c = self.controller
        up = c.uploads.begin(name, headers.get("x-image-tag") or None)
        try:
            async for chunk in _body(headers, reader):
                c.uploads.write(up.id, up.received, chunk)
        except BaseException:
            c.uploads.drop(up.id)
            raise
        return await c.deploy(up.id)


class _MethodNotAllowed(Exception):
    pass


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise _MethodNotAllowed(f"use {allowed}")


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
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


async def _body(headers: dict[str, str], reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The request body in chunks of at most CHUNK_SIZE; never all of it at once."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise FaasError(Code.BAD_REQUEST, "malformed chunk size") from None
            if size == 0:
                await _trailer(reader)
                return
            while size:
                data = await reader.readexactly(min(size, CHUNK_SIZE))
                size -= len(data)
                yield data
            await reader.readexactly(2)
        return
    try:
        left = int(headers["content-length"])
    except (KeyError, ValueError):
        raise FaasError(Code.BAD_REQUEST, "send the image as the body with Content-Length "
                        "(curl --data-binary @image.tar) or chunked") from None
    while left > 0:
        data = await reader.read(min(left, CHUNK_SIZE))
        if not data:
            raise FaasError(Code.BAD_REQUEST, f"body ended {left} bytes early")
        left -= len(data)
        yield data


async def _trailer(reader: asyncio.StreamReader) -> None:
    while (await reader.readuntil(b"\r\n")) != b"\r\n":
        pass
