"""The runner's image store: spooled uploads in, digest-keyed rootfs out.

The controller spools an upload as its own user in ``$FAAS_ROOT/spool``; the runner
takes the file over by renaming it into ``images/.incoming`` (root only) before reading
a byte, so nothing the controller's user does afterwards can change what is read, and
opens it without following links. Extraction itself happens in a limited child process
(``runner.images.extract``). Which rootfs exist is the controller's call: ``keep``
removes the rest, except images added moments ago that the controller has not recorded
yet.

What the images take is counted (the apparent size of their regular files, recorded in
each image's config.json at extraction), so that an extraction can be refused when the
store would pass ``image_store_max_bytes``; the extraction child also holds the
per-image expanded-size cap and the free-space floor (``runner.images.layers.Budget``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import stat
import time
from dataclasses import dataclass
from typing import Any

from common.errors import Code, FaasError
from common.layout import Layout
from runner.images.errors import ImageError
from runner.images.extract import DEFAULT_LIMITS, cleanup_staging, extract, remove_image
from runner.images.limits import Limits

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

    def __init__(self, root: str, spool_uid: int, limits: Limits = DEFAULT_LIMITS):
        self.images = Layout(root).images
        self.spool = Layout(root).spool
        self.incoming = os.path.join(self.images, INCOMING)
        self.spool_uid = spool_uid
        self.limits = limits  # its store_used_bytes is filled in per extraction
        self.progress: dict[str, Progress] = {}
        self.pinned: dict[str, float] = {}  # digest -> when image_add returned it
        self.sizes: dict[str, int] = {}  # digest -> bytes its files take
        self.configs: dict[str, dict[str, Any]] = {}  # digest -> what config_of read

    @property
    def used(self) -> int:
        """Bytes the published images take together."""
        return sum(self.sizes.values())

    def recover(self) -> dict[str, int]:
        """At start: remove staging directories and taken-over uploads a crash left."""
        os.makedirs(self.images, mode=0o700, exist_ok=True)
        os.makedirs(self.incoming, mode=0o700, exist_ok=True)
        stale = 0
        for entry in os.scandir(self.incoming):
            os.unlink(entry.path)
            stale += 1
        counts = {"staging": cleanup_staging(self.images), "incoming": stale}
        self.sizes = {digest: image_size(self.images, digest) for digest in self.present()}
        return {**counts, "images": len(self.sizes), "image_bytes": self.used}

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

        limits = dataclasses.replace(self.limits, store_used_bytes=self.used)
        try:
            result = await asyncio.to_thread(extract, path, self.images, tag, limits, report)
        except ImageError as exc:
            raise FaasError(exc.wire_code, exc.message, exc.details) from None
        finally:
            os.unlink(path)
            self.progress.pop(upload, None)
        self.pinned[result.digest] = time.monotonic()
        if not result.reused:
            self.sizes[result.digest] = result.expanded_bytes
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
            self.sizes.pop(digest, None)
            self.configs.pop(digest, None)
            removed.append(digest)
        return removed


def image_size(images: str, digest: str) -> int:
    """What a published image takes: as recorded at its extraction, or (an image extracted
    before sizes were recorded) the apparent size of its regular files, each inode once."""
    image_dir = os.path.join(images, digest.removeprefix("sha256:"))
    try:
        with open(os.path.join(image_dir, "config.json"), "rb") as f:
            recorded = json.load(f).get("expanded_bytes")
        if isinstance(recorded, int) and recorded >= 0:
            return recorded
    except (OSError, ValueError):
        pass
    seen: set[tuple[int, int]] = set()
    total = 0
    for top, _dirs, files in os.walk(os.path.join(image_dir, "rootfs")):  # never follows links
        for name in files:
            st = os.lstat(os.path.join(top, name))
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


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
