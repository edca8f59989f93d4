"""The SDK in-process: HTTP parsing, responses, packets, errors, the one-write rule."""

import _socket
import json
import socket
import types
from collections.abc import Iterator

import faas_handler as fh
import pytest
from sdk_harness import FakeRunner, get, parse_reply, recv_all


def read(raw: bytes, **kwargs: object) -> fh.Request | None:
    """read_request() on a socketpair fed with ``raw`` (then EOF)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(raw)
        ours.shutdown(socket.SHUT_WR)
        theirs.settimeout(5)
        return fh.read_request(theirs, **kwargs)


# -- requests ----------------------------------------------------------------------------


def test_request_line_query_and_headers() -> None:
    request = read(b"GET /a%20b/c?n=10&x=1&x=2&q=a+b%2Bc&flag HTTP/1.1\r\nHost: fn.faas\r\n"
                   b"Accept: a\r\naccept: b\r\nX-Empty:\r\n\r\n", remote="::1", id="r")
    assert request is not None
    assert (request.method, request.target, request.version) == (
        "GET", "/a%20b/c?n=10&x=1&x=2&q=a+b%2Bc&flag", "HTTP/1.1")
    assert request.path == "/a b/c"
    assert request.query_string == "n=10&x=1&x=2&q=a+b%2Bc&flag"
    assert request.query == {"n": "10", "x": "2", "q": "a b+c", "flag": ""}
    assert request.query_items[1:3] == [("x", "1"), ("x", "2")]
    assert request.headers == {"host": "fn.faas", "accept": "a, b", "x-empty": ""}
    assert request.header_list[1:3] == [("Accept", "a"), ("accept", "b")]
    assert (request.body, request.remote, request.id) == (b"", "::1", "r")


def test_content_length_body_and_bare_lf() -> None:
    request = read(b"POST /p HTTP/1.0\nContent-Length: 5\nContent-Type: text/plain\n\nhelloEXTRA")
    assert request is not None and request.body == b"hello" and request.text == "hello"
    assert request.version == "HTTP/1.0"


def test_json_body() -> None:
    request = read(b'POST / HTTP/1.1\r\nContent-Length: 8\r\n\r\n{"a": 1}')
    assert request is not None and request.json() == {"a": 1}


def test_chunked_body() -> None:
    request = read(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"3\r\nabc\r\nA\r\n0123456789\r\n0\r\n\r\n")
    assert request is not None and request.body == b"abc0123456789"


def test_client_that_sends_nothing() -> None:
    assert read(b"") is None


@pytest.mark.parametrize(("raw", "status"), [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"GET / FTP/1.0\r\n\r\n", 400),
    (b"GET nopath HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nNo-Colon\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n65\r\n" + b"x" * 101, 413),
    (b"GET / HTTP/1.1\r\nHost: x", 400),
])
def test_bad_requests(raw: bytes, status: int) -> None:
    with pytest.raises(fh.HTTPError) as caught:
        read(raw, max_body=100)
    assert caught.value.status == status


def test_head_too_large_is_431() -> None:
    with pytest.raises(fh.HTTPError) as caught:
        read(b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"a" * (fh.MAX_HEAD + 10) + b"\r\n\r\n")
    assert caught.value.status == 431


def test_absolute_form_target() -> None:
    request = read(b"GET http://fn.faas/x?y=1 HTTP/1.1\r\n\r\n")
    assert request is not None and (request.path, request.query) == ("/x", {"y": "1"})


# -- responses ---------------------------------------------------------------------------


def split(data: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    return status, {k.lower(): v for k, _, v in (line.partition(": ") for line in lines)}, body


@pytest.mark.parametrize(("result", "status", "body", "content_type"), [
    ((200, {"X-A": "1"}, "hé"), "HTTP/1.1 200 OK", "hé".encode(), "text/plain; charset=utf-8"),
    ((404, "nope"), "HTTP/1.1 404 Not Found", b"nope", "text/plain; charset=utf-8"),
    (b"\x00raw", "HTTP/1.1 200 OK", b"\x00raw", "application/octet-stream"),
    ({"a": [1]}, "HTTP/1.1 200 OK", b'{"a": [1]}', "application/json"),
    (None, "HTTP/1.1 204 No Content", b"", None),
    (fh.Response("x", "299 Custom Thing", [("Content-Type", "a/b")]),
     "HTTP/1.1 299 Custom Thing", b"x", "a/b"),
    (("418", "tea"), "HTTP/1.1 418 I'm a Teapot", b"tea", "text/plain; charset=utf-8"),
])
def test_render(result: object, status: str, body: bytes, content_type: str | None) -> None:
    line, headers, sent = split(fh.render(fh._coerce(result)))
    assert line == status
    assert sent == body
    assert headers.get("content-type") == content_type
    assert headers["connection"] == "close"
    assert headers["date"].endswith(" GMT")
    assert headers.get("content-length") == (str(len(body)) if line[9:12] != "204" else None)


def test_render_owns_framing_headers() -> None:
    response = fh.Response(b"abc", 200, {"Content-Length": "99", "Connection": "keep-alive",
                                         "Transfer-Encoding": "chunked"})
    _, headers, body = split(fh.render(response))
    assert (headers["content-length"], headers["connection"], body) == ("3", "close", b"abc")
    assert "transfer-encoding" not in headers


def test_render_head_keeps_the_length_and_drops_the_body() -> None:
    _, headers, body = split(fh.render(fh.Response(b"abcdef"), head_only=True))
    assert (headers["content-length"], body) == ("6", b"")
    _, headers, _ = split(fh.render(fh.Response(b"", 200, {"Content-Length": "42"}), True))
    assert headers["content-length"] == "42"


@pytest.mark.parametrize("bad", [
    fh.Response("x", 200, {"X-A": "a\r\nInjected: 1"}),
    fh.Response("x", 200, {"Bad Name": "1"}),
    fh.Response("x", 99),
    fh.Response("x", "20 OK"),
    fh.Response(3.5),
])
def test_render_refuses_bad_responses(bad: fh.Response) -> None:
    with pytest.raises((ValueError, TypeError)):
        fh.render(bad)


# -- packets -----------------------------------------------------------------------------


@pytest.mark.parametrize("message", [
    {"type": "conn", "id": "a1", "remote": "2001:db8::1", "deadline": 1700000000.125},
    {"type": "conn", "id": "é\"\\\n\t", "deadline": 17, "x": None, "y": True, "z": -1e3},
    {"type": "future", "nested": {"a": [1, {"b": 2}]}},
    {},
])
def test_packets_parse_like_json(message: dict) -> None:
    assert fh.parse_packet(json.dumps(message).encode()) == message
    assert fh.parse_packet(json.dumps(message, separators=(",", ":")).encode()) == message


@pytest.mark.parametrize("data", [b"", b"\xff", b"[1]", b'"s"', b"{", b'{"a" 1}', b'{"a": 1,}',
                                  b'{"a": 1} x', b"null"])
def test_packets_that_are_not_objects(data: bytes) -> None:
    assert fh.parse_packet(data) is None


@pytest.mark.parametrize("rid", ["r1", "", "é ☃", 'q"b\\s', "\x00\x1f\ud800", "x" * 1000])
def test_done_packet_is_json_with_the_same_id(rid: str) -> None:
    packet = fh.done_packet(rid)
    assert json.loads(packet.decode("utf-8")) == {"type": "done", "id": rid}


# -- serving, in this process ------------------------------------------------------------


@pytest.fixture
def served(runner: FakeRunner) -> Iterator[FakeRunner]:
    """serve() of a test handler in a thread, reuse on."""

    def handle(request: fh.Request) -> object:
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        if request.path == "/nodelay":
            return str(request.sock.getsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY))
        return 200, [("X-Len", str(len(request.body)))], request.body or b"empty"

    runner.start_thread(fh.serve, handler=handle, reuse=True, max_body=1000)
    runner.accept()
    yield runner
    runner.stop()


def test_handler_exception_is_500_and_the_loop_goes_on(served: FakeRunner,
                                                       capfd: pytest.CaptureFixture) -> None:
    reply = served.request(get("/boom"), rid="bad")
    assert reply.status == 500
    served.expect_done("bad")
    assert "RuntimeError: handler bug" in capfd.readouterr().err
    reply = served.request(get("/fine"), rid="good")
    assert (reply.status, reply.body) == (200, b"empty")
    served.expect_done("good")


def test_tcp_nodelay_is_set(served: FakeRunner) -> None:
    assert served.request(get("/nodelay"), rid="n").body == b"1"
    served.expect_done("n")


def test_expect_100_continue(served: FakeRunner) -> None:
    client = served.connect(rid="c")
    with client:
        client.sendall(b"POST / HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert client.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.sendall(b"data")
        assert b"\r\n\r\ndata" in client.recv(65536)
    served.expect_done("c")


def test_body_over_the_cap_is_413(served: FakeRunner) -> None:
    reply = served.request(b"POST / HTTP/1.1\r\nContent-Length: 1001\r\n\r\n" + b"x" * 1001,
                           rid="big")
    assert reply.status == 413
    served.expect_done("big")
    reply = served.request(b"POST / HTTP/1.1\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000,
                           rid="ok")
    assert (reply.status, reply.headers["x-len"]) == (200, "1000")
    served.expect_done("ok")


def test_head_request(served: FakeRunner) -> None:
    reply_raw = served.connect(rid="h")
    with reply_raw:
        reply_raw.sendall(b"HEAD / HTTP/1.1\r\n\r\n")
        data = b"".join(iter(lambda: reply_raw.recv(65536), b""))
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\n")
    assert b"Content-Length: 5\r\n" in data
    served.expect_done("h")


def test_a_conn_without_descriptor_and_a_non_socket_are_survived(served: FakeRunner) -> None:
    served.send({"type": "conn", "id": "nofd"})
    import os

    read_end, write_end = os.pipe()
    served.send({"type": "conn", "id": "pipe"}, [write_end])
    os.close(write_end)
    assert served.packet() == {"type": "done", "id": "pipe"}  # served nothing, but done
    os.close(read_end)
    assert served.request(get("/"), rid="after").status == 200
    served.expect_done("after")


def test_conn_without_deadline_on_a_nonblocking_socket(served: FakeRunner) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        server, _ = listener.accept()
    server.setblocking(False)  # what the runner hands over; no deadline: plain blocking IO
    served.send({"type": "conn", "id": "nd"}, [server.fileno()])
    server.close()
    with client:
        client.sendall(get("/x")[:10])  # in two parts: the handler must wait, not fail
        client.sendall(get("/x")[10:])
        reply = parse_reply(recv_all(client))
    assert (reply.status, reply.body) == (200, b"empty")
    served.expect_done("nd")


class Recorder:
    """Every sendall/send/sendmsg the SDK makes on TCP sockets, via a _socket stand-in."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.options: list[tuple[int, int, int]] = []
        recorder = self

        class Socket(_socket.socket):
            def _tcp(self) -> bool:
                return self.family in (_socket.AF_INET, _socket.AF_INET6)

            def sendall(self, data: bytes, *args: object) -> None:
                if self._tcp():
                    recorder.calls.append(("sendall", bytes(data)))
                return super().sendall(data, *args)

            def send(self, data: bytes, *args: object) -> int:
                if self._tcp():
                    recorder.calls.append(("send", bytes(data)))
                return super().send(data, *args)

            def sendmsg(self, *args: object) -> int:
                if self._tcp():
                    recorder.calls.append(("sendmsg", b""))
                return super().sendmsg(*args)

            def setsockopt(self, *args: int) -> None:
                if self._tcp():
                    recorder.options.append(args)
                return super().setsockopt(*args)

        self.module = types.ModuleType("_socket")
        self.module.__dict__.update(vars(_socket))
        self.module.socket = Socket


def test_the_response_leaves_in_one_write(runner: FakeRunner,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder()
    monkeypatch.setattr(fh, "_socket", recorder.module)
    body = "x" * 100_000
    runner.start_thread(fh.serve, handler=lambda request: (200, {"X-A": "b"}, body), reuse=True)
    runner.accept()
    reply = runner.request(get("/"), rid="one")
    runner.expect_done("one")
    runner.stop()
    assert reply.status == 200 and reply.body == body.encode()
    assert [name for name, _ in recorder.calls] == ["sendall"]  # status, headers, body: one
    assert recorder.calls[0][1] == reply.raw
    assert (_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1) in recorder.options
