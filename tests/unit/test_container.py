"""runner/container.py with a plain process in place of the runtime: the control socket,
the hand-over, the request's end ("done", "exited", "timeout"), the output pumps and
their request ids, the clean-up. The same code under runc and crun: tests/integration."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from common.proc import adopt_orphans
from runner import container as container_mod
from runner.container import Container, LinePump
from runner.runtime import Runtime

HANDLER = r"""
import json, os, socket, sys, time
print("started", flush=True)  # before it is ready: no request's
ctl = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
ctl.connect(sys.argv[1])
while True:
    msg, fds, _, _ = socket.recv_fds(ctl, 4096, 1)
    if not msg:
        sys.exit(0)
    req = json.loads(msg)
    conn = socket.socket(fileno=fds[0])
    path = conn.recv(4096).split()[1].decode()
    print(f"request {req['id']}", file=sys.stderr, flush=True)
    if path == "/exit":
        sys.exit(3)
    if path == "/hang":
        time.sleep(60)
    if path == "/long":
        sys.stderr.write("x" * 40000 + "\nafter\ntail-without-newline")
        sys.stderr.flush()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    conn.close()
    ctl.send(json.dumps({"type": "done", "id": req["id"]}).encode())
"""


# `run --detach --pid-file F ...`: start the handler, write its pid, exit
LAUNCH = r"""
import subprocess, sys
pid = subprocess.Popen([sys.executable, "-c", sys.argv[3], sys.argv[2]]).pid
open(sys.argv[1], "w").write(str(pid))
"""


class PlainRuntime(Runtime):
    """The production Runtime (spawn_run, kill, delete) with the handler as a plain
    process in place of the runtime's argv: started detached (as runc is), or as the
    runtime's own process (as crun is)."""

    def __init__(self, ctl_dir: Path, detach: bool = True):
        super().__init__("plain", root=str(ctl_dir / "state"))
        self.ctl_dir = ctl_dir
        self.detach = detach

    def run_argv(self, bundle: str, container_id: str, pidfile: str | None = None
                 ) -> list[str]:
        ctl = str(self.ctl_dir / f"{container_id}.sock")
        assert (pidfile is not None) == self.detach
        if pidfile is not None:
            return [sys.executable, "-c", LAUNCH, pidfile, ctl, HANDLER]
        return [sys.executable, "-c", HANDLER, ctl]

    def kill_argv(self, container_id: str, signal: str) -> list[str]:
        return ["true"]  # the process goes with its control socket

    def delete_argv(self, container_id: str) -> list[str]:
        return ["true"]


@pytest.fixture(autouse=True)
def subreaper():
    """As the runner: the detached handlers become our children when LAUNCH exits."""
    adopt_orphans()
    yield
    adopt_orphans(False)


class Lines:
    def __init__(self) -> None:
        self.got: list[tuple[str, str | None, str]] = []

    def __call__(self, cid: str, stream: str, rid: str | None, lines: list[str]) -> None:
        self.got.extend((stream, rid, line) for line in lines)


def make(tmp_path: Path, sink: Lines, detach: bool = True) -> Container:
    (tmp_path / "bundles").mkdir(exist_ok=True)
    (tmp_path / "ctl").mkdir(exist_ok=True)
    return Container("fn", str(tmp_path / "bundles"), str(tmp_path / "ctl"),
                     PlainRuntime(tmp_path / "ctl", detach),
                     lambda cid, ctl: {"ociVersion": "1.0.2"}, sink)


async def started(tmp_path: Path, sink: Lines, detach: bool = True) -> Container:
    """A container whose handler has connected to its control socket."""
    c = make(tmp_path, sink, detach)
    await c.start()
    await c.ready(10)
    return c


