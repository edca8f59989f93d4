"""netagent (root): owns the WireGuard interface, addresses, peers and its firewall chain.

It offers only narrow verbs (see common.protocol.OPS["netagent"]) and converges to the
whole desired state the controller sends with ``sync``. Its endpoint is mode 0600 and
owned by the controller's user: nobody else may talk to it.
"""

from __future__ import annotations

from common.daemon import AgentDaemon, run_main


class NetAgent(AgentDaemon):
    """The root network agent."""

    service = "netagent"
    socket_mode = 0o600


def main() -> None:
    """Console script faas-netagent."""
    run_main(NetAgent)
