"""controller (unprivileged): the desired state, the operator APIs, orchestration.

It never runs ip, wg or runc and never writes a zone file: it tells the agents, through
their narrow ops, what the world should look like, and watches that they listen.
Operators reach it with faasctl over ``$FAAS_RUN/controller.sock`` (mode 0660, group
faas).
"""

from __future__ import annotations

import os
import time
from typing import Any

from common import protocol
from common.daemon import VERSION, Daemon, run_main
from common.rpc import Client, Handler
from controller.health import Monitor


class Controller(Daemon):
    """The controller daemon."""

    service = "controller"
    socket_mode = 0o660

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        clients = {name: Client(name, self.settings.run) for name in protocol.AGENTS}
        self.monitor = Monitor(clients, self.desired_state, lambda: self.generation,
                               self.settings.ping_interval, self.log)
        self.generation = 1

    def handlers(self) -> dict[str, Handler]:
        return {"ping": self.op_ping, "status": self.op_status}

    def desired_state(self, agent: str) -> dict[str, Any]:
        """The whole desired state for one agent (nothing is deployable yet)."""
        return {}

    async def background(self) -> None:
        await self.monitor.run(self.stop)

    async def op_status(self, args: dict[str, Any]) -> dict[str, Any]:
        """Every faasd process as the controller sees it, itself first."""
        me = await self.op_ping({})
        rows = [{
            "name": "controller", "state": "up", "pid": os.getpid(), "boot_id": self.boot_id,
            "version": VERSION, "uptime": me["uptime"], "rss": me["rss"],
            "last_seen": time.time(), "synced": True, "restarts": 0, "error": None,
        }]
        rows += [agent.row() for agent in self.monitor.agents.values()]
        return {"processes": rows, "generation": self.generation}


def main() -> None:
    """Console script faas-controller."""
    run_main(Controller)

