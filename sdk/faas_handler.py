"""faas_handler: answer faasd connections from Python, in one stdlib-only module.

A faasd handler connects to the runner's control socket ($FAAS_CONTROL_SOCKET), receives
each client's connected TCP socket as a file descriptor, serves HTTP/1.1 on it and closes
it (docs/handler-protocol.md). This module does all of that; you write the function::

    from faas_handler import serve

    def handle(request):
        return 200, {"Content-Type": "text/plain"}, f"hello {request.query.get('name')}\\n"

    serve(handle)

or run an existing WSGI application unchanged::

    from faas_handler import serve, wsgi
    from myapp import app
    serve(wsgi(app))

or, without editing anything: ``python3 -m faas_handler [--wsgi] myapp:app``.

Every container pays for this module's import on its cold start, so it imports only
what is already loaded when Python starts (plus ``os``): not ``socket`` (~8 ms: enum,
selectors, collections), not ``json`` (~10 ms: re, enum), never ``http.server`` or
``email``. The control packets are flat JSON objects, read by a small parser that falls
back to ``json`` for anything unusual; modules a path really needs (``json`` for a dict
body, ``traceback`` for an error, ``io`` for WSGI) are imported where they are used.

Why one module of this length: a handler author copies this one file into an image, with
nothing but the standard library beside it.
"""

import _socket  # the C socket type `socket.socket` wraps: same calls, none of its imports
import os
import sys
import time

TYPE_CHECKING = False  # the typing module costs a cold start too: hints are for tools only
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    Handler = Callable[["Request"], object]
    HeaderList = list[tuple[str, str]]

__all__ = [  # serve() and wsgi() are the API; the rest are its parts, for other loops
    "HTTPError", "Request", "Response", "conn_fields", "connect", "done_packet", "environ",
    "main", "parse_conn", "parse_packet", "read_request", "receive", "render", "serve",
    "serve_connection", "wsgi",
]
__version__ = "1.1"  # the handler protocol's: 1.1 added conn's port and peer

DEFAULT_CONTROL_SOCKET = "/control.sock"
MAX_BODY = 8 << 20  # request bodies above this get 413; serve(max_body=...) changes it
MAX_HEAD = 64 << 10  # request line + headers; above it: 431
CONTROL_PACKET = 65536  # the largest control packet read; the runner's are ~150 bytes
# Room for the one descriptor a conn packet carries. The kernel rounds this up and may
# still deliver two; every descriptor but the first is closed (never leaked).
_FD_SPACE = _socket.CMSG_SPACE(4)
_LINGER_BYTES = 1 << 20  # unread request data drained before close, so no RST eats the reply

_REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content",
    206: "Partial Content", 301: "Moved Permanently", 302: "Found", 303: "See Other",
    304: "Not Modified", 307: "Temporary Redirect", 308: "Permanent Redirect",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 410: "Gone",
    411: "Length Required", 413: "Content Too Large", 415: "Unsupported Media Type",
    422: "Unprocessable Content", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                   b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_HEX = frozenset(b"0123456789abcdefABCDEF")
# The SDK frames every response itself: these never come from the handler.
_FRAMING = frozenset(("connection", "keep-alive", "transfer-encoding", "content-length"))


def _log(message: str) -> None:
    """One line on stderr (the function's log)."""
    sys.stderr.write(f"faas_handler: {message}\n")
    sys.stderr.flush()


def _log_exception(what: str) -> None:
    import traceback  # only an error pays for it

    _log(what)
    traceback.print_exc(file=sys.stderr)
    sys.stderr.flush()


# -- requests and responses ------------------------------------------------------------


