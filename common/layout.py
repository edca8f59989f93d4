"""Where faasd keeps things: every path under ``$FAAS_ROOT`` and ``$FAAS_RUN``, once.

Each daemon, the launcher and backup ask this module for a path instead of spelling it,
so moving a file is a change here (and in docs/design.md "On disk", which a test keeps
in agreement with :data:`DIRS` and :data:`FILES`). Which daemon owns what is in the
tables below; only the owner writes a file (and only it reads one that is private).

Paths only, no I/O except :func:`ensure_dir`, which makes a directory with the owner and
mode :data:`DIRS` gives it (the launcher at ``faasd up``, restore before it writes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

DEFAULT_ROOT = "/var/lib/faasd"
DEFAULT_RUN = "/run/faasd"


@dataclass(frozen=True)
class Dir:
    """A directory the launcher makes: under which base, whose, which mode, and why.
    ``owner``/``group`` are "root" or "faas" (the configured user and group)."""

    attr: str  # the Layout property that gives its path
    base: str  # "root" ($FAAS_ROOT) or "run" ($FAAS_RUN)
    rel: str  # relative to the base; "" is the base itself
    owner: str
    group: str
    mode: int
    what: str
    root_only: bool = False  # under $FAAS_RUN: refused unless a real root-owned directory


# In the order they are made. Directories a daemon makes for itself (named/, bundles/,
# logs/functions/) are in FILES: their owner makes them with its own checks.
DIRS = (
    Dir("root", "root", "", "root", "root", 0o755, "FAAS_ROOT"),
    Dir("logs", "root", "logs", "root", "faas", 0o750, "one JSON-lines file per program"),
    Dir("state_dir", "root", "state", "faas", "faas", 0o700, "the controller's SQLite"),
    Dir("spool", "root", "spool", "faas", "faas", 0o700, "uploads in progress"),
    Dir("images", "root", "images", "root", "root", 0o700, "the runner's rootfs cache"),
    Dir("dns_dir", "root", "dns", "faas", "faas", 0o755, "dnsagent's zone; named reads it"),
    Dir("run", "run", "", "root", "faas", 0o1770, "FAAS_RUN"),
    Dir("ctl", "run", "ctl", "root", "root", 0o700, "the runner's control sockets", True),
    Dir("runc_dir", "run", "runc", "root", "root", 0o700, "runc's state", True),
    Dir("crun_dir", "run", "crun", "root", "root", 0o700, "crun's state", True),
    Dir("netns", "run", "netns", "root", "root", 0o700,
        "netagent's network namespaces of egress functions", True),
    Dir("keeper_dir", "run", "keeper", "root", "root", 0o700,
        "the keeper's socket: only the runner may reach it", True),
)

# Files and daemon-made directories, by Layout property: (owner daemon, relative path
# as docs/design.md spells it). The docs test checks each appears there.
FILES = {
    "state_db": ("controller", "state/state.db"),
    "bundles": ("runner", "bundles/"),
    "volumes": ("runner", "volumes/"),
    "volume_mounts": ("runner", "volumes/mnt/"),
    "secrets": ("runner", "secrets/"),
    "secret_copies": ("runner", "secrets/"),
    "zone_file": ("dnsagent", "dns/faas.db"),
    "serial_file": ("dnsagent", "dns/serial"),
    "rndc_conf": ("dnsagent", "dns/rndc.conf"),
    "named_dir": ("faas-named", "named/"),
    "named_conf": ("faas-named", "named/named.conf"),
    "rndc_key": ("faas-named", "named/rndc.key"),
    "named_work": ("faas-named", "named/work/"),
    "wireguard_dir": ("netagent", "wireguard/"),
    "wg_private_key": ("netagent", "wireguard/private.key"),
    "wg_endpoints": ("netagent", "wireguard/endpoints.json"),
    "function_logs": ("runner", "logs/functions/"),
    "http_sock": ("controller", "http.sock"),
    "keeper_sock": ("keeper", "keeper/keeper.sock"),
    "supervisord_sock": ("supervisord", "supervisord.sock"),
    "supervisord_pid": ("supervisord", "supervisord.pid"),
}


@dataclass(frozen=True)
class Layout:
    """The paths of one instance: ``Layout(settings.root, settings.run)``."""

    root: str = DEFAULT_ROOT
    run: str = DEFAULT_RUN

    def _r(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _u(self, *parts: str) -> str:
        return os.path.join(self.run, *parts)

    # --- $FAAS_ROOT -------------------------------------------------------------------
    @property
    def state_dir(self) -> str:
        return self._r("state")

    @property
    def state_db(self) -> str:
        return self._r("state", "state.db")

    @property
    def spool(self) -> str:
        return self._r("spool")

    @property
    def images(self) -> str:
        return self._r("images")

    def image_rootfs(self, digest: str) -> str:
        """An extracted image's root filesystem (``digest`` with or without sha256:)."""
        return self._r("images", digest.removeprefix("sha256:"), "rootfs")

    @property
    def bundles(self) -> str:
        return self._r("bundles")

    @property
    def volumes(self) -> str:
        return self._r("volumes")

    @property
    def volume_mounts(self) -> str:
        return self._r("volumes", "mnt")

    @property
    def secrets(self) -> str:
        """The secrets' values (runner/secretstore.py): root 0700, files root 0600."""
        return self._r("secrets")

    @property
    def dns_dir(self) -> str:
        return self._r("dns")

    @property
    def zone_file(self) -> str:
        return self._r("dns", "faas.db")

    @property
    def serial_file(self) -> str:
        return self._r("dns", "serial")

    @property
    def rndc_conf(self) -> str:
        return self._r("dns", "rndc.conf")

    @property
    def named_dir(self) -> str:
        return self._r("named")

    @property
    def named_conf(self) -> str:
        return self._r("named", "named.conf")

    @property
    def rndc_key(self) -> str:
        return self._r("named", "rndc.key")

    @property
    def named_work(self) -> str:
        return self._r("named", "work")

    @property
    def wireguard_dir(self) -> str:
        return self._r("wireguard")

    @property
    def wg_private_key(self) -> str:
        return self._r("wireguard", "private.key")

    @property
    def wg_endpoints(self) -> str:
        return self._r("wireguard", "endpoints.json")

    @property
    def logs(self) -> str:
        return self._r("logs")

    @property
    def function_logs(self) -> str:
        return self._r("logs", "functions")

    def function_log(self, name: str) -> str:
        return self._r("logs", "functions", f"{name}.log")

    # --- $FAAS_RUN --------------------------------------------------------------------
    def socket(self, service: str) -> str:
        """A daemon's ZeroMQ endpoint file."""
        return self._u(f"{service}.sock")

    def lock(self, service: str) -> str:
        """A daemon's single-instance lock (``common/rpc.py``)."""
        return self._u(f"{service}.lock")

    @property
    def http_sock(self) -> str:
        return self._u("http.sock")

    @property
    def ctl(self) -> str:
        return self._u("ctl")

    @property
    def secret_copies(self) -> str:
        """Per-container copies of secrets, on a tmpfs: root 0700."""
        return self._u("secrets")

    def runtime_state(self, runtime: str) -> str:
        """The OCI runtime's state directory (``runtime`` a name or a path to the binary)."""
        return self._u(os.path.basename(runtime))

    @property
    def runc_dir(self) -> str:
        return self.runtime_state("runc")

    @property
    def crun_dir(self) -> str:
        return self.runtime_state("crun")

    @property
    def netns(self) -> str:
        return self._u("netns")

    def netns_path(self, function: str) -> str:
        """The bind mount that holds a network=egress function's namespace (netagent
        makes it; the runner's containers join it). ``function`` is a checked name."""
        return self._u("netns", function)

    @property
    def keeper_dir(self) -> str:
        return self._u("keeper")

    @property
    def keeper_sock(self) -> str:
        """The keeper's fd store (``common/fdstore.py``)."""
        return self._u("keeper", "keeper.sock")

    @property
    def supervisord_sock(self) -> str:
        return self._u("supervisord.sock")

    @property
    def supervisord_pid(self) -> str:
        return self._u("supervisord.pid")


def of(settings: object) -> Layout:
    """The layout of a Settings (anything with ``root`` and ``run``)."""
    return Layout(getattr(settings, "root"), getattr(settings, "run"))


def dir_spec(attr: str) -> Dir:
    """The row of :data:`DIRS` for a Layout property."""
    return next(d for d in DIRS if d.attr == attr)


def ids(d: Dir, owners: dict[str, Any]) -> tuple[int, int]:
    """uid and gid of ``d`` given ``owners`` {"root": (uid, gid), "faas": (uid, gid)}."""
    return int(owners[d.owner][0]), int(owners[d.group][1])


def ensure_dir(path: str, owner: tuple[int, int], mode: int) -> None:
    """Make ``path`` if missing, then give it ``owner`` and ``mode``; a symlink in its
    place is refused (OSError), never followed."""
    os.makedirs(path, mode=mode, exist_ok=True)
    st = os.lstat(path)
    if os.path.islink(path):
        raise NotADirectoryError(f"{path} is a symlink; faasd wants a real directory there")
    if (st.st_uid, st.st_gid) != owner:
        os.chown(path, *owner, follow_symlinks=False)
    os.chmod(path, mode)
