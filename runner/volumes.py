"""Volumes: named ext4 filesystems, each in a sparse image file on a loop device.

The runner (root) owns them: ``volumes/<name>.img`` is the filesystem, mounted
``nodev,nosuid,noexec`` at ``volumes/mnt/<name>/`` (root 0700: no host user reaches it),
and a function that mounts the volume gets that filesystem's ``data/`` directory bound at
its path. The size is the image's: a write past it is ENOSPC inside the filesystem, so
inside the functions that mount it and nowhere else.

The image files are the only record of which volumes exist: the controller keeps none
(a volume is data, like an extracted image, not desired state), and deleting a volume is
never the effect of a sync. At start every image is mounted unless it already is (a
runner killed with SIGKILL leaves its mounts; a reboot or ``faasd down`` does not), so a
volume survives restarts of every daemon and of the host. What the operator reads:
docs/volumes.md.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from common.errors import Code, FaasError
from common.fnsettings import BY_KEY, NAME_PATTERN
from common.layout import Layout
from common.paths import root_dir
from runner.bundle import BundleError

MIN_BYTES = 4 << 20  # ext4 with a journal needs a few MiB to be worth having
COMMAND_TIMEOUT = 300.0  # mkfs of a large sparse image, a mount, an unmount
_NAME = re.compile(NAME_PATTERN)
Runner = Callable[[list[str]], None]


def run_command(argv: list[str]) -> None:
    """Run a tool to completion; OSError with its stderr if it fails."""
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise OSError(f"{argv[0]} did not finish in {COMMAND_TIMEOUT:g}s") from None
    if proc.returncode != 0:
        raise OSError(f"{' '.join(argv[:2])} failed ({proc.returncode}): "
                      f"{proc.stderr.strip()[:300]}")


class Volumes:
    """Every volume of this host. Blocking calls: the runner runs them in a thread, one at
    a time."""

    def __init__(self, paths: Layout, max_bytes: int, total_max_bytes: int,
                 min_free_bytes: int, run: Runner = run_command):
        self.dir = paths.volumes
        self.mnt = paths.volume_mounts
        self.max_bytes = max_bytes
        self.total_max_bytes = total_max_bytes
        self.min_free_bytes = min_free_bytes
        self.run = run

    def image(self, name: str) -> str:
        return os.path.join(self.dir, f"{_checked(name)}.img")

    def mountpoint(self, name: str) -> str:
        return os.path.join(self.mnt, _checked(name))

    def data(self, name: str) -> str:
        """The directory a container gets: the filesystem's ``data/`` (its root also
        holds ext4's lost+found, which no function needs to see)."""
        return os.path.join(self.mountpoint(name), "data")

    def names(self) -> list[str]:
        """Every volume: each ``<name>.img`` regular file with a volume name."""
        out = []
        for entry in os.scandir(self.dir):
            name = entry.name.removesuffix(".img")
            if entry.name.endswith(".img") and _NAME.fullmatch(name) \
                    and entry.is_file(follow_symlinks=False):
                out.append(name)
        return sorted(out)

    def mounted(self, name: str) -> bool:
        return os.path.ismount(self.mountpoint(name))

    # --- start and stop ------------------------------------------------------------------

    def recover(self) -> tuple[dict[str, int], dict[str, str]]:
        """At start: make the directories, mount every volume not mounted yet. Returns
        the counts and, by name, why a volume could not be mounted (its functions' starts
        fail until it can; the others are served)."""
        root_dir(self.dir, 0o700)
        root_dir(self.mnt, 0o700)
        counts = {"volumes": 0, "mounted": 0, "reused": 0}
        failed = {}
        for name in self.names():
            counts["volumes"] += 1
            if self.mounted(name):
                counts["reused"] += 1
                continue
            try:
                self._mount(name)
                counts["mounted"] += 1
            except OSError as exc:
                failed[name] = str(exc)
        return counts, failed

    def unmount_all(self) -> dict[str, str]:
        """At a graceful stop, after every container: unmount each volume (the loop
        device goes with it). Returns, by name, why one could not be."""
        failed = {}
        for name in self.names():
            if self.mounted(name):
                try:
                    self.run(["umount", self.mountpoint(name)])
                except OSError as exc:
                    failed[name] = str(exc)
        return failed

    def _mount(self, name: str) -> None:
        point = self.mountpoint(name)
        os.makedirs(point, mode=0o700, exist_ok=True)
        self.run(["mount", "-t", "ext4", "-o", "loop,nodev,nosuid,noexec", self.image(name),
                  point])

    # --- the ops ---------------------------------------------------------------------

    def create(self, name: str, size: int) -> dict[str, Any]:
        """A new empty volume of ``size`` bytes, mounted. Refused (forbidden) above the
        host's bounds, (conflict) if it exists; nothing is left behind on failure."""
        path = self.image(name)
        if size < MIN_BYTES or size > self.max_bytes:
            raise FaasError(Code.FORBIDDEN, f"volume size {size} is not between {MIN_BYTES} "
                            f"and this host's max_volume_bytes {self.max_bytes}",
                            {"field": "size", "maximum": self.max_bytes})
        if os.path.lexists(path):
            raise FaasError(Code.CONFLICT, f"volume {name} exists", {"volume": name})
        total = sum(self._size(n) for n in self.names()) + size
        if total > self.total_max_bytes:
            raise FaasError(Code.FORBIDDEN, f"volumes would total {total} bytes, above this "
                            f"host's volumes_max_bytes {self.total_max_bytes}",
                            {"field": "size", "maximum": self.total_max_bytes})
        st = os.statvfs(self.dir)
        free = st.f_bavail * st.f_frsize
        if size + self.min_free_bytes > free:
            raise FaasError(Code.FORBIDDEN, f"{size} bytes would leave less than "
                            f"min_free_bytes ({self.min_free_bytes}) free on the disk of "
                            f"{self.dir} ({free} free)", {"field": "size"})
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.ftruncate(fd, size)  # sparse: disk is used as the function writes
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # No reserved blocks (-m 0): a container's root user gets no more than others.
            self.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", name[:16], path])
            self._mount(name)
            os.mkdir(self.data(name), 0o755)
        except BaseException:
            self._discard(name)
            raise
        return self.describe(name)

    def remove(self, name: str) -> None:
        """Unmount and delete a volume and everything in it."""
        if not os.path.lexists(self.image(name)):
            raise FaasError(Code.NOT_FOUND, f"no volume {name}", {"volume": name})
        if self.mounted(name):
            try:
                self.run(["umount", self.mountpoint(name)])
            except OSError as exc:
                raise FaasError(Code.CONFLICT, f"volume {name} cannot be unmounted: {exc}",
                                {"volume": name}) from None
        self._discard(name)

    def _discard(self, name: str) -> None:
        if self.mounted(name):
            try:
                self.run(["umount", self.mountpoint(name)])
            except OSError:
                pass
        for remove in (lambda: os.unlink(self.image(name)),
                       lambda: os.rmdir(self.mountpoint(name))):
            try:
                remove()
            except FileNotFoundError:
                pass

    def _size(self, name: str) -> int:
        return os.lstat(self.image(name)).st_size

    def describe(self, name: str) -> dict[str, Any]:
        """Size (the image's), used and free bytes (the filesystem's, when mounted)."""
        row: dict[str, Any] = {"name": name, "size": self._size(name),
                               "mounted": self.mounted(name), "used": None, "free": None}
        if row["mounted"]:
            st = os.statvfs(self.mountpoint(name))
            row["used"] = (st.f_blocks - st.f_bfree) * st.f_frsize
            row["free"] = st.f_bavail * st.f_frsize
        return row

    def list(self) -> list[dict[str, Any]]:
        return [self.describe(n) for n in self.names()]

    # --- containers --------------------------------------------------------------------

    def sources(self, mounts: Iterable[str]) -> dict[str, str]:
        """The host directory of each volume of ``mounts`` (``VOL:/path[:ro]``). A volume
        that does not exist or is not mounted fails this container's start (BundleError),
        not the sync."""
        out = {}
        for spec in mounts:
            name = spec.split(":", 1)[0]
            if name in out:
                continue
            if not os.path.lexists(self.image(name)):
                raise BundleError(f"volume {name} does not exist (faasctl volume create "
                                  f"{name} --size SIZE, or set mounts= without it)")
            if not self.mounted(name) or not os.path.isdir(self.data(name)):
                raise BundleError(f"volume {name} is not mounted: see the runner's log "
                                  "(volume_mount_failed)")
            out[name] = self.data(name)
        return out

    def adopt(self, names: Iterable[str], uid: int, gid: int) -> None:
        """Give each volume's ``data/`` to the container's user if it is still root's
        and empty: the first function to mount a volume owns it (docs/volumes.md)."""
        if (uid, gid) == (0, 0):
            return
        for name in names:
            data = self.data(name)
            try:
                st = os.lstat(data)
                if stat.S_ISDIR(st.st_mode) and (st.st_uid, st.st_gid) == (0, 0) \
                        and not os.listdir(data):
                    os.chown(data, uid, gid, follow_symlinks=False)
            except OSError as exc:
                raise BundleError(f"volume {name}: {exc.strerror}") from None


def bind_mounts(specs: list[str], sources: Mapping[str, str]) -> list[dict[str, Any]]:
    """A bind mount of each ``VOL:/path[:ro]``, parents before what they hold: the
    volume's directory, without devices, set-id or executables (a volume holds data)."""
    out = []
    for spec in specs:
        if not BY_KEY["mounts"].canonical([spec]):  # the last check before runc
            raise BundleError(f"mount {spec[:100]!r} is not VOLUME:/path[:ro]")
        name, dest, *ro = spec.split(":")
        source = sources.get(name)
        if source is None or not source.startswith("/"):
            raise BundleError(f"volume {name} has no host directory")
        out.append({"destination": dest, "type": "bind", "source": source,
                    "options": ["bind", "nosuid", "nodev", "noexec", "ro" if ro else "rw"]})
    dests = [m["destination"] for m in out]
    if len(set(dests)) != len(dests):
        raise BundleError(f"two volumes are mounted at the same path: {', '.join(dests)}")
    return sorted(out, key=lambda m: m["destination"].count("/"))


def _checked(name: str) -> str:
    # Every path is made from a name: one that is not a volume name never reaches one.
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise FaasError(Code.BAD_REQUEST, f"{str(name)[:80]!r} is not a volume name")
    return name