class Request:
    """One HTTP request, read whole before the handler is called.

    ``method`` ("GET"), ``target`` (the raw request-target, "/a%20b?x=1"), ``path``
    (percent-decoded, "/a b"), ``query_string`` ("x=1"), ``query`` (decoded; the last
    value of a repeated name wins), ``query_items`` (every pair, in order), ``version``
    ("HTTP/1.1"), ``headers`` (lower-case names; repeated ones joined with ", "),
    ``header_list`` (every (name, value) as sent), ``body`` (bytes), ``remote`` (the
    client's address, from the runner), ``peer`` (the calling VPN peer's name; None for
    a local caller), ``port`` (the function's port the connection came to; None from a
    runner before protocol 1.1), ``id`` (the runner's request id), ``deadline``
    (unix time after which the runner kills the container, or None), ``reuse`` (whether
    this process will serve more connections) and ``sock`` (the connection, for
    ``getsockname()`` and the like; the SDK writes the response and closes it).
    """

    __slots__ = ("body", "deadline", "header_list", "headers", "id", "method", "path", "peer",
                 "port", "query", "query_items", "query_string", "remote", "reuse", "sock",
                 "target", "version")

    def __init__(self, method: str, target: str, version: str, header_list: "HeaderList",
                 body: bytes = b"", *, remote: str = "", id: str = "",
                 deadline: "float | None" = None, reuse: bool = False,
                 sock: "_socket.socket | None" = None, peer: "str | None" = None,
                 port: "int | None" = None) -> None:
        self.method, self.target, self.version = method, target, version
        raw_path, _, self.query_string = target.partition("?")
        self.path = _unquote(raw_path.encode("latin-1")).decode("utf-8", "replace")
        self.query_items = _parse_query(self.query_string)
        self.query = dict(self.query_items)
        self.header_list = header_list
        self.headers: dict[str, str] = {}
        for name, value in header_list:
            key = name.lower()
            self.headers[key] = f"{self.headers[key]}, {value}" if key in self.headers else value
        self.body, self.remote, self.id = body, remote, id
        self.deadline, self.reuse, self.sock = deadline, reuse, sock
        self.peer, self.port = peer, port

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (invalid bytes replaced)."""
        return self.body.decode("utf-8", "replace")

    def json(self) -> object:
        """The body parsed as JSON (imports ``json`` on first use); ValueError if it is not."""
        import json

        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target} id={self.id!r}>"


class Response:
    """What a handler may return: ``Response(body, status=200, headers=None)``.

    ``body`` is bytes, str (sent as UTF-8; default type text/plain) or a dict/list (sent
    as JSON); ``status`` an int or a WSGI-style "404 Not Found"; ``headers`` a dict or a
    list of (name, value). Content-Length and Connection are always the SDK's own.
    """

    __slots__ = ("body", "headers", "status")

    def __init__(self, body: object = b"", status: "int | str" = 200,
                 headers: "dict[str, str] | Iterable[tuple[str, str]] | None" = None) -> None:
        self.status = status
        self.headers = list(headers.items() if isinstance(headers, dict) else headers or ())
        self.body = body

    def __repr__(self) -> str:
        return f"<Response {self.status}>"


def _coerce(result: object) -> Response:
    """Whatever the handler returned, as a Response: a Response, (status, headers, body),
    (status, body), a bare body (200) or None (204)."""
    if isinstance(result, Response):
        return result
    if result is None:
        return Response(b"", 204)
    if isinstance(result, tuple):
        if len(result) == 3:
            return Response(result[2], result[0], result[1])
        if len(result) == 2:
            return Response(result[1], result[0])
        raise TypeError(f"a handler returned a tuple of {len(result)}: expected "
                        "(status, headers, body) or (status, body)")
    return Response(result)


def _encode_body(body: object) -> tuple[bytes, str]:
    """The body's bytes and the Content-Type to use when the handler set none."""
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body), "application/octet-stream"
    if isinstance(body, str):
        return body.encode(), "text/plain; charset=utf-8"
    if isinstance(body, (dict, list)):
        import json

        return json.dumps(body).encode(), "application/json"
    raise TypeError(f"a response body must be bytes, str, dict or list, not {type(body).__name__}")


def _status_line(status: "int | str") -> str:
    """'200 OK' from 200 or from '200 OK' (checked: a status must not smuggle headers)."""
    if isinstance(status, str):
        code_text, _, reason = status.partition(" ")
        if len(code_text) != 3 or not code_text.isdigit() or "\r" in status or "\n" in status:
            raise ValueError(f"bad status {status!r}")
        code = int(code_text)
    else:
        code, reason = int(status), ""
    if not 100 <= code <= 599:
        raise ValueError(f"bad status {status!r}")
    return f"{code} {reason or _reason(code)}"


