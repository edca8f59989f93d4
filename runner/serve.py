"""Serving one function: its listener on [address]:80, its pool, its limits.

Each function has its own accept loop, so a slow or broken function never delays
another. A connection waits for one of ``concurrency`` slots (at most ``queue`` wait;
past that the runner answers 503 with Retry-After itself), takes a warm container
(reused or pre-started) or starts one, hands the socket over and waits for ``done``,
the container's exit, or the timeout (then the container is killed and the client's
connection closes with it). The pool is refilled to ``min_warm`` in the background.
"""

from __future__ import annotations

import asyncio
import bisect
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


class Function:
    """A deployed function as the runner serves it."""

    def __init__(self, name: str, address: str, settings: ServeSettings,
                 new_container: Callable[[], Container], log: EventLog):
        self.name = name
        self.address = address
        self.settings = settings
        self.new_container = new_container  # a container of the current version
        self.log = log
        self.sock = listen(address)
        self.slots = asyncio.Semaphore(settings.concurrency)
        self.waiting = 0
        self.idle: deque[Container] = deque()  # ready, connected, waiting for a conn
        self.busy: set[Container] = set()
        self.starting = 0
        self.stats = Stats()
        self.tasks: set[asyncio.Future[Any]] = set()
        self.accepting = asyncio.ensure_future(self._accept_loop())
        self.janitor = asyncio.ensure_future(self._janitor())
        self.refill()

    def update(self, settings: ServeSettings, new_container: Callable[[], Container]) -> None:
        """New settings or version: containers in flight finish, idle ones are replaced."""
        self.new_container = new_container
        if settings.concurrency != self.settings.concurrency:
            # Waiters on the old semaphore keep their place; new arrivals use the new one.
            self.slots = asyncio.Semaphore(settings.concurrency)
        self.settings = settings
        while self.idle:
            self._spawn(self.idle.popleft().stop())
        self.refill()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(self.sock)
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                self.log.warning("accept_failed", function=self.name, error=str(exc))
                await asyncio.sleep(0.1)
                continue
            self._spawn(self.handle(conn, addr[0]))

    async def handle(self, conn: socket.socket, remote: str) -> None:
        """Serve one client connection, whatever happens to the container."""
        token = request_id.set(new_id())
        started = time.monotonic()
        outcome = "error"
        try:
            conn.setblocking(False)
            if self.slots.locked() and self.waiting >= self.settings.queue:
                outcome = "rejected"
                self.stats.rejected += 1
                await self._reply(conn, http_error(503, "Service Unavailable",
                                                   f"{self.name} is at capacity", 1))
                return
            slots = self.slots
            if slots.locked():  # wait for a slot, at most the timeout (wait_for costs a task)
                self.waiting += 1
                try:
                    await asyncio.wait_for(slots.acquire(), self.settings.timeout)
                except TimeoutError:
                    outcome = "rejected"
                    self.stats.rejected += 1
                    await self._reply(conn, http_error(503, "Service Unavailable",
                                                       f"{self.name} is at capacity", 1))
                    return
                finally:
                    self.waiting -= 1
            else:
                await slots.acquire()  # free: returns at once
            try:
                outcome = await self._serve(conn, remote)
            finally:
                slots.release()
        except Exception as exc:  # a bug: into the log, and the client gets its answer
            self.log.error("request_failed", function=self.name, error=repr(exc))
            await self._reply(conn, http_error(500, "Internal Server Error",
                                               f"{self.name}: faasd failed; see its log"))
        finally:
            conn.close()
            self.stats.outcomes[outcome] = self.stats.outcomes.get(outcome, 0) + 1
            elapsed = time.monotonic() - started
            self.stats.observe(elapsed)
            self.log.info("request", function=self.name, outcome=outcome,
                          ms=round(elapsed * 1e3, 2))
            request_id.reset(token)
            self.refill()

    async def _serve(self, conn: socket.socket, remote: str) -> str:
        try:
            container, how = await self._take()
        except ContainerFailed as exc:
            self.stats.failed += 1
            self.log.warning("container_failed", function=self.name, error=str(exc))
            reason = "Gateway Timeout" if exc.status == 504 else "Bad Gateway"
            await self._reply(conn, http_error(exc.status, reason, f"{self.name}: {exc}"))
            return "failed"
        self.busy.add(container)
        rid = request_id.get() or new_id()
        try:
            container.hand_over(conn, rid, remote, time.time() + self.settings.timeout)
        except ContainerFailed as exc:
            self.busy.discard(container)
            self._spawn(container.stop(0))
            self.stats.failed += 1
            await self._reply(conn, http_error(502, "Bad Gateway", f"{self.name}: {exc}"))
            return "failed"
        conn.close()  # the container holds the connection now; ours would keep it open
        setattr(self.stats, how, getattr(self.stats, how) + 1)
        self.stats.served += 1
        result = await container.finish(self.settings.timeout)
        self.busy.discard(container)
        if result == "timeout":
            self.stats.timeouts += 1
            self.log.warning("timeout", function=self.name, container=container.id)
            self._spawn(container.stop(0))
        elif result == "done" and self.settings.reuse and container.alive:
            self.idle.append(container)
        else:
            self._spawn(container.stop())
        return f"{how}:{result}"

    async def _take(self) -> tuple[Container, str]:
        """A ready container: an idle one if any, else a new one (a cold start)."""
        while self.idle:
            container = self.idle.popleft()
            if container.alive:
                return container, "reused" if container.served else "warm"
            self._spawn(container.stop(0))
        return await self._start(), "cold"

    async def _start(self) -> Container:
        container = self.new_container()
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
        if factory is not self.new_container:  # a new version came while it started
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
            for container in list(self.idle):
                if len(self.idle) <= self.settings.min_warm:
                    break
                if now - container.idle_since > self.settings.idle_timeout:
                    self.idle.remove(container)
                    self._spawn(container.stop())
            self.refill()  # a pool that lost containers, or whose start failed, fills up

    async def _reply(self, conn: socket.socket, data: bytes) -> None:
        """Answer the client ourselves. Its request is read away first: closing a socket
        with unread data sends a reset, and the client would never see the answer."""
        loop = asyncio.get_running_loop()
        try:
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
        self.accepting.cancel()
        self.janitor.cancel()
        self.sock.close()

    async def close(self) -> None:
        """Stop accepting, let requests in flight finish, stop every container."""
        self.stop_accepting()
        deadline = time.monotonic() + self.settings.timeout + 5
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
