"""Files written whole or not at all: the one way faasd replaces a file.

A temporary file beside the target (random name, ``O_EXCL|O_NOFOLLOW``, so nothing
planted in the directory is followed), owner and mode set on the descriptor, fsynced,
renamed over the target, the directory fsynced: after a crash the old file or the new
one is there, never a mix. And the careful way to read a small file someone else
could have replaced with a symlink or a FIFO (:func:`read_small`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from typing import IO

from common.errors import Code, FaasError


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_beside(target: str) -> tuple[int, str]:
    """A new temporary file beside ``target``: a random name opened O_EXCL|O_NOFOLLOW,
    so nothing planted in the directory is followed."""
    directory, base = os.path.split(os.path.abspath(target))
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(4)}.tmp")
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                   0o600), tmp


@contextlib.contextmanager
def atomic_file(target: str, mode: int = 0o600,
                owner: tuple[int, int] | None = None) -> Iterator[IO[bytes]]:
    """A binary file to write that replaces ``target`` when the block ends without an
    exception; on one, the temporary file is removed and ``target`` is untouched."""
    fd, tmp = _create_beside(target)
    try:
        with open(fd, "wb") as f:
            yield f
            f.flush()
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    commit(tmp, target)


def stage(target: str, data: bytes, mode: int = 0o600,
          owner: tuple[int, int] | None = None) -> str:
    """``data`` in a new temporary file beside ``target``, owner and mode set, fsynced;
    its path, for :func:`commit` once whatever must happen in between (a check of the
    file, another file first) has."""
    fd, tmp = _create_beside(target)
    try:
        with open(fd, "wb") as f:
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def commit(tmp: str, target: str) -> None:
    """Rename ``tmp`` over ``target`` and fsync the directory: the new file or the old
    one survives a crash, never a mix. A symlink at ``target`` is replaced, not followed."""
    os.rename(tmp, target)
    fsync_dir(os.path.dirname(os.path.abspath(target)))


def atomic_write(target: str, data: bytes, mode: int = 0o600,
                 owner: tuple[int, int] | None = None) -> None:
    """Replace ``target`` with ``data``, whole or not at all."""
    commit(stage(target, data, mode, owner), target)


def read_small(path: str, cap: int) -> bytes | None:
    """A regular file's bytes (None if missing). Never follows a symlink or opens a FIFO
    an unprivileged user might have planted in a directory of theirs; refuses a file
    over ``cap`` (internal error)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FaasError(Code.INTERNAL, f"{path} is not a regular file")
        if st.st_size > cap:
            raise FaasError(Code.INTERNAL, f"{path} is larger than {cap} bytes")
        with open(fd, "rb", closefd=False) as f:
            return f.read(cap + 1)[:cap]
    finally:
        os.close(fd)
