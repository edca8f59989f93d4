"""Serving one function: its listener on [address]:80, its pool, its limits.

Each function has its own listener, so a slow or broken function never delays
another. A connection takes one of ``concurrency`` slots or waits in a queue of at most
``queue`` (for at most ``timeout``; past either the runner answers 503 with Retry-After
itself), takes a warm container (reused or pre-started) or starts one, is handed over,
and ends with ``done``, the container's exit, or the timeout (then the container is
killed and the client's connection closes with it). The pool is refilled to
``min_warm`` in the background.

A request that finds a container ready runs on callbacks only: the listener's reader
accepts, hands the socket over at once, and the container calls back when the request
ends, which hands the slot, and often the same container, to the next connection in the
queue. No task, future or log write per request: that path is what bounds a reused
function's throughput. Starting a container, and answering a client ourselves, are tasks.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import socket
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from common.log import EventLog, request_id
from common.protocol import new_id
from runner.container import Container, ContainerFailed

# Upper bounds (seconds) of the request-latency histogram's buckets; one more for +Inf.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
IPV6_FREEBIND = 78  # linux/in6.h; bind before netagent has put the address in place
BACKLOG = 1024
START_TIMEOUT = 10.0


@dataclass(frozen=True)
class ServeSettings:
    """How the runner serves a function (the container's own limits live in its config)."""

    timeout: float = 30.0
    concurrency: int = 16
    queue: int = 64
    min_warm: int = 0
    reuse: bool = False
    idle_timeout: float = 60.0


@dataclass
class Stats:
    """Counters the runner reports for a function."""

    served: int = 0
    cold: int = 0
    warm: int = 0
    reused: int = 0
    rejected: int = 0  # 503
    failed: int = 0  # 502/504 before hand-over
    timeouts: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    # per bucket of LATENCY_BUCKETS (not cumulative), the last one for longer requests
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def observe(self, seconds: float) -> None:
        """Count one request's duration (connection accepted to connection closed)."""
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds


def listen(address: str, port: int = 80) -> socket.socket:
    """A non-blocking listener on [address]:port that does not need the address yet."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
    sock.bind((address, port))
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def http_error(status: int, reason: str, text: str, retry_after: int | None = None) -> bytes:
    """A complete small HTTP/1.1 error response."""
    body = (text + "\n").encode()
    extra = f"Retry-After: {retry_after}\r\n" if retry_after is not None else ""
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: "
            f"{len(body)}\r\n{extra}Connection: close\r\n\r\n").encode() + body


class Request:
    """One client connection, from accept() to its end."""

    __slots__ = ("conn", "remote", "id", "started", "queued_until")

    def __init__(self, conn: socket.socket, remote: str, started: float):
        self.conn = conn
        self.remote = remote
        self.id = new_id()
        self.started = started  # loop time
        self.queued_until = 0.0


class Function:
    """A deployed function as the runner serves it."""

    def __init__(self, name: str, address: str, settings: ServeSettings,
                 new_container: Callable[[], Container], log: EventLog, port: int = 80):
        self.name = name
        self.address = address
        self.settings = settings
        self.new_container = new_container  # a container of the current version
        self.log = log
        self.loop = asyncio.get_running_loop()
        self.sock = listen(address, port)
        self.active = 0  # slots taken: requests being served or their container started
        self.pending: deque[Request] = deque()  # waiting for a slot, oldest first
        self._expiry: asyncio.TimerHandle | None = None  # of the oldest pending request
        self._expiry_busy: asyncio.TimerHandle | None = None  # of requests in flight
        self.idle: list[Container] = []  # ready, connected, waiting for a conn; the
        # last one is used first, so a pool larger than the load shrinks from the front
        self.busy: set[Container] = set()
        self.starting = 0
        self.generation = 0  # of settings and version; a container keeps the one it had
        self.stats = Stats()
        self.tasks: set[asyncio.Future[Any]] = set()
        self.drained = asyncio.Event()  # no request in flight or waiting
        self.drained.set()
        self.closed = False
        self._accepting = False
        self._resume_accept: asyncio.TimerHandle | None = None
        self._accept()
        self.janitor = asyncio.ensure_future(self._janitor())
        self.refill()

    @property
    def waiting(self) -> int:
        return len(self.pending)

    def update(self, settings: ServeSettings, new_container: Callable[[], Container]) -> None:
        """New settings or version: containers in flight finish (and are not reused),
        idle ones are replaced."""
        self.new_container = new_container
        self.settings = settings
        self.generation += 1
        while self.idle:
            self._spawn(self.idle.pop().stop())
        self._next()  # a larger concurrency takes waiting connections now
        self.refill()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- accepting -------------------------------------------------------------------

    def _accept(self) -> None:
        self._resume_accept = None
        if not self.closed:
            self.loop.add_reader(self.sock, self._on_accept)
            self._accepting = True

    def _on_accept(self) -> None:
        """The listener is readable: take what the backlog holds (a bounded batch, so
        one busy function does not starve the others)."""
        now = self.loop.time()
        for _ in range(64):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # the client gave up while in the backlog
                continue
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                self.log.warning("accept_failed", function=self.name, error=str(exc))
                self.loop.remove_reader(self.sock)
                self._accepting = False
                self._resume_accept = self.loop.call_later(0.1, self._accept)
                return
            self._admit(Request(conn, addr[0], now))

    def _admit(self, req: Request) -> None:
        if self.active < self.settings.concurrency:
            self.active += 1
            self.drained.clear()
            self._dispatch(req)
        elif len(self.pending) >= self.settings.queue:
            self._refuse(req)
        else:
            req.queued_until = req.started + self.settings.timeout
            self.pending.append(req)
            self.drained.clear()
            if self._expiry is None:
                self._expiry = self.loop.call_at(req.queued_until, self._expire)

    def _expire(self) -> None:
        """The oldest waiting connections have waited ``timeout``: 503."""
        self._expiry = None
        now = self.loop.time()
        while self.pending and self.pending[0].queued_until <= now:
            self._refuse(self.pending.popleft())
        if self.pending:
            self._expiry = self.loop.call_at(self.pending[0].queued_until, self._expire)
        else:
            self._check_drained()

    def _refuse(self, req: Request) -> None:
        self.stats.rejected += 1
        self._answer(req, http_error(503, "Service Unavailable",
                                     f"{self.name} is at capacity", 1), "rejected")

    def _next(self) -> None:
        """Give free slots to waiting connections."""
        while self.pending and self.active < self.settings.concurrency:
            self.active += 1
            self._dispatch(self.pending.popleft())
        if not self.pending and self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _check_drained(self) -> None:
        if self.active == 0 and not self.pending:
            self.drained.set()

    # --- serving, with a slot taken --------------------------------------------------

    def _dispatch(self, req: Request) -> None:
        """Hand over to a ready container, or start one."""
        while self.idle:
            container = self.idle.pop()
            if container.alive:
                return self._hand_over(req, container,
                                       "reused" if container.served else "warm")
            self._spawn(container.stop(0))
        self._spawn(self._serve_cold(req))

    async def _serve_cold(self, req: Request) -> None:
        token = request_id.set(req.id)
        try:
            container = await self._start()
        except ContainerFailed as exc:
            self.stats.failed += 1
            self.log.warning("container_failed", function=self.name, error=str(exc))
            reason = "Gateway Timeout" if exc.status == 504 else "Bad Gateway"
            self._answer(req, http_error(exc.status, reason, f"{self.name}: {exc}"), "failed",
                         slot=True)
            return
        except Exception as exc:  # a bug: into the log, and the client gets its answer
            self.log.error("request_failed", function=self.name, error=repr(exc))
            self._answer(req, http_error(500, "Internal Server Error",
                                         f"{self.name}: faasd failed; see its log"), "error",
                         slot=True)
            return
        finally:
            request_id.reset(token)
        self._hand_over(req, container, "cold")

    def _hand_over(self, req: Request, container: Container, how: str) -> None:
        timeout = self.settings.timeout
        try:
            container.hand_over(req.conn, req.id, req.remote, time.time() + timeout)
        except ContainerFailed as exc:
            self._spawn(container.stop(0))
            self.stats.failed += 1
            self._answer(req, http_error(502, "Bad Gateway", f"{self.name}: {exc}"), "failed",
                         slot=True)
            return
        except Exception as exc:  # a bug (nothing was sent): logged, answered, slot freed
            self.log.error("request_failed", function=self.name, error=repr(exc), rid=req.id)
            self._spawn(container.stop(0))
            self._answer(req, http_error(500, "Internal Server Error",
                                         f"{self.name}: faasd failed; see its log"), "error",
                         slot=True)
            return
        req.conn.close()  # the container holds the connection now; ours would keep it open
        self.busy.add(container)
        setattr(self.stats, how, getattr(self.stats, how) + 1)
        self.stats.served += 1
        container.deadline = self.loop.time() + timeout
        container.await_result(lambda result: self._ended(req, container, how, result))
        if self._expiry_busy is None or container.deadline < self._expiry_busy.when():
            self._watch_deadlines()

    def _watch_deadlines(self) -> None:
        """One timer for every request in flight, at the earliest deadline: requests
        end long before theirs, so it fires about once per ``timeout``, not per request."""
        now = self.loop.time()
        for container in [c for c in self.busy if c.waiting and c.deadline <= now]:
            container.expire()
        if self._expiry_busy is not None:
            self._expiry_busy.cancel()
        deadlines = [c.deadline for c in self.busy if c.waiting]
        self._expiry_busy = (self.loop.call_at(min(deadlines), self._watch_deadlines)
                             if deadlines else None)

    def _ended(self, req: Request, container: Container, how: str, result: str) -> None:
        """The container's callback: the request is over."""
        self.busy.discard(container)
        if result == "timeout":
            self.stats.timeouts += 1
            self.log.warning("timeout", function=self.name, container=container.id,
                             rid=req.id)
            self._spawn(container.stop(0))
        elif (result == "done" and self.settings.reuse and container.alive
              and container.generation == self.generation
              and not (self.closed and not self.pending)):  # closing, nobody waiting
            self.idle.append(container)
        else:
            self._spawn(container.stop())
        self._account(req, f"{how}:{result}")
        self.active -= 1
        self._next()
        self._check_drained()
        self.refill()

    def _account(self, req: Request, outcome: str) -> None:
        self.stats.outcomes[outcome] = self.stats.outcomes.get(outcome, 0) + 1
        elapsed = self.loop.time() - req.started
        self.stats.observe(elapsed)
        self.log.batched("info", "request", req.id, function=self.name, outcome=outcome,
                         ms=round(elapsed * 1e3, 2))

    def _answer(self, req: Request, data: bytes, outcome: str, slot: bool = False) -> None:
        """Answer the client ourselves, then account for the request (and free its slot)."""
        self._spawn(self._reply_and_end(req, data, outcome, slot))

    async def _reply_and_end(self, req: Request, data: bytes, outcome: str, slot: bool
                             ) -> None:
        try:
            await self._reply(req.conn, data)
        finally:
            req.conn.close()
            self._account(req, outcome)
            if slot:
                self.active -= 1
                self._next()
            self._check_drained()

    # --- the pool --------------------------------------------------------------------

    async def _start(self) -> Container:
        container = self.new_container()
        container.generation = self.generation
        self.starting += 1
        try:
            try:
                await container.start()
            except OSError as exc:  # no fds, no space, no runtime binary...
                raise ContainerFailed(f"cannot start a container: {exc}") from None
            await container.ready(min(START_TIMEOUT, self.settings.timeout))
            return container
        except BaseException:
            self._spawn(container.stop(0))
            raise
        finally:
            self.starting -= 1

    def refill(self) -> None:
        """Start containers until ``min_warm`` are ready or on their way."""
        if self.closed:
            return
        for _ in range(self.settings.min_warm - len(self.idle) - self.starting):
            self._spawn(self._warm_one())

    async def _warm_one(self) -> None:
        factory = self.new_container
        try:
            container = await self._start()
        except ContainerFailed as exc:
            self.log.warning("warm_start_failed", function=self.name, error=str(exc))
            await asyncio.sleep(1)  # a broken image must not spin
            return
        if factory is not self.new_container or self.closed:  # a new version came
            self._spawn(container.stop(0))
            self.refill()
            return
        self.idle.append(container)

    async def _janitor(self) -> None:
        """Stop containers idle past ``idle_timeout`` beyond what min_warm keeps."""
        while True:
            await asyncio.sleep(1)
            now = time.monotonic()
            for container in [c for c in self.idle if not c.alive]:  # died while idle
                self.idle.remove(container)
                self._spawn(container.stop(0))
            # the front of the list has waited longest (the back is used first)
            while len(self.idle) > self.settings.min_warm and \
                    now - self.idle[0].idle_since > self.settings.idle_timeout:
                self._spawn(self.idle.pop(0).stop())
            self.refill()  # a pool that lost containers, or whose start failed, fills up

    async def _reply(self, conn: socket.socket, data: bytes) -> None:
        """Answer the client ourselves. Its request is read away first: closing a socket
        with unread data sends a reset, and the client would never see the answer."""
        loop = asyncio.get_running_loop()
        try:
            conn.setblocking(False)
            await asyncio.wait_for(loop.sock_sendall(conn, data), 5)
            conn.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(1):
                while await loop.sock_recv(conn, 65536):
                    pass
        except (OSError, TimeoutError):
            pass

    def snapshot(self) -> dict[str, Any]:
        """Pool and counters, for status and metrics."""
        return {"name": self.name, "idle": len(self.idle), "busy": len(self.busy),
                "starting": self.starting, "waiting": self.waiting,
                **{k: v for k, v in vars(self.stats).items()}}

    def stop_accepting(self) -> None:
        """Close the listener now (its address may be served again at once)."""
        self.closed = True
        if self._accepting:
            self.loop.remove_reader(self.sock)
            self._accepting = False
        if self._resume_accept is not None:
            self._resume_accept.cancel()
        self.janitor.cancel()
        self.sock.close()

    async def close(self) -> None:
        """Stop accepting, let requests in flight (and waiting) finish, stop every
        container."""
        self.stop_accepting()
        deadline = time.monotonic() + self.settings.timeout + 5
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.timeout + 5):
                await self.drained.wait()
        while self.tasks and time.monotonic() < deadline:  # finishing ones spawn stops
            await asyncio.wait(set(self.tasks), timeout=deadline - time.monotonic())
        await asyncio.gather(*(c.stop(0) for c in list(self.idle) + list(self.busy)),
                             return_exceptions=True)
        self.idle.clear()
        self.busy.clear()


def settings_from(data: dict[str, Any]) -> ServeSettings:
    """The serving half of a function's settings."""
    known = {k: v for k, v in data.items() if k in ServeSettings.__dataclass_fields__}
    return replace(ServeSettings(), **known)
