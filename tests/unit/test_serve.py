"""The runner's serving logic (runner/serve.py) with fake containers: slots, the queue,
503s, deadlines, reuse, failures, a graceful close. Real sockets on ::1, no runtime;
the test plays the handler. The end-to-end tests run the same paths with runc and crun."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import time
from typing import Any, Callable

import pytest

from common.fnsettings import PER_CLIENT_OFF
from common.log import EventLog
from runner import serve
from runner.budget import MemoryBudget, budget_bytes, host_memory
from runner.callers import Callers
from runner.container import ContainerFailed
from runner.serve import Function, ServeSettings

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


class FakeContainer:
    """What Function uses of a Container; the test answers for the handler."""

    def __init__(self, n: int, fail_start: ContainerFailed | None = None,
                 refuse: bool | str = False, start_seconds: float = 0.0):
        self.id = f"fake-{n}"
        self.served = 0
        self.generation = 0
        self.idle_since = time.monotonic()
        self.deadline = 0.0
        self.alive = True
        self.stopped = False
        self.fail_start = fail_start
        self.refuse = refuse
        self.start_seconds = start_seconds
        self.conns: list[socket.socket] = []  # what was handed over, as the handler has it
        self.ids: list[str] = []
        self.callers: list[tuple[int, str | None]] = []  # (port, peer) of each hand-over
        self._result: Callable[[str], None] | None = None
        self.exited: asyncio.Future[int] | None = None

    async def start(self) -> None:
        self.exited = asyncio.get_running_loop().create_future()
        await asyncio.sleep(self.start_seconds)
        if self.fail_start is not None:
            raise self.fail_start

    async def ready(self, timeout: float) -> None:
        pass

    def hand_over(self, client: socket.socket, request_id: str, remote: str,
                  deadline: float, port: int = 80, peer: str | None = None) -> None:
        if self.refuse == "bug":
            raise RuntimeError("a bug")
        if self.refuse:
            raise ContainerFailed("handler did not take the connection: Resource "
                                  "temporarily unavailable")
        assert client.getblocking(), "a handler gets a blocking socket"
        self.conns.append(socket.socket(fileno=os.dup(client.fileno())))
        self.ids.append(request_id)
        self.callers.append((port, peer))
        self.served += 1

    def await_result(self, callback: Callable[[str], None]) -> None:
        self._result = callback

    @property
    def waiting(self) -> bool:
        return self._result is not None

    def expire(self) -> None:
        self.end("timeout")

    def end(self, result: str) -> None:
        callback, self._result = self._result, None
        if callback is not None:
            callback(result)

    def answer(self, result: str = "done") -> None:
        """Be the handler: answer the last connection, close it, report ``result``."""
        conn = self.conns[-1]
        conn.recv(4096)
        conn.sendall(RESPONSE)
        conn.close()
        self.end(result)

    async def stop(self, grace: float = 1.0) -> None:
        self.stopped = True
        self.alive = False
        if self.exited is not None and not self.exited.done():
            self.exited.set_result(0)
        for conn in self.conns:  # its processes die: the handler's copies close
            conn.close()
        self.end("exited")


class Harness:
    """A Function on ::1 (an ephemeral port) whose containers are fakes. Every client is
    ::1, so per_client is off unless a test sets it."""

    def __init__(self, budget: MemoryBudget | None = None, address: str = "::1",
                 callers: Callers | None = None, **settings: Any):
        settings.setdefault("per_client", PER_CLIENT_OFF)
        self.containers: list[FakeContainer] = []
        self.make: dict[str, Any] = {}
        self.out = io.StringIO()
        self.log = EventLog("runner", stream=self.out)
        self.fn = Function("fake", address, ServeSettings(**settings), self.new, self.log,
                           budget=budget, callers=callers, bind=lambda port: 0)
        self.port = self.fn.listeners[80].getsockname()[1]

    def new(self) -> FakeContainer:
        c = FakeContainer(len(self.containers), **self.make)
        self.containers.append(c)
        return c

    async def send(self, source: str = "::1") -> asyncio.Task[bytes]:
        """A client's request, answered whenever: its whole answer."""
        async def client() -> bytes:
            reader, writer = await asyncio.open_connection(source, self.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: fake\r\n\r\n")
            await writer.drain()
            try:
                return await reader.read()
            except ConnectionResetError:  # closed with the request unread: no answer
                return b""
            finally:
                writer.close()
        return asyncio.ensure_future(client())

    async def serving(self, what: str = "a container serving") -> FakeContainer:
        """The first container with a request in flight, once there is one."""
        return await until(what, lambda: next((c for c in self.containers if c.waiting), None))

    def log_lines(self) -> list[dict[str, Any]]:
        self.log.flush()
        return [json.loads(line) for line in self.out.getvalue().splitlines()]


async def until(what: str, probe: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
    return result


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_reuse_hands_the_next_connection_to_the_same_container():
    async def main() -> None:
        h = Harness(reuse=True)
        first = await h.send()
        c = await h.serving("a cold container with the connection")
        c.answer()
        assert (await first).endswith(b"ok")
        second = await h.send()
        await until("the second hand-over", lambda: c.served == 2 and c.waiting)
        c.answer()
        assert (await second).endswith(b"ok")
        assert len(h.containers) == 1 and not c.stopped
        snap = h.fn.snapshot()
        assert (snap["cold"], snap["reused"], snap["served"], snap["idle"]) == (1, 1, 2, 1)
        await h.fn.close()
        assert c.stopped
        outcomes = [line["outcome"] for line in h.log_lines() if line["event"] == "request"]
        assert outcomes == ["cold:done", "reused:done"]
        assert [line["rid"] for line in h.log_lines() if line["event"] == "request"] == c.ids
    run(main())


def test_one_shot_containers_are_stopped_after_their_request():
    async def main() -> None:
        h = Harness()
        first = await h.send()
        c = await h.serving("a container")
        c.answer("exited")
        assert (await first).endswith(b"ok")
        await until("the container stopped", lambda: c.stopped)
        assert h.fn.snapshot()["idle"] == 0
        await h.fn.close()
    run(main())


def test_past_the_queue_the_runner_answers_503_and_the_queue_moves_on():
    async def main() -> None:
        h = Harness(reuse=True, concurrency=1, queue=1)
        first = await h.send()
        c = await h.serving("the first request in its container")
        second = await h.send()
        await until("the second request queued", lambda: h.fn.waiting == 1)
        third = await h.send()
        refused = await third
        assert refused.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1\r\n" in refused
        assert not second.done()
        c.answer()
        await first
        await until("the queued request in the same container", lambda: c.served == 2)
        c.answer()
        assert (await second).endswith(b"ok")
        assert h.fn.snapshot()["rejected"] == 1 and len(h.containers) == 1
        await h.fn.close()
    run(main())


def test_a_request_that_waits_past_the_timeout_gets_503():
    async def main() -> None:
        h = Harness(concurrency=1, queue=4, timeout=0.3)
        h.make = {"start_seconds": 1.0}  # the first request's cold start holds the slot
        starting = await h.send()
        await until("the first container starting", lambda: h.fn.starting == 1)
        waiting = await h.send()
        assert (await waiting).startswith(b"HTTP/1.1 503 ")
        assert h.fn.snapshot()["rejected"] == 1 and not starting.done()
        c = await h.serving("the first request handed over")
        c.answer("exited")
        assert (await starting).endswith(b"ok")
        await h.fn.close()
    run(main())


def test_the_deadline_expires_the_request_and_stops_its_container():
    async def main() -> None:
        h = Harness(reuse=True, timeout=0.2)
        client = await h.send()
        c = await h.serving("a container")
        await until("the container stopped at the deadline", lambda: c.stopped)
        assert await client == b""  # closed, no answer
        snap = h.fn.snapshot()
        assert snap["timeouts"] == 1 and snap["idle"] == 0 and snap["busy"] == 0
        outcomes = [line["outcome"] for line in h.log_lines() if line["event"] == "request"]
        assert outcomes == ["cold:timeout"]
        await h.fn.close()
    run(main())


def test_one_timer_watches_every_request_in_flight():
    async def main() -> None:
        h = Harness(reuse=True, timeout=0.3)
        clients = [await h.send() for _ in range(3)]
        await until("three containers", lambda: sum(c.waiting for c in h.containers) == 3)
        h.containers[1].answer()  # one ends in time, the others at their deadline
        await until("the other two expired", lambda: h.fn.snapshot()["timeouts"] == 2)
        answers = await asyncio.gather(*clients)
        assert [a.endswith(b"ok") for a in answers] == [False, True, False]
        assert h.fn._expiry_busy is None  # nothing in flight: no timer left
        await h.fn.close()
    run(main())


@pytest.mark.parametrize("make, status", [
    ({"fail_start": ContainerFailed("handler did not connect", 504)}, b"504 Gateway Timeout"),
    ({"fail_start": ContainerFailed("container exited (1)")}, b"502 Bad Gateway"),
    ({"refuse": True}, b"502 Bad Gateway"),
    ({"refuse": "bug"}, b"500 Internal Server Error"),
])
def test_a_container_that_fails_gets_the_client_an_error(make, status):
    async def main() -> None:
        h = Harness()
        h.make = make
        answer = await (await h.send())
        assert answer.startswith(b"HTTP/1.1 " + status), answer
        assert h.fn.snapshot()["failed"] == (0 if make.get("refuse") == "bug" else 1)
        await until("its slot free again", lambda: h.fn.active == 0)
        h.make = {}
        served = await h.send()  # the next one is served
        (await h.serving("a working container")).answer()
        assert (await served).endswith(b"ok")
        await h.fn.close()
    run(main())


def test_close_lets_requests_in_flight_and_waiting_finish():
    async def main() -> None:
        h = Harness(reuse=True, concurrency=1)
        first = await h.send()
        c = await h.serving("a container")
        second = await h.send()
        await until("the second queued", lambda: h.fn.waiting == 1)
        closing = asyncio.ensure_future(h.fn.close())
        await asyncio.sleep(0.05)
        assert not closing.done()
        with pytest.raises(ConnectionRefusedError):  # no longer accepting
            await asyncio.open_connection("::1", h.port)
        c.answer()
        await until("the queued one handed over", lambda: c.served == 2 and c.waiting)
        c.answer()
        assert (await first).endswith(b"ok") and (await second).endswith(b"ok")
        await closing
        assert c.stopped and h.fn.snapshot()["idle"] == 0
    run(main())


def test_a_reused_container_that_ends_after_close_is_stopped():
    async def main() -> None:
        h = Harness(reuse=True)
        client = await h.send()
        c = await h.serving()
        h.fn.stop_accepting()  # as a sync that drops the function does first
        c.answer()
        assert (await client).endswith(b"ok")
        await until("stopped, not kept idle", lambda: c.stopped)
        assert h.fn.idle == []
        await h.fn.close()
    run(main())


def test_a_larger_concurrency_takes_waiting_connections_at_once():
    async def main() -> None:
        h = Harness(concurrency=1)
        clients = [await h.send() for _ in range(3)]
        await until("two waiting", lambda: h.fn.waiting == 2)
        h.fn.update(ServeSettings(concurrency=3, per_client=PER_CLIENT_OFF), h.new)
        await until("all three in containers",
                    lambda: sum(c.waiting for c in h.containers) == 3)
        for c in h.containers:
            c.answer("exited")
        assert all(a.endswith(b"ok") for a in await asyncio.gather(*clients))
        await h.fn.close()
    run(main())


def test_a_container_of_the_old_settings_is_not_reused_after_an_update():
    async def main() -> None:
        h = Harness(reuse=True)
        first = await h.send()
        old = await h.serving("a request in flight")
        h.fn.update(ServeSettings(reuse=True, timeout=20, per_client=PER_CLIENT_OFF), h.new)
        old.answer()  # finishes, in the container of the old settings
        assert (await first).endswith(b"ok")
        await until("the old container stopped", lambda: old.stopped)
        second = await h.send()
        new = await h.serving("the next request")
        assert new is not old
        new.answer()
        assert (await second).endswith(b"ok")
        await h.fn.close()
    run(main())


def test_min_warm_fills_the_pool_and_a_dead_idle_container_is_not_used():
    async def main() -> None:
        h = Harness(min_warm=2, reuse=True)
        await until("two warm", lambda: len(h.fn.idle) == 2)
        h.fn.idle[-1].alive = False  # died while idle
        client = await h.send()
        c = await h.serving("a live container serving")
        assert c is h.containers[0] and c.served == 1
        c.answer()
        assert (await client).endswith(b"ok")
        assert h.fn.snapshot()["warm"] == 1
        await h.fn.close()
    run(main())


def test_access_lines_are_batched_and_keep_their_order():
    async def main() -> None:
        out = io.StringIO()
        log = EventLog("runner", stream=out)
        for i in range(3):
            log.batched("info", "request", f"r{i}", n=i)
        assert out.getvalue() == ""  # not yet
        log.info("other")  # any other event writes the batch first
        events = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [e.get("rid") for e in events] == ["r0", "r1", "r2", None]
        log.batched("info", "request", "r3")
        await until("the batch written by its timer", lambda: "r3" in out.getvalue(), 2)
    run(main())


# --- admission: the first byte, per_client, the memory budget ---------------------------

def silent(port: int, host: str = "::1") -> socket.socket:
    """A client that connects and sends nothing (yet)."""
    sock = socket.create_connection((host, port))
    sock.setblocking(False)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """The server closed ``sock`` (end of file, or a reset)."""
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_a_connection_takes_no_slot_before_its_first_byte():
    async def main() -> None:
        h = Harness(concurrency=1, queue=0, first_byte_timeout=5)
        quiet = silent(h.port)
        await until("the silent one waiting", lambda: len(h.fn.first_byte) == 1)
        assert h.fn.active == 0 and h.containers == []
        served = await h.send()  # gets the only slot: the silent one holds nothing
        c = await h.serving("the talking client served")
        c.answer("exited")
        assert (await served).endswith(b"ok")
        quiet.setblocking(True)
        quiet.sendall(b"GET / HTTP/1.1\r\n\r\n")  # now it speaks: admitted, served
        await until("the late one admitted", lambda: not h.fn.first_byte)
        (await h.serving("the late one served")).answer("exited")
        assert quiet.recv(4096).endswith(b"ok")
        quiet.close()
        await h.fn.close()
    run(main())


def test_silence_past_first_byte_timeout_closes_the_connection_without_a_container():
    async def main() -> None:
        h = Harness(first_byte_timeout=0.2, per_client=4)
        quiet = [silent(h.port) for _ in range(3)]
        await until("three waiting", lambda: len(h.fn.first_byte) == 3)
        assert h.fn.clients == {"::1": 3}  # waiting ones count for their address
        started = time.monotonic()
        for sock in quiet:
            await until("closed by the runner", lambda: closed_by_server(sock), 3)
            sock.close()
        assert time.monotonic() - started < 1.5
        snap = h.fn.snapshot()
        assert snap["first_byte_timeouts"] == 3 and snap["first_byte_waiting"] == 0
        assert h.containers == [] and h.fn.clients == {} and h.fn._expiry_first is None
        await h.fn.close()
    run(main())


def test_a_client_that_leaves_before_its_first_byte_starts_nothing():
    async def main() -> None:
        h = Harness(first_byte_timeout=5, per_client=4)
        quiet = silent(h.port)
        await until("waiting", lambda: len(h.fn.first_byte) == 1)
        quiet.close()
        await until("forgotten", lambda: not h.fn.first_byte and not h.fn.clients)
        assert h.containers == [] and h.fn.snapshot()["outcomes"] == {}
        await h.fn.close()
    run(main())


def test_first_byte_timeout_0_hands_a_silent_connection_over_at_once():
    async def main() -> None:
        h = Harness(first_byte_timeout=0)
        quiet = silent(h.port)
        c = await h.serving("the silent connection in a container")
        assert not h.fn.first_byte
        c.conns[-1].sendall(b"hello")  # a server-speaks-first protocol
        quiet.setblocking(True)
        assert quiet.recv(5) == b"hello"
        quiet.close()
        c.end("exited")
        await h.fn.close()
    run(main())


def test_past_the_waiting_cap_the_connection_that_waited_longest_is_closed(monkeypatch):
    monkeypatch.setattr(serve, "FIRST_BYTE_MIN_WAITING", 0)

    async def main() -> None:
        h = Harness(concurrency=1, queue=0, first_byte_timeout=30)  # cap: 2 x (1 + 0)
        first, second = silent(h.port), silent(h.port)
        await until("two waiting", lambda: len(h.fn.first_byte) == 2)
        third = silent(h.port)
        await until("the first closed", lambda: closed_by_server(first))
        assert h.fn.snapshot()["first_byte_dropped"] == 1 and len(h.fn.first_byte) == 2
        assert not closed_by_server(second) and not closed_by_server(third)
        for sock in (first, second, third):
            sock.close()
        await h.fn.close()
    run(main())


def test_per_client_refuses_one_address_while_another_is_served():
    async def main() -> None:
        # on ::, so that 127.0.0.1 (::ffff:127.0.0.1) is a second client address
        h = Harness(address="::", concurrency=4, per_client=2, first_byte_timeout=5)
        quiet = silent(h.port)  # waiting for its first byte: counts
        first = await h.send()
        await until("one in a container", lambda: any(c.waiting for c in h.containers))
        refused = await (await h.send())
        assert refused.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1\r\n" in refused
        assert b"per_client 2" in refused
        other = await h.send("127.0.0.1")
        await until("the other address served",
                    lambda: sum(c.waiting for c in h.containers) == 2)
        assert h.fn.clients == {"::1": 2, "::ffff:127.0.0.1": 1}
        for c in h.containers:
            c.answer("exited")
        assert (await first).endswith(b"ok") and (await other).endswith(b"ok")
        snap = h.fn.snapshot()
        assert snap["rejected_client"] == 1 and snap["rejected"] == 1
        quiet.close()
        await until("every address released", lambda: not h.fn.clients)
        await h.fn.close()
    run(main())


def test_per_client_auto_is_half_the_slots():
    async def main() -> None:
        h = Harness(concurrency=4, queue=8, per_client=0)
        clients = [await h.send() for _ in range(3)]
        refused = await clients[2]
        assert refused.startswith(b"HTTP/1.1 503 ") and b"per_client 2" in refused
        await until("two served", lambda: sum(c.waiting for c in h.containers) == 2)
        h.fn.update(ServeSettings(concurrency=8, queue=8), h.new)
        assert h.fn.per_client == 4
        for c in h.containers:
            c.answer("exited")
        await asyncio.gather(*clients[:2])
        await h.fn.close()
    run(main())


def test_past_the_memory_budget_a_new_container_is_refused_with_503():
    async def main() -> None:
        budget = MemoryBudget(limit=2 * (64 << 20))
        h = Harness(budget=budget, concurrency=4, memory=64 << 20)
        first, second = await h.send(), await h.send()
        await until("two in containers", lambda: sum(c.waiting for c in h.containers) == 2)
        assert budget.used == 128 << 20
        third = await (await h.send())
        assert third.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1\r\n" in third
        assert b"memory budget" in third
        assert len(h.containers) == 2  # the third was never made
        snap = h.fn.snapshot()
        assert snap["rejected_memory"] == 1 and snap["rejected"] == 1
        await until("the refused request's slot free", lambda: h.fn.active == 2)
        h.containers[0].answer("exited")  # one-shot: stopped, its memory given back
        await first
        await until("memory given back", lambda: budget.used == 64 << 20)
        fourth = await h.send()
        await until("the next one served", lambda: len(h.containers) == 3 and
                    h.containers[-1].waiting)
        h.containers[-1].answer("exited")
        h.containers[1].answer("exited")
        assert (await fourth).endswith(b"ok") and (await second).endswith(b"ok")
        await h.fn.close()
        await until("every container's memory given back", lambda: budget.used == 0)
    run(main())


def test_a_warm_pool_fill_past_the_budget_waits():
    async def main() -> None:
        budget = MemoryBudget(limit=2 * (64 << 20))
        h = Harness(budget=budget, min_warm=3, reuse=True, memory=64 << 20)
        await until("two warm", lambda: len(h.fn.idle) == 2)
        await asyncio.sleep(0.1)
        assert len(h.containers) == 2 and budget.used == 128 << 20
        assert [e for e in h.log_lines() if e["event"] == "warm_start_waits"]
        h.fn.idle[0].alive = False  # dies: the janitor stops it, the pool refills
        await h.fn.idle[0].stop(0)
        await until("the third start once there was room", lambda: len(h.containers) == 3, 4)
        await h.fn.close()
    run(main())


def test_the_default_budget_is_three_quarters_of_the_host_memory(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemFree:   1000 kB\nMemTotal:  4096 kB\n")
    assert host_memory(str(meminfo)) == 4096 * 1024
    assert budget_bytes(1 << 30) == 1 << 30  # a value set is the value
    assert budget_bytes(0) == int(host_memory() * 0.75) > 0
    budget = MemoryBudget(limit=100)
    assert budget.take("a", 60) and not budget.take("b", 50) and budget.used == 60
    budget.give_back("a")
    budget.give_back("a")  # twice: nothing more
    assert budget.used == 0 and MemoryBudget().take("c", 1 << 50)  # 0: no limit


def test_the_memory_budget_returns_to_zero_after_every_kind_of_end():
    """Every path a container can end by gives its memory back: a start that fails, a
    hand-over the handler refuses, a request past its timeout, a one-shot and a reused
    container, a warm pool replaced by a settings change, a warm start still running
    when the function is removed. Nothing may stay counted once they are all gone."""
    async def main() -> None:
        budget = MemoryBudget(limit=8 * (64 << 20))
        h = Harness(budget=budget, concurrency=4, memory=64 << 20, timeout=0.3)
        h.make = {"fail_start": ContainerFailed("container exited (1)")}
        assert b" 502 " in await (await h.send())
        h.make = {"refuse": True}
        assert b" 502 " in await (await h.send())
        h.make = {}
        timed_out = await h.send()
        await h.serving("a request that will time out")
        await timed_out  # the deadline ends it: the container is stopped
        one_shot = await h.send()
        (await h.serving("a one-shot request")).answer("exited")
        await one_shot
        await until("four ends given back", lambda: budget.used == 0)
        h.fn.update(ServeSettings(per_client=PER_CLIENT_OFF, memory=64 << 20, reuse=True,
                                  min_warm=2), h.new)
        await until("a warm pool", lambda: len(h.fn.idle) == 2)
        reused = await h.send()
        (await h.serving("a warm container")).answer()
        await reused
        h.fn.update(ServeSettings(per_client=PER_CLIENT_OFF, memory=32 << 20, reuse=True,
                                  min_warm=1), h.new)  # the pool is replaced
        await until("the old pool stopped", lambda: sum(not c.stopped for c in h.containers)
                    == 1 and len(h.fn.idle) == 1)
        assert budget.used == 32 << 20
        h.make = {"start_seconds": 0.5}
        h.fn.idle[0].alive = False  # dies idle; the refill is still starting at removal
        await until("a start in progress", lambda: h.fn.starting == 1)
        await h.fn.close()
        await until("every container's memory given back", lambda: budget.used == 0)
        assert budget.snapshot()["containers"] == 0
    run(main())


def test_a_flood_of_refused_connections_holds_no_more_than_refusing_max_fds(monkeypatch):
    """Each 503 holds its connection up to a second while the request is read away; a
    client opening connections faster than that (one address past per_client) must not
    pile them up until the runner has no fds left for any function: past REFUSING_MAX
    being answered, a refusal is closed at once. Once the flood is over, 503s are
    answered again."""
    monkeypatch.setattr(serve, "REFUSING_MAX", 20, raising=False)

    async def main() -> None:
        h = Harness(concurrency=2, queue=0, per_client=1)
        flood = []
        for _ in range(200):  # connect and send, never read nor close
            s = socket.socket(socket.AF_INET6)
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("::1", h.port))
            flood.append(s)
        await until("every extra connection refused", lambda: h.fn.stats.rejected_client
                    == 199)
        assert len(h.fn.tasks) <= 20  # each 503 being written is a task holding its fd
        for s in flood:
            s.close()
        await until("the refusals written", lambda: not h.fn.tasks)
        first, extra = await h.send(), await h.send()
        assert (await extra).startswith(b"HTTP/1.1 503 ")  # answered again
        (await h.serving()).answer()
        assert (await first).endswith(b"ok")
        await h.fn.close()
    run(main())
