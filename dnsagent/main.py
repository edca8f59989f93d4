"""dnsagent (unprivileged): owns the faas. zone file and asks the DNS server to reload.

It converges to the whole desired state the controller sends with ``sync``. Its endpoint
is mode 0600: only the controller's user may talk to it.
"""

from __future__ import annotations

from common.daemon import AgentDaemon, run_main


class DnsAgent(AgentDaemon):
    """The zone-file agent."""

    service = "dnsagent"
    socket_mode = 0o600


def main() -> None:
    """Console script faas-dnsagent."""
    run_main(DnsAgent)
