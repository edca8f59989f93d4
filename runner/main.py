"""runner (root): images, listeners, runc containers, warm pools, control sockets.

It decides nothing: it converges to the whole desired state the controller sends with
``sync``. Its endpoint is mode 0600 and owned by the controller's user: nobody else may
talk to it. supervisord stops and kills it as a group so its containers die with it.
"""

from __future__ import annotations

from typing import Any

from common.daemon import AgentDaemon, owner_ids, run_main
from common.rpc import Handler
from runner.store import ImageStore


class Runner(AgentDaemon):
    """The container runner."""

    service = "runner"
    socket_mode = 0o600

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.store = ImageStore(self.settings.root, owner_ids(self.settings)[0])

    def handlers(self) -> dict[str, Handler]:
        return {**super().handlers(), "image_add": self.op_image_add,
                "image_progress": self.op_image_progress}

    async def setup(self) -> None:
        self.log.info("recovered", **self.store.recover())

    async def op_image_add(self, args: dict[str, Any]) -> dict[str, Any]:
        """Extract a spooled upload into a rootfs, or find it already extracted."""
        result = await self.store.add(args["upload"], args["tag"])
        self.log.info("image_added", digest=result["digest"], reused=result["reused"],
                      dropped=result["dropped"])
        return result

    async def op_image_progress(self, args: dict[str, Any]) -> dict[str, Any]:
        """How far an extraction has come."""
        return self.store.progress_of(args["upload"])

    async def converge(self, state: dict[str, Any]) -> None:
        for digest in self.store.keep(state["images"]):
            self.log.info("image_removed", digest=digest)


def main() -> None:
    """Console script faas-runner."""
    run_main(Runner)