def _reason(code: int) -> str:
    if code in _REASONS:
        return _REASONS[code]
    try:
        from http import HTTPStatus  # rare codes only: http imports enum

        return HTTPStatus(code).phrase
    except ValueError:
        return "Unknown"


def _http_date(now: float) -> str:
    """An IMF-fixdate (RFC 9110 5.6.7), without importing email.utils."""
    t = time.gmtime(now)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


def render(response: Response, head_only: bool = False) -> bytes:
    """The whole response (status line, headers, body) as one buffer, so that it goes out
    in one ``sendall``: nothing waits on Nagle or on a delayed ACK between pieces."""
    status = _status_line(response.status)
    code = int(status[:3])
    body, default_type = _encode_body(response.body)
    lines = [f"HTTP/1.1 {status}"]
    given_length = None
    has_type = has_date = False
    for name, value in response.headers:
        name, value = str(name), str(value)
        bad_name = not name or not _TOKEN.issuperset(name.encode("latin-1"))
        if bad_name or "\r" in value or "\n" in value:  # no header injection
            raise ValueError(f"bad response header {name!r}: {value!r}")
        key = name.lower()
        if key == "content-length":
            given_length = value.strip()
        if key in _FRAMING:
            continue
        has_type = has_type or key == "content-type"
        has_date = has_date or key == "date"
        lines.append(f"{name}: {value}")
    if not has_date:
        lines.append(f"Date: {_http_date(time.time())}")
    if code < 200 or code in (204, 304):  # no body, by definition (RFC 9110 6.4.1)
        body = b""
    else:
        if body and not has_type:
            lines.append(f"Content-Type: {default_type}")
        # HEAD: a handler may say how long the GET body would be without producing it
        length = given_length if head_only and not body and given_length else len(body)
        lines.append(f"Content-Length: {length}")
    lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


def _error(code: int, detail: str = "") -> bytes:
    text = f"{code} {_reason(code)}" + (f": {detail}" if detail else "") + "\n"
    return render(Response(text, code))


# -- reading a request -----------------------------------------------------------------


class HTTPError(Exception):
    """A request the SDK answers itself with ``status`` (400, 413, 431, 501, 505...)."""

    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(f"{status} {detail}")
        self.status, self.detail = status, detail


class _Reader:
    """Buffered reads from the connection (the C socket type has no makefile())."""

    def __init__(self, sock: "_socket.socket") -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    def fill(self) -> bool:
        """Read what is there (at least one byte); False at end of stream."""
        if self.eof:
            return False
        chunk = self.sock.recv(65536)
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def head(self, limit: int) -> bytes | None:
        """Up to and including the empty line ending the headers; None if the client closed
        before sending anything."""
        searched = 0
        while True:
            end = _head_end(self.buf, max(0, searched - 3))
            if end > limit or (end < 0 and len(self.buf) > limit):
                raise HTTPError(431, f"request line and headers exceed {limit} bytes")
            if end >= 0:
                data = bytes(self.buf[:end])
                del self.buf[:end]
                return data
            searched = len(self.buf)
            if not self.fill():
                if self.buf.strip():
                    raise HTTPError(400, "the request ended inside its headers")
                return None

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self.fill():
                raise HTTPError(400, "the body is shorter than its length")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def line(self, limit: int = 4096) -> bytes:
        while (end := self.buf.find(b"\n")) < 0:
            if len(self.buf) > limit:
                raise HTTPError(400, "a chunk line is too long")
            if not self.fill():
                raise HTTPError(400, "the chunked body ended early")
        data = bytes(self.buf[:end + 1])
        del self.buf[:end + 1]
        return data


def _head_end(buf: bytearray, start: int) -> int:
    """The index just past the blank line ending the head (CRLF or bare LF), or -1."""
    crlf, lf = buf.find(b"\n\r\n", start), buf.find(b"\n\n", start)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf + 3
    return lf + 2 if lf >= 0 else -1


