"""runner (root): images, listeners, runc containers, warm pools, control sockets.

It decides nothing: it converges to the whole desired state the controller sends with
``sync``. Its endpoint is mode 0600 and owned by the controller's user: nobody else may
talk to it. Its listeners, and the connections it has not yet handed over, are held by
the keeper too (runner/keep.py), so a restart, or its ``kill -9``, fails no request: the
next runner takes them back, and lets the containers of the previous one finish the
connections they hold before it removes them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import time
from typing import Any

from common import fnsettings, layout
from common.daemon import AgentDaemon, owner_ids, run_main
from common.errors import Code, FaasError
from common.paths import root_dir
from common.proc import adopt_orphans
from common.rpc import Handler
from common.settings import SettingsError, vpn_server
from runner.bounds import check_state
from runner.budget import MemoryBudget, budget_bytes
from runner.callers import Callers
from runner.fleet import Fleet
from runner.fnlogs import FunctionLogs
from runner.images.extract import DEFAULT_LIMITS
from runner.keep import Keep
from runner.runtime import RuntimeUnavailable, runtime_for
from runner.serve import LATENCY_BUCKETS
from runner.store import ImageStore
from runner.volumes import Volumes

RETIRE_POLL = 0.2  # seconds between looks at the previous run's containers still running


class Runner(AgentDaemon):
    """The container runner."""

    service = "runner"
    socket_mode = 0o600

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        uid, gid = owner_ids(self.settings)
        root = self.settings.root
        self.store = ImageStore(root, uid, dataclasses.replace(
            DEFAULT_LIMITS, image_max_bytes=self.settings.image_max_bytes,
            expand_ratio=self.settings.image_expand_ratio,
            store_max_bytes=self.settings.image_store_max_bytes,
            min_free_bytes=self.settings.min_free_bytes))
        self.runtime = runtime_for(self.settings.runtime,
                                   layout.of(self.settings).runtime_state(self.settings.runtime))
        try:
            self.runtime.check()
        except RuntimeUnavailable as exc:
            raise SettingsError(f"runtime = {self.settings.runtime}: {exc}") from None
        self.fleet: Fleet | None = None
        self.keep: Keep | None = None
        self._retiring: asyncio.Task[None] | None = None
        self.volumes = Volumes(layout.of(self.settings), self.settings.max_volume_bytes,
                               self.settings.volumes_max_bytes, self.settings.min_free_bytes)
        self._volume_lock = asyncio.Lock()  # one create, remove or mount at a time
        self._gid = gid
        # The bounds of every sync, from root's settings file (runner/bounds.py).
        self.function_prefix = ipaddress.IPv6Network(self.settings.function_prefix)
        self.maxima = fnsettings.host_maxima(self.settings)
        self.callers = Callers(ipaddress.IPv6Network(self.settings.vpn_prefix))
        try:
            self.budget = MemoryBudget(budget_bytes(self.settings.container_memory_budget))
        except (OSError, ValueError) as exc:
            raise SettingsError(f"container_memory_budget = 0 needs the host's MemTotal: "
                                f"{exc}; set it in bytes") from None

    def handlers(self) -> dict[str, Handler]:
        return {**super().handlers(), "image_add": self.op_image_add,
                "image_progress": self.op_image_progress, "stats": self.op_stats,
                "volume_create": self.op_volume_create, "volume_list": self.op_volume_list,
                "volume_rm": self.op_volume_rm,
                "secret_put": self.op_secret_put, "secret_list": self.op_secret_list,
                "secret_rm": self.op_secret_rm}

    async def setup(self) -> None:
        # Containers are started detached: their init processes become our children
        # (runner/container.py), to be reaped here and not by pid 1.
        adopt_orphans()
        logs = FunctionLogs(layout.of(self.settings).function_logs, self._gid)
        root_dir(layout.of(self.settings).keeper_dir, 0o700)
        self.keep = Keep(layout.of(self.settings).keeper_sock, self.log, self.boot_id)
        await self.keep.start()
        self.fleet = Fleet(self.settings.root, self.settings.run, self.runtime, logs, self.log,
                           self.store.config_of, self.budget, callers=self.callers,
                           nameserver=str(vpn_server(self.settings.vpn_prefix).ip),
                           volumes=self.volumes, keep=self.keep)
        removed = await self.retire_leftover_containers()
        counts, failed = await asyncio.to_thread(self.volumes.recover)
        self.log.info("volumes", **counts)
        for name, error in failed.items():  # its functions' starts fail; the rest serve
            self.log.error("volume_mount_failed", volume=name, error=error)
        self.log.info("recovered", containers=removed, **self.store.recover(),
                      **self.fleet.recover())
        self.log.info("memory_budget", bytes=self.budget.limit)

    async def retire_leftover_containers(self) -> int:
        """Containers of a previous run: a stopped one is deleted now. One still running
        may be serving a connection the previous runner handed it; its control socket is
        gone, so it ends after that connection: it is deleted once it has stopped, and
        killed past the longest timeout a function may have."""
        statuses = await asyncio.to_thread(self.runtime.statuses)
        running = [cid for cid, status in statuses.items() if status == "running"]
        for cid in set(statuses) - set(running):
            await self.runtime.delete(cid)
        if running:
            self._retiring = asyncio.ensure_future(self._retire(running))
        return len(statuses)

    async def _retire(self, ids: list[str]) -> None:
        deadline = time.monotonic() + self.maxima["timeout"] + 5
        killed = 0
        while ids:
            await asyncio.sleep(RETIRE_POLL)
            statuses = await asyncio.to_thread(self.runtime.statuses)
            late = time.monotonic() > deadline
            for cid in [c for c in ids if late or statuses.get(c) != "running"]:
                killed += statuses.get(cid) == "running"
                await self.runtime.delete(cid)
                ids.remove(cid)
        self.log.info("leftovers_retired", killed=killed)

    async def teardown(self) -> None:
        """SIGTERM: stop accepting, let requests in flight finish, stop containers."""
        if self.fleet is not None:
            await self.fleet.close()
        if self.keep is not None:
            self.keep.close()
        for name, error in (await asyncio.to_thread(self.volumes.unmount_all)).items():
            self.log.warning("volume_unmount_failed", volume=name, error=error)

    async def op_ping(self, args: dict[str, Any]) -> dict[str, Any]:
        """Liveness, and the ports this runner holds (before setup: none)."""
        reply = await super().op_ping(args)
        reply["held"] = self.fleet.held() if self.fleet is not None else []
        return reply

    async def op_image_add(self, args: dict[str, Any]) -> dict[str, Any]:
        """Extract a spooled upload into a rootfs, or find it already extracted."""
        result = await self.store.add(args["upload"], args["tag"])
        self.log.info("image_added", digest=result["digest"], reused=result["reused"],
                      dropped=result["dropped"])
        return result

    async def op_image_progress(self, args: dict[str, Any]) -> dict[str, Any]:
        """How far an extraction has come."""
        return self.store.progress_of(args["upload"])

    async def op_stats(self, args: dict[str, Any]) -> dict[str, Any]:
        """Every function's pool and counters since this runner started serving it."""
        assert self.fleet is not None
        return {"functions": self.fleet.snapshot(), "buckets": list(LATENCY_BUCKETS),
                "memory": self.budget.snapshot()}

    async def op_volume_create(self, args: dict[str, Any]) -> dict[str, Any]:
        """Make and mount a volume, within root's bounds (max_volume_bytes,
        volumes_max_bytes, min_free_bytes)."""
        async with self._volume_lock:
            try:
                row = await asyncio.to_thread(self.volumes.create, args["name"], args["size"])
            except OSError as exc:
                raise FaasError(Code.INTERNAL, f"volume {args['name']}: {exc}") from None
        self.log.info("volume_created", volume=args["name"], size=args["size"])
        return row

    async def op_volume_list(self, args: dict[str, Any]) -> dict[str, Any]:
        """Every volume with its size and use."""
        return {"volumes": await asyncio.to_thread(self.volumes.list)}

    async def op_volume_rm(self, args: dict[str, Any]) -> dict[str, Any]:
        """Delete a volume, unless a function of the desired state mounts it. Before the
        first sync the runner does not know which do, so it refuses then too."""
        assert self.fleet is not None
        name = args["name"]
        if not self.synced:
            raise FaasError(Code.UNAVAILABLE, "the runner has had no sync since it started: "
                            "try again in a moment")
        async with self._volume_lock:
            users = self.fleet.mounting(name)
            if users:
                raise FaasError(Code.CONFLICT, f"volume {name} is mounted by "
                                f"{', '.join(users)}: remove it from their mounts first",
                                {"volume": name, "functions": users})
            await asyncio.to_thread(self.volumes.remove, name)
        self.log.info("volume_removed", volume=name)
        return {"name": name}

    async def op_secret_put(self, args: dict[str, Any]) -> dict[str, Any]:
        """Store or replace a secret; containers started from now on see the new value."""
        assert self.fleet is not None
        row = self.fleet.secrets.put(args["name"], args["value"])
        self.fleet.secret_changed(args["name"])
        self.log.info("secret_stored", name=row["name"], size=row["size"])
        return row

    async def op_secret_list(self, args: dict[str, Any]) -> dict[str, Any]:
        """Names, sizes and times: never a value."""
        assert self.fleet is not None
        return {"secrets": self.fleet.secrets.rows()}

    async def op_secret_rm(self, args: dict[str, Any]) -> dict[str, Any]:
        """Delete a secret that no function of the desired state uses (root's own check:
        the controller's is only the earlier, friendlier one)."""
        assert self.fleet is not None
        result = self.fleet.secrets.remove(args["name"], self.fleet.secret_users(args["name"]))
        self.log.info("secret_removed", name=args["name"])
        return result

    async def converge(self, state: dict[str, Any]) -> None:
        assert self.fleet is not None
        check_state(state, self.function_prefix, self.maxima)  # before anything changes
        peers = self.callers.check(state.get("peers", []))
        self.callers.update(peers)  # before the functions: a new allow sees its peers
        await self.fleet.converge(state["functions"])
        for digest in self.store.keep(state["images"]):
            self.log.info("image_removed", digest=digest)


def main() -> None:
    """Console script faas-runner."""
    run_main(Runner)
