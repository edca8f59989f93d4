"""The runner's image store: spooled uploads in, digest-keyed rootfs out.

The controller spools an upload as its own user in ``$FAAS_ROOT/spool``; the runner
takes the file over by renaming it into ``images/.incoming`` (root only) before reading
a byte, so nothing the controller's user does afterwards can change what is read, and
opens it without following links. Extraction itself happens in a limited child process
(``runner.images.extract``). Which rootfs exist is the controller's call: ``keep``
removes the rest, except images added moments ago that the controller has not recorded
yet.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import time
from dataclasses import dataclass
from typing import Any

from common.errors import Code, FaasError
from runner.images.errors import ImageError
from runner.images.extract import cleanup_staging, extract, remove_image

INCOMING = ".incoming"
PIN_SECONDS = 600.0  # how long a fresh image survives syncs that do not name it yet
_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass
class Progress:
    """What one extraction has done so far."""

    phase: str = "verify"
    done: int = 0
    total: int | None = None


class ImageStore:
    """Images under ``root/images``; uploads taken from ``root/spool``."""

    def __init__(self, root: str, spool_uid: int):
        self.images = os.path.join(root, "images")
        self.spool = os.path.join(root, "spool")
        self.incoming = os.path.join(self.images, INCOMING)
        self.spool_uid = spool_uid
        self.progress: dict[str, Progress] = {}
        self.pinned: dict[str, float] = {}  # digest -> when image_add returned it
        self.configs: dict[str, dict[str, Any]] = {}  # digest -> what config_of read

    def recover(self) -> dict[str, int]:
        """At start: remove staging directories and taken-over uploads a crash left."""
        os.makedirs(self.images, mode=0o700, exist_ok=True)
        os.makedirs(self.incoming, mode=0o700, exist_ok=True)
        stale = 0
        for entry in os.scandir(self.incoming):
            os.unlink(entry.path)
            stale += 1
        return {"staging": cleanup_staging(self.images), "incoming": stale}

    def _take(self, upload: str) -> str:
        """Move the spooled upload where only root can touch it; check what it is."""
        src = os.path.join(self.spool, f"{upload}.tar")
        dst = os.path.join(self.incoming, f"{upload}.tar")
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            raise FaasError(Code.NOT_FOUND, f"no spooled upload {upload}") from None
        try:
            fd = os.open(dst, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            os.unlink(dst)
            raise FaasError(Code.BAD_IMAGE, "the spooled upload is not a plain file") from None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != self.spool_uid or st.st_nlink != 1:
            os.unlink(dst)
            raise FaasError(Code.BAD_IMAGE, "the spooled upload is not a plain file of the "
                            "controller's")
        return dst

    async def add(self, upload: str, tag: str | None) -> dict[str, Any]:
        """Extract an upload (or find its image already there); return digest and config."""
        path = self._take(upload)
        progress = self.progress[upload] = Progress()

        def report(phase: str, done: int, total: int | None) -> None:
            progress.phase, progress.done, progress.total = phase, done, total

        try:
            result = await asyncio.to_thread(extract, path, self.images, tag, progress=report)
        except ImageError as exc:
            raise FaasError(exc.wire_code, exc.message, exc.details) from None
        finally:
            os.unlink(path)
            self.progress.pop(upload, None)
        self.pinned[result.digest] = time.monotonic()
        await asyncio.to_thread(make_mountpoints, str(result.rootfs))
        return {"digest": result.digest, "config": result.config.to_dict(),
                "reused": result.reused, "dropped": result.dropped}

    def progress_of(self, upload: str) -> dict[str, Any]:
        """Phase and counts of an extraction in progress."""
        p = self.progress.get(upload)
        if p is None:
            raise FaasError(Code.NOT_FOUND, f"no extraction of upload {upload} in progress")
        return {"phase": p.phase, "done": p.done, "total": p.total}

    def present(self) -> set[str]:
        """Digests of the published images."""
        return {f"sha256:{e.name}" for e in os.scandir(self.images)
                if e.is_dir(follow_symlinks=False) and _HEX.fullmatch(e.name)}

    def config_of(self, digest: str) -> dict[str, Any] | None:
        """What a container of the image runs, as whom, where and with which env: read from
        the config.json this runner's extraction wrote beside the rootfs (in root's own
        0700 directory), or None if the image is not here. A sync names only the digest,
        so what a container runs is never the controller's to say."""
        config = self.configs.get(digest)
        if config is not None:
            return config
        hexd = digest.removeprefix("sha256:")
        if not _HEX.fullmatch(hexd):
            return None
        try:
            fd = os.open(os.path.join(self.images, hexd, "config.json"),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        with open(fd, encoding="utf-8") as f:
            data = json.load(f)
        config = {k: data[k] for k in ("entrypoint", "cmd", "env", "workdir", "user")}
        self.configs[digest] = config
        return config

    def keep(self, wanted: list[str]) -> list[str]:
        """Remove every image not in ``wanted`` and not freshly added; return removed."""
        now = time.monotonic()
        self.pinned = {d: t for d, t in self.pinned.items()
                       if d not in wanted and now - t < PIN_SECONDS}
        removed = []
        for digest in sorted(self.present() - set(wanted) - set(self.pinned)):
            remove_image(self.images, digest)
            self.configs.pop(digest, None)
            removed.append(digest)
        return removed


# What every container mounts over the image. Created once here, so that the runtime
# never has to create them in the shared rootfs at a container's start.
MOUNT_DIRS = ("proc", "dev", "sys", "tmp")
MOUNT_FILES = ("control.sock",)


def make_mountpoints(rootfs: str) -> None:
    """Create missing top-level mount points; never follow or replace what is there."""
    fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for name in MOUNT_DIRS:
            try:
                os.mkdir(name, 0o755, dir_fd=fd)  # mkdirat never follows a symlink
            except FileExistsError:
                pass
        for name in MOUNT_FILES:
            try:
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                                 os.O_CLOEXEC, 0o644, dir_fd=fd))
            except FileExistsError:
                pass
    finally:
        os.close(fd)
