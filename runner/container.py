"""One function container: its bundle, its control socket, its runtime process.

The runner listens on a SOCK_SEQPACKET socket per container (bind-mounted at
/control.sock); the handler connecting to it means "ready". A connection is handed over
as one packet of JSON with exactly one fd attached (SCM_RIGHTS); the handler answers
``done`` (reuse) or exits (one-shot). The runtime process (``runc run``, not detached)
is our child: its exit is the container's, and its stdout and stderr are the
container's, which go to the function's log tagged with the request being served.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import time
from typing import Any, Callable

from common.proc import die_with_parent
from runner.bundle import BundleError, write_bundle
from runner.runtime import Runtime

CONTROL_PACKET = 4096
PUMP_GRACE = 2.0  # seconds to read a stopped container's last output


class ContainerFailed(Exception):
    """The container died or misbehaved before it could serve; ``status`` for the client."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.status = status


class Container:
    """A container of one function version, from start to removal."""

    def __init__(self, function: str, bundles: str, ctl_dir: str, runtime: Runtime,
                 make_config: Callable[[str, str], dict[str, Any]],
                 sink: Callable[[str, str, str | None, str], None]):
        self.id = f"{function}-{secrets.token_hex(6)}"
        self.function = function
        self.bundle = os.path.join(bundles, self.id)
        self.ctl_path = os.path.join(ctl_dir, f"{self.id}.sock")
        self.runtime = runtime
        self.make_config = make_config  # (container id, control socket path) -> config
        self.sink = sink  # (container id, stream, request id, line)
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.request: str | None = None
        self.served = 0
        self.idle_since = time.monotonic()
        self._pumps: list[asyncio.Task[None]] = []
        self.exited: asyncio.Future[int] | None = None

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
        self.proc = await asyncio.create_subprocess_exec(
            *self.runtime.command("run", "--bundle", self.bundle, self.id),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, preexec_fn=self._preexec)
        for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            self._pumps.append(asyncio.ensure_future(self._pump(name, stream)))
        # One future for the container's whole life: ready() and every finish() wait on it
        self.exited = asyncio.ensure_future(self.proc.wait())

    def _preexec(self) -> None:
        die_with_parent()
        if self.runtime.preexec_fn is not None:
            self.runtime.preexec_fn()

    async def _pump(self, name: str, stream: asyncio.StreamReader | None) -> None:
        assert stream is not None
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # over the stream's 64 KiB limit: asyncio drops it
                self.sink(self.id, name, self.request, "[faasd: a line over 64 KiB dropped]")
                continue
            if not line:
                return
            self.sink(self.id, name, self.request, line.decode(errors="replace").rstrip("\n"))

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
            return
        accept.cancel()
        if exited in done:
            raise ContainerFailed(f"container exited ({self.proc.returncode}) before its "
                                  "handler connected to /control.sock")
        raise ContainerFailed(f"handler did not connect to /control.sock within {timeout:.0f}s",
                              504)

    def hand_over(self, client: socket.socket, request_id: str, remote: str,
                  deadline: float) -> None:
        """Send one connection: the JSON packet with exactly that one fd attached."""
        assert self.conn is not None
        packet = json.dumps({"type": "conn", "id": request_id, "remote": remote,
                             "deadline": deadline}).encode()
        self.request = request_id
        self.idle_since = time.monotonic()
        # O_NONBLOCK lives on the open file, which the handler shares: it gets a plain
        # blocking socket, as a handler written from the protocol's text expects.
        client.setblocking(True)
        try:
            socket.send_fds(self.conn, [packet], [client.fileno()])
        except OSError as exc:  # a full queue means the handler is not reading
            client.setblocking(False)  # the runner answers the client itself
            raise ContainerFailed(f"handler did not take the connection: {exc.strerror}")
        self.served += 1

    async def finish(self, timeout: float) -> str:
        """Wait for ``done`` (returns "done"), the container's exit ("exited"), or the
        deadline ("timeout")."""
        assert self.conn is not None and self.exited is not None
        loop = asyncio.get_running_loop()
        exited = self.exited
        deadline = time.monotonic() + timeout
        while True:
            recv = asyncio.ensure_future(loop.sock_recv(self.conn, CONTROL_PACKET))
            done, _ = await asyncio.wait({recv, exited}, timeout=deadline - time.monotonic(),
                                         return_when=asyncio.FIRST_COMPLETED)
            if recv not in done:
                recv.cancel()
                return "exited" if exited in done else "timeout"
            try:
                packet = recv.result()
            except OSError:
                packet = b""
            if not packet:  # the handler closed its end: it is leaving
                await asyncio.wait({exited}, timeout=max(0.0, deadline - time.monotonic()))
                return "exited" if exited.done() else "timeout"
            if _is_done(packet, self.request):
                self.request = None
                self.idle_since = time.monotonic()
                return "done"
            # anything else is a type we do not know: ignored, as the protocol says

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self, grace: float = 1.0) -> None:
        """Close the control socket (the protocol's "stop"), then kill if need be; remove
        everything the container had on the host."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.proc is not None and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                await self.kill()
        await self.remove()
        # The pipes close when the container's last process has gone; a process the
        # runtime could not kill must not hold the runner up.
        if self._pumps:
            await asyncio.wait(self._pumps, timeout=PUMP_GRACE)
        for pump in self._pumps:
            pump.cancel()

    async def kill(self) -> None:
        """SIGKILL the container (through the runtime, so every process in it dies)."""
        kill = await asyncio.create_subprocess_exec(
            *self.runtime.command("kill", self.id, "KILL"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await kill.wait()
        if self.proc is not None:
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:  # the runtime itself is stuck: end it
                self.proc.send_signal(signal.SIGKILL)
                await self.proc.wait()

    async def remove(self) -> None:
        """Delete the runtime's record, the bundle and the control socket."""
        delete = await asyncio.create_subprocess_exec(
            *self.runtime.command("delete", "--force", self.id),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await delete.wait()
        shutil.rmtree(self.bundle, ignore_errors=True)
        try:
            os.unlink(self.ctl_path)
        except FileNotFoundError:
            pass


def _is_done(packet: bytes, request_id: str | None) -> bool:
    try:
        msg = json.loads(packet)
    except ValueError:
        return False
    return isinstance(msg, dict) and msg.get("type") == "done" and msg.get("id") == request_id
