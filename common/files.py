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


@contextlib.contextmanager
def atomic_file(target: str, mode: int = 0o600,
                owner: tuple[int, int] | None = None) -> Iterator[IO[bytes]]:
    """A binary file to write that replaces ``target`` when the block ends without an
    exception; on one, the temporary file is removed and ``target`` is untouched."""
    directory, base = os.path.split(os.path.abspath(target))
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with open(fd, "wb") as f:
            yield f
            f.flush()
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.rename(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def atomic_write(target: str, data: bytes, mode: int = 0o600,
                 owner: tuple[int, int] | None = None) -> None:
    """Replace ``target`` with ``data``, whole or not at all."""
    with atomic_file(target, mode, owner) as f:
        f.write(data)


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
