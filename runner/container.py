"""One function container: its bundle, its control socket, its runtime process.

The runner listens on a SOCK_SEQPACKET socket per container (bind-mounted at
/control.sock); the handler connecting to it means "ready". A connection is handed over
as one packet of JSON with exactly one fd attached (SCM_RIGHTS); the handler answers
``done`` (reuse) or exits (one-shot).

The runtime is reached only through runner/runtime.py (``spawn_run``, ``kill``,
``delete``), which chooses the argv and how a container starts. runc starts the
container detached and exits: the container's init, orphaned, becomes
the runner's child (the runner is a child subreaper), watched through a pidfd, and its
stdout and stderr are pipes straight to the runner (``runc run`` in the foreground
would copy them through itself: a Go wakeup per line). crun runs in the foreground, our
child, whose exit is the container's: it passes the pipes straight through, and
detached it would leave an intermediate process for us to reap. The output goes to the
function's log tagged with the request being served.

Waiting for a request's end costs no task: the control socket has a reader callback
for the container's life, and whichever comes first (``done``, the container's exit,
the deadline its function watches) calls the function's callback once. That is the
path every request of a reused container takes, so it is kept short.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import select
import shutil
import socket
import time
from typing import Any, Callable

from runner.bundle import BundleError, write_bundle
from runner.handler_protocol import CONTROL_PACKET, conn_packet, done_packet, is_done
from runner.runtime import Running, Runtime, RuntimeFailed

PUMP_GRACE = 2.0  # seconds to read a stopped container's last output
PUMP_PAUSE = 0.05  # after a read, a pipe is left alone this long (see LinePump)
PUMP_READ = 65536
PIPE_SIZE = 256 << 10  # of each output pipe: a handler writes 5 MB/s before it waits
F_SETPIPE_SZ = 1031  # linux/fcntl.h
MAX_LINE = 16 << 10  # longer lines are cut here; the rest up to the newline is dropped


class ContainerFailed(Exception):
    """The container died or misbehaved before it could serve; ``status`` for the client."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.status = status


