"""RPC over real ZeroMQ ipc sockets on throwaway endpoints, in one process."""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
import time

import msgpack
import pytest
import zmq
import zmq.asyncio

from common import protocol
from common.errors import Code, FaasError
from common.log import EventLog, request_id
from common.rpc import Access, AlreadyRunning, Client, Server, socket_path


class Agent:
    """A dnsagent-shaped server whose ping and sync can be made to misbehave."""

    def __init__(self, run_dir: str, log: EventLog | None = None):
        self.run_dir = run_dir
        self.hang = asyncio.Event()  # set: sync never answers
        self.hang_next = 0  # ping: hang this many times, then answer
        self.calls: list[tuple[str, str | None]] = []
        self.log = log or EventLog("dnsagent", stream=io.StringIO())
        self.server = Server("dnsagent", {"ping": self.ping, "sync": self.sync}, run_dir,
                             self.log, Access(0o600))
        self.stop = asyncio.Event()

    async def ping(self, args):
        self.calls.append(("ping", request_id.get()))
        if self.hang_next:
            self.hang_next -= 1
            await asyncio.sleep(3600)
        return {"pong": True}

    async def sync(self, args):
        self.calls.append(("sync", request_id.get()))
        if self.hang.is_set():
            await asyncio.sleep(3600)
        if args["generation"] == 13:
            raise RuntimeError("unlucky")
        return {"generation": args["generation"]}

    async def __aenter__(self):
        self.server.bind()
        self.task = asyncio.ensure_future(self.server.serve(self.stop))
        return self

    async def __aexit__(self, *exc):
        self.stop.set()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.server.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_call_and_reply(tmp_path):
    async def main():
        async with Agent(str(tmp_path)):
            client = Client("dnsagent", str(tmp_path))
            assert await client.call("ping") == {"pong": True}
            assert await client.call("sync", {"generation": 4, "state": {}}) == {"generation": 4}
            client.close()
    run(main())


def test_socket_mode_and_lock(tmp_path):
    async def main():
        async with Agent(str(tmp_path)):
            st = os.stat(socket_path(str(tmp_path), "dnsagent"))
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            second = Server("dnsagent", {"ping": None, "sync": None}, str(tmp_path),
                            EventLog("x", stream=io.StringIO()))
            with pytest.raises(AlreadyRunning, match="another instance"):
                second.bind()
            # the first one still answers
            client = Client("dnsagent", str(tmp_path))
            assert await client.call("ping") == {"pong": True}
            client.close()
        assert not os.path.exists(socket_path(str(tmp_path), "dnsagent"))
    run(main())


def test_handler_table_must_match_protocol(tmp_path):
    with pytest.raises(ValueError, match="differ"):
        Server("dnsagent", {"ping": None}, str(tmp_path), EventLog("x"))


def test_timeout_when_nobody_listens(tmp_path):
    async def main():
        client = Client("dnsagent", str(tmp_path))
        started = time.monotonic()
        with pytest.raises(FaasError) as info:
            await client.call("ping", timeout=0.2, retries=0)
        assert info.value.code is Code.TIMEOUT
        assert time.monotonic() - started < 2
        client.close()
    run(main())


def test_handler_bug_is_internal_and_server_survives(tmp_path):
    async def main():
        out = io.StringIO()
        async with Agent(str(tmp_path), EventLog("dnsagent", stream=out)):
            client = Client("dnsagent", str(tmp_path))
            with pytest.raises(FaasError) as info:
                await client.call("sync", {"generation": 13, "state": {}})
            assert info.value.code is Code.INTERNAL
            assert "RuntimeError" not in info.value.message  # tracebacks stay home
            assert "unlucky" in out.getvalue()
            assert await client.call("ping") == {"pong": True}
            client.close()
    run(main())