def _parse_head(head: bytes) -> tuple[str, str, str, "HeaderList"]:
    """(method, target, version, headers) of a request head; HTTPError if malformed."""
    lines = head.lstrip(b"\r\n").splitlines()  # RFC 9112 2.2: ignore leading empty lines
    parts = lines[0].split(b" ") if lines else []
    if len(parts) != 3 or not parts[0] or not _TOKEN.issuperset(parts[0]):
        raise HTTPError(400, "malformed request line")
    method, target, version = (p.decode("latin-1") for p in parts)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if version.startswith("HTTP/") and version[5:6].isdigit():
            raise HTTPError(505, f"{version} is not served here")
        raise HTTPError(400, "malformed request line")
    if "://" in target and not target.startswith("/"):  # absolute-form: keep path + query
        rest = target.partition("://")[2]
        target = "/" + rest.partition("/")[2] if "/" in rest else "/"
    elif not target.startswith("/") and target != "*":
        raise HTTPError(400, "malformed request target")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or not _TOKEN.issuperset(name):
            raise HTTPError(400, "malformed header line")  # incl. obs-fold (RFC 9112 5.2)
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    return method, target, version, headers


def _body_length(headers: dict[str, str], max_body: int) -> int | None:
    """The Content-Length to read, None for chunked; HTTPError when unusable."""
    if "transfer-encoding" in headers:
        if "content-length" in headers:  # both: a request-smuggling shape, refused
            raise HTTPError(400, "both Transfer-Encoding and Content-Length")
        if headers["transfer-encoding"].strip().lower() != "chunked":
            raise HTTPError(501, "only the chunked transfer coding is understood")
        return None
    raw = headers.get("content-length", "0")
    values = {v.strip() for v in raw.split(",")}  # "5, 5" from a repeated header is fine
    if len(values) != 1 or not (value := values.pop()).isdigit():
        raise HTTPError(400, "bad Content-Length")
    if int(value) > max_body:
        raise HTTPError(413, f"the body is larger than {max_body} bytes")
    return int(value)


def _read_chunked(reader: _Reader, max_body: int) -> bytes:
    body = bytearray()
    while True:
        size_text = reader.line().split(b";")[0].strip()
        if not size_text or not _HEX.issuperset(size_text):
            raise HTTPError(400, "bad chunk size")
        size = int(size_text, 16)
        if size == 0:
            break
        if len(body) + size > max_body:
            raise HTTPError(413, f"the body is larger than {max_body} bytes")
        body += reader.exactly(size)
        if reader.line().strip():
            raise HTTPError(400, "a chunk does not end with CRLF")
    while reader.line().strip():  # trailer fields: read and dropped
        pass
    return bytes(body)


def read_request(connection: "_socket.socket", *, max_body: int = MAX_BODY,
                 **fields: object) -> Request | None:
    """Read one request from ``connection``: None if the client closed without sending
    one, HTTPError for a request the SDK must refuse. ``fields`` go to :class:`Request`."""
    reader = _Reader(connection)
    head = reader.head(MAX_HEAD)
    if head is None:
        return None
    method, target, version, header_list = _parse_head(head)
    request = Request(method, target, version, header_list, **fields)  # type: ignore[arg-type]
    length = _body_length(request.headers, max_body)
    if (length is None or length > len(reader.buf)) and version == "HTTP/1.1" \
            and request.headers.get("expect", "").lower() == "100-continue":
        connection.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")  # the client waits for it
    request.body = _read_chunked(reader, max_body) if length is None else reader.exactly(length)
    return request


def _unquote(raw: bytes, plus: bool = False) -> bytes:
    """Percent-decoding (and + as space for forms), without importing urllib."""
    if plus:
        raw = raw.replace(b"+", b" ")
    if b"%" not in raw:
        return raw
    first, *rest = raw.split(b"%")
    out = bytearray(first)
    for part in rest:
        if len(part) >= 2 and part[0] in _HEX and part[1] in _HEX:
            out.append(int(part[:2], 16))
            out += part[2:]
        else:  # not an escape: kept as it was sent
            out += b"%" + part
    return bytes(out)


def _parse_query(query: str) -> list[tuple[str, str]]:
    """application/x-www-form-urlencoded pairs, decoded as UTF-8."""
    pairs = []
    for item in query.split("&"):
        if item:
            name, _, value = item.partition("=")
            pairs.append((_unquote(name.encode("latin-1"), True).decode("utf-8", "replace"),
                          _unquote(value.encode("latin-1"), True).decode("utf-8", "replace")))
    return pairs


# -- one connection --------------------------------------------------------------------


