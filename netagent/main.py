"""netagent (root): owns the WireGuard interface, addresses, peers and its firewall chain.

It offers only narrow verbs (see common.protocol.OPS["netagent"]) and converges to the
whole desired state the controller sends with ``sync``. Every argument is checked
against the configured interface and prefixes before anything runs: one bad address
refuses the whole sync and changes nothing. Its endpoint is mode 0600 and owned by the
controller's user: nobody else may talk to it.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from common.daemon import AgentDaemon, run_main
from common.errors import Code, FaasError
from netagent.net import Net


class NetAgent(AgentDaemon):
    """The root network agent."""

    service = "netagent"
    socket_mode = 0o600

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.net = Net(self.settings.wg_interface)
        self.function_prefix = ipaddress.IPv6Network(self.settings.function_prefix)

    def check_addresses(self, addresses: list[str]) -> set[ipaddress.IPv6Interface]:
        """Every function address must lie inside the function prefix."""
        wanted = set()
        for addr in addresses:
            ip = ipaddress.IPv6Address(addr)
            if ip not in self.function_prefix:
                raise FaasError(Code.BAD_REQUEST, f"{addr} is outside the function prefix "
                                f"{self.function_prefix}", {"address": addr})
            wanted.add(ipaddress.IPv6Interface(f"{ip}/128"))
        return wanted

    async def converge(self, state: dict[str, Any]) -> None:
        wanted = self.check_addresses(state["addresses"])
        if not await self.net.link_exists():
            kind = await self.net.create_link()
            self.log.info("interface_created", interface=self.net.interface, kind=kind)
        await self.net.set_up()
        have = {a for a in await self.net.addresses() if a.ip in self.function_prefix}
        for iface in sorted(wanted - have):
            await self.net.add_address(iface)
            self.log.info("address_added", address=str(iface.ip))
        for iface in sorted(have - wanted):
            await self.net.del_address(iface)
            self.log.info("address_removed", address=str(iface.ip))


def main() -> None:
    """Console script faas-netagent."""
    run_main(NetAgent)
