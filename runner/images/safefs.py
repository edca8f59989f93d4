"""The only code that writes an extracted image to disk: nothing here can leave the rootfs.

Containment does not rest on checking strings. Every path is resolved by the kernel
with openat2(2) and ``RESOLVE_IN_ROOT`` relative to the rootfs directory fd: ``..`` and
absolute symlinks (the image's own, which are created exactly as the image has them)
are clamped at the rootfs as if it were ``/``. Only the PARENT directory of an entry is
resolved that way; the final component is then handled with the ``*at()`` calls on
that directory fd, never following it if it is a symlink (``O_NOFOLLOW``, ``O_EXCL``,
``AT_SYMLINK_NOFOLLOW``, unlink/rmdir of the link itself). The extraction child is the
only writer of its staging directory, so there is no outside racer to defend against.

Paths given to :class:`SafeRoot` are already normalized by the caller: relative, ``/``
separated, no empty, ``.`` or ``..`` components, no NUL ("" is the root itself).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Collection

from runner.images.errors import bad_image

# openat2(2) has number 437 on every architecture since Linux 5.6 (the syscall table
# was unified for new calls); struct open_how is three u64s.
SYS_OPENAT2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV

_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_DIR_READ = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20
_CACHE = 64  # parent dir fds kept open: tar entries come grouped by directory


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def openat2(dirfd: int, path: str, flags: int, resolve: int = RESOLVE) -> int:
    """openat2(2): open ``path`` relative to ``dirfd`` with the given RESOLVE_* flags."""
    how = _OpenHow(flags, 0, resolve)
    raw = os.fsencode(path)
    # EAGAIN: a rename raced the in-root walk; retrying is the documented answer
    for _ in range(32):
        fd = _syscall(
            ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(raw),
            ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            raise OSError(err, "openat2 is not available: faasd needs Linux 5.6 or later", path)
        if err not in (errno.EAGAIN, errno.EINTR):
            raise OSError(err, os.strerror(err), path)
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)


def syncfs(fd: int) -> None:
    """Flush the filesystem holding ``fd`` (one call instead of an fsync per file)."""
    if _libc.syncfs(ctypes.c_int(fd)) != 0:
        os.sync()


class SafeRoot:
    """A directory that the methods below cannot write or delete outside of.

    ``created`` (when set to a set by the caller) receives every path this object makes,
    including parents it had to create: the layer code needs "made by this layer".
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.fd = os.open(path, _DIR_READ)
        self.created: set[str] | None = None
        self._dirs: OrderedDict[str, int] = OrderedDict()
        self._stale: list[int] = []
        self._euid, self._egid = os.geteuid(), os.getegid()
        self._umask = os.umask(0)
        os.umask(self._umask)

    def close(self) -> None:
        """Close every fd this object holds."""
        self._forget()
        self._flush()
        os.close(self.fd)

    # -- resolution ---------------------------------------------------------

    def _flush(self) -> None:
        # fds dropped from the cache are closed only here, at the start of an operation,
        # so that an fd an operation still holds is never closed under it.
        for fd in self._stale:
            os.close(fd)
        self._stale.clear()

    def _forget(self) -> None:
        # A directory or symlink went away: any cached path may now resolve elsewhere.
        self._stale.extend(self._dirs.values())
        self._dirs.clear()

    def _dir(self, path: str, create: bool) -> int | None:
        """An fd of directory ``path`` resolved in-root; missing ones made 0755 if ``create``."""
        if not path:
            return self.fd
        fd = self._dirs.get(path)
        if fd is not None:
            self._dirs.move_to_end(path)
            return fd
        try:
            fd = openat2(self.fd, path, _DIR_PATH)
        except (FileNotFoundError, NotADirectoryError) as exc:
            if not create:
                return None
            if isinstance(exc, NotADirectoryError):
                raise bad_image(
                    f"cannot create entries under {path!r}: part of that path is not a directory",
                    path=path,
                ) from None
            fd = self._mkdirs(path)
        except OSError as exc:
            raise _resolve_error(path, exc) from None
        self._dirs[path] = fd
        if len(self._dirs) > _CACHE:
            self._stale.append(self._dirs.popitem(last=False)[1])
        return fd

    def _mkdirs(self, path: str) -> int:
        parent, _, name = path.rpartition("/")
        pfd = self._dir(parent, create=True)
        try:
            os.mkdir(name, 0o755, dir_fd=pfd)
        except FileExistsError:
            # It exists yet did not resolve: a symlink to nowhere. Creating its target
            # would mean guessing, so the entry is refused instead.
            raise bad_image(
                f"cannot create entries under {path!r}: it is a symlink to a missing directory",
                path=path,
            ) from None
        if self._umask:
            os.chmod(name, 0o755, dir_fd=pfd)
        if self.created is not None:
            self.created.add(path)
        return os.open(name, _DIR_PATH | os.O_NOFOLLOW, dir_fd=pfd)

    def parent(self, path: str) -> tuple[int, str]:
        """The fd of ``path``'s parent (made if missing) and its last component."""
        parent, _, name = path.rpartition("/")
        fd = self._dir(parent, create=True)
        assert fd is not None
        return fd, name

    def lookup_parent(self, path: str) -> tuple[int, str] | None:
        """Like :meth:`parent` but never creating anything; None if the parent is missing."""
        parent, _, name = path.rpartition("/")
        fd = self._dir(parent, create=False)
        return None if fd is None else (fd, name)

    # -- removal ------------------------------------------------------------

    def _remove_at(self, dfd: int, name: str, st: os.stat_result | None = None) -> None:
        if st is None:
            st = os.lstat(name, dir_fd=dfd)
        if stat.S_ISDIR(st.st_mode):
            self._forget()
            fd = os.open(name, _DIR_READ, dir_fd=dfd)
            clear_dir_fd(fd)
            os.rmdir(name, dir_fd=dfd)
        else:
            if stat.S_ISLNK(st.st_mode):
                self._forget()
            os.unlink(name, dir_fd=dfd)

    def remove(self, path: str) -> bool:
        """Remove ``path`` (a whole tree if a directory); False if it did not exist."""
        self._flush()
        found = self.lookup_parent(path)
        if found is None:
            return False
        try:
            self._remove_at(*found)
        except FileNotFoundError:
            return False
        return True

    def clear_dir(self, path: str, keep: Collection[str]) -> None:
        """Empty directory ``path`` except the paths in ``keep`` (and what is under a kept dir).

        This is how an opaque directory hides lower layers but not its own layer's entries.
        """
        self._flush()
        work = [path]
        while work:
            current = work.pop()
            try:
                fd = openat2(self.fd, current or ".", _DIR_READ & ~os.O_NOFOLLOW)
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                with os.scandir(fd) as it:
                    entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
                for name, is_dir in entries:
                    child = f"{current}/{name}" if current else name
                    if child not in keep:
                        self._remove_at(fd, name)
                    elif is_dir:
                        work.append(child)
            finally:
                os.close(fd)

    # -- creation -----------------------------------------------------------

    def _chown_at(self, dfd: int, name: str, uid: int, gid: int) -> None:
        if (uid, gid) != (self._euid, self._egid):
            os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)

    def write_file(
        self, path: str, mode: int, uid: int, gid: int, mtime_ns: int,
        read: Callable[[int], bytes], size: int, sparse: bool = False,
    ) -> None:
        """Create regular file ``path`` (replacing what is there) from ``size`` bytes of ``read``.

        ``sparse``: all-zero chunks become holes (the data comes from a sparse member).
        """
        self._flush()
        dfd, name = self.parent(path)
        try:
            fd = os.open(name, _NEW_FILE, mode, dir_fd=dfd)
        except FileExistsError:
            self._remove_at(dfd, name)
            fd = os.open(name, _NEW_FILE, mode, dir_fd=dfd)
        try:
            _copy(read, fd, size, sparse)
            if (uid, gid) != (self._euid, self._egid):
                os.fchown(fd, uid, gid)
            if self._umask:
                os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)

    def make_dir(self, path: str, mode: int, uid: int, gid: int) -> None:
        """Make directory ``path``; an existing directory is kept (merged) and gets the new
        owner and mode."""
        self._flush()
        if not path:
            os.fchown(self.fd, uid, gid)
            os.fchmod(self.fd, mode)
            return
        dfd, name = self.parent(path)
        try:
            os.mkdir(name, mode, dir_fd=dfd)
        except FileExistsError:
            st = os.lstat(name, dir_fd=dfd)
            if stat.S_ISDIR(st.st_mode):
                fd = os.open(name, _DIR_READ, dir_fd=dfd)
                try:
                    os.fchown(fd, uid, gid)
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
                return
            self._remove_at(dfd, name, st)
            os.mkdir(name, mode, dir_fd=dfd)
        self._chown_at(dfd, name, uid, gid)
        if self._umask:  # mkdir(2) applies the umask (the extraction child runs with umask 0)
            fd = os.open(name, _DIR_READ, dir_fd=dfd)
            try:
                os.fchmod(fd, mode)
            finally:
                os.close(fd)

    def make_symlink(self, path: str, target: str, uid: int, gid: int, mtime_ns: int) -> None:
        """Make symlink ``path`` -> ``target`` exactly as given (it resolves in-root later)."""
        self._flush()
        dfd, name = self.parent(path)
        try:
            os.symlink(target, name, dir_fd=dfd)
        except FileExistsError:
            self._remove_at(dfd, name)
            os.symlink(target, name, dir_fd=dfd)
        self._chown_at(dfd, name, uid, gid)
        os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=dfd, follow_symlinks=False)

    def make_hardlink(self, path: str, target: str) -> None:
        """Make ``path`` another name of ``target`` (resolved in-root, never a directory)."""
        self._flush()
        found = self.lookup_parent(target)
        try:
            if found is None:
                raise FileNotFoundError
            tfd, tname = found
            tst = os.lstat(tname, dir_fd=tfd)
        except FileNotFoundError:
            raise bad_image(
                f"hardlink {path!r} points to {target!r}, which does not exist",
                path=path, target=target,
            ) from None
        if stat.S_ISDIR(tst.st_mode):
            raise bad_image(
                f"hardlink {path!r} points to directory {target!r}: "
                "directories cannot be hardlinked",
                path=path, target=target,
            )
        dfd, name = self.parent(path)
        try:
            os.link(tname, name, src_dir_fd=tfd, dst_dir_fd=dfd, follow_symlinks=False)
            return
        except FileExistsError:
            st = os.lstat(name, dir_fd=dfd)
            if (st.st_dev, st.st_ino) == (tst.st_dev, tst.st_ino):
                return  # already that file (a link to itself, or a repeated entry)
            self._remove_at(dfd, name, st)
        found = self.lookup_parent(target)  # the removal may have dropped cached fds
        if found is None:
            raise bad_image(
                f"hardlink {path!r} points to {target!r}, which this entry itself replaced",
                path=path, target=target,
            )
        tfd, tname = found
        try:
            os.link(tname, name, src_dir_fd=tfd, dst_dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            raise bad_image(
                f"hardlink {path!r} points to {target!r}, which this entry itself replaced",
                path=path, target=target,
            ) from None

    def set_times(self, path: str, mtime_ns: int) -> None:
        """Set atime and mtime of ``path`` (not following it); a vanished path is skipped."""
        self._flush()
        if not path:
            os.utime(self.fd, ns=(mtime_ns, mtime_ns))
            return
        found = self.lookup_parent(path)
        if found is None:
            return
        try:
            os.utime(found[1], ns=(mtime_ns, mtime_ns), dir_fd=found[0], follow_symlinks=False)
        except FileNotFoundError:
            pass


def _copy(read: Callable[[int], bytes], fd: int, size: int, sparse: bool) -> None:
    left = size
    while left:
        data = read(min(left, _CHUNK))
        if not data:
            raise EOFError("unexpected end of data")
        left -= len(data)
        if sparse and data.count(0) == len(data):
            os.lseek(fd, len(data), os.SEEK_CUR)
            continue
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    if sparse:
        os.ftruncate(fd, size)  # a trailing hole is not written by the loop above


def _resolve_error(path: str, exc: OSError) -> Exception:
    if exc.errno == errno.ELOOP:
        return bad_image(f"cannot resolve {path!r}: too many levels of symbolic links", path=path)
    if exc.errno == errno.EXDEV:
        return bad_image(f"cannot resolve {path!r}: it leads to another filesystem", path=path)
    if exc.errno == errno.ENAMETOOLONG:
        return bad_image(f"cannot resolve {path!r}: a name is too long", path=path)
    return exc


def clear_dir_fd(fd: int) -> None:
    """Delete everything inside the directory ``fd`` (which is closed), never following symlinks.

    Iterative, holding one fd at a time and climbing back with "..", so that neither a
    very deep tree (symlink chains can nest directories deeper than any entry name) nor
    the fd limit can stop it. Write-protected directories are made writable first when
    not running as root.
    """
    stack: list[tuple[str, list[str]]] = []
    pending = _unlink_files(fd)
    while True:
        if pending:
            name = pending.pop()
            child = os.open(name, _DIR_READ, dir_fd=fd)
            stack.append((name, pending))
            os.close(fd)
            fd = child
            pending = _unlink_files(fd)
            continue
        if not stack:
            os.close(fd)
            return
        parent = os.open("..", _DIR_READ, dir_fd=fd)
        os.close(fd)
        fd = parent
        name, pending = stack.pop()
        os.rmdir(name, dir_fd=fd)


def _unlink_files(fd: int) -> list[str]:
    """Unlink every non-directory in ``fd``; return the names of its subdirectories."""
    if os.geteuid() != 0:
        os.fchmod(fd, 0o700)
    dirs = []
    with os.scandir(fd) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                dirs.append(entry.name)
            else:
                os.unlink(entry.name, dir_fd=fd)
    return dirs


def remove_tree(path: str | os.PathLike[str]) -> bool:
    """Delete ``path`` and everything under it, however deep or write-protected; False if
    missing."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path)) or "/"
    name = os.path.basename(os.path.abspath(path))
    pfd = os.open(parent, _DIR_READ & ~os.O_NOFOLLOW)
    try:
        try:
            st = os.lstat(name, dir_fd=pfd)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=pfd)
            return True
        clear_dir_fd(os.open(name, _DIR_READ, dir_fd=pfd))
        os.rmdir(name, dir_fd=pfd)
        return True
    finally:
        os.close(pfd)