def _remaining(deadline: object) -> float | None:
    """Seconds left before the runner's deadline (a socket timeout), None without one."""
    if not isinstance(deadline, (int, float)) or isinstance(deadline, bool):
        return None
    return max(deadline - time.time(), 0.01)


def _set_nodelay(sock: "_socket.socket") -> None:
    """The response leaves in one sendall; TCP_NODELAY makes sure its last segment is not
    held back waiting for an ACK (Nagle)."""
    try:
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    except OSError:  # not TCP (a unix socket in a test): nothing to tune
        pass


def _close(sock: "_socket.socket", drain: bool) -> None:
    """End the connection: FIN after the response, then close. Unread request bytes make
    close() send RST, which can destroy the response before the client read it, so any
    leftover input is drained first (bounded in bytes and time)."""
    try:
        sock.shutdown(_socket.SHUT_WR)
        if not drain:
            sock.setblocking(False)
            drain = bool(sock.recv(65536))  # anything more than the request?
        if drain:
            sock.settimeout(1.0)
            read = 0
            while read < _LINGER_BYTES and (chunk := sock.recv(65536)):
                read += len(chunk)
    except OSError:  # BlockingIOError (nothing left), timeout, reset: all fine here
        pass
    finally:
        sock.close()


def _answer(handler: "Handler", sock: "_socket.socket", msg: dict, reuse: bool,
            max_body: int) -> None:
    """Serve one HTTP request on ``sock``: read it, call the handler, send its response."""
    conn = _conn(msg)
    sock.settimeout(_remaining(conn["deadline"]))
    fields = {"remote": str(conn["remote"]), "id": str(conn["id"]),
              "deadline": conn["deadline"], "reuse": reuse, "sock": sock,
              "peer": conn["peer"], "port": conn["port"]}
    try:
        request = read_request(sock, max_body=max_body, **fields)
    except HTTPError as exc:
        _send_quietly(sock, _error(exc.status, exc.detail))
        _close(sock, drain=True)
        return
    except TimeoutError:
        _send_quietly(sock, _error(408, "the request did not arrive in time"))
        _close(sock, drain=False)
        return
    if request is None:  # connected and closed: nothing to answer
        _close(sock, drain=False)
        return
    try:
        data = render(_coerce(handler(request)), request.method == "HEAD")
    except Exception:
        _log_exception(f"request {request.id}: the handler failed; answering 500")
        data = _error(500)
    _send_quietly(sock, data)
    _close(sock, drain=False)


