"""The runner's side of the keeper (``keeper/main.py``, wire format in
``common/fdstore.py``): every listener and every connection not yet handed to a
container is held there too, so that neither a runner restart nor its ``kill -9`` fails a
request.

The runner keeps the whole set it wants held (``mine``) and what the keeper holds on
this connection (``sent``); changes are sent once per loop iteration, so a connection
accepted and handed to a warm container in the same iteration costs no message at all.
When the keeper goes away the runner goes on serving, tries again every half second, and
gives the new keeper its whole set in one ``reset``.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Callable
from typing import Any

from common import fdstore
from common.log import EventLog

RETRY = 0.5  # seconds between attempts to reach a keeper that is away
SEND_TIMEOUT = 1.0  # a keeper this slow to read is treated as gone (and re-held later)
TAKE_TIMEOUT = 10.0  # for the whole set at a runner's start (a slow machine, many fds)
DROPS_PER_MESSAGE = 2000


class Keep:
    """Descriptors held by the keeper on the runner's behalf."""

    def __init__(self, path: str, log: EventLog, boot_id: str):
        self.path = path
        self.log = log
        self.boot_id = boot_id
        self.sock: socket.socket | None = None
        self.mine: dict[str, tuple[socket.socket, dict[str, Any], int]] = {}
        self.sent: dict[str, int] = {}  # key -> serial, as the keeper holds it
        self._dirty: set[str] = set()
        self._serial = itertools.count(1)
        self._conns = itertools.count(1)
        self._flush: asyncio.Handle | None = None
        self._reset = False  # the next hold replaces whatever the keeper has
        self._retry: asyncio.Task[None] | None = None
        self._lost_logged = False
        self.unclaimed: set[str] = set()  # listeners taken back, not yet wanted again
        self.orphans: list[tuple[str, socket.socket, dict[str, Any]]] = []
        self.loop = asyncio.get_running_loop()

    # --- the connection ----------------------------------------------------------------

    def _connect(self, watch: bool = True) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
            uid = fdstore.peer_uid(sock)
            if uid != 0:  # someone planted a socket there: never hand it a descriptor
                raise OSError(f"{self.path} is served by uid {uid}, not root")
        except OSError as exc:
            sock.close()
            if not self._lost_logged:
                self._lost_logged = True
                self.log.warning("keeper_unavailable", error=str(exc), retry=f"every {RETRY}s")
            return False
        sock.settimeout(SEND_TIMEOUT)
        self.sock = sock
        self.sent = {}
        self._lost_logged = False
        if watch:
            self.loop.add_reader(sock, self._readable)
        return True

    async def start(self) -> None:
        """At the runner's start: reach the keeper and take back what the previous runner
        left there (listeners, and connections it had not handed over)."""
        if not self._connect(watch=False):  # watched once taken: the reader would eat it
            self._retry = asyncio.ensure_future(self._reconnect())
            return
        try:
            taken = await asyncio.to_thread(self._take)
        except (OSError, fdstore.WireError) as exc:
            self.log.error("keeper_take_failed", error=str(exc))
            self.loop.add_reader(self.sock, self._readable)
            self._lost()
            return
        self.loop.add_reader(self.sock, self._readable)
        for key, sock, meta in taken:
            self.mine[key] = (sock, meta, serial := next(self._serial))
            self.sent[key] = serial
            if key.startswith("listen "):
                self.unclaimed.add(key)
            else:
                self.orphans.append((key, sock, meta))
        self.log.info("keeper_taken", listeners=len(self.unclaimed),
                      connections=len(self.orphans))

    def _take(self) -> list[tuple[str, socket.socket, dict[str, Any]]]:
        assert self.sock is not None
        out: list[tuple[str, socket.socket, dict[str, Any]]] = []
        self.sock.settimeout(TAKE_TIMEOUT)
        fdstore.send(self.sock, {"op": "take"})
        while True:
            got = fdstore.receive(self.sock)
            if got is None:
                raise OSError("the keeper closed the connection during take")
            message, fds = got
            for item, fd in zip(message.get("items", []), fds):
                out.append((item["key"], socket.socket(fileno=fd), item.get("meta", {})))
            if message.get("op") != "held" or message.get("last"):
                self.sock.settimeout(SEND_TIMEOUT)
                return out

    def _readable(self) -> None:
        """The keeper sends nothing unasked: readable means it went away."""
        assert self.sock is not None
        try:
            got = fdstore.receive(self.sock, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, fdstore.WireError):
            got = None
        if got is not None:
            fdstore.close_all(got[1])
            return
        self._lost()

    def _lost(self) -> None:
        if self.sock is not None:
            self.loop.remove_reader(self.sock)
            self.sock.close()
            self.sock = None
            self.log.warning("keeper_lost", held=len(self.mine), retry=f"every {RETRY}s")
            self._lost_logged = True
        self.sent = {}
        if self._retry is None or self._retry.done():
            self._retry = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        """Until a keeper holds the whole set: a connection can succeed and then fail at
        once (a keeper that was exiting still had its socket open), and ``_lost`` called
        from this task's own flush must not leave the runner without one."""
        while True:
            try:
                if self._connect():
                    self._reset = True
                    self._dirty = set(self.mine)
                    self.flush()
                    if self.sock is not None:
                        self.log.info("keeper_connected", held=len(self.mine))
                        return
            except Exception as exc:  # a bug: logged, and tried again
                self.log.error("keeper_reconnect_failed", error=repr(exc))
            await asyncio.sleep(RETRY)

    def close(self) -> None:
        """The runner is stopping: the keeper keeps what it holds, for the next one."""
        if self._retry is not None:
            self._retry.cancel()
        if self._flush is not None:
            self._flush.cancel()
            self.flush()
        if self.sock is not None:
            self.loop.remove_reader(self.sock)
            self.sock.close()
            self.sock = None

    # --- what is held -------------------------------------------------------------------

    def listen(self, address: str, port: int, make: Callable[[], socket.socket]
               ) -> socket.socket:
        """The listener of [address]:port: the one taken back at start if there is one
        (connections are waiting in its backlog), else a new one, held from now on."""
        key = fdstore.listen_key(address, port)
        if key in self.unclaimed:
            self.unclaimed.discard(key)
            sock = self.mine[key][0]
            sock.setblocking(False)
            return sock
        sock = make()
        self._hold(key, sock, {"address": address, "port": port})
        return sock

    def unlisten(self, address: str, port: int) -> None:
        """A listener no longer wanted: the keeper closes its copy too."""
        self.release(fdstore.listen_key(address, port))

    def pawn(self, conn: socket.socket, address: str, port: int, remote: str) -> str:
        """An accepted connection, held until :meth:`release` (handed over or ended)."""
        key = f"conn {self.boot_id} {next(self._conns)}"
        self._hold(key, conn, {"address": address, "port": port, "remote": remote})
        return key

    def release(self, key: str) -> None:
        if self.mine.pop(key, None) is not None:
            self._changed(key)

    def release_unclaimed(self) -> int:
        """After the first sync: listeners of functions no longer served are closed."""
        count = len(self.unclaimed)
        for key in self.unclaimed:
            sock = self.mine[key][0]
            self.release(key)
            sock.close()
        self.unclaimed.clear()
        return count

    def take_orphans(self) -> list[tuple[str, socket.socket, dict[str, Any]]]:
        orphans, self.orphans = self.orphans, []
        return orphans

    def _hold(self, key: str, sock: socket.socket, meta: dict[str, Any]) -> None:
        self.mine[key] = (sock, meta, next(self._serial))
        self._changed(key)

    def _changed(self, key: str) -> None:
        self._dirty.add(key)
        if self._flush is None and self.sock is not None:
            self._flush = self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send what changed since the last flush: drops, then holds."""
        self._flush = None
        if self.sock is None:
            return  # the whole set goes to the next keeper
        drops, holds = [], []
        for key in self._dirty:
            cur, had = self.mine.get(key), self.sent.get(key)
            if cur is None:
                if had is not None:
                    drops.append(key)
                    del self.sent[key]
            elif had != cur[2] and cur[0].fileno() >= 0:
                holds.append((key, cur[1], cur[0].fileno()))
                self.sent[key] = cur[2]
        self._dirty.clear()
        try:
            for i in range(0, len(drops), DROPS_PER_MESSAGE):
                fdstore.send(self.sock, {"op": "drop", "keys": drops[i:i + DROPS_PER_MESSAGE]})
            for items, fds in fdstore.batches(holds):
                fdstore.send(self.sock, {"op": "hold", "items": items, "reset": self._reset},
                             fds)
                self._reset = False
            if self._reset:  # a new keeper and nothing to hold: still forget the rest
                fdstore.send(self.sock, {"op": "hold", "items": [], "reset": True})
                self._reset = False
        except (OSError, fdstore.WireError) as exc:
            self.log.warning("keeper_send_failed", error=str(exc))
            self._lost()
