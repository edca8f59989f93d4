"""wsgi(app): a plain PEP 3333 application served through the SDK."""

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import faas_handler as fh
import pytest
from sdk_harness import SDK_DIR, FakeRunner, get

KEYS = ("REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "CONTENT_TYPE",
        "CONTENT_LENGTH", "SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL", "REMOTE_ADDR",
        "HTTP_HOST", "HTTP_X_CUSTOM", "HTTP_ACCEPT", "wsgi.url_scheme", "wsgi.multithread",
        "wsgi.multiprocess", "wsgi.run_once", "faas.id")


class Body:
    """An iterable with close(), to check the adapter calls it."""

    closed = 0

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        Body.closed += 1


def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
    """Reports what it saw: the environ keys above and the body it read."""
    path = environ["PATH_INFO"]
    if path == "/error-after-start":
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("late")
        except ValueError:
            start_response("503 Service Unavailable", [("Retry-After", "1")], sys.exc_info())
        return [b"try later"]
    if path == "/str-chunk":
        start_response("200 OK", [])
        return ["not bytes"]
    if path == "/no-start":
        return []
    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written ")
        return Body([b"and ", b"", b"returned"])
    length = int(environ.get("CONTENT_LENGTH") or 0)
    seen = {key: environ.get(key) for key in KEYS}
    seen["body"] = environ["wsgi.input"].read(length).decode()
    seen["errors_is_stderr"] = environ["wsgi.errors"] is sys.stderr
    out = json.dumps(seen).encode()
    start_response("201 Created", [("Content-Type", "application/json"), ("X-App", "yes")])
    return Body([out[:10], out[10:]])


@pytest.fixture
def wsgi_runner(runner: FakeRunner) -> Iterator[FakeRunner]:
    runner.start_thread(fh.serve, handler=fh.wsgi(app), reuse=True)
    runner.accept()
    yield runner
    runner.stop()


def test_post_with_body_and_query(wsgi_runner: FakeRunner) -> None:
    Body.closed = 0
    raw = (b"POST /sub%20mit/x?a=1&b=two%20words HTTP/1.1\r\nHost: fn.faas:8080\r\n"
           b"X-Custom: one\r\nX-Custom: two\r\nX_Custom: spoof\r\nAccept: */*\r\n"
           b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 11\r\n\r\n"
           b"hello=world")
    reply = wsgi_runner.request(raw, rid="w1")
    wsgi_runner.expect_done("w1")
    assert reply.status == 201
    assert reply.headers["x-app"] == "yes"
    assert reply.headers["content-type"] == "application/json"
    assert json.loads(reply.body) == {
        "REQUEST_METHOD": "POST", "SCRIPT_NAME": "", "PATH_INFO": "/sub mit/x",
        "QUERY_STRING": "a=1&b=two%20words",
        "CONTENT_TYPE": "application/x-www-form-urlencoded", "CONTENT_LENGTH": "11",
        "SERVER_NAME": "fn.faas", "SERVER_PORT": "8080", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "fn.faas:8080", "HTTP_X_CUSTOM": "one,two",
        "HTTP_ACCEPT": "*/*", "wsgi.url_scheme": "http", "wsgi.multithread": False,
        "wsgi.multiprocess": True, "wsgi.run_once": False, "faas.id": "w1",
        "body": "hello=world", "errors_is_stderr": True,
    }
    assert Body.closed == 1


def test_get_without_body(wsgi_runner: FakeRunner) -> None:
    reply = wsgi_runner.request(b"GET / HTTP/1.0\r\n\r\n", rid="w2")
    wsgi_runner.expect_done("w2")
    seen = json.loads(reply.body)
    assert (seen["CONTENT_LENGTH"], seen["CONTENT_TYPE"], seen["body"]) == (None, None, "")
    assert (seen["SERVER_NAME"], seen["SERVER_PROTOCOL"]) == ("127.0.0.1", "HTTP/1.0")
    assert seen["SERVER_PORT"].isdigit()


def test_write_callable_and_iterable_are_joined(wsgi_runner: FakeRunner) -> None:
    reply = wsgi_runner.request(get("/write"), rid="w3")
    wsgi_runner.expect_done("w3")
    assert (reply.status, reply.body) == (200, b"written and returned")


def test_exc_info_replaces_headers_not_yet_sent(wsgi_runner: FakeRunner) -> None:
    reply = wsgi_runner.request(get("/error-after-start"), rid="w4")
    wsgi_runner.expect_done("w4")
    assert (reply.status, reply.headers["retry-after"], reply.body) == (503, "1", b"try later")