def _send_quietly(sock: "_socket.socket", data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError as exc:  # the client left or the deadline came: nobody to tell
        _log(f"could not send the response: {exc}")


def serve_connection(handler: "Handler", fd: int, msg: dict, *, reuse: bool = False,
                     max_body: int = MAX_BODY) -> None:
    """Serve the connection ``fd`` (which this takes over and always closes) as described
    by the conn packet ``msg``."""
    try:
        sock = _socket.socket(fileno=fd)
    except OSError as exc:  # not a socket: nothing to serve, but never leak it
        os.close(fd)
        _log(f"request {msg.get('id')}: the descriptor is not a socket ({exc})")
        return
    try:
        _set_nodelay(sock)
        _answer(handler, sock, msg, reuse, max_body)
    except OSError as exc:
        _log(f"request {msg.get('id')}: connection error: {exc}")
    except Exception:
        _log_exception(f"request {msg.get('id')}: failed")
    finally:
        sock.close()  # idempotent: _close usually did it already


# -- the control socket ----------------------------------------------------------------


def _fds(ancillary: list) -> list[int]:
    """Every descriptor in SCM_RIGHTS ancillary data (native ints, no array module)."""
    fds = []
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.extend(int.from_bytes(data[i:i + 4], sys.byteorder, signed=True)
                       for i in range(0, len(data) - len(data) % 4, 4))
    return fds


def receive(ctl: "_socket.socket") -> tuple[dict | None, int] | None:
    """The next control packet as (message or None if unreadable, descriptor or -1);
    None when the runner closed the socket (stop). Descriptors beyond the first are
    closed here, so a misbehaving sender cannot make the handler leak."""
    try:
        data, ancillary, flags, _ = ctl.recvmsg(CONTROL_PACKET, _FD_SPACE,
                                                _socket.MSG_CMSG_CLOEXEC)
    except ConnectionResetError:
        return None
    fds = _fds(ancillary)
    for extra in fds[1:]:
        os.close(extra)
    if flags & _socket.MSG_CTRUNC:
        _log("a control packet carried more descriptors than one; the rest were closed")
    fd = fds[0] if fds else -1
    if not data:  # end of stream: SEQPACKET has no empty packets worth keeping
        if fd >= 0:
            os.close(fd)
        return None
    if flags & _socket.MSG_TRUNC:
        return None, fd  # too long to be one of ours: the caller ignores it
    return parse_packet(data), fd


def parse_packet(data: bytes) -> dict | None:
    """A control packet as a dict, None if it is not a JSON object."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return None
    msg = _parse_flat(text)
    if msg is None:  # escapes or nested values: the real parser decides
        import json

        try:
            msg = json.loads(text)
        except ValueError:
            return None
    return msg if isinstance(msg, dict) else None


_WS = " \t\r\n"
_NUMBER = frozenset("+-0123456789.eE")
_CONSTANTS = (("true", True), ("false", False), ("null", None))


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _parse_flat(text: str) -> dict | None:
    """A flat JSON object of plain strings, numbers, true, false and null (every packet
    the runner sends today); None for anything else, which the caller hands to ``json``.
    This saves ``json``'s ~10 ms import on every cold start."""
    i = _skip(text, 0)
    if not text.startswith("{", i):
        return None
    out: dict = {}
    i = _skip(text, i + 1)
    if text.startswith("}", i):
        return out if _skip(text, i + 1) == len(text) else None
    while True:
        key, i = _flat_value(text, i)
        if not isinstance(key, str):
            return None
        i = _skip(text, i)
        if not text.startswith(":", i):
            return None
        value, i = _flat_value(text, _skip(text, i + 1))
        if i < 0:
            return None
        out[key] = value
        i = _skip(text, i)
        if text.startswith("}", i):
            return out if _skip(text, i + 1) == len(text) else None
        if not text.startswith(",", i):
            return None
        i = _skip(text, i + 1)


def _flat_value(text: str, i: int) -> tuple[object, int]:
    """(value, index after it) of a scalar at ``i``; index -1 when not a simple scalar."""
    if text.startswith('"', i):
        end = text.find('"', i + 1)
        value = text[i + 1:end]
        if end < 0 or "\\" in value or not value.isprintable():
            return None, -1  # escapes or control characters: not for this parser
        return value, end + 1
    for word, constant in _CONSTANTS:
        if text.startswith(word, i):
            return constant, i + len(word)
    end = i
    while end < len(text) and text[end] in _NUMBER:
        end += 1
    token = text[i:end]
    try:
        if "." in token or "e" in token or "E" in token:
            return float(token), end
        return int(token), end
    except ValueError:
        return None, -1


# -- the handler protocol's packets: the one place this side reads ``conn`` and writes
# ``done``. The runner's side: runner/handler_protocol.py; tests/fixtures/
# handler_packets.json holds both sides to the same examples.


def parse_conn(data: bytes) -> dict | None:
    """The fields of a ``conn`` packet (``id``, ``remote``, ``deadline``, ``port``,
    ``peer``), None for anything else (unknown types are ignored, as the protocol says).
    A raw (non-HTTP) handler gets the caller's identity here: ``peer`` is the VPN peer's
    name, None for a local caller; ``port`` the function's port the connection came to
    (None from a runner before protocol 1.1, which served port 80 only)."""
    return conn_fields(parse_packet(data))


def conn_fields(msg: dict | None) -> dict | None:
    """``conn_fields`` of a parsed packet: None unless it is a ``conn``; fields it does
    not know are ignored, fields it lacks have their defaults."""
    if msg is None or msg.get("type") != "conn":
        return None
    return _conn(msg)


def _conn(msg: dict) -> dict:
    port, peer = msg.get("port"), msg.get("peer")
    return {"id": msg.get("id", ""), "remote": msg.get("remote", ""),
            "deadline": msg.get("deadline"),
            "port": port if isinstance(port, int) and not isinstance(port, bool) else None,
            "peer": peer if isinstance(peer, str) else None}


def done_packet(request_id: object) -> bytes:
    """The ``done`` packet for ``request_id``, in JSON built by hand (no json import)."""
    if not isinstance(request_id, str):
        import json

        return b'{"type": "done", "id": ' + json.dumps(request_id).encode() + b"}"
    escaped = "".join(_json_char(ch) for ch in request_id)
    return f'{{"type": "done", "id": "{escaped}"}}'.encode()


def _json_char(ch: str) -> str:
    if ch in '"\\':
        return "\\" + ch
    if ch < " " or "\ud800" <= ch <= "\udfff":  # controls, and lone surrogates UTF-8 cannot carry
        return f"\\u{ord(ch):04x}"
    return ch


def connect(path: str | None = None) -> "_socket.socket":
    """The control connection: SOCK_SEQPACKET to ``path`` (default $FAAS_CONTROL_SOCKET,
    else /control.sock). Being connected tells the runner this handler is ready."""
    path = path or os.environ.get("FAAS_CONTROL_SOCKET") or DEFAULT_CONTROL_SOCKET
    ctl = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        ctl.connect(path)
    except OSError:
        ctl.close()
        raise
    return ctl


def serve(handler: "Handler", *, reuse: bool | None = None, max_body: int = MAX_BODY,
          control: str | None = None) -> None:
    """Serve connections from the runner with ``handler(request)`` until told to stop.

    ``handler`` takes a :class:`Request` and returns a :class:`Response`, a tuple
    (status, headers, body) or (status, body), a bare body, or None (204). An exception
    in it is logged to stderr and answered with 500.

    ``reuse``: after a connection, send ``done`` and wait for the next one (True), or
    return after the first (False: the process exits, always correct). Default: the
    runner's hint, env ``FAAS_REUSE`` == "1". Returns when the runner closes the control
    socket. ``max_body`` caps request bodies (413 above it); ``control`` overrides the
    control socket path.
    """
    if reuse is None:
        reuse = os.environ.get("FAAS_REUSE") == "1"
    ctl = connect(control)
    try:
        while (packet := receive(ctl)) is not None:
            msg, fd = packet
            conn = conn_fields(msg)
            if msg is None or conn is None:  # unknown types are ignored
                if fd >= 0:
                    os.close(fd)
                continue
            if fd < 0:
                _log(f"request {conn['id']}: a conn packet without a descriptor; ignored")
                continue
            serve_connection(handler, fd, msg, reuse=reuse, max_body=max_body)
            if not reuse:
                return
            try:
                ctl.sendall(done_packet(conn["id"]))
            except OSError:  # the runner is gone: that is a stop too
                return
    finally:
        ctl.close()


# -- WSGI ------------------------------------------------------------------------------


class _StartResponse:
    """PEP 3333's start_response, buffering: the response is sent whole, in one write."""

    def __init__(self) -> None:
        self.status: str | None = None
        self.headers: HeaderList = []
        self.chunks: list[bytes] = []
        self.body_started = False

    def __call__(self, status: str, headers: "HeaderList",
                 exc_info: object = None) -> "Callable[[bytes], None]":
        if exc_info:
            try:
                if self.body_started:  # too late to change the status: re-raise (PEP 3333)
                    raise exc_info[1].with_traceback(exc_info[2])  # type: ignore[index]
            finally:
                exc_info = None  # no cycle through the traceback
        elif self.status is not None:
            raise AssertionError("start_response called a second time without exc_info")
        if not isinstance(status, str) or not all(
                isinstance(h, tuple) and len(h) == 2 and all(isinstance(v, str) for v in h)
                for h in headers):
            raise TypeError("start_response wants a str status and a list of (str, str)")
        _status_line(status)  # checked now, where the application's traceback is useful
        self.status, self.headers = status, list(headers)
        return self.write

    def write(self, data: bytes) -> None:
        """The legacy write() callable (and where the iterable's chunks go)."""
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"a WSGI body chunk must be bytes, not {type(data).__name__}")
        if self.status is None:
            raise AssertionError("body data before start_response")
        if data:
            self.body_started = True
            self.chunks.append(bytes(data))


