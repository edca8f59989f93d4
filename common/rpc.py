"""Request/reply over ZeroMQ on asyncio: a ROUTER server and a DEALER client.

The server binds ``ipc://$FAAS_RUN/<service>.sock`` after taking an exclusive lock on
``<service>.lock`` beside it, so a second instance refuses to start instead of stealing
the endpoint. The socket file's owner and mode, fixed at bind time, decide who may
connect. Each request is served in its own task, so a slow ``sync`` never delays a
``ping``.

The client keeps one DEALER socket per endpoint and matches replies to calls by request
id, so a reply that arrives after its call timed out is simply dropped. ZeroMQ
reconnects on its own when the server comes back; a call lost with a dying server times
out cleanly, and idempotent operations are retried within the caller's deadline.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import fcntl
import itertools
import os
import stat
import time
import weakref
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import zmq
import zmq.asyncio

from common import protocol
from common.errors import Code, FaasError
from common.layout import Layout
from common.log import EventLog, request_id

Handler = Callable[[dict[str, Any]], Awaitable[Any]]

_call_counter = itertools.count(1)

# The uid of the process that sent the request being served, when the transport tells:
# libzmq reads SO_PEERCRED on an ipc connection and reports "<address>:<uid>:<gid>:<pid>"
# as the message's Peer-Address, so it is the kernel's word, never the client's. None
# elsewhere (in-process calls, such as the HTTP API's, unless it sets this itself).
peer_uid: contextvars.ContextVar[int | None] = contextvars.ContextVar("peer_uid", default=None)
# Who the caller is, as the key of a per-caller quota: "uid N" for a process the kernel
# named (ZeroMQ over ipc, the HTTP API on loopback or its unix socket), "token NAME" for
# the holder of an HTTP API token; None when unknown.
caller: contextvars.ContextVar[str | None] = contextvars.ContextVar("caller", default=None)


def _peer_uid(frame: zmq.Frame) -> int | None:
    try:
        address = frame.get("Peer-Address")
    except zmq.ZMQError:
        return None
    parts = address.rsplit(":", 3)
    return int(parts[1]) if len(parts) == 4 and parts[1].isdigit() else None


_contexts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, zmq.asyncio.Context] = (
    weakref.WeakKeyDictionary())


def context() -> zmq.asyncio.Context:
    """The ZeroMQ context of the running event loop: a daemon has one loop, so one context.

    Not ``Context.instance()``: that one is shared with synchronous code and outlives
    event loops, and sockets of a finished loop must not share anything with new ones."""
    loop = asyncio.get_running_loop()
    ctx = _contexts.get(loop)
    if ctx is None or ctx.closed:
        ctx = _contexts[loop] = zmq.asyncio.Context()
    return ctx


def socket_path(run_dir: str, service: str) -> str:
    """Where a service's endpoint lives."""
    return Layout(run=run_dir).socket(service)


def child_id() -> str:
    """The id of an outgoing call: derived from the request being served, if any."""
    parent = request_id.get()
    return f"{parent}.{next(_call_counter)}" if parent else protocol.new_id()


class AlreadyRunning(Exception):
    """Another instance holds the service's lock."""


@dataclass(frozen=True)
class Access:
    """Who may connect: the socket file's mode and, when we are root, its owner."""

    mode: int = 0o600
    uid: int = -1
    gid: int = -1


