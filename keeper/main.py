"""keeper (root): holds the runner's listening sockets and unserved connections.

A request must not fail because the runner restarts. The runner gives the keeper a copy
of each listener and of each connection it accepted but has not yet handed to a
container (``common/fdstore.py``); a runner that starts again takes them back. While no
runner runs, the listeners stay open, so new connections wait in the kernel's backlog
instead of being refused, and the connections the dead runner held are served by the
next one. The keeper is the runner's mirror: when the keeper dies, the runner still
holds every descriptor and gives them all to the next keeper.

It does nothing else, so that it has no reason to restart: no ZeroMQ, no settings but
the run directory, no child processes. Its socket is in a root-only directory and it
talks only to a peer with uid 0 (SO_PEERCRED); the runner checks the same of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import sys
from typing import Any

from common import fdstore, layout
from common.log import EventLog
from common.paths import root_dir
from common.proc import die_with_parent
from common.rpc import AlreadyRunning, take_lock
from common.settings import EX_CONFIG, SettingsError, load

VERSION = 1
class Store:
    """The descriptors held, by key, with the meta the runner gave each."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[int, dict[str, Any]]] = {}

    def hold(self, key: str, fd: int, meta: dict[str, Any]) -> None:
        old = self.items.pop(key, None)
        if old is not None and old[0] != fd:
            fdstore.close_all([old[0]])
        self.items[key] = (fd, meta)

    def drop(self, keys: list[str]) -> int:
        dropped = [self.items.pop(k)[0] for k in keys if k in self.items]
        fdstore.close_all(dropped)
        return len(dropped)

    def clear(self) -> None:
        fdstore.close_all([fd for fd, _ in self.items.values()])
        self.items.clear()

    def counts(self) -> dict[str, int]:
        listeners = sum(1 for k in self.items if k.startswith("listen "))
        return {"listeners": listeners, "connections": len(self.items) - listeners}


class Keeper:
    """One client at a time (the runner); a new one replaces the old after the old's
    last messages are read, so a dead runner's final drops are not lost."""

    def __init__(self, path: str, log: EventLog):
        self.path = path
        self.log = log
        self.store = Store()
        self.server: socket.socket | None = None
        self.client: socket.socket | None = None
        self.loop = asyncio.get_running_loop()

    def bind(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        server.bind(self.path)
        os.chmod(self.path, 0o600)
        server.listen(4)
        server.setblocking(False)
        self.server = server
        self.loop.add_reader(server, self._accept)

    def close(self) -> None:
        for sock in (self.client, self.server):
            if sock is not None:
                self.loop.remove_reader(sock)
                sock.close()
        self.client = self.server = None

    def _accept(self) -> None:
        try:
            conn, _ = self.server.accept()
        except (BlockingIOError, InterruptedError):
            return
        uid = fdstore.peer_uid(conn)
        if uid != 0:
            self.log.warning("refused", uid=uid, why="only root (the runner) may use the keeper")
            conn.close()
            return
        if self.client is not None:  # the previous runner: read what it left, then go
            self._read(self.client, final=True)
            self._forget_client()
        conn.setblocking(False)
        self.client = conn
        self.loop.add_reader(conn, self._read, conn)
        self.log.info("runner_connected", **self.store.counts())

    def _forget_client(self) -> None:
        if self.client is not None:
            self.loop.remove_reader(self.client)
            self.client.close()
            self.client = None

    def _read(self, conn: socket.socket, final: bool = False) -> None:
        while True:
            try:
                got = fdstore.receive(conn, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except fdstore.WireError as exc:
                self.log.error("bad_message", error=str(exc))
                got = None
            except OSError as exc:
                self.log.warning("runner_gone", error=str(exc))
                got = None
            if got is None:
                if conn is self.client and not final:
                    self._forget_client()
                    self.log.info("runner_disconnected", **self.store.counts())
                return
            message, fds = got
            try:
                self._handle(conn, message, fds)
            except OSError as exc:  # the reply could not be sent: the runner is gone
                self.log.warning("reply_failed", error=str(exc))
                if conn is self.client:
                    self._forget_client()
                return

    def _handle(self, conn: socket.socket, message: dict[str, Any], fds: list[int]) -> None:
        op = message["op"]
        if op == "hold":
            if message.get("reset"):
                self.store.clear()
            for item, fd in zip(message["items"], fds):
                self.store.hold(item["key"], fd, item.get("meta", {}))
        elif op == "drop":
            self.store.drop(message["keys"])
        elif op == "take":
            items = [(k, meta, fd) for k, (fd, meta) in self.store.items.items()]
            parts = list(fdstore.batches(items)) or [([], [])]
            conn.setblocking(True)
            conn.settimeout(5)
            try:
                for i, (chunk, chunk_fds) in enumerate(parts):
                    fdstore.send(conn, {"op": "held", "items": chunk,
                                        "last": i == len(parts) - 1}, chunk_fds)
            finally:
                conn.setblocking(False)
            self.log.info("given", **self.store.counts())
        else:  # "held" is ours to send, never to receive
            fdstore.close_all(fds)


def raise_fd_limit() -> None:
    """Every listener and waiting connection of the host is a descriptor here."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(run_dir: str, log: EventLog) -> None:
    paths = layout.Layout(run=run_dir)
    root_dir(paths.keeper_dir, 0o700)
    lock = take_lock(paths.lock("keeper"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    keeper = Keeper(paths.keeper_sock, log)
    keeper.bind()
    log.info("started", pid=os.getpid(), version=VERSION)
    try:
        await stop.wait()
    finally:
        # Stopping on purpose: what is held closes with us (the runner holds its copies).
        log.info("stopped", **keeper.store.counts())
        keeper.close()
        os.close(lock)


def main() -> None:
    log = EventLog("keeper")
    try:
        settings = load()
    except SettingsError as exc:
        print(f"faas-keeper: {exc}", file=sys.stderr)
        sys.exit(EX_CONFIG)
    log.set_level(settings.log_level)
    if os.geteuid() != 0:
        print("faas-keeper: run me as root (it holds the runner's sockets)", file=sys.stderr)
        sys.exit(EX_CONFIG)
    raise_fd_limit()
    die_with_parent(signal.SIGTERM)  # supervisord killed: the next one starts a keeper
    try:
        asyncio.run(serve(settings.run, log))
    except SettingsError as exc:  # its directory is not root's
        print(f"faas-keeper: {exc}", file=sys.stderr)
        sys.exit(EX_CONFIG)
    except AlreadyRunning as exc:
        print(f"faas-keeper: refusing to start: {exc}", file=sys.stderr)
        sys.exit(75)
