"""The OCI runtime config (config.json) of one function container, and its bundle dir.

Every TCP connection to a function is served by a container of the function's image.
The image's rootfs is shared by all its containers and mounted read-only; the bundle dir
holds nothing but config.json. What a container gets, and why, is in docs/containers.md.
:func:`build_config` only computes: it reads the image's /etc/passwd and /etc/group when
the image's USER is a name, and writes nothing.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.fnsettings import BY_KEY
from runner import seccomp

MiB = 1 << 20
OCI_VERSION = "1.0.2"
CONTROL_SOCKET = "/control.sock"  # where the per-container control socket appears inside
SECRETS_DIR = "/run/secrets"  # where a function's secrets appear inside, one file each
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NOBODY = 65534  # the user (and group) of an image that names none
CGROUP_PARENT = "/faasd"
CPU_PERIOD_US = 100_000

NAMESPACES = ("pid", "mount", "ipc", "uts", "cgroup", "network")

# As runc's and Docker's defaults (Docker also masks powercap: CVE-2020-8694).
MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_MAX_ID = 0xFFFFFFFE  # (uid_t)-1 means "unchanged" to the kernel
_MAX_ACCOUNT_FILE = 4 * MiB


class BundleError(Exception):
    """A container cannot be configured from this image and these settings."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class FunctionSettings:
    """The per-function limits and environment of its containers: ``memory``, ``cpu`` and
    ``pids`` are the settings of common/fnsettings.py by their names, with their defaults
    and ranges; ``nofile`` and ``tmp_bytes`` are faasd's own, the same for every function."""

    memory: int = BY_KEY["memory"].default
    cpu: float = BY_KEY["cpu"].default
    pids: int = BY_KEY["pids"].default
    network: str = BY_KEY["network"].default
    may_call: list[str] = field(default_factory=lambda: list(BY_KEY["may_call"].default))
    secrets: list[str] = field(default_factory=lambda: list(BY_KEY["secrets"].default))
    mounts: list[str] = field(default_factory=lambda: list(BY_KEY["mounts"].default))
    nofile: int = 1024
    tmp_bytes: int = 64 * MiB
    env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, settings: Mapping[str, Any]) -> FunctionSettings:
        """The container's share of a function's settings as synced (typed by the wire
        schema, bounded by runner/bounds.py)."""
        return cls(memory=settings["memory"], cpu=settings["cpu"], pids=settings["pids"],
                   network=settings["network"], may_call=list(settings["may_call"]),
                   secrets=list(settings["secrets"]), mounts=list(settings["mounts"]),
                   # The handler protocol's hint: answering "done" is worth it (the SDK
                   # reads it; any handler may).
                   env={**settings["env"], "FAAS_REUSE": "1" if settings["reuse"] else "0"})

    def validate(self) -> None:
        """Raise :class:`BundleError` naming the first bad value: the last check before a
        value reaches the kernel, with the table's ranges (the runner already refused a
        sync outside them)."""
        checks = (
            *((k, getattr(self, k), BY_KEY[k].type, BY_KEY[k].lo, BY_KEY[k].hi)
              for k in ("memory", "cpu", "pids")),
            ("nofile", self.nofile, int, 16, 1 << 20),  # 1 << 20: the kernel's nr_open
            ("tmp_bytes", self.tmp_bytes, int, 64 * 1024, 1 << 50),
        )
        for name, value, kind, low, high in checks:
            # The CFS quota needs at least 1 ms per period (0.01 CPU): the table's minimum
            # is above it. An int is a number of CPUs too; a bool is neither.
            ok = (int, float) if kind is float else int
            if isinstance(value, bool) or not isinstance(value, ok) or not low <= value <= high:
                raise BundleError(f"{name} must be {'an integer' if kind is int else 'a number'}"
                                  f" in [{low}, {high}], not {value!r}")
        check_env(self.env)


def check_env(env: Mapping[str, str]) -> None:
    """Refuse environment entries the kernel or the handler could not take as meant."""
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise BundleError(f"environment names and values must be strings: {key!r}")
        if not key or "=" in key or "\0" in key:
            raise BundleError(f"environment name {key[:60]!r} is empty or holds '=' or NUL")
        if "\0" in value:
            raise BundleError(f"environment value of {key!r} holds a NUL byte")
        if key == "FAAS_CONTROL_SOCKET":
            raise BundleError("FAAS_CONTROL_SOCKET is set by faasd and cannot be overridden")


@dataclass(frozen=True)
class EgressNet:
    """A network=egress container's network: the namespace netagent holds for its
    function (a path the runner computed from its layout, never one from a message) and
    the host files mounted read-only as its /etc/resolv.conf and /etc/hosts."""

    netns: str
    resolv_conf: str
    hosts: str