def take_lock(path: str) -> int:
    """Open and flock the lock file; refuse files that are not plainly ours."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            raise AlreadyRunning(f"lock file {path} is not a plain file owned by uid "
                                 f"{os.geteuid()}; remove it and start again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise AlreadyRunning(f"another instance (pid {holder}) holds {path}; stop it "
                                 "first (supervisorctl stop ...)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd
    except BaseException:
        os.close(fd)
        raise


class Server:
    """Serves one service's operations from a static handler table."""

    def __init__(self, service: str, handlers: dict[str, Handler], run_dir: str,
                 log: EventLog, access: Access = Access()):
        missing = set(protocol.OPS[service]) ^ set(handlers)
        if missing:
            raise ValueError(f"{service}: handlers and protocol.OPS differ on {sorted(missing)}")
        self.service = service
        self.handlers = dict(handlers)
        self.path = socket_path(run_dir, service)
        self.lock_path = Layout(run=run_dir).lock(service)
        self.log = log
        self.access = access
        self.sock: zmq.asyncio.Socket | None = None
        self._lock_fd: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def bind(self) -> None:
        """Take the lock, replace a stale socket file and bind with the right mode."""
        self._lock_fd = take_lock(self.lock_path)
        try:
            os.unlink(self.path)  # stale: its owner is gone, or we would not hold the lock
        except FileNotFoundError:
            pass
        sock = context().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * protocol.MAX_FRAME)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # The file is created by bind(): a umask makes it private from its first instant.
        old = os.umask(0o777 & ~self.access.mode)
        try:
            sock.bind(f"ipc://{self.path}")
        finally:
            os.umask(old)
        if os.geteuid() == 0 and (self.access.uid >= 0 or self.access.gid >= 0):
            os.chown(self.path, self.access.uid, self.access.gid, follow_symlinks=False)
        self.sock = sock
        self.log.info("listening", endpoint=self.path, mode=oct(self.access.mode))

    async def serve(self, stop: asyncio.Event) -> None:
        """Receive and dispatch until ``stop`` is set; then finish in-flight requests."""
        assert self.sock is not None, "bind() first"
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                recv = asyncio.ensure_future(self.sock.recv_multipart(copy=False))
                done, _ = await asyncio.wait({recv, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if recv not in done:
                    recv.cancel()
                    break
                frames = recv.result()
                task = asyncio.ensure_future(self._handle(frames))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            stopper.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=5)

    async def _handle(self, frames: list[zmq.Frame]) -> None:
        identity, body = frames[0].bytes, [f.bytes for f in frames[1:]]
        uid = _peer_uid(frames[-1])  # this task's own context: this request only
        peer_uid.set(uid)
        caller.set(None if uid is None else f"uid {uid}")
        reply = await self.dispatch(body[0] if len(body) == 1 else None)
        try:
            await self.sock.send_multipart([identity, reply])  # type: ignore[union-attr]
        except zmq.ZMQError as exc:  # the peer went away; nothing to tell it
            self.log.debug("reply_dropped", error=str(exc))

    async def dispatch(self, body: bytes | None) -> bytes:
        """Turn one request body into one reply body. Never raises."""
        rid: str | None = None
        token = None
        started = time.monotonic()
        try:
            if body is None:
                raise FaasError(Code.BAD_REQUEST, "a request is exactly one frame")
            try:
                req = protocol.parse_request(body, self.service)
            except FaasError as exc:
                rid = exc.request_id
                raise
            rid = req.id
            token = request_id.set(rid)
            result = await self.handlers[req.op.name](req.args)
            self.log.debug("served", op=req.op.name,
                           ms=round((time.monotonic() - started) * 1e3, 2))
            return protocol.make_reply(rid, result)
        except FaasError as exc:
            self.log.warning("refused", code=exc.code.value, error=exc.message, id=rid)
            return protocol.make_error(rid, exc)
        except Exception as exc:  # a bug: the traceback stays here, the client gets a code
            self.log.error("handler_failed", error=repr(exc), traceback=_traceback(exc))
            return protocol.make_error(rid, FaasError(
                Code.INTERNAL, f"internal error in {self.service}; its log has request id {rid}"))
        finally:
            if token is not None:
                request_id.reset(token)

    def close(self) -> None:
        """Close the socket, remove its file and release the lock."""
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
            try:
                os.unlink(self.path)
            except OSError:
                pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _traceback(exc: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(exc))


class Client:
    """Calls one service's operations; safe to share between tasks."""

    def __init__(self, service: str, run_dir: str, retries: int = 2):
        self.service = service
        self.path = socket_path(run_dir, service)
        self.retries = retries
        self.sock: zmq.asyncio.Socket | None = None
        self._pending: dict[str, asyncio.Future[protocol.Reply]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        # Set on every new connection (a server that came back): watchers wake on it.
        self.connected = asyncio.Event()

    def preflight(self) -> None:
        """Raise a clear error if the endpoint is missing or we may not connect to it."""
        try:
            os.stat(self.path)
        except PermissionError:
            raise self._forbidden() from None
        except FileNotFoundError:
            raise FaasError(Code.UNAVAILABLE, f"{self.path} does not exist: is faasd running? "
                            "(faasd up; faasd ctl status)") from None
        if not os.access(self.path, os.W_OK):
            raise self._forbidden()

    def _forbidden(self) -> FaasError:
        return FaasError(Code.FORBIDDEN, f"no permission to connect to {self.path}: add your "
                         "user to the faas group (usermod -aG faas USER) and log in again")

    def _connect(self) -> zmq.asyncio.Socket:
        if self.sock is None:
            sock = context().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue a request on a dead pipe
            sock.setsockopt(zmq.RECONNECT_IVL, 50)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
            sock.setsockopt(zmq.MAXMSGSIZE, 2 * protocol.MAX_FRAME)
            monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED |
                                              zmq.EVENT_DISCONNECTED)
            sock.connect(f"ipc://{self.path}")
            self.sock = sock
            self._reader = asyncio.ensure_future(self._read())
            self._watcher = asyncio.ensure_future(self._watch(monitor))
        return self.sock

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        """Fail calls at once when the server goes away; signal when one arrives.

        A reply can never come back over a connection that is gone, so waiting out the
        timeout would only delay the caller's retry."""
        try:
            while True:
                frames = await monitor.recv_multipart()
                event = int.from_bytes(frames[0][:2], "little")
                if event == zmq.EVENT_DISCONNECTED:
                    lost = FaasError(Code.UNAVAILABLE, f"connection to {self.service} lost",
                                     {"service": self.service})
                    for fut in self._pending.values():
                        if not fut.done():
                            fut.set_exception(lost)
                elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.connected.set()
        except (zmq.ZMQError, asyncio.CancelledError):
            pass
        finally:
            monitor.close(0)

    async def _read(self) -> None:
        assert self.sock is not None
        while True:
            try:
                frames = await self.sock.recv_multipart()
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            reply = protocol.parse_reply(frames[-1])
            fut = self._pending.get(reply.id) if reply.id else None
            if fut is not None and not fut.done():
                fut.set_result(reply)

    async def call(self, op: str, args: dict[str, Any] | None = None,
                   timeout: float | None = None, retries: int | None = None) -> Any:
        """Call ``op``; raise FaasError on an error reply, timeout or unknown op.

        ``timeout`` bounds each attempt; idempotent ops get ``retries`` more attempts
        (the client's default unless given)."""
        spec = protocol.OPS[self.service].get(op)
        if spec is None:
            raise FaasError(Code.BAD_REQUEST, f"{self.service} has no op {op!r}")
        args = spec.args.check(args or {}, "args")
        timeout = spec.timeout if timeout is None else timeout
        retries = self.retries if retries is None else retries
        attempts = 1 + (retries if spec.idempotent else 0)
        deadline = time.monotonic() + timeout * attempts
        last: FaasError | None = None
        for _ in range(attempts):
            left = min(timeout, deadline - time.monotonic())
            if left <= 0:
                break
            try:
                return await self._once(op, args, left)
            except FaasError as exc:
                if exc.code not in (Code.TIMEOUT, Code.UNAVAILABLE):
                    raise
                last = exc
        raise last or FaasError(Code.TIMEOUT, f"{self.service} {op}: no time left")

    async def _once(self, op: str, args: dict[str, Any], timeout: float) -> Any:
        rid = child_id()
        fut: asyncio.Future[protocol.Reply] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            sock = self._connect()
            async with asyncio.timeout(timeout):
                await sock.send(protocol.make_request(op, args, rid))
                reply = await fut
        except TimeoutError:
            raise FaasError(Code.TIMEOUT, f"{self.service} did not answer {op} within "
                            f"{timeout:.1f}s; is it running? (faasd ctl status)",
                            {"service": self.service, "op": op}) from None
        except zmq.ZMQError as exc:
            if exc.errno == errno.EACCES:
                raise self._forbidden() from None
            raise FaasError(Code.UNAVAILABLE, f"{self.service}: {exc}") from None
        finally:
            self._pending.pop(rid, None)
        if not reply.ok:
            assert reply.error is not None
            raise reply.error
        return reply.result

    def close(self) -> None:
        """Drop the socket; pending calls fail with a timeout."""
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
        self._reader = self._watcher = None
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
