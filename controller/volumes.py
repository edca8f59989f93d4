"""The controller's volume ops: checks against the desired state, the rest forwarded.

The runner (root) owns volumes, their files and their bounds (runner/volumes.py); the
controller keeps no record of them. It refuses early what the state alone decides (a
``mounts=`` naming a volume that does not exist, removing a volume a function mounts)
and adds to the runner's figures the functions that mount each volume. The runner
checks again, as root: docs/volumes.md.
"""

from __future__ import annotations

from typing import Any

from common import fnsettings
from common.errors import Code, FaasError
from common.log import EventLog
from common.rpc import Client, Handler
from controller.state import State


class VolumeOps:
    """volume_create, volume_list, volume_rm, and the check of ``set mounts=``: a part of
    the Controller (it has ``state``, ``clients`` and ``log``)."""

    state: State
    clients: dict[str, Client]
    log: EventLog

    def volume_handlers(self) -> dict[str, Handler]:
        return {"volume_create": self.op_volume_create, "volume_list": self.op_volume_list,
                "volume_rm": self.op_volume_rm}

    async def check_mounts(self, changes: dict[str, str]) -> None:
        """Refuse a ``mounts=`` naming a volume the runner does not have, before anything
        changes. A value that does not parse is left to the state's own error."""
        if "mounts" not in changes:
            return
        try:
            wanted = {m.split(":", 1)[0]
                      for m in fnsettings.BY_KEY["mounts"].value(changes["mounts"])}
        except ValueError:
            return
        if not wanted:
            return
        have = {v["name"] for v in (await self.clients["runner"].call("volume_list", {}))
                ["volumes"]}
        missing = sorted(wanted - have)
        if missing:
            raise FaasError(Code.NOT_FOUND, f"mounts: no volume {', '.join(missing)}: create "
                            f"it first (faasctl volume create {missing[0]} --size 1G)",
                            {"key": "mounts", "volumes": missing})

    def mounted_by(self) -> dict[str, list[str]]:
        """For each volume some function mounts, those functions by name."""
        return fnsettings.users(fnsettings.named(self.state.functions()), "mounts")

    async def op_volume_create(self, args: dict[str, Any]) -> dict[str, Any]:
        """A new volume, made by the runner within the host's bounds."""
        try:
            size = fnsettings.parse_size(args["size"])
        except ValueError as exc:
            raise FaasError(Code.BAD_REQUEST, f"size {args['size']!r}: {exc}",
                            {"field": "size"}) from None
        row = await self.clients["runner"].call(
            "volume_create", {"name": args["name"], "size": size}, retries=0)
        self.log.info("volume_created", name=args["name"], size=size)
        return {**row, "functions": []}

    async def op_volume_list(self, args: dict[str, Any]) -> dict[str, Any]:
        """Every volume: the runner's figures and the functions that mount it."""
        rows = (await self.clients["runner"].call("volume_list", {}))["volumes"]
        users = self.mounted_by()
        return {"volumes": [{**r, "functions": users.get(r["name"], [])} for r in rows]}

    async def op_volume_rm(self, args: dict[str, Any]) -> dict[str, Any]:
        """Delete a volume no function mounts (the runner checks again, as root)."""
        users = self.mounted_by().get(args["name"], [])
        if users:
            raise FaasError(Code.CONFLICT, f"volume {args['name']} is mounted by "
                            f"{', '.join(users)}: remove it from their mounts first "
                            f"(faasctl set {users[0]} mounts=...)",
                            {"volume": args["name"], "functions": users})
        result = await self.clients["runner"].call("volume_rm", {"name": args["name"]},
                                                   retries=0)
        self.log.info("volume_removed", name=args["name"])
        return result