def build_config(rootfs: str, image_config: Mapping[str, Any], *, container_id: str,
                 hostname: str, control_socket: str,
                 settings: FunctionSettings = FunctionSettings(),
                 cgroup_parent: str = CGROUP_PARENT,
                 egress: EgressNet | None = None,
                 secrets_dir: str | None = None,
                 volumes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The OCI config of one container of an image.

    ``rootfs`` is the image's extracted root (absolute), ``image_config`` its normalized
    config (entrypoint, cmd, env, workdir, user), ``control_socket`` the host path of the
    container's control socket, ``secrets_dir`` the host directory of its secrets' copies
    (runner/secretstore.py), bound read-only at /run/secrets, ``volumes`` the bind mounts
    of the volumes ``settings.mounts`` names (runner/volumes.py bind_mounts). Raises
    :class:`BundleError` for an image or settings that cannot make a container (no
    command, unknown user, bad environment, bad limits, a volume without its directory).
    """
    _check_names(rootfs, container_id, hostname, control_socket, cgroup_parent,
                 *([secrets_dir] if secrets_dir is not None else []))
    settings.validate()
    if settings.mounts and len(volumes or []) != len(settings.mounts):
        raise BundleError("the function mounts volumes this container was not given")
    args = [*(image_config.get("entrypoint") or []), *(image_config.get("cmd") or [])]
    if not args:
        raise BundleError("the image has no command to run (entrypoint and cmd are empty)")
    if not all(isinstance(a, str) and "\0" not in a for a in args):
        raise BundleError("the image's command has an argument that is not a string or holds NUL")
    cwd = image_config.get("workdir") or "/"
    if not isinstance(cwd, str) or not cwd.startswith("/") or "\0" in cwd:
        raise BundleError(f"the image's workdir {str(cwd)[:100]!r} is not an absolute path")
    uid, gid, groups = resolve_user(rootfs, image_config.get("user") or "")
    namespaces: list[dict[str, str]] = [{"type": t} for t in NAMESPACES]
    extra: list[dict[str, Any]] = []
    if egress is not None:
        for path in (egress.netns, egress.resolv_conf, egress.hosts):
            if not path.startswith("/") or "\0" in path or ".." in path.split("/"):
                raise BundleError(f"egress path {path[:120]!r} must be absolute, without '..'")
        namespaces[NAMESPACES.index("network")] = {"type": "network", "path": egress.netns}
        extra = [{"destination": dest, "type": "bind", "source": src,
                  "options": ["bind", "ro", "nosuid", "nodev", "noexec"]}
                 for dest, src in (("/etc/resolv.conf", egress.resolv_conf),
                                   ("/etc/hosts", egress.hosts))]
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid, "additionalGids": groups, "umask": 0o022},
            "args": args,
            "env": container_env(image_config.get("env") or [], settings.env),
            "cwd": cwd,
            # An empty set of every kind: the process and anything it execs hold no
            # capability, whatever its uid (even 0) and whatever file capabilities say.
            "capabilities": {k: [] for k in
                             ("bounding", "effective", "inheritable", "permitted", "ambient")},
            "rlimits": [
                {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
                {"type": "RLIMIT_NOFILE", "hard": settings.nofile, "soft": settings.nofile},
            ],
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": True},
        "hostname": hostname,
        "mounts": mounts(control_socket, settings.tmp_bytes, uid, gid) + extra + ([
            # The directory and its files are the container user's, read-only; the bind
            # is read-only too, so not even that user can add or replace one.
            {"destination": SECRETS_DIR, "type": "bind", "source": secrets_dir,
             "options": ["bind", "nosuid", "nodev", "noexec", "ro"]}]
            if secrets_dir is not None else []) + list(volumes or []),
        "linux": {
            "namespaces": namespaces,
            # Absolute: the same place on cgroup v1, hybrid and v2 (docs/containers.md).
            "cgroupsPath": f"{cgroup_parent}/{container_id}",
            "resources": resources(settings),
            "seccomp": seccomp.profile(),
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }


def _check_names(rootfs: str, container_id: str, hostname: str, control_socket: str,
                 cgroup_parent: str, secrets_dir: str = "/") -> None:
    if not _ID.fullmatch(container_id):
        raise BundleError(f"container id {container_id[:80]!r} is not [A-Za-z0-9_.+-]{{1,128}}")
    if not _HOSTNAME.fullmatch(hostname):
        raise BundleError(f"hostname {hostname[:80]!r} is not a DNS label")
    for what, path in (("rootfs", rootfs), ("control socket", control_socket),
                       ("cgroup parent", cgroup_parent), ("secrets", secrets_dir)):
        if not path.startswith("/") or "\0" in path or ".." in path.split("/"):
            raise BundleError(f"{what} path {path[:120]!r} must be absolute, without '..'")


def container_env(image_env: list[str], function_env: Mapping[str, str]) -> list[str]:
    """The process environment: the image's, PATH if it has none, the function's
    settings over both, and FAAS_CONTROL_SOCKET."""
    check_env(function_env)
    env: dict[str, str] = {}
    for item in image_env:
        key, sep, value = item.partition("=")
        if sep and key and "\0" not in item:  # the image code already refused others
            env[key] = value
    env.pop("FAAS_CONTROL_SOCKET", None)  # an image's own value would be wrong here
    env.setdefault("PATH", DEFAULT_PATH)
    env.update(function_env)
    env["FAAS_CONTROL_SOCKET"] = CONTROL_SOCKET
    return [f"{k}={v}" for k, v in env.items()]


def mounts(control_socket: str, tmp_bytes: int, uid: int, gid: int) -> list[dict[str, Any]]:
    """The filesystems over the read-only rootfs: runc's defaults, a small /tmp that the
    container's user owns, a read-only /sys and its own cgroup, and the control socket."""
    def mount(dest: str, kind: str, source: str, *options: str) -> dict[str, Any]:
        return {"destination": dest, "type": kind, "source": source, "options": list(options)}

    return [
        mount("/proc", "proc", "proc", "nosuid", "noexec", "nodev"),
        mount("/dev", "tmpfs", "tmpfs", "nosuid", "strictatime", "mode=755", "size=65536k"),
        mount("/dev/pts", "devpts", "devpts", "nosuid", "noexec", "newinstance",
              "ptmxmode=0666", "mode=0620", "gid=5"),
        mount("/dev/shm", "tmpfs", "shm", "nosuid", "noexec", "nodev", "mode=1777",
              "size=16m"),
        mount("/dev/mqueue", "mqueue", "mqueue", "nosuid", "noexec", "nodev"),
        mount("/sys", "sysfs", "sysfs", "nosuid", "noexec", "nodev", "ro"),
        # The container's own cgroup (a cgroup namespace: nothing above it), read-only, as
        # Docker does: a runtime can size itself from its memory.max and pids.max.
        mount("/sys/fs/cgroup", "cgroup", "cgroup", "nosuid", "noexec", "nodev", "relatime",
              "ro"),
        # runc 1.1 resets a tmpfs's mode to that of the directory it covers, whatever
        # mode= says: an image whose /tmp is 0755 would leave /tmp unwritable to a
        # non-root user. Owned by that user, it is writable in either case.
        mount("/tmp", "tmpfs", "tmpfs", "nosuid", "nodev", "mode=1777", f"size={tmp_bytes}",
              f"uid={uid}", f"gid={gid}"),
        # Read-only still lets the handler connect(2): a socket is not written through
        # its mount. It stops the handler from replacing the inode under the runner.
        mount(CONTROL_SOCKET, "bind", control_socket, "bind", "nosuid", "nodev", "noexec",
              "ro"),
    ]


def resources(settings: FunctionSettings) -> dict[str, Any]:
    """Cgroup limits: memory without swap, a CFS CPU quota, a pid count, no devices
    beyond the few runc always allows (null, zero, full, tty, random, urandom, ptys)."""
    return {
        "devices": [{"allow": False, "access": "rwm"}],
        # swap is memory+swap: equal to the limit means the container never swaps.
        "memory": {"limit": settings.memory, "swap": settings.memory},
        "cpu": {"quota": max(1000, round(settings.cpu * CPU_PERIOD_US)),
                "period": CPU_PERIOD_US},
        "pids": {"limit": settings.pids},
    }


# --- users ------------------------------------------------------------------------------

def resolve_user(rootfs: str, user: str) -> tuple[int, int, list[int]]:
    """(uid, gid, additional gids) for an image's USER, as Docker resolves it.

    ``""`` is 65534:65534. ``uid`` or ``name``, optionally ``:gid`` or ``:group``; names
    are looked up in the ROOTFS's /etc/passwd and /etc/group, never the host's. A uid
    without a group takes the passwd entry's group, else 0 (as Docker); additional gids
    are the /etc/group entries listing the user's name. A numeric ``uid:gid`` is taken
    as it is: no file is read and there are no additional gids.
    """
    if not user:
        return NOBODY, NOBODY, []
    if "\0" in user or user.count(":") > 1:
        raise BundleError(f"image user {user[:60]!r} is not user[:group]")
    name, _, group = user.partition(":")
    if not name:
        raise BundleError(f"image user {user[:60]!r} names no user")
    passwd = None
    uid = _numeric(name)
    if uid is None or not group:  # a name to look up, or a uid whose group passwd gives
        passwd = read_account_file(rootfs, "passwd", required=uid is None)
    entry = _passwd_entry(passwd or [], name, uid)
    if uid is None:
        if entry is None:
            raise BundleError(f"image user {name!r} is not in the image's /etc/passwd")
        uid = entry[1]
    gid = _resolve_group(rootfs, group) if group else (entry[2] if entry else 0)
    groups: list[int] = []
    if entry is not None:
        members = read_account_file(rootfs, "group", required=False) or []
        groups = sorted({g for g, users in _group_members(members) if entry[0] in users} - {gid})
    return uid, gid, groups


def _resolve_group(rootfs: str, group: str) -> int:
    gid = _numeric(group)
    if gid is not None:
        return gid
    for fields in read_account_file(rootfs, "group", required=True) or []:
        if fields[0] == group and len(fields) >= 3:
            gid = _numeric(fields[2], strict=False)
            if gid is not None:
                return gid
    raise BundleError(f"image group {group!r} is not in the image's /etc/group")


def _numeric(text: str, *, strict: bool = True) -> int | None:
    """The id ``text`` spells, or None if it is not a number. An out-of-range number is
    an error in the image's USER (strict) and a line to skip in its passwd or group."""
    if not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    if value > _MAX_ID:
        if strict:
            raise BundleError(f"id {text[:20]} is out of range (at most {_MAX_ID})")
        return None
    return value


def _passwd_entry(lines: list[list[str]], name: str, uid: int | None
                  ) -> tuple[str, int, int] | None:
    """(name, uid, gid) of the first entry matching the name, or the uid if numeric."""
    for fields in lines:
        if len(fields) < 4:
            continue
        u, g = _numeric(fields[2], strict=False), _numeric(fields[3], strict=False)
        if u is None or g is None:
            continue
        if (uid is None and fields[0] == name) or (uid is not None and u == uid):
            return fields[0], u, g
    return None


def _group_members(lines: list[list[str]]) -> list[tuple[int, set[str]]]:
    out = []
    for fields in lines:
        if len(fields) >= 4 and (gid := _numeric(fields[2], strict=False)) is not None:
            out.append((gid, {m for m in fields[3].split(",") if m}))
    return out


def read_account_file(rootfs: str, name: str, *, required: bool) -> list[list[str]] | None:
    """The colon-separated lines of the rootfs's /etc/<name>, or None if it has none.

    The rootfs belongs to whoever built the image: /etc or /etc/<name> may be a symlink
    to a host file, a FIFO that blocks a reader, or a huge file. Each component is opened
    with O_NOFOLLOW relative to the one before, so nothing outside the rootfs is ever
    read; a symlink or a non-regular file is refused with a BundleError.
    """
    where = f"the image's /etc/{name}"
    try:
        data = _read_in_root(rootfs, ("etc", name))
    except FileNotFoundError:
        if required:
            raise BundleError(f"{where} does not exist, so user and group names cannot be "
                              "resolved: use a numeric USER uid[:gid]") from None
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise BundleError(f"{where} (or /etc) is a symlink: refusing to follow it "
                              "out of the image; use a numeric USER uid[:gid]") from None
        raise BundleError(f"{where} cannot be read: {exc.strerror}") from None
    text = data.decode("utf-8", errors="replace")
    return [line.split(":") for line in text.splitlines()
            if line and not line.startswith(("#", "+", "-"))]


def _read_in_root(rootfs: str, parts: tuple[str, ...]) -> bytes:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(rootfs, flags | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        # O_NONBLOCK: opening a FIFO must not hang the runner; it is refused below.
        leaf = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)
    try:
        info = os.fstat(leaf)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if info.st_size > _MAX_ACCOUNT_FILE:
            raise OSError(errno.EFBIG, f"larger than {_MAX_ACCOUNT_FILE} bytes")
        return os.read(leaf, _MAX_ACCOUNT_FILE + 1)[:_MAX_ACCOUNT_FILE]
    finally:
        os.close(leaf)


# --- the bundle dir ---------------------------------------------------------------------

def write_bundle(bundle_dir: str, config: Mapping[str, Any]) -> str:
    """Write ``config`` as ``bundle_dir``/config.json atomically; return the file's path.

    The dir is created 0700 if missing (and made 0700 if not). The file is written to a
    temporary name and renamed: a runtime started at any moment reads either no
    config.json or a whole one. No fsync: a bundle never outlives the runner that wrote
    it (the runner removes every bundle at start), so durability would only cost time
    on every connection. Mode 0600: it names paths and limits of the host.
    """
    os.makedirs(bundle_dir, mode=0o700, exist_ok=True)
    os.chmod(bundle_dir, 0o700)
    path = os.path.join(bundle_dir, "config.json")
    tmp = os.path.join(bundle_dir, f".config.json.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        with open(fd, "w", encoding="utf-8", closefd=True) as f:
            json.dump(config, f, separators=(",", ":"))
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