@pytest.mark.parametrize("path", ["/str-chunk", "/no-start"])
def test_broken_applications_get_500(wsgi_runner: FakeRunner, path: str) -> None:
    reply = wsgi_runner.request(get(path), rid=path)
    wsgi_runner.expect_done(path)
    assert reply.status == 500


def test_start_response_rules() -> None:
    start = fh._StartResponse()
    start("200 OK", [("A", "b")])
    with pytest.raises(AssertionError):
        start("200 OK", [])  # twice without exc_info
    start.write(b"body")
    try:
        raise KeyError("boom")
    except KeyError:
        with pytest.raises(KeyError):  # body started: exc_info is re-raised
            start("500 Internal Server Error", [], sys.exc_info())
    with pytest.raises(TypeError):
        fh._StartResponse()("200 OK", [("A", 1)])
    with pytest.raises(ValueError):
        fh._StartResponse()("OK", [])


def test_run_once_follows_reuse() -> None:
    request = fh.Request("GET", "/", "HTTP/1.1", [], reuse=False)
    assert fh.environ(request)["wsgi.run_once"] is True
    request.reuse = True
    assert fh.environ(request)["wsgi.run_once"] is False


TINY_APP = '''
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [environ["QUERY_STRING"].encode(), b" ", str(environ["wsgi.run_once"]).encode()]
'''


def test_command_line_serves_a_wsgi_app(runner: FakeRunner, tmp_path: Path) -> None:
    (tmp_path / "tinyapp.py").write_text(TINY_APP)
    proc = runner.start([sys.executable, "-m", "faas_handler", "--wsgi", "tinyapp:app"],
                        env={"PYTHONPATH": f"{SDK_DIR}:{tmp_path}"})
    runner.accept()
    reply = runner.request(get("/?q=1"))
    assert (reply.status, reply.body) == (200, b"q=1 True"), runner.stderr()
    assert proc.wait(10) == 0


def test_command_line_usage_error(runner: FakeRunner) -> None:
    proc = runner.start([sys.executable, "-m", "faas_handler", "--bogus", "x:y"])
    assert proc.wait(10) == 2
    assert "usage:" in runner.stderr()


def test_environ_of_a_request_without_a_tcp_socket() -> None:
    import socket

    ours, theirs = socket.socketpair()
    with ours, theirs:
        request = fh.Request("GET", "/p?q", "HTTP/1.1", [("Host", "[::1]:81")], sock=theirs)
        env = fh.environ(request)
    assert (env["SERVER_NAME"], env["SERVER_PORT"], env["PATH_INFO"]) == ("::1", "81", "/p")
    assert env["REMOTE_PORT"] == ""


def _serve_one(handler: Callable, msg: dict) -> bytes:
    """One request over real loopback TCP, served by serve_connection as ``msg`` says."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        with client:
            client.sendall(b"GET /who HTTP/1.1\r\nHost: fn\r\nRemote-User: mallory\r\n\r\n")
            fh.serve_connection(handler, conn.detach(), msg)
            data = b""
            while chunk := client.recv(65536):
                data += chunk
            return data


def who(environ: dict, start_response: Callable) -> Iterable[bytes]:
    seen = {k: environ.get(k, "absent") for k in ("REMOTE_USER", "faas.peer", "faas.port")}
    seen["request"] = [environ["faas.request"].peer, environ["faas.request"].port]
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(seen).encode()]


def test_the_calling_peer_is_remote_user_and_the_port_is_faas_port() -> None:
    msg = {"type": "conn", "id": "w1", "remote": "fd00:faa5:0:100::2", "deadline": None,
           "port": 5432, "peer": "laptop"}
    body = _serve_one(fh.wsgi(who), msg).partition(b"\r\n\r\n")[2]
    assert json.loads(body) == {"REMOTE_USER": "laptop", "faas.peer": "laptop",
                                "faas.port": 5432, "request": ["laptop", 5432]}


def test_a_local_caller_has_no_remote_user_even_if_a_header_says_so() -> None:
    msg = {"type": "conn", "id": "w2", "remote": "::1", "deadline": None, "port": 80,
           "peer": None}
    body = _serve_one(fh.wsgi(who), msg).partition(b"\r\n\r\n")[2]
    # the client's Remote-User header is HTTP_REMOTE_USER, never REMOTE_USER
    assert json.loads(body) == {"REMOTE_USER": "absent", "faas.peer": None, "faas.port": 80,
                                "request": [None, 80]}


def test_a_runner_before_1_1_leaves_peer_and_port_none() -> None:
    msg = {"type": "conn", "id": "w3", "remote": "::1", "deadline": None}
    body = _serve_one(fh.wsgi(who), msg).partition(b"\r\n\r\n")[2]
    assert json.loads(body) == {"REMOTE_USER": "absent", "faas.peer": None,
                                "faas.port": None, "request": [None, None]}
