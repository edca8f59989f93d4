"""faasd: start and stop the whole platform under supervisord (run as root).

``faasd up`` checks the settings, prepares ``$FAAS_ROOT`` and ``$FAAS_RUN`` with the
owners and modes that decide who may talk to whom, and starts supervisord with
``supervisord.conf``; ``faasd ctl ...`` is supervisorctl for that instance; ``faasd
reload`` restarts every program on new code and configuration one at a time, losing no
request (cli/rolling.py); ``faasd down`` stops everything. The config file takes every
path from the environment this command sets, so it works from any directory and for any
number of instances.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

from cli import rolling
from common import layout
from common.daemon import owner_ids
from common.paths import root_dir
from common.proc import alive
from common.settings import EX_CONFIG, Settings, SettingsError, load

DEFAULT_CONF = "/etc/faasd/supervisord.conf"


def prepare(settings: Settings) -> None:
    """Create the directories every daemon needs, owned and moded as docs/design.md says.

    ``state/`` and ``spool/`` belong to the controller's user, ``images/`` to root alone.
    ``$FAAS_RUN`` is root:faas 1770: the faas group may reach the controller's endpoint,
    the unprivileged daemons may bind theirs, and the sticky bit stops them from removing
    or replacing the root daemons' sockets. Others may not enter at all.
    """
    uid, gid = owner_ids(settings)
    ids = {"root": 0, "faas": uid}
    gids = {"root": 0, "faas": gid}
    paths = layout.of(settings)
    for d in layout.DIRS:
        path = getattr(paths, d.attr)
        if d.root_only:
            root_dir(path, d.mode)  # never one an unprivileged daemon planted first
        else:
            layout.ensure_dir(path, (ids[d.owner], gids[d.group]), d.mode)


def _env(settings: Settings, args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FAAS_ROOT=settings.root,
        FAAS_RUN=settings.run,
        FAAS_USER=settings.user,
        FAAS_GROUP=settings.group,
        # realpath: install.sh links /usr/local/bin/faasd to the venv, where the rest is
        FAAS_BIN=(os.path.dirname(os.path.realpath(sys.argv[0])) if args.bin is None
                  else args.bin),
    )
    return env


def _supervisor_bin(name: str, env: dict[str, str]) -> str:
    path = os.path.join(env["FAAS_BIN"], name)
    return path if os.path.exists(path) else (shutil.which(name) or name)


def down(settings: Settings, conf: str, env: dict[str, str], timeout: float = 60) -> int:
    """Shut supervisord down, wait until it has gone (its programs stop first), then
    remove the interface and chains, which netagent leaves in place across restarts."""
    pidfile = layout.of(settings).supervisord_pid
    try:
        with open(pidfile, encoding="ascii") as f:
            pid = int(f.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        pid = 0
    if pid:
        subprocess.run([_supervisor_bin("supervisorctl", env), "-c", conf, "shutdown"],
                       env=env, check=False)
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            print(f"faasd: supervisord (pid {pid}, from {pidfile}) did not stop within "
                  f"{timeout:.0f}s, so the interface is left in place: check `faasd ctl "
                  f"status` and `ps -p {pid}` (a stale pidfile: remove it), then run "
                  "`faasd down` again", file=sys.stderr)
            return 1
    return subprocess.run([os.path.join(env["FAAS_BIN"], "faas-netagent"), "--remove"],
                          env=env, check=False).returncode


def reload(settings: Settings, conf: str, env: dict[str, str]) -> int:
    supervisorctl = _supervisor_bin("supervisorctl", env)

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([supervisorctl, "-c", conf, *args], env=env, text=True,
                              capture_output=True, check=False)

    def healthy() -> bool:
        return subprocess.run([os.path.join(env["FAAS_BIN"], "faasctl"), "status"], env=env,
                              capture_output=True, check=False).returncode == 0

    if ctl("pid").returncode != 0:
        print("faasd: supervisord is not running here: `faasd up` starts it", file=sys.stderr)
        return 1
    return rolling.reload(settings, ctl, healthy, say=lambda m: print(f"faasd: {m}"))


def main(argv: list[str] | None = None) -> None:
    """Console script faasd."""
    parser = argparse.ArgumentParser(prog="faasd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--conf", default=os.environ.get("FAAS_SUPERVISORD_CONF", DEFAULT_CONF),
                        help=f"supervisord config (default {DEFAULT_CONF})")
    parser.add_argument("--bin", default=None,
                        help="directory of the faas-* programs (default: beside this one)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="prepare directories and start supervisord")
    up.add_argument("--foreground", action="store_true", help="run supervisord in the foreground")
    sub.add_parser("down", help="stop every program and supervisord, then take the "
                   "WireGuard interface and its firewall chains away")
    sub.add_parser("reload", help="after an upgrade: re-read supervisord.conf and restart "
                   "every program on the new code, one at a time, losing no request")
    ctl = sub.add_parser("ctl", help="supervisorctl for this instance (status, restart NAME, ...)")
    ctl.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    try:
        settings = load()
        env = _env(settings, ns)
        if ns.command == "up":
            prepare(settings)
    except (SettingsError, OSError) as exc:
        print(f"faasd: {exc}", file=sys.stderr)
        sys.exit(EX_CONFIG)
    conf = os.path.abspath(ns.conf)
    if ns.command == "up":
        argv_ = [_supervisor_bin("supervisord", env), "-c", conf]
        argv_ += ["-n"] if ns.foreground else []
    elif ns.command == "down":
        sys.exit(down(settings, conf, env))
    elif ns.command == "reload":
        sys.exit(reload(settings, conf, env))
    else:
        argv_ = [_supervisor_bin("supervisorctl", env), "-c", conf, *ns.args]
    os.execve(argv_[0], argv_, env)