def test_peer_restarting_mid_call(tmp_path):
    """A call lost with a dying server times out cleanly; the next call works."""
    async def main():
        client = Client("dnsagent", str(tmp_path))
        async with Agent(str(tmp_path)) as agent:
            agent.hang.set()
            call = asyncio.ensure_future(client.call("sync", {"generation": 1, "state": {}},
                                                     timeout=0.5))
            while not agent.calls:
                await asyncio.sleep(0.01)
        with pytest.raises(FaasError) as info:
            await call  # sync is idempotent: retried, but nobody is there
        assert info.value.code is Code.TIMEOUT
        async with Agent(str(tmp_path)):
            assert await client.call("ping", timeout=2) == {"pong": True}
        client.close()
    run(main())


def test_idempotent_ops_are_retried(tmp_path):
    async def main():
        async with Agent(str(tmp_path)) as agent:
            agent.hang_next = 1
            client = Client("dnsagent", str(tmp_path), retries=2)
            assert await client.call("ping", timeout=0.3) == {"pong": True}
            assert [c[0] for c in agent.calls] == ["ping", "ping"]
            agent.hang_next = 1
            with pytest.raises(FaasError):
                await client.call("ping", timeout=0.3, retries=0)
            client.close()
    run(main())


def test_request_id_carries_into_outgoing_calls(tmp_path):
    async def main():
        async with Agent(str(tmp_path)) as agent:
            client = Client("dnsagent", str(tmp_path))
            token = request_id.set("feedbeef0001")
            try:
                await client.call("ping")
            finally:
                request_id.reset(token)
            await client.call("ping")
            client.close()
            (_, first), (_, second) = agent.calls
            assert first.startswith("feedbeef0001.")
            assert not second.startswith("feedbeef0001")
    run(main())


def raw_call(path: str, frames: list[bytes]) -> protocol.Reply:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(f"ipc://{path}")
    try:
        sock.send_multipart(frames)
        return protocol.parse_reply(sock.recv_multipart()[-1])
    finally:
        sock.close(0)
        ctx.term()


@pytest.mark.parametrize("frames,code", [
    ([b"\xc1garbage"], Code.BAD_REQUEST),
    ([msgpack.packb({"v": 2, "id": "a", "op": "ping", "args": {}})], Code.VERSION_MISMATCH),
    ([msgpack.packb({"v": 1, "id": "a", "op": "status", "args": {}})], Code.BAD_REQUEST),
    ([b"a", b"b"], Code.BAD_REQUEST),
    ([b"\x00" * (protocol.MAX_FRAME + 10)], Code.TOO_LARGE),
])
def test_server_refuses_malformed_frames_and_stays_up(tmp_path, frames, code):
    async def main():
        async with Agent(str(tmp_path)) as agent:
            path = socket_path(str(tmp_path), "dnsagent")
            reply = await asyncio.to_thread(raw_call, path, frames)
            assert not reply.ok and reply.error.code is code
            assert agent.calls == []  # no handler ran
            ok = await asyncio.to_thread(raw_call, path, [protocol.make_request("ping", {}, "z")])
            assert ok.ok and ok.id == "z"
    run(main())


def test_log_lines_are_json_with_request_id():
    out = io.StringIO()
    log = EventLog("runner", stream=out)
    token = request_id.set("abc.1")
    try:
        log.info("thing", n=1)
    finally:
        request_id.reset(token)
    log.debug("hidden")
    record = json.loads(out.getvalue())
    assert record["proc"] == "runner" and record["rid"] == "abc.1" and record["n"] == 1
    assert out.getvalue().count("\n") == 1


def test_handlers_learn_the_callers_uid_from_the_kernel(tmp_path):
    """libzmq's SO_PEERCRED reading of an ipc peer reaches the handler as peer_uid; a
    call made in-process (outside any request) has none."""
    from common.rpc import peer_uid
    seen = []

    async def main():
        async with Agent(str(tmp_path)) as agent:
            async def ping(args):
                seen.append(peer_uid.get())
                return {"pong": True}
            agent.server.handlers["ping"] = ping
            client = Client("dnsagent", str(tmp_path))
            await client.call("ping")
            client.close()
    run(main())
    assert seen == [os.getuid()] and peer_uid.get() is None
