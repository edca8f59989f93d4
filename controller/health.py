"""The controller's watch over its agents: ping, record, resync.

Level-triggered, as Kubernetes controllers are: each agent is pinged about once a
``ping_interval``; whenever its reply shows a boot id we have not synced, says it has had
no sync since it started, holds another generation of the desired state than ours, or
reports the digest of another state than the one we want (someone else holding the faas
user sent it a sync: the generation alone would not show it), the agent gets a ``sync``
carrying its whole desired state. A restarted agent therefore heals without an operator,
and so does an agent whose sync failed: the next ping finds it still unsynced.

The runner's ping also says which ports it holds a listener on; netagent opens a port
>= 1024 to peers only while the runner we synced holds it (controller/vpn.py's
``peer_ports``), so a change of that report resyncs netagent at once, and its digest is
part of what netagent should hold.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from common import protocol
from common.errors import FaasError
from common.log import EventLog, request_id
from common.rpc import Client

FLAP_WINDOW = 300.0  # seconds
FLAP_RESTARTS = 3  # this many restarts within the window: flapping


@dataclass
class AgentHealth:
    """What the controller knows of one agent."""

    name: str
    state: str = "unknown"  # unknown (never answered), up, down
    pid: int | None = None
    boot_id: str | None = None
    version: str | None = None
    uptime: float | None = None
    rss: int | None = None
    last_seen: float | None = None  # wall-clock time of the last good ping
    failures: int = 0  # consecutive failed pings
    restarts: int = 0  # boot id changes seen
    synced_boot: str | None = None  # boot id that last received a sync
    last_sync: float | None = None
    generation: int = 0
    error: str | None = None
    restart_times: list[float] = field(default_factory=list)  # monotonic, the last few

    @property
    def synced(self) -> bool:
        return self.boot_id is not None and self.synced_boot == self.boot_id

    def restarted(self) -> None:
        self.restarts += 1
        self.restart_times = [*self.restart_times, time.monotonic()][-FLAP_RESTARTS:]

    def flags(self, generation: int, now: float | None = None) -> list[str]:
        """What an operator should look at: down, flapping, behind on sync."""
        now = time.monotonic() if now is None else now
        flags = []
        if self.state != "up":
            flags.append(self.state)
        recent = [t for t in self.restart_times if now - t <= FLAP_WINDOW]
        if len(recent) >= FLAP_RESTARTS:
            flags.append(f"flapping: {len(recent)} restarts in {FLAP_WINDOW / 60:.0f} min")
        if self.state == "up" and not self.synced:
            flags.append("not synced since its restart")
        elif self.state == "up" and self.generation < generation:
            flags.append(f"behind: has generation {self.generation} of {generation}")
        return flags

    def row(self, generation: int | None = None) -> dict[str, Any]:
        """Plain data for status replies."""
        row = asdict(self)
        del row["restart_times"]
        row["synced"] = self.synced
        row["flags"] = self.flags(generation if generation is not None else self.generation)
        return row


class Monitor:
    """Pings every agent on its own schedule and resyncs the ones that need it."""

    def __init__(self, clients: dict[str, Client], desired: Callable[[str], dict[str, Any]],
                 generation: Callable[[], int], interval: float, log: EventLog):
        self.clients = clients
        self.desired = desired
        self.generation = generation
        self.interval = interval
        self.log = log
        self.agents = {name: AgentHealth(name) for name in clients}
        # agent -> ((generation, holdings version), its checked desired state, digest)
        self._wanted: dict[str, tuple[tuple[int, int], dict[str, Any], str]] = {}
        # The runner's last report of the ports it holds, by function address; None while
        # there is none from the runner we synced (down, restarted, not synced yet).
        self.held: dict[str, frozenset[int]] | None = None
        self._held_version = 0  # bumped at every change of ``held``

    async def run(self, stop: asyncio.Event) -> None:
        """One watcher task per agent, so a dead agent never delays the others."""
        await asyncio.gather(*(self._watch(name, stop) for name in self.clients))

    async def _watch(self, name: str, stop: asyncio.Event) -> None:
        connected = self.clients[name].connected
        while not stop.is_set():
            started = time.monotonic()
            connected.clear()
            await self.check(name)
            left = self.interval - (time.monotonic() - started)
            if left > 0:
                # A new connection is most likely a restarted agent: look at once.
                waits = [asyncio.ensure_future(stop.wait()),
                         asyncio.ensure_future(connected.wait())]
                await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()

    async def check(self, name: str) -> None:
        """Ping one agent, record what it says, and sync it if it needs it."""
        token = request_id.set(protocol.new_id())
        try:
            await self._check(name)
        finally:
            request_id.reset(token)

    async def _check(self, name: str) -> None:
        agent = self.agents[name]
        try:
            # No retries: the next tick is the retry, and a stale reading must not linger.
            reply = protocol.PING_RESULT.check(
                await self.clients[name].call("ping", retries=0), "ping")
        except FaasError as exc:
            agent.failures += 1
            agent.error = exc.message
            if agent.state != "down":
                self.log.warning("agent_down", agent=name, error=exc.message)
            agent.state = "down"
            if name == "runner":
                await self.runner_holds(None)
            return
        if agent.boot_id is not None and reply["boot_id"] != agent.boot_id:
            agent.restarted()
            self.log.info("agent_restarted", agent=name, boot_id=reply["boot_id"],
                          previous=agent.boot_id)
        if agent.state != "up":
            self.log.info("agent_up", agent=name, boot_id=reply["boot_id"], pid=reply["pid"])
        agent.state, agent.failures, agent.error = "up", 0, None
        agent.boot_id, agent.pid, agent.version = reply["boot_id"], reply["pid"], reply["version"]
        agent.uptime, agent.rss, agent.last_seen = reply["uptime"], reply["rss"], time.time()
        if reply["protocol"] != protocol.VERSION:
            agent.error = f"speaks protocol {reply['protocol']}, controller {protocol.VERSION}"
            self.log.error("protocol_mismatch", agent=name, protocol=reply["protocol"])
            return
        if name == "runner":  # only what a runner holding our state says: not a new one's
            # empty hands, nor a report from before our sync. Synced by us, or (this
            # controller restarted) holding exactly the state we want.
            ours = reply["synced"] and (agent.synced_boot == reply["boot_id"]
                                        or reply["digest"] == self.wanted_digest(name))
            await self.runner_holds(reply["held"] if ours else None)
        if (not reply["synced"] or agent.synced_boot != reply["boot_id"]
                or reply["generation"] != self.generation()):
            await self.sync(name, reply["boot_id"])
        elif reply["digest"] and reply["digest"] != self.wanted_digest(name):
            # Synced by us, same generation, another state: not ours. Put ours back.
            self.log.warning("agent_state_differs", agent=name, generation=reply["generation"],
                             digest=reply["digest"][:12])
            await self.sync(name, reply["boot_id"])

    async def runner_holds(self, report: list[dict[str, Any]] | None) -> None:
        """Record the runner's report of the ports it holds (None: no report to trust);
        on a change, netagent gets its new desired state now (level-triggered all the
        same: its next ping compares digests)."""
        held = None if report is None else {
            e["address"]: frozenset(e["ports"]) for e in report}
        if held == self.held:
            return
        self.held = held
        self._held_version += 1
        self.log.info("ports_held", known=held is not None, functions=len(held or {}),
                      ports=sum(len(p) for p in (held or {}).values()))
        netagent = self.agents.get("netagent")
        if netagent is not None and netagent.state == "up" and netagent.boot_id is not None:
            await self.sync("netagent", netagent.boot_id)

    def wanted(self, name: str) -> tuple[dict[str, Any], str]:
        """The state we want the agent to hold, as its sync's schema reads it, and its
        digest; built, checked and hashed once per generation (every change of desired
        state bumps it) and runner report of held ports, not at every sync and ping: each
        is O(functions) (docs/operations.md, "Scale"). FaasError: the agent's schema
        refuses it."""
        key = (self.generation(), self._held_version)
        cached = self._wanted.get(name)
        if cached is None or cached[0] != key:
            state = protocol.state_schema(name).check(self.desired(name), "state")
            cached = (key, state, protocol.state_digest(name, state, checked=True))
            self._wanted[name] = cached
        return cached[1], cached[2]

    def wanted_digest(self, name: str) -> str:
        """The digest of the state we want the agent to hold."""
        try:
            return self.wanted(name)[1]
        except FaasError as exc:  # a state the agent's schema refuses: the sync says why
            return f"unusable: {exc.message}"

    async def push(self) -> None:
        """Sync every agent that is up now, after a change of desired state. An agent
        missed here is caught by its next ping, whose generation is then behind."""
        await asyncio.gather(*(self.sync(name, a.boot_id) for name, a in self.agents.items()
                               if a.state == "up" and a.boot_id is not None))

    async def sync(self, name: str, boot_id: str) -> None:
        """Send the whole desired state; on failure the next ping tries again."""
        agent = self.agents[name]
        generation = self.generation()
        try:
            state, _ = self.wanted(name)
            await self.clients[name].call("sync", {"generation": generation, "state": state},
                                          checked=True)
        except FaasError as exc:
            agent.error = f"sync failed: {exc.message}"
            self.log.warning("sync_failed", agent=name, code=exc.code.value, error=exc.message)
            return
        agent.synced_boot, agent.last_sync, agent.generation = boot_id, time.time(), generation
        self.log.info("agent_synced", agent=name, boot_id=boot_id, generation=generation)
