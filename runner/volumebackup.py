"""The volumes' share of the runner's backup part (runner/backup.py), only with
``faasctl backup --with-volumes``.

A volume travels as a tar of its ``data/`` directory (``volumes/<name>.tar``), made and
read back by GNU tar with numeric owners and modes, so the files keep the uids the
functions wrote them with; its size is in the manifest.

- export: each volume's files. A volume that is not mounted (faasd stopped) is mounted
  read-only at a private directory of ``volumes/`` for the copy and unmounted after.
  The copy is of a live filesystem: files written during it may be caught half-way
  (docs/backup.md).
- ready: ``volumes/`` is a real directory or missing.
- check: each tar holds only relative names without ``..``, regular files, directories,
  symlinks and hard links to its own files, nothing below a symlink, and no more bytes
  than the volume's size; a volume that exists here is a conflict unless ``--force``.
- install: each volume made anew at its size (within this host's bounds), filled from
  its tar, and unmounted: the runner mounts it at its start.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
import tempfile
from typing import Any

from common import layout, parts
from common.errors import Code, FaasError
from common.settings import Settings
from runner.volumes import MIN_BYTES, Volumes, run_command

PREFIX, SUFFIX = "volumes/", ".tar"
TAR_TIMEOUT = 3600.0


def _volumes(settings: Settings) -> Volumes:
    return Volumes(layout.of(settings), settings.max_volume_bytes,
                   settings.volumes_max_bytes, settings.min_free_bytes)


def _tar(argv: list[str], ok: tuple[int, ...] = (0,)) -> None:
    proc = subprocess.run(["tar", "--numeric-owner", *argv], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TAR_TIMEOUT)
    if proc.returncode not in ok:
        raise OSError(f"tar failed ({proc.returncode}): {proc.stderr.strip()[:300]}")


def _name_of(member: str) -> str:
    return member.removeprefix(PREFIX).removesuffix(SUFFIX)


# --- the actions ------------------------------------------------------------------------

def is_member(name: str) -> bool:
    """Whether an archive member is a volume's tar."""
    return name.startswith(PREFIX) and name.endswith(SUFFIX)


def export(settings: Settings, work: str) -> dict[str, Any]:
    """Each volume's files as a tar in ``work``, and its size."""
    vols = _volumes(settings)
    if not os.path.isdir(vols.dir):
        return {"files": {}, "volumes": {}}
    files, sizes = {}, {}
    for name in vols.names():
        # Not mounted (faasd stopped): read-only at a private place, so a runner that
        # starts meanwhile still finds its own mount point free.
        private = None if vols.mounted(name) else tempfile.mkdtemp(prefix=".backup-",
                                                                     dir=vols.dir)
        try:
            if private is not None:
                run_command(["mount", "-t", "ext4", "-o", "ro,loop,nodev,nosuid,noexec",
                             vols.image(name), private])
            data = vols.data(name) if private is None else os.path.join(private, "data")
            files[f"{PREFIX}{name}{SUFFIX}"] = path = os.path.join(work, f"{name}.tar")
            # 1: a file changed while it was read (a live copy); the rest is copied
            _tar(["-cpf", path, "-C", data, "."], ok=(0, 1))
            sizes[name] = os.lstat(vols.image(name)).st_size
        finally:
            if private is not None:
                if os.path.ismount(private):
                    run_command(["umount", private])
                os.rmdir(private)
    return {"files": files, "volumes": sizes}


def ready(settings: Settings) -> None:
    """Conflict if volumes/ is not a directory."""
    parts.real_dir_or_none(layout.of(settings).volumes)


def check(settings: Settings, files: dict[str, str], sizes: dict[str, int] | None = None,
          force: bool = False) -> dict[str, Any]:
    """Each tar is one the runner would make, within its volume's size; a volume of the
    same name here is a conflict unless ``force``."""
    sizes = sizes or {}
    vols = _volumes(settings)
    for member, path in files.items():
        name = _name_of(member)
        size = sizes.get(name)
        if not isinstance(size, int) or not MIN_BYTES <= size <= 1 << 50:
            raise FaasError(Code.BAD_REQUEST, f"volume {name}: no usable size in the manifest")
        if os.path.lexists(vols.image(name)) and not force:
            raise FaasError(Code.CONFLICT, f"volume {name} exists here: `faasctl volume rm "
                            f"{name}` first, or restore --force to replace it")
        check_tar(path, name, size)
    return {}


def check_tar(path: str, name: str, size: int) -> None:
    """Relative names without ``..``, only files, directories, symlinks and hard links to
    earlier files, nothing under a symlink, at most ``size`` bytes of files."""
    total = 0
    seen: set[str] = set()
    links: set[str] = set()
    try:
        with tarfile.open(path, mode="r:") as tf:
            for ti in tf:
                norm = os.path.normpath(ti.name)
                parts_ = norm.split("/")
                if ti.name.startswith("/") or ".." in parts_:
                    raise _bad(name, f"{ti.name[:80]!r} is not a relative name inside it")
                if any("/".join(parts_[:i]) in links for i in range(1, len(parts_))):
                    raise _bad(name, f"{ti.name[:80]!r} lies below a symlink")
                if ti.islnk() and os.path.normpath(ti.linkname) not in seen:
                    raise _bad(name, f"hard link {ti.name[:80]!r} to a file not before it")
                if not (ti.isreg() or ti.isdir() or ti.issym() or ti.islnk()):
                    raise _bad(name, f"{ti.name[:80]!r} is a device, FIFO or socket")
                if ti.issym():
                    links.add(norm)
                seen.add(norm)
                total += ti.size if ti.isreg() else 0
    except tarfile.TarError as exc:
        raise _bad(name, f"not a readable tar: {exc}") from None
    if total > size:
        raise _bad(name, f"holds {total} bytes, more than its size {size}")


def _bad(name: str, message: str) -> FaasError:
    return FaasError(Code.BAD_REQUEST, f"volume {name}: {message}")


def install(settings: Settings, files: dict[str, str], sizes: dict[str, int] | None = None,
            force: bool = False) -> None:
    """Each volume made at its size, filled from its tar, unmounted."""
    sizes = sizes or {}
    vols = _volumes(settings)
    layout.ensure_dir(vols.dir, (0, 0), 0o700)
    layout.ensure_dir(vols.mnt, (0, 0), 0o700)
    for member, path in sorted(files.items()):
        name = _name_of(member)
        if os.path.lexists(vols.image(name)) and force:
            vols.remove(name)
        vols.create(name, sizes[name])
        try:
            # The volume's data/ is the tar's "." entry: its owner and mode come back too.
            _tar(["-xpf", path, "-C", vols.data(name)])
        finally:
            run_command(["umount", vols.mountpoint(name)])