class Container:
    """A container of one function version, from start to removal."""

    def __init__(self, function: str, bundles: str, ctl_dir: str, runtime: Runtime,
                 make_config: Callable[[str, str], dict[str, Any]],
                 sink: Callable[[str, str, str | None, list[str]], None],
                 on_remove: Callable[[str], None] | None = None):
        self.id = f"{function}-{secrets.token_hex(6)}"
        self.function = function
        self.bundle = os.path.join(bundles, self.id)
        self.ctl_path = os.path.join(ctl_dir, f"{self.id}.sock")
        self.runtime = runtime
        self.make_config = make_config  # (container id, control socket path) -> config
        self.sink = sink  # (container id, stream, request id, lines)
        self.on_remove = on_remove  # (container id): what make_config made beside the bundle
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.running: Running | None = None  # from the runtime's spawn_run
        self.proc: asyncio.subprocess.Process | None = None  # the runtime's `run`
        self.request: str | None = None
        self.served = 0
        self.generation = 0  # of its function's settings, when it was started
        self.idle_since = time.monotonic()
        self._pumps: list[LinePump] = []
        self._output = select.poll()  # which pipes have something: one syscall for both
        self._pump_of: dict[int, LinePump] = {}
        self.exited: asyncio.Future[int] | None = None
        self._result: Callable[[str], None] | None = None  # waiting for this request's end
        self.deadline = 0.0  # of the request handed over, loop time (the caller's to set)
        self._done = b""
        self._reading = False
        self.leaving = False
        self._stopping: asyncio.Future[None] | None = None

    # --- life ------------------------------------------------------------------------

    async def start(self) -> None:
        """Write the bundle, open the control socket, start the runtime."""
        os.makedirs(self.bundle, mode=0o700)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(self.ctl_path)
        os.chmod(self.ctl_path, 0o666)  # the handler runs as the image's user
        listener.listen(1)
        listener.setblocking(False)
        self.listener = listener
        try:
            write_bundle(self.bundle, self.make_config(self.id, self.ctl_path))
        except BundleError as exc:  # the image or settings cannot make a container
            raise ContainerFailed(exc.message) from None
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(2)]  # stdout, stderr
        try:
            for r, _ in pipes:
                with contextlib.suppress(OSError):  # over the user's pipe quota: 64 KiB
                    fcntl.fcntl(r, F_SETPIPE_SZ, PIPE_SIZE)
            self.running = await self.runtime.spawn_run(
                self.bundle, self.id, stdout=pipes[0][1], stderr=pipes[1][1],
                pidfile=os.path.join(self.bundle, "pid"))
            self.proc = self.running.proc
        except BaseException:
            for r, _ in pipes:
                os.close(r)
            raise
        finally:
            for _, w in pipes:
                os.close(w)
        for name, (r, _) in zip(("stdout", "stderr"), pipes):
            self._pumps.append(LinePump(r, self._lines(name)))
            self._pump_of[r] = self._pumps[-1]
            self._output.register(r, select.POLLIN)
        # One future for the container's whole life: ready() and every request wait on it
        self.exited = asyncio.ensure_future(self.running.wait())
        self.exited.add_done_callback(self._on_exit)

    @property
    def pid(self) -> int:
        """The container's init, once a detached runtime has started it (else 0)."""
        return self.running.pid if self.running is not None else 0

    def _lines(self, stream: str) -> Callable[[list[str]], None]:
        def emit(lines: list[str]) -> None:
            self.sink(self.id, stream, self.request, lines)
        return emit

    async def ready(self, timeout: float) -> None:
        """Wait for the handler to connect to its control socket."""
        assert self.listener is not None and self.proc is not None
        assert self.exited is not None
        accept = asyncio.ensure_future(asyncio.get_running_loop().sock_accept(self.listener))
        exited = self.exited
        done, _ = await asyncio.wait({accept, exited}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if accept in done:
            self.conn, _ = accept.result()
            self.conn.setblocking(False)
            self.listener.close()  # one handler per container
            self.listener = None
            # read for the container's whole life: no epoll change per request
            asyncio.get_running_loop().add_reader(self.conn, self._readable)
            self._reading = True
            return
        accept.cancel()
        if exited in done:
            raise ContainerFailed(f"container exited ({exited.result()}) before its "
                                  "handler connected to /control.sock")
        raise ContainerFailed(f"handler did not connect to /control.sock within {timeout:.0f}s",
                              504)

    def hand_over(self, client: socket.socket, request_id: str, remote: str,
                  deadline: float, port: int = 80, peer: str | None = None) -> None:
        """Send one connection: the JSON packet with exactly that one fd attached.

        ``client`` must be a blocking socket: O_NONBLOCK lives on the open file, which
        the handler shares, and a handler written from the protocol's text expects a
        plain blocking socket (a socket from accept() on Linux is one)."""
        assert self.conn is not None
        packet = conn_packet(request_id, remote, deadline, port, peer)
        self._drain()  # what it wrote while idle keeps the tag it had (none)
        self.request = request_id
        self._done = done_packet(request_id)  # as the SDK writes it: no JSON to parse
        self.idle_since = time.monotonic()
        try:
            socket.send_fds(self.conn, [packet], [client.fileno()])
        except OSError as exc:  # a full queue means the handler is not reading
            raise ContainerFailed(f"handler did not take the connection: {exc.strerror}")
        self.served += 1

    def await_result(self, callback: Callable[[str], None]) -> None:
        """Call ``callback`` once with "done" (the handler answered ``done`` for the
        connection just handed over), "exited" (the container is gone), or "timeout"
        when the caller calls :meth:`expire`."""
        assert self.conn is not None and self.exited is not None
        self._result = callback
        if self.exited.done():
            self._end("exited")

    @property
    def waiting(self) -> bool:
        """A request handed over has not ended yet."""
        return self._result is not None

    def expire(self) -> None:
        """The request's deadline has passed: it ends as "timeout"."""
        self._end("timeout")

    def _readable(self) -> None:
        assert self.conn is not None
        while True:
            try:
                packet = self.conn.recv(CONTROL_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                packet = b""
            if not packet:  # the handler closed its end: it is leaving
                self.leaving = True  # not to be handed anything, even before its exit
                self._stop_reading()  # its exit (or the deadline) ends a request
                return
            if packet == self._done or is_done(packet, self.request):
                self._drain()  # what it wrote for this request, tagged with it
                self.request = None
                self.idle_since = time.monotonic()
                return self._end("done")
            # anything else is a type we do not know: ignored, as the protocol says

    def _drain(self) -> None:
        """Read what the output pipes hold now, under the current request id."""
        for fd, _ in self._output.poll(0):
            self._pump_of[fd].drain()

    def _on_exit(self, _: asyncio.Future[int]) -> None:
        if self._result is not None:
            self._end("exited")

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            asyncio.get_running_loop().remove_reader(self.conn)

    def _end(self, result: str) -> None:
        callback, self._result = self._result, None
        if callback is not None:
            callback(result)

    @property
    def alive(self) -> bool:
        return self.exited is not None and not self.exited.done() and not self.leaving

    async def stop(self, grace: float = 1.0) -> None:
        """Close the control socket (the protocol's "stop"), then kill if need be; remove
        everything the container had on the host. Calls after the first wait for it."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float) -> None:
        self._end("exited")  # a request still waiting on it ends now
        self._stop_reading()
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.exited is not None and not self.exited.done():
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), grace)
            except TimeoutError:
                await self.kill()
        await self.remove()
        # The pipes close when the container's last process has gone; a process the
        # runtime could not kill must not hold the runner up.
        if self._pumps:
            await asyncio.wait([p.closed for p in self._pumps], timeout=PUMP_GRACE)
        for pump in self._pumps:
            pump.close()

    async def kill(self) -> None:
        """SIGKILL the container (through the runtime, so every process in it dies)."""
        with contextlib.suppress(RuntimeFailed):  # gone already, or not started yet:
            await self.runtime.kill(self.id)  # the wait below says which
        if self.exited is None or self.running is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), 5)
            return
        except TimeoutError:  # the runtime is stuck starting it, or could not kill it
            self.running.kill_now()
        with contextlib.suppress(TimeoutError):  # (a process stuck in the kernel stays)
            await asyncio.wait_for(asyncio.shield(self.exited), 5)

    async def remove(self) -> None:
        """Delete the runtime's record, the bundle, the secrets' copies and the control
        socket."""
        with contextlib.suppress(RuntimeFailed):  # a container the runtime could not
            await self.runtime.delete(self.id)  # delete is deleted at the runner's next start
        shutil.rmtree(self.bundle, ignore_errors=True)
        if self.on_remove is not None:
            self.on_remove(self.id)
        try:
            os.unlink(self.ctl_path)
        except FileNotFoundError:
            pass


class LinePump:
    """Reads one of a container's output pipes and hands on whole lines, in batches.

    After each read the pipe is left alone for PUMP_PAUSE: a handler that writes a line
    per request then costs the runner one wakeup per pause, not one per request (the
    container drains its pipes itself when a request ends, so lines keep their request
    id). A pipe holds PIPE_SIZE, so a handler is never held up below about 5 MB/s of output.
    """

    def __init__(self, fd: int, emit: Callable[[list[str]], None]):
        self.fd = fd
        self.emit = emit
        self.partial = b""
        self.cut = False  # inside a line over MAX_LINE: dropping up to its newline
        self.loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.resume: asyncio.TimerHandle | None = None
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        self.loop.remove_reader(self.fd)
        if self.drain():
            self.resume = self.loop.call_later(PUMP_PAUSE, self._resume)

    def _resume(self) -> None:
        self.resume = None
        if not self.closed.done():
            self.loop.add_reader(self.fd, self._readable)

    def drain(self) -> bool:
        """Read what is in the pipe now; False once it is closed (end of file)."""
        if self.closed.done():
            return False
        chunks = []
        while True:
            try:
                chunk = os.read(self.fd, PUMP_READ)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                self._lines(b"".join(chunks), end=True)
                self.close()
                return False
            chunks.append(chunk)
            if len(chunk) < PUMP_READ:
                break
        if chunks:
            self._lines(b"".join(chunks))
        return True

    def _lines(self, data: bytes, end: bool = False) -> None:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if end and self.partial:
            lines.append(self.partial)
            self.partial = b""
        out = []
        for line in lines:
            if not self.cut:
                out.append(line[:MAX_LINE].decode(errors="replace"))
            self.cut = False
        if len(self.partial) > MAX_LINE:  # a runaway line: keep its start, drop the rest
            if not self.cut:
                out.append(self.partial[:MAX_LINE].decode(errors="replace"))
            self.cut, self.partial = True, b""
        if out:
            self.emit(out)

    def close(self) -> None:
        if self.closed.done():
            return
        if self.resume is not None:
            self.resume.cancel()
        self.loop.remove_reader(self.fd)
        os.close(self.fd)
        self.closed.set_result(None)
