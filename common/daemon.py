"""What every faasd daemon shares: boot id, ping, sync bookkeeping, signals, main().

A daemon is a subclass of :class:`Daemon` that names its service, the access mode of its
endpoint and its handler table. ``run_main`` turns it into a good citizen under
supervisord: settings checked before anything else (a bad one exits 78 with a message
naming the key), one instance per run directory (a second exits 75), SIGTERM and SIGINT
only wake the loop, which then stops serving and exits 0.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import secrets
import signal
import sys
import time
from typing import Any

import psutil

from common import protocol
from common.errors import Code, FaasError
from common.log import EventLog
from common.proc import die_with_parent
from common.rpc import Access, AlreadyRunning, Handler, Server
from common.settings import EX_CONFIG, Settings, SettingsError, load

EX_TEMPFAIL = 75  # another instance is running: not a configuration error
VERSION = "0.1.0"  # the package version too: setup.cfg reads it from here


class Daemon:
    """Base of the controller and the agents."""

    service: str = ""
    socket_mode: int = 0o600

    def __init__(self, settings: Settings, log: EventLog):
        self.settings = settings
        self.log = log
        self.boot_id = secrets.token_hex(8)
        self.started = time.monotonic()
        self.stop = asyncio.Event()
        self.generation = 0
        self.synced = False
        self.digest = ""  # protocol.state_digest of the state last converged to
        self.offered = ""  # that of the last sync received, converged or not
        self._proc = psutil.Process()

    def handlers(self) -> dict[str, Handler]:
        """The op table this daemon serves; must match protocol.OPS[service]."""
        return {"ping": self.op_ping}

    def socket_owner(self) -> tuple[int, int]:
        """Owner of the endpoint file: the controller's user, so only it (and root) may
        connect to an agent; the faas group on the controller's own endpoint."""
        return owner_ids(self.settings)

    async def op_ping(self, args: dict[str, Any]) -> dict[str, Any]:
        """Liveness and identity; the controller resyncs on a new boot id."""
        return {
            "service": self.service,
            "version": VERSION,
            "protocol": protocol.VERSION,
            "boot_id": self.boot_id,
            "pid": os.getpid(),
            "uptime": round(time.monotonic() - self.started, 3),
            "rss": self._proc.memory_info().rss,
            "synced": self.synced,
            "generation": self.generation,
            "digest": self.digest,
        }

    async def setup(self) -> None:
        """Work before serving (subclasses); runs after the endpoint is bound."""

    async def background(self) -> None:
        """Long-running work beside the server (subclasses); cancelled at stop."""
        await self.stop.wait()

    async def teardown(self) -> None:
        """Graceful work after serving stopped, before exit (subclasses)."""

    async def run(self) -> None:
        """Bind, serve until SIGTERM, clean up."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        loop.set_exception_handler(self._unhandled)
        uid, gid = self.socket_owner()
        access = Access(self.socket_mode, uid, gid)
        server = Server(self.service, self.handlers(), self.settings.run, self.log, access)
        server.bind()
        self.log.info("started", boot_id=self.boot_id, pid=os.getpid(), version=VERSION)
        try:
            await self.setup()
            bg = asyncio.ensure_future(self.background())
            await server.serve(self.stop)
            bg.cancel()
            await asyncio.gather(bg, return_exceptions=True)
            await self.teardown()
        finally:
            server.close()
            self.log.info("stopped")


    def _unhandled(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """A bug in a callback or a task nobody awaited: into the log, as JSON."""
        self.log.error("unhandled", message=context.get("message"),
                       error=repr(context.get("exception")))


class AgentDaemon(Daemon):
    """An agent: serves ping and sync; converges to the state the controller sends."""

    def handlers(self) -> dict[str, Handler]:
        return {"ping": self.op_ping, "sync": self.op_sync}

    async def op_sync(self, args: dict[str, Any]) -> dict[str, Any]:
        """Converge to the whole desired state; idempotent. A state outside the bounds
        root set (``converge`` checks before it changes anything) is refused and logged:
        the caller holds the faas user, and that may be an attacker's."""
        digest = protocol.state_digest(self.service, args["state"])
        self.offered = digest  # the state being converged to (netagent's repair loop)
        try:
            await self.converge(args["state"])
        except FaasError as exc:
            if exc.code in (Code.FORBIDDEN, Code.BAD_REQUEST):
                self.log.warning("sync_refused", code=exc.code.value, error=exc.message,
                                 generation=args["generation"])
            raise
        self.generation = args["generation"]
        self.digest = digest
        self.synced = True
        self.log.info("synced", generation=self.generation, digest=self.digest[:12])
        return {"generation": self.generation, "digest": self.digest}

    async def converge(self, state: dict[str, Any]) -> None:
        """Make the world match ``state`` (subclasses)."""


def run_main(cls: type[Daemon]) -> None:
    """Entry point of a daemon's console script."""
    # supervisord killed: we stop too (gracefully), so the next `faasd up` finds no
    # orphan holding our lock. Under systemd the unit's cgroup is killed anyway.
    die_with_parent(signal.SIGTERM)
    log = EventLog(cls.service)
    try:
        settings = load()
    except SettingsError as exc:
        print(f"faas-{cls.service}: {exc}", file=sys.stderr)
        log.error("bad_settings", error=str(exc))
        sys.exit(EX_CONFIG)
    log.set_level(settings.log_level)
    try:
        owner_ids(settings)
    except SettingsError as exc:
        print(f"faas-{cls.service}: {exc}", file=sys.stderr)
        sys.exit(EX_CONFIG)
    try:
        asyncio.run(cls(settings, log).run())
    except SettingsError as exc:  # a setting this host cannot honour (found at start)
        print(f"faas-{cls.service}: {exc}", file=sys.stderr)
        log.error("bad_settings", error=str(exc))
        sys.exit(EX_CONFIG)
    except AlreadyRunning as exc:
        print(f"faas-{cls.service}: refusing to start: {exc}", file=sys.stderr)
        log.error("already_running", error=str(exc))
        sys.exit(EX_TEMPFAIL)


def owner_ids(settings: Settings) -> tuple[int, int]:
    """uid of the configured user and gid of the configured group."""
    try:
        uid = pwd.getpwnam(settings.user).pw_uid
        gid = grp.getgrnam(settings.group).gr_gid
    except KeyError as exc:
        raise SettingsError(f"{exc.args[0]}; create it (install.sh does) or set FAAS_USER / "
                            "FAAS_GROUP") from None
    return uid, gid
