"""runner (root): images, listeners, runc containers, warm pools, control sockets.

It decides nothing: it converges to the whole desired state the controller sends with
``sync``. Its endpoint is mode 0600 and owned by the controller's user: nobody else may
talk to it. supervisord stops and kills it as a group so its containers die with it.
"""

from __future__ import annotations

from common.daemon import AgentDaemon, run_main


class Runner(AgentDaemon):
    """The container runner."""

    service = "runner"
    socket_mode = 0o600


def main() -> None:
    """Console script faas-runner."""
    run_main(Runner)