async def request(c: Container, path: str, rid: str) -> tuple[asyncio.Future[str], socket.socket]:
    """Hand over one end of a socket pair carrying ``GET path``; the request's end as a
    future, and our end."""
    ours, theirs = socket.socketpair()
    ours.sendall(f"GET {path} HTTP/1.1\r\n\r\n".encode())
    ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    c.hand_over(theirs, rid, "fd00::1", 0.0)
    theirs.close()
    c.await_result(ended.set_result)
    return ended, ours


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.mark.parametrize("detach", [True, False], ids=["detached", "foreground"])
def test_reused_requests_end_with_done_and_their_output_carries_their_id(tmp_path, detach):
    async def main() -> None:
        sink = Lines()
        c = await started(tmp_path, sink, detach)
        for rid in ("aaaa", "bbbb"):
            ended, ours = await request(c, "/", rid)
            assert await ended == "done"
            assert ours.recv(4096).endswith(b"ok")
            # drained when `done` came, so tagged with the request, not the next one
            assert ("stderr", rid, f"request {rid}") in sink.got
        assert c.served == 2 and c.alive
        pid = c.pid or c.proc.pid  # the adopted init (detached), or our child
        await c.stop()
        assert not os.path.exists(c.bundle) and not os.path.exists(c.ctl_path)
        assert not os.path.exists(f"/proc/{pid}")  # reaped: no zombie
        assert all(p.closed.done() for p in c._pumps)
        assert ("stdout", None, "started") in sink.got
    run(main())


@pytest.mark.parametrize("detach", [True, False], ids=["detached", "foreground"])
def test_a_handler_that_exits_ends_the_request_as_exited(tmp_path, detach):
    async def main() -> None:
        c = await started(tmp_path, Lines(), detach)
        ended, _ = await request(c, "/exit", "cccc")
        assert await ended == "exited"
        assert not c.alive and c.exited is not None and c.exited.result() == 3
        await c.stop()
    run(main())


def test_a_runtime_that_fails_to_start_it_is_the_exit(tmp_path, monkeypatch):
    async def main() -> None:
        sink = Lines()
        c = make(tmp_path, sink)
        monkeypatch.setattr(c.runtime, "run_argv", lambda *a: [
            "sh", "-c", "echo 'no such image' >&2; exit 7"])
        await c.start()
        with pytest.raises(container_mod.ContainerFailed, match=r"container exited \(7\)"):
            await c.ready(10)
        await c.stop()
        assert ("stderr", None, "no such image") in sink.got
    run(main())


def test_expire_ends_the_request_once_and_stop_kills(tmp_path, monkeypatch):
    async def kill(self: Container) -> None:  # the runtime's kill, for a plain process
        assert self.exited is not None
        os.kill(self.pid, 9)
        await self.exited
    monkeypatch.setattr(Container, "kill", kill)

    async def main() -> None:
        c = await started(tmp_path, Lines())
        results: list[str] = []
        _, ours = await request(c, "/hang", "dddd")
        c._result = results.append  # count every call of the callback
        c.expire()
        c.expire()
        assert results == ["timeout"] and not c.waiting
        await c.stop(0.2)  # the handler sleeps: killed
        assert not c.alive and c.exited is not None and c.exited.result() == -9
    run(main())


def test_a_runaway_line_is_cut_and_the_last_line_kept(tmp_path):
    async def main() -> None:
        sink = Lines()
        c = await started(tmp_path, sink)
        ended, _ = await request(c, "/long", "eeee")
        assert await ended == "done"
        await c.stop()
        lines = [line for stream, rid, line in sink.got if stream == "stderr"]
        assert lines[-3:] == ["x" * container_mod.MAX_LINE, "after", "tail-without-newline"]
    run(main())


@pytest.mark.parametrize("chunks, expect", [
    ([b"a\nb", b"c\n"], ["a", "bc"]),
    ([b"x" * 20, b"y" * 10 + b"\nz\n"], ["x" * 16, "z"]),  # MAX_LINE 16 here
    ([b"\xff\n"], ["\ufffd"]),
])
def test_line_pump_splits_cuts_and_decodes(monkeypatch, chunks, expect):
    monkeypatch.setattr(container_mod, "MAX_LINE", 16)

    async def main() -> list[str]:
        got: list[str] = []
        r, w = os.pipe()
        pump = LinePump(r, got.extend)
        for chunk in chunks:
            os.write(w, chunk)
            pump.drain()
        os.close(w)
        await asyncio.wait_for(pump.closed, 5)
        return got
    assert run(main()) == expect
