"""Secrets: their values, kept by root, and the per-container copies at /run/secrets.

The values live in ``$FAAS_ROOT/secrets/`` (root 0700, one file per secret, root 0600,
replaced atomically), never in the controller's database: the controller runs as the
unprivileged ``faas`` user (docs/security.md "Secrets" says what that buys).

A container of a function with ``secrets`` gets a directory of its own under
``$FAAS_RUN/secrets/``, a tmpfs of its own capped at TMPFS_SIZE (mounted here at start,
so no value is copied to a disk and copies cannot fill the host's /run), holding a copy
of each secret owned by the container's user, mode 0400, bind-mounted read-only at
/run/secrets. Copies are made at the container's start
(so a replaced secret reaches the next container) and removed with the container and at
the runner's start. Functions without secrets cost nothing here.

No value ever reaches a log line or an error: messages name secrets, never contents.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterable
from typing import Any

from common import files
from common.errors import Code, FaasError
from common.paths import root_dir
from common.protocol import NAME_PATTERN, SECRET_MAX

MAX_SECRETS = 4096  # stored at once: the tmpfs and a listing stay small
# A cap, not a reservation: a tmpfs takes memory only for what it holds (a page per
# small file), so thousands of containers with a few secrets each fit well under it.
TMPFS_SIZE = 256 << 20
TMPFS = "tmpfs"
_NAME = re.compile(NAME_PATTERN)


class MissingSecret(Exception):
    """A container's function names a secret that is not stored (the message names it)."""


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise FaasError(Code.BAD_REQUEST, f"{str(name)[:80]!r} is not a secret name",
                        {"field": "name"})
    return name


def fs_type(path: str, mountinfo: str = "/proc/self/mountinfo") -> tuple[str, bool]:
    """(filesystem type, whether ``path`` is its mount point) of the mount holding ``path``."""
    path = os.path.realpath(path)
    best, kind = "", ""
    with open(mountinfo, encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point = fields[4].replace("\\040", " ")
            inside = path == point or path.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, fields[sep + 1]
    return kind, best == path


class SecretStore:
    """The runner's secrets: ``store`` holds the values, ``copies`` the containers'."""

    def __init__(self, store: str, copies: str):
        self.store = store
        self.copies = copies

    # --- at start -----------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Check both directories are root's; make sure the copies are on a tmpfs of their
        own, capped at TMPFS_SIZE (kept from a previous run: a runner killed leaves it
        mounted), so copies can never fill the host's /run; remove the copies a previous
        run left (their containers are gone)."""
        root_dir(self.store, 0o700)
        root_dir(self.copies, 0o700)
        if fs_type(self.copies) != (TMPFS, True):  # its own, capped: not /run's share
            subprocess.run(["mount", "-t", "tmpfs", "-o",
                            f"mode=0700,size={TMPFS_SIZE},nosuid,nodev,noexec",
                            "faasd-secrets", self.copies], check=True, capture_output=True)
            if fs_type(self.copies) != (TMPFS, True):
                raise OSError(f"{self.copies} is not a tmpfs after mounting one")
        left = list(os.scandir(self.copies))
        for entry in left:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        return {"secret_copies": len(left)}

    # --- the values -----------------------------------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self.store, _check_name(name))

    def names(self) -> set[str]:
        """Every stored secret's name."""
        return {e.name for e in os.scandir(self.store)
                if _NAME.fullmatch(e.name) and e.is_file(follow_symlinks=False)}

    def put(self, name: str, value: bytes) -> dict[str, Any]:
        """Store (or replace) a secret, whole or not at all; its row."""
        if not isinstance(value, bytes) or len(value) > SECRET_MAX:
            raise FaasError(Code.TOO_LARGE, f"a secret is at most {SECRET_MAX} bytes",
                            {"max": SECRET_MAX})
        path, names = self._path(name), self.names()
        if name not in names and len(names) >= MAX_SECRETS:
            raise FaasError(Code.TOO_LARGE, f"{MAX_SECRETS} secrets are stored already: "
                            "remove some first", {"max": MAX_SECRETS})
        files.atomic_write(path, value, 0o600, (0, 0))
        return self.row(name)

    def row(self, name: str) -> dict[str, Any]:
        """name, size and mtime: what may be shown of a secret."""
        st = os.lstat(self._path(name))
        return {"name": name, "size": st.st_size, "updated": st.st_mtime}

    def rows(self) -> list[dict[str, Any]]:
        """Every secret's row, by name."""
        return [self.row(n) for n in sorted(self.names())]

    def remove(self, name: str, users: Iterable[str]) -> dict[str, Any]:
        """Delete a secret unless a function in ``users`` (of the desired state) uses it."""
        users = sorted(users)
        if users:
            raise FaasError(Code.CONFLICT, f"secret {name} is used by {', '.join(users)}: "
                            f"remove it from their secrets first (faasctl set FN secrets=...)",
                            {"functions": users})
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            raise FaasError(Code.NOT_FOUND, f"no secret {name}", {"name": name}) from None
        files.fsync_dir(self.store)
        return {"name": name}

    def read(self, name: str) -> bytes:
        """A value, for a container's copy: never followed through a symlink."""
        try:
            data = files.read_small(self._path(name), SECRET_MAX)
        except (FaasError, OSError):  # a symlink, a FIFO, a directory: not a secret of ours
            raise MissingSecret(f"secret {name} is not a regular file in {self.store}: "
                                f"remove it and create the secret again") from None
        if data is None:
            raise MissingSecret(f"secret {name} is not stored on this host (faasctl secret "
                                f"create {name})")
        return data

    # --- a container's copies -----------------------------------------------------------

    def copies_of(self, container_id: str) -> str:
        """Where a container's copies are (whether or not it has any)."""
        return os.path.join(self.copies, container_id)

    def materialize(self, container_id: str, names: Iterable[str], uid: int, gid: int) -> str:
        """A directory of copies for one container: each file the container user's, 0400;
        the directory theirs, 0500. Raises MissingSecret naming the first one not stored
        (and leaves nothing behind)."""
        values = {n: self.read(n) for n in names}
        path = self.copies_of(container_id)
        os.mkdir(path, 0o700)
        try:
            for name, value in values.items():
                fd = os.open(os.path.join(path, name),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o400)
                with open(fd, "wb") as f:
                    os.fchown(fd, uid, gid)
                    os.fchmod(fd, 0o400)
                    f.write(value)
            os.chown(path, uid, gid)
            os.chmod(path, stat.S_IRUSR | stat.S_IXUSR)
        except BaseException:
            self.drop(container_id)
            raise
        return path

    def drop(self, container_id: str) -> None:
        """Remove a container's copies (nothing if it had none)."""
        shutil.rmtree(self.copies_of(container_id), ignore_errors=True)
