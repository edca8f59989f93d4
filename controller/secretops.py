"""The controller's secret ops: it forwards values to the runner and keeps none.

A value crosses the controller once, on ``secret_create`` (the operators' API), and goes
straight on to the runner, which stores it as root (runner/secretstore.py). No value is
logged, kept in the state database, or put into an answer or an error. The controller
learns names (from the runner, when it needs them) and which functions use which: that
is in the functions' settings anyway. What a compromised controller can and cannot
learn is in docs/security.md "Secrets".
"""

from __future__ import annotations

from typing import Any

from common import fnsettings
from common.errors import Code, FaasError
from common.log import EventLog
from common.rpc import Client
from controller.state import State


class SecretOps:
    """The controller's secret_create, secret_list and secret_rm, and the check ``set
    secrets=`` needs: a part of the Controller class, kept apart (a mixin)."""

    state: State
    clients: dict[str, Client]
    log: EventLog

    @property
    def runner(self) -> Client:
        return self.clients["runner"]

    async def op_secret_create(self, args: dict[str, Any]) -> dict[str, Any]:
        """Store or replace a secret on the runner; the answer is its row (no value)."""
        row = await self.runner.call("secret_put", {"name": args["name"],
                                                    "value": args["value"]})
        self.log.info("secret_set", name=row["name"], size=row["size"])
        return row

    async def op_secret_list(self, args: dict[str, Any]) -> dict[str, Any]:
        """Names, sizes and dates from the runner, with the functions using each."""
        rows = (await self.runner.call("secret_list", {}))["secrets"]
        used = fnsettings.users(fnsettings.named(self.state.specs()), "secrets")
        return {"secrets": [{**r, "functions": used.get(r["name"], [])} for r in rows]}

    async def op_secret_rm(self, args: dict[str, Any]) -> dict[str, Any]:
        """Remove a secret no function uses (the runner checks again, as root)."""
        used = fnsettings.users(fnsettings.named(self.state.specs()), "secrets")
        users = used.get(args["name"], [])
        if users:
            raise FaasError(Code.CONFLICT, f"secret {args['name']} is used by "
                            f"{', '.join(users)}: take it out of their secrets first "
                            "(faasctl set FN secrets=...)", {"functions": users})
        result = await self.runner.call("secret_rm", {"name": args["name"]})
        self.log.info("secret_removed", name=args["name"])
        return result

    async def check_secrets(self, name: str, changes: dict[str, str]) -> None:
        """Before ``set NAME secrets=...`` changes anything: every named secret must be
        stored (the runner says which are)."""
        if "secrets" not in changes:
            return
        wanted = fnsettings.apply(self.state.function(name)["settings"],
                                  {"secrets": changes["secrets"]}, self.state.maxima)["secrets"]
        if not wanted:
            return
        stored = {r["name"] for r in (await self.runner.call("secret_list", {}))["secrets"]}
        unknown = [s for s in wanted if s not in stored]
        if unknown:
            raise FaasError(Code.NOT_FOUND, f"no secret named {', '.join(unknown)}: create it "
                            "first (faasctl secret create NAME); nothing was changed",
                            {"field": "secrets", "secrets": unknown})