def _split_host(host: str, default_port: str) -> tuple[str, str]:
    """("example.org", "8080") from a Host header, IPv6 literals included."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else default_port
    name, colon, port = host.rpartition(":")
    return (name, port) if colon and port.isdigit() else (host, default_port)


def _addresses(sock: "_socket.socket | None") -> tuple[tuple, tuple]:
    """(local, peer) IP addresses of the connection; placeholders when it has none."""
    local: tuple = ("localhost", 80)
    peer: tuple = ("", "")
    try:
        if sock is not None and sock.family in (_socket.AF_INET, _socket.AF_INET6):
            local, peer = sock.getsockname(), sock.getpeername()
    except OSError:  # the client is already gone: the placeholders will do
        pass
    return local, peer


def environ(request: Request) -> dict:
    """The PEP 3333 environ of ``request``."""
    import io  # already loaded by the interpreter: this costs a lookup

    local, peer = _addresses(request.sock)
    server_name, server_port = _split_host(request.headers.get("host", ""), str(local[1]))
    env = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        # WSGI strings are bytes as latin-1 (PEP 3333 "native strings")
        "PATH_INFO": _unquote(request.target.partition("?")[0].encode("latin-1")).decode("latin-1"),
        "QUERY_STRING": request.query_string,
        "SERVER_NAME": server_name or str(local[0]),
        "SERVER_PORT": server_port,
        "SERVER_PROTOCOL": request.version,
        "REMOTE_ADDR": request.remote or str(peer[0]),
        "REMOTE_PORT": str(peer[1]),
        "REQUEST_URI": request.target,
        "RAW_URI": request.target,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(request.body),
        "wsgi.input_terminated": True,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": not request.reuse,
        "faas.request": request,
        "faas.id": request.id,
        "faas.deadline": request.deadline,
        "faas.peer": request.peer,
        "faas.port": request.port,
    }
    if request.peer:  # who is calling, as a front server that authenticated them says
        env["REMOTE_USER"] = request.peer
    if "content-type" in request.headers:
        env["CONTENT_TYPE"] = request.headers["content-type"]
    if request.body or "content-length" in request.headers:
        env["CONTENT_LENGTH"] = str(len(request.body))  # chunked bodies are read whole too
    for name, value in request.header_list:
        if "_" in name:  # "X_Forwarded_For" would pose as X-Forwarded-For: dropped, as nginx does
            continue
        key = "HTTP_" + name.upper().replace("-", "_")
        if key not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
            env[key] = f"{env[key]},{value}" if key in env else value
    return env


def wsgi(app: "Callable[[dict, Callable], Iterable[bytes]]") -> "Handler":
    """A handler that runs the WSGI application ``app`` (Flask, Django, Bottle...) on each
    request: PEP 3333 environ, start_response with exc_info, the iterable collected and
    its close() called; the response is sent whole, in one write."""

    def handle(request: Request) -> Response:
        start_response = _StartResponse()
        result = app(environ(request), start_response)
        try:
            for chunk in result:
                start_response.write(chunk)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if start_response.status is None:
            raise AssertionError("the WSGI application never called start_response")
        return Response(b"".join(start_response.chunks), start_response.status,
                        start_response.headers)

    handle.__name__ = handle.__qualname__ = f"wsgi({getattr(app, '__name__', 'app')})"
    return handle


# -- command line ----------------------------------------------------------------------


def _load(spec: str) -> object:
    """The object ``module:attribute`` names (``module`` alone means ``module:handle``)."""
    module_name, _, attribute = spec.partition(":")
    __import__(module_name)
    obj: object = sys.modules[module_name]
    for part in (attribute or "handle").split("."):
        obj = getattr(obj, part)
    return obj


def main(argv: list[str] | None = None) -> int:
    """``python3 -m faas_handler [--wsgi] [--reuse|--no-reuse] module:callable``."""
    args = list(sys.argv[1:] if argv is None else argv)
    as_wsgi = "--wsgi" in args
    reuse = True if "--reuse" in args else False if "--no-reuse" in args else None
    specs = [a for a in args if not a.startswith("--")]
    if len(specs) != 1 or len(specs) + as_wsgi + (reuse is not None) != len(args):
        sys.stderr.write("usage: python3 -m faas_handler [--wsgi] [--reuse|--no-reuse] "
                         "module:callable\n")
        return 2
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the working dir's modules, as `python -m` would
    target = _load(specs[0])
    serve(wsgi(target) if as_wsgi else target, reuse=reuse)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
