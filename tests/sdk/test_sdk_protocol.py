"""The handler protocol end to end: the examples as real processes, a fake runner."""

import os
import time

from sdk_harness import EXAMPLES, FakeRunner, closed_by_peer, fd_count, get

FIBONACCI = EXAMPLES / "fibonacci" / "handler.py"
ECHO = EXAMPLES / "echo" / "handler.py"
FIRST_TEN = b"0, 1, 1, 2, 3, 5, 8, 13, 21, 34\n"


def test_fibonacci_one_shot_answers_and_exits(runner: FakeRunner) -> None:
    proc = runner.start_python(FIBONACCI)
    runner.accept()
    reply = runner.request(get("/?n=10"))
    assert reply.status == 200
    assert reply.body == FIRST_TEN
    assert reply.headers["connection"] == "close"
    assert reply.headers["content-type"].startswith("text/plain")
    assert proc.wait(10) == 0  # one-shot: exiting is its done
    assert runner.packet() is None  # and it said nothing else


def test_fibonacci_bad_n_is_400(runner: FakeRunner) -> None:
    runner.start_python(FIBONACCI, reuse=True)
    runner.accept()
    for target in ("/?n=abc", "/?n=-1", "/?n=1001", "/?n=%C2%B2", "/?n="):
        reply = runner.request(get(target), rid=target)
        assert reply.status == 400, target
        assert b"n must be a whole number from 0 to 1000" in reply.body
        runner.expect_done(target)
    reply = runner.request(get("/"), rid="default")
    assert (reply.status, reply.body) == (200, FIRST_TEN)  # n defaults to 10
    runner.expect_done("default")
    reply = runner.request(get("/?n=0"), rid="zero")
    assert (reply.status, reply.body) == (200, b"\n")
    runner.expect_done("zero")
    reply = runner.request(get("/?n=1000"), rid="max")
    assert reply.status == 200 and reply.body.count(b", ") == 999
    runner.expect_done("max")
    reply = runner.request(b"POST /?n=3 HTTP/1.1\r\nContent-Length: 0\r\n\r\n", rid="post")
    assert reply.status == 405 and reply.headers["allow"] == "GET, HEAD"
    runner.expect_done("post")
    assert runner.stop() == 0


def test_reuse_serves_two_connections_with_done_after_each(runner: FakeRunner) -> None:
    proc = runner.start_python(FIBONACCI, reuse=True)
    runner.accept()
    assert runner.request(get("/?n=3"), rid="first").body == b"0, 1, 1\n"
    runner.expect_done("first")
    reply = runner.request(get("/?n=4"), rid="second", blocking=True)  # either mode works
    assert reply.body == b"0, 1, 1, 2\n"
    runner.expect_done("second")
    assert proc.poll() is None  # still there, waiting for the next conn
    assert runner.stop() == 0  # closing the control socket: stop


def test_extra_descriptors_are_closed_and_never_leak(runner: FakeRunner) -> None:
    proc = runner.start_python(FIBONACCI, reuse=True)
    runner.accept()
    runner.request(get("/?n=1"), rid="warm")
    runner.expect_done("warm")
    baseline = fd_count(proc.pid)
    for i in range(50):
        read_end, write_end = os.pipe()
        extra = [write_end, os.open(os.devnull, os.O_RDONLY)] if i % 2 else [write_end]
        try:
            reply = runner.request(get("/?n=2"), extra_fds=extra, rid=f"r{i}")
        finally:
            for fd in extra:
                os.close(fd)
        assert (reply.status, reply.body) == (200, b"0, 1\n")
        runner.expect_done(f"r{i}")
        assert closed_by_peer(read_end), "the handler kept the extra descriptor"
        os.close(read_end)
    assert fd_count(proc.pid) <= baseline
    assert runner.stop() == 0


def test_unknown_packets_are_ignored(runner: FakeRunner) -> None:
    proc = runner.start_python(FIBONACCI, reuse=False)
    runner.accept()
    read_end, write_end = os.pipe()
    runner.send({"type": "hello", "version": 2})
    runner.send({"type": "future", "nested": {"a": [1, 2]}, "id": "x\"y"}, fds=[write_end])
    os.close(write_end)
    runner.send(b"\xff not json")
    runner.send([1, 2, 3])
    runner.send({"no": "type"})
    assert closed_by_peer(read_end), "the fd of an unknown packet was kept"
    os.close(read_end)
    assert proc.poll() is None  # a one-shot handler is still waiting for its conn
    assert runner.request(get("/?n=5")).body == b"0, 1, 1, 2, 3\n"
    assert proc.wait(10) == 0


def test_closing_the_control_socket_stops_the_handler(runner: FakeRunner) -> None:
    proc = runner.start_python(FIBONACCI, reuse=True)
    runner.accept()
    assert proc.poll() is None
    assert runner.stop() == 0


def test_one_shot_handler_stops_before_any_connection(runner: FakeRunner) -> None:
    runner.start_python(FIBONACCI, reuse=False)
    runner.accept()
    assert runner.stop() == 0


def test_deadline_bounds_a_silent_client(runner: FakeRunner) -> None:
    runner.start_python(ECHO, reuse=True)
    runner.accept()
    client = runner.connect(rid="slow", deadline=time.time() + 0.5)
    with client:  # sends nothing: the handler's read times out at the deadline
        data = client.recv(65536)
    assert data.startswith(b"HTTP/1.1 408 ")
    runner.expect_done("slow")
    assert runner.stop() == 0


def test_echo_returns_the_request(runner: FakeRunner) -> None:
    runner.start_python(ECHO, reuse=False)
    runner.accept()
    body = b"hello\x00binary\xff"
    raw = (b"PUT /some/path?x=1&y=%20 HTTP/1.1\r\nHost: echo.faas\r\nX-Custom: A b\r\n"
           + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    reply = runner.request(raw, rid="echo-1")
    assert reply.status == 200
    assert reply.headers["x-request-id"] == "echo-1"
    assert reply.headers["x-remote"] == "127.0.0.1"
    head, _, echoed = reply.body.partition(b"\n\n")
    assert head.split(b"\n") == [b"PUT /some/path?x=1&y=%20 HTTP/1.1", b"Host: echo.faas",
                                 b"X-Custom: A b", b"Content-Length: %d" % len(body)]
    assert echoed == body
    assert runner.proc is not None and runner.proc.wait(10) == 0


def test_echo_reads_chunked_bodies(runner: FakeRunner) -> None:
    runner.start_python(ECHO)
    runner.accept()
    raw = (b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: x\r\n\r\n")
    reply = runner.request(raw)
    assert reply.status == 200
    assert reply.body.endswith(b"\n\nhello, world")
