"""Serving one function: its listeners on [address]:PORT, its pool, its limits.

Each function has its own listeners (one per port of its ``ports`` setting), so a slow or
broken function never delays another. A connection from a VPN peer that the function's
``allow`` does not name is refused at accept, before anything else (runner/callers.py):
on port 80 with an HTTP 403 written by the runner, on other ports by closing it. Any
other connection takes one of ``concurrency`` slots or waits in a queue of at most
``queue`` (for at most ``timeout``; past either the runner answers 503 with Retry-After
itself), takes a warm container (reused or pre-started) or starts one, is handed over,
and ends with ``done``, the container's exit, or the timeout (then the container is
killed and the client's connection closes with it). The pool is refilled to
``min_warm`` in the background.

Before any of that a connection is admitted (docs/containers.md, "Admission"): one
client address may hold at most ``per_client`` connections, and a connection whose
first byte has not arrived yet holds no slot and no queue place: it waits, at most
``first_byte_timeout``, in a set of its own that one timer per function watches. A
container is started only if its memory limit fits the host's budget (runner/budget.py).

A request that finds a container ready runs on callbacks only: the listener's reader
accepts, hands the socket over at once, and the container calls back when the request
ends, which hands the slot, and often the same container, to the next connection in the
queue. No task, future or log write per request: that path is what bounds a reused
function's throughput. Starting a container, and answering a client ourselves, are tasks.

Why one module of this length: admission (first byte, per client, memory budget), slots,
queue and pool are one state machine whose transitions share the per-request hot path;
split over modules, each hand-over would cross them. Containers themselves live in
``runner/container.py``, the memory budget in ``runner/budget.py``.

With a keeper (``runner/keep.py``) every listener, and every connection from its accept
until it is handed over or ended here, is held there too: a runner that stops or dies
leaves them to the next one instead of resetting them.
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

from common.fnsettings import BY_KEY, per_client_limit
from common.log import EventLog, request_id
from common.protocol import new_id
from runner.budget import MemoryBudget
from runner.callers import Callers
from runner.container import Container, ContainerFailed
from runner.keep import Keep

# Upper bounds (seconds) of the request-latency histogram's buckets; one more for +Inf.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
IPV6_FREEBIND = 78  # linux/in6.h; bind before netagent has put the address in place
BACKLOG = 1024
START_TIMEOUT = 10.0
# 503s being written at once, over every function: each holds its connection up to a
# second (the request is read away first). Past this a refusal is closed unanswered, so a
# client opening connections faster than they are refused cannot use up the runner's fds.
REFUSING_MAX = 256
FIRST_BYTE_WAITING = 2  # connections that may wait for their first byte, per slot and
FIRST_BYTE_MIN_WAITING = 256  # queue place, and at least this many; past it the one
# that has waited longest is closed
PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT  # an accepted socket is blocking (hand_over)


@dataclass(frozen=True)
class ServeSettings:
    """How the runner serves a function (the container's own limits live in its config):
    the serving settings of common/fnsettings.py, by their names, with their defaults."""

    timeout: float = BY_KEY["timeout"].default
    concurrency: int = BY_KEY["concurrency"].default
    queue: int = BY_KEY["queue"].default
    min_warm: int = BY_KEY["min_warm"].default
    reuse: bool = BY_KEY["reuse"].default
    idle_timeout: float = BY_KEY["idle_timeout"].default
    first_byte_timeout: float = BY_KEY["first_byte_timeout"].default
    per_client: int = BY_KEY["per_client"].default  # 0: auto (fnsettings.per_client_limit)
    memory: int = BY_KEY["memory"].default  # a container's limit, counted against the budget
    ports: list[int] = field(default_factory=lambda: list(BY_KEY["ports"].default))
    allow: list[str] = field(default_factory=lambda: list(BY_KEY["allow"].default))


@dataclass
class Stats:
    """Counters the runner reports for a function."""

    served: int = 0
    cold: int = 0
    warm: int = 0
    reused: int = 0
    forbidden: int = 0  # a peer not in allow: 403 (port 80) or closed, at accept
    rejected: int = 0  # 503, for any of the reasons below
    rejected_client: int = 0  # 503: the client address holds per_client connections
    rejected_memory: int = 0  # 503: a new container would go past the memory budget
    first_byte_timeouts: int = 0  # closed: no byte within first_byte_timeout
    first_byte_dropped: int = 0  # closed: too many waiting for their first byte
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

    __slots__ = ("conn", "remote", "port", "peer", "id", "started", "queued_until",
                 "counted", "kept")

    def __init__(self, conn: socket.socket, remote: str, started: float, port: int = 80,
                 peer: str | None = None):
        self.conn = conn
        self.remote = remote
        self.port = port  # the function's port it came to
        self.peer = peer  # the VPN peer's name; None: a local caller (or unknown)
        self.id = new_id()
        self.started = started  # loop time
        self.queued_until = 0.0  # in the queue; waiting for the first byte: until then
        self.counted = False  # in Function.clients
        self.kept = ""  # its key in the keeper, until handed over or ended


class Function:
    """A deployed function as the runner serves it."""

    refusing = 0  # 503s being written now, by every function of the runner (REFUSING_MAX)

    def __init__(self, name: str, address: str, settings: ServeSettings,
                 new_container: Callable[[], Container], log: EventLog,
                 budget: MemoryBudget | None = None, callers: Callers | None = None,
                 bind: Callable[[int], int] = int, keep: Keep | None = None):
        self.name = name
        self.address = address
        self.settings = settings
        self.new_container = new_container  # a container of the current version
        self.log = log
        self.budget = budget if budget is not None else MemoryBudget()
        self.loop = asyncio.get_running_loop()
        self.callers = callers  # None: every caller is local (no VPN peers known)
        self.bind = bind  # the port to bind for a function port (tests: 0, any free one)
        self.keep = keep  # holds listeners and unserved connections across runner restarts
        self.listeners: dict[int, socket.socket] = {}  # by the function's port
        self.listen_failed: set[int] = set()  # ports that could not be bound: retried
        self._accepting = False
        self._listen(settings.ports)
        self.active = 0  # slots taken: requests being served or their container started
        self.pending: deque[Request] = deque()  # waiting for a slot, oldest first
        self._expiry: asyncio.TimerHandle | None = None  # of the oldest pending request
        self._expiry_busy: asyncio.TimerHandle | None = None  # of requests in flight
        # accepted, no byte received yet, by fd; oldest first (dicts keep their order)
        self.first_byte: dict[int, Request] = {}
        self._expiry_first: asyncio.TimerHandle | None = None  # of the oldest of those
        self.clients: dict[str, int] = {}  # connections held, by client address
        self.per_client = per_client_limit(settings.per_client, settings.concurrency)
        self._over_budget = False  # a warm start was refused: logged once
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
        self._listen(settings.ports, changed=True)
        self.per_client = per_client_limit(settings.per_client, settings.concurrency)
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

    def _listen(self, ports: list[int], changed: bool = False) -> None:
        """Listen on exactly ``ports``: new ones opened, removed ones closed (their
        connections already accepted go on)."""
        for port in [p for p in self.listeners if p not in ports]:
            sock = self.listeners.pop(port)
            if self._accepting:
                self.loop.remove_reader(sock)
            if self.keep is not None:
                self.keep.unlisten(self.address, self.bind(port))
            sock.close()
            self.log.info("port_closed", function=self.name, port=port)
        for port in [p for p in ports if p not in self.listeners]:
            try:
                self.listeners[port] = sock = self._open(port)
            except OSError as exc:  # in use by something else on this host: the others go
                # on, and the janitor tries again every second (logged once per port)
                if port not in self.listen_failed:
                    self.listen_failed.add(port)
                    self.log.error("listen_failed", function=self.name, port=port,
                                   error=str(exc), retry="every second")
                continue
            if self._accepting:
                self.loop.add_reader(sock, self._on_accept, sock, port)
            if changed or port in self.listen_failed:
                self.log.info("port_opened", function=self.name, port=port)
            self.listen_failed.discard(port)
        self.listen_failed &= set(ports)

    def _open(self, port: int) -> socket.socket:
        bound = self.bind(port)
        if self.keep is None:
            return listen(self.address, bound)
        return self.keep.listen(self.address, bound, lambda: listen(self.address, bound))

    def _accept(self) -> None:
        self._resume_accept = None
        if not self.closed:
            for port, sock in self.listeners.items():
                self.loop.add_reader(sock, self._on_accept, sock, port)
            self._accepting = True

    def _on_accept(self, sock: socket.socket, port: int) -> None:
        """A listener is readable: take what its backlog holds (a bounded batch, so
        one busy function does not starve the others)."""
        now = self.loop.time()
        for _ in range(64):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # the client gave up while in the backlog
                continue
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                self.log.warning("accept_failed", function=self.name, error=str(exc))
                for listener in self.listeners.values():
                    self.loop.remove_reader(listener)
                self._accepting = False
                self._resume_accept = self.loop.call_later(0.1, self._accept)
                return
            req = Request(conn, addr[0], now, port)
            if self.keep is not None:
                req.kept = self.keep.pawn(conn, self.address, self.bind(port), addr[0])
            self._arrive(req)

    def adopt(self, conn: socket.socket, port: int, remote: str, key: str) -> None:
        """A connection the previous runner accepted and never handed over (the keeper
        gave it back): served as if it had just been accepted."""
        req = Request(conn, remote, self.loop.time(), port)
        req.kept = key
        conn.setblocking(True)  # as accept() gives them (hand_over expects it)
        self._arrive(req)

    def _done_with(self, req: Request) -> None:
        """Handed over or ended here: our copy of the connection closes, the keeper's
        too."""
        if req.kept:
            assert self.keep is not None
            self.keep.release(req.kept)
            req.kept = ""
        req.conn.close()

    def _arrive(self, req: Request) -> None:
        """A connection just accepted: refused if its peer is not allowed; else counted
        for its address, then admitted if its first byte is there (usually: it came with
        the handshake's last ACK), else left to wait for it without a slot."""
        if self.callers is not None:
            req.peer, local = self.callers.identify(req.remote)
            if not self.callers.allowed(self.settings.allow, req.peer, local):
                return self._forbid(req)
        if self.per_client:
            held = self.clients.get(req.remote, 0)
            if held >= self.per_client:
                self.stats.rejected_client += 1
                return self._refuse(req, f"{self.name}: too many connections from "
                                    f"{req.remote} (per_client {self.per_client})")
            self.clients[req.remote] = held + 1
            req.counted = True
        if self.settings.first_byte_timeout > 0:
            try:
                if not req.conn.recv(1, PEEK):  # closed without sending anything
                    return self._close_early(req)
            except (BlockingIOError, InterruptedError):
                return self._wait_first_byte(req)
            except OSError:  # reset already
                return self._close_early(req)
        self._admit(req, req.started)

    def _wait_first_byte(self, req: Request) -> None:
        if len(self.first_byte) >= max(FIRST_BYTE_MIN_WAITING, FIRST_BYTE_WAITING * (
                self.settings.concurrency + self.settings.queue)):
            self.stats.first_byte_dropped += 1
            self._close_early(next(iter(self.first_byte.values())))
        fd = req.conn.fileno()
        req.queued_until = req.started + self.settings.first_byte_timeout
        self.first_byte[fd] = req
        self.loop.add_reader(fd, self._first_byte_in, req)
        if self._expiry_first is None:
            self._expiry_first = self.loop.call_at(req.queued_until, self._expire_first)

    def _first_byte_in(self, req: Request) -> None:
        """A waiting connection is readable: its first byte (then it is admitted), or
        its end."""
        try:
            if not req.conn.recv(1, PEEK):
                return self._close_early(req)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self._close_early(req)
        fd = req.conn.fileno()
        self.loop.remove_reader(fd)
        del self.first_byte[fd]
        self._admit(req, self.loop.time())

    def _expire_first(self) -> None:
        """Connections that sent nothing for ``first_byte_timeout`` are closed, with no
        answer (the client may not speak HTTP; browsers' unused preconnects end so)."""
        self._expiry_first = None
        now = self.loop.time()
        while self.first_byte:
            req = next(iter(self.first_byte.values()))
            if req.queued_until > now:
                self._expiry_first = self.loop.call_at(req.queued_until, self._expire_first)
                return
            self.stats.first_byte_timeouts += 1
            self._close_early(req)

    def _close_early(self, req: Request) -> None:
        """Close a connection that has not been admitted: nothing to answer, nothing to
        account but its address's count."""
        fd = req.conn.fileno()
        if self.first_byte.pop(fd, None) is not None:
            self.loop.remove_reader(fd)
        self._done_with(req)
        self._release(req)

    def _release(self, req: Request) -> None:
        if req.counted:
            req.counted = False
            held = self.clients[req.remote] - 1
            if held:
                self.clients[req.remote] = held
            else:
                del self.clients[req.remote]

    def _admit(self, req: Request, now: float) -> None:
        if self.active < self.settings.concurrency:
            self.active += 1
            self.drained.clear()
            self._dispatch(req)
        elif len(self.pending) >= self.settings.queue:
            self._refuse(req)
        else:
            req.queued_until = now + self.settings.timeout
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

    def _forbid(self, req: Request) -> None:
        """A peer ``allow`` does not name: no slot, no container. Port 80 is HTTP's, so
        it gets a 403 as a 503 is written; another port's protocol is unknown: closed."""
        self.stats.forbidden += 1
        if req.port != 80 or Function.refusing >= REFUSING_MAX:
            self._done_with(req)
            return self._account(req, "forbidden")
        Function.refusing += 1
        self._spawn(self._refuse_reply(req, http_error(
            403, "Forbidden", f"{self.name} does not allow {req.peer or 'this peer'}"), False,
            "forbidden"))

    def _refuse(self, req: Request, why: str = "", slot: bool = False) -> None:
        self.stats.rejected += 1
        if Function.refusing >= REFUSING_MAX:  # a flood: closed now, holding nothing
            self._done_with(req)
            self._account(req, "rejected")
            if slot:
                self.active -= 1
                self._next()
            self._check_drained()
            return
        Function.refusing += 1
        self._spawn(self._refuse_reply(req, http_error(
            503, "Service Unavailable", why or f"{self.name} is at capacity", 1), slot))

    async def _refuse_reply(self, req: Request, data: bytes, slot: bool,
                            outcome: str = "rejected") -> None:
        try:
            await self._reply_and_end(req, data, outcome, slot)
        finally:
            Function.refusing -= 1

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
        container = self._within_budget()
        if container is None:
            self.stats.rejected_memory += 1
            # the figures are for the operator (metrics), not for every client
            return self._refuse(req, f"{self.name}: the host's container memory budget is "
                                "in use", slot=True)
        self._spawn(self._serve_cold(req, container))

    async def _serve_cold(self, req: Request, container: Container) -> None:
        token = request_id.set(req.id)
        try:
            await self._start(container)
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
            container.hand_over(req.conn, req.id, req.remote, time.time() + timeout,
                                req.port, req.peer)
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
        self._done_with(req)  # the container holds the connection now; ours would keep it
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
        """The request is over: counted, logged, and no longer its address's."""
        if req.counted:
            self._release(req)
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
            self._done_with(req)
            self._account(req, outcome)
            if slot:
                self.active -= 1
                self._next()
            self._check_drained()

    # --- the pool --------------------------------------------------------------------

    def _within_budget(self) -> Container | None:
        """A new container, its memory counted against the budget; None if it would not
        fit (decided here, synchronously, so concurrent starts cannot overshoot)."""
        if not self.budget.fits(self.settings.memory):
            return None
        container = self.new_container()
        self.budget.take(container.id, self.settings.memory)
        return container

    async def _start(self, container: Container) -> None:
        """Start a container from :meth:`_within_budget` and wait until it is ready."""
        container.generation = self.generation
        self.starting += 1
        try:
            try:
                await container.start()
            except OSError as exc:  # no fds, no space, no runtime binary...
                raise ContainerFailed(f"cannot start a container: {exc}") from None
            await container.ready(min(START_TIMEOUT, self.settings.timeout))
        except BaseException:
            self._spawn(container.stop(0))
            raise
        finally:
            self.starting -= 1
            self._give_back_at_exit(container)

    def _give_back_at_exit(self, container: Container) -> None:
        """The container's memory counts against the budget until it has exited."""
        exited = container.exited
        if exited is None:  # the runtime never ran
            self.budget.give_back(container.id)
        else:
            exited.add_done_callback(lambda _: self.budget.give_back(container.id))

    def refill(self) -> None:
        """Start containers until ``min_warm`` are ready or on their way; a start past
        the memory budget waits for a later call (the janitor makes one every second)."""
        if self.closed:
            return
        for _ in range(self.settings.min_warm - len(self.idle) - self.starting):
            container = self._within_budget()
            if container is None:
                if not self._over_budget:
                    self._over_budget = True
                    self.log.warning("warm_start_waits", function=self.name,
                                     reason="container memory budget",
                                     **self.budget.snapshot())
                return
            self._over_budget = False
            self.starting += 1  # counted now: the next refill must not start it twice
            self._spawn(self._warm_one(container, self.new_container))

    async def _warm_one(self, container: Container, factory: Callable[[], Container]
                        ) -> None:
        self.starting -= 1  # _start counts it from here
        try:
            await self._start(container)
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
            if self.listen_failed:
                self._listen(self.settings.ports)

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
                "first_byte_waiting": len(self.first_byte),
                **{k: v for k, v in vars(self.stats).items()}}

    def stop_accepting(self, leave: bool = False) -> None:
        """Close the listener now (its address may be served again at once). ``leave``:
        the runner is stopping, and what the keeper holds (listeners, connections not yet
        served) stays there for the next runner."""
        self.closed = True
        if self._accepting:
            for sock in self.listeners.values():
                self.loop.remove_reader(sock)
            self._accepting = False
        if self._resume_accept is not None:
            self._resume_accept.cancel()
        for req in list(self.first_byte.values()):  # they have sent nothing to finish
            if leave and req.kept:
                self._abandon(req)
            else:
                self._close_early(req)
        if self._expiry_first is not None:
            self._expiry_first.cancel()
            self._expiry_first = None
        self.janitor.cancel()
        for port, sock in self.listeners.items():
            if self.keep is not None and not leave:
                self.keep.unlisten(self.address, self.bind(port))
            sock.close()
        if leave:  # the queue too: the next runner serves it
            kept = [r for r in self.pending if r.kept]
            for req in kept:
                self.pending.remove(req)
                self._abandon(req)
            self._check_drained()

    def _abandon(self, req: Request) -> None:
        """Left to the next runner: our copy closes, the keeper's stays."""
        fd = req.conn.fileno()
        if self.first_byte.pop(fd, None) is not None:
            self.loop.remove_reader(fd)
        req.conn.close()
        self._release(req)

    async def close(self, leave: bool = False) -> None:
        """Stop accepting, let requests in flight (and waiting, unless ``leave`` leaves
        them to the next runner) finish, stop every container."""
        self.stop_accepting(leave)
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
