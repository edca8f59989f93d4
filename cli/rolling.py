"""faasd reload: new code and configuration, one program at a time, no request lost.

What install.sh runs on a host where faasd is already running (an upgrade). supervisord
re-reads its configuration; then every program is restarted (or added, or replaced where
its section changed) in an order that keeps someone holding the listeners: the keeper
first, while the runner holds its copies; the runner last, while the keeper holds them.
Each must be back before the next goes: running under supervisord, and, for the
agents, up and synced again as the controller sees them (``faasctl status`` healthy).
supervisord itself keeps running: a change to the supervisor package needs `faasd down`
and `faasd up`, which cost what docs/operations.md says.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

from common import layout
from common.settings import Settings

ORDER = ("keeper", "netagent", "dnsagent", "dns", "controller", "runner")
BACK_TIMEOUT = 60.0  # seconds a program may take to be back (a runner drains first)


def reread_changes(output: str) -> dict[str, str]:
    """supervisorctl reread's report, by program: available, changed, disappeared."""
    changes = {}
    for line in output.splitlines():
        name, _, what = line.partition(":")
        if what.strip() in ("available", "changed", "disappeared"):
            changes[name.strip()] = what.strip()
    return changes


def keeper_has_runner(sock_path: str, table: str = "/proc/net/unix") -> bool:
    """Whether a process is connected to the keeper's socket (the runner has given it
    its set again), from the kernel's table of unix sockets."""
    try:
        with open(table, encoding="utf-8") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return False
    # Num RefCount Protocol Flags Type St Inode Path; St 03: connected
    return any(len(f := line.split()) >= 8 and f[7] == sock_path and f[5] == "03"
               for line in lines)


def poll(what: str, probe: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(0.1)


def reload(settings: Settings, ctl: Callable[..., subprocess.CompletedProcess[str]],
           healthy: Callable[[], bool], say: Callable[[str], None] = print) -> int:
    """Re-read the configuration and cycle every program in :data:`ORDER` (then any
    other). ``ctl`` runs supervisorctl; ``healthy`` says whether ``faasctl status`` is."""
    changes = reread_changes(ctl("reread").stdout)
    running = {line.split()[0] for line in ctl("status").stdout.splitlines() if line.strip()}
    names = [n for n in ORDER if n in running or changes.get(n) == "available"]
    names += sorted((running | {n for n, c in changes.items() if c == "available"})
                    - set(names) - {n for n, c in changes.items() if c == "disappeared"})
    for name in [n for n, c in changes.items() if c == "disappeared"]:
        say(f"removing {name} (gone from the configuration)")
        ctl("stop", name)
        ctl("remove", name)
    keeper_sock = layout.of(settings).keeper_sock
    for name in names:
        t0 = time.monotonic()
        # new or changed section: update adds it, or stops the old and starts the new
        out = ctl("update", name) if changes.get(name) else ctl("restart", name)
        if out.returncode != 0 or "ERROR" in out.stdout:
            print(f"faasd: {name} did not restart: {out.stdout.strip()} (see "
                  f"{layout.of(settings).logs}/{name}.log)", file=sys.stderr)
            return 1
        try:
            poll(f"{name} running", lambda n=name: " RUNNING " in
                 f" {ctl('status', n).stdout} ", BACK_TIMEOUT)
            if name == "keeper":
                poll("the runner handing the keeper its sockets",
                     lambda: keeper_has_runner(keeper_sock) or "runner" not in running,
                     BACK_TIMEOUT)
            else:
                poll("faasctl status healthy", healthy, BACK_TIMEOUT)
        except TimeoutError as exc:
            print(f"faasd: {exc}; the rest were not restarted: check `faasd ctl status` "
                  f"and {layout.of(settings).logs}/{name}.log", file=sys.stderr)
            return 1
        say(f"{name} restarted on the new code ({time.monotonic() - t0:.1f}s)")
    return 0
