"""Apply one image layer (a tar stream, plain, gzip or zstd) onto a rootfs, OCI style.

The tar is streamed once, front to back: :mod:`tarfile` parses the headers only (never
``extract``), file data is copied by :class:`~runner.images.safefs.SafeRoot`, which owns
every filesystem call. The uncompressed bytes are counted and hashed as they stream and
compared with the config's diff_id at the end (the staging directory is thrown away on
a mismatch, so writing before knowing is harmless).

Whiteouts and opaque directories hide LOWER layers only. Instead of a first pass over
the tar, the applier remembers the paths this layer made (``created``): a whiteout of a
path this layer made is ignored, and an opaque marker empties its directory except for
paths this layer made. That gives the "opaque applies before the layer's own entries"
result wherever the marker sits in the tar, for the price of a set of names.

Why one module of this length: applying a layer (whiteouts, opaque markers, hard links,
the disk caps) is one pass over a hostile tar whose rules are reviewed together; the
filesystem calls that keep it inside the rootfs are ``runner/images/safefs.py``'s.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import queue
import tarfile
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from runner.images.errors import bad_image, too_large
from runner.images.limits import Limits, MiB
from runner.images.safefs import SafeRoot

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_AUFS_META = ".wh..wh."  # other AUFS bookkeeping (.wh..wh.plnk, ...): ignored, as containerd does
_CHUNK = 1 << 20
_AHEAD = 4  # chunks read ahead of the tar parser
_MAX_ID = 2**31 - 1
_NS_RANGE = 2**62  # utimensat takes any 64-bit time; stay clear of overflow


class Reader(Protocol):
    """Anything with ``read(n)``, returning at most n bytes and b"" only at the end."""

    def read(self, n: int, /) -> bytes: ...


@dataclass
class LayerStats:
    """What applying one layer did, for logs."""

    entries: int = 0
    dropped: int = 0  # device nodes, FIFOs, unknown entry types, AUFS metadata
    whiteouts: int = 0


FREE_CHECK_BYTES = 8 * MiB  # free space is read again before at most this much is written
# What a directory, file or symlink costs on disk beyond its data: an inode, and for a
# directory a block (ext4, xfs). Counted so that an image of many empty entries is not free.
NODE_BYTES = 4096


class Budget:
    """The caps shared by all layers of one image (bytes, entries, one file's size), and
    what the image may take on disk: its expanded size, the store's quota, the free-space
    floor. ``free()`` says how many bytes are free on the images filesystem now."""

    def __init__(self, limits: Limits, on_entry: Callable[[int], None] | None = None,
                 archive_bytes: int = 0, free: Callable[[], int] | None = None):
        self.limits = limits
        self.entries = 0
        self.stream_bytes = 0
        self.file_bytes = 0
        self.on_entry = on_entry  # test hook: see runner/images/_child.py
        self.archive_bytes = archive_bytes
        self.free = free
        self.unchecked = 0  # bytes counted since free space was last read
        self.expanded_max, self.expanded_why = expanded_cap(limits, archive_bytes)

    def before_extracting(self) -> None:
        """Refuse at once when the store is already full or the disk already too low."""
        lim = self.limits
        if lim.store_max_bytes and lim.store_used_bytes + self.archive_bytes > lim.store_max_bytes:
            raise too_large(
                f"the image store is full: its images take {lim.store_used_bytes} bytes of "
                f"image_store_max_bytes = {lim.store_max_bytes}: remove functions you do not "
                "need (faasctl rm), or raise image_store_max_bytes",
                limit="image_store_max_bytes", value=lim.store_max_bytes,
            )
        self._check_free(0)

    def _check_free(self, upcoming: int) -> None:
        if self.free is None or not self.limits.min_free_bytes:
            return
        free = self.free()
        if free - upcoming < self.limits.min_free_bytes:
            raise too_large(
                f"extracting the image would leave less than min_free_bytes = "
                f"{self.limits.min_free_bytes} bytes free on the images filesystem ({free} "
                "free now): free disk space, or lower min_free_bytes",
                limit="min_free_bytes", value=self.limits.min_free_bytes,
            )

    def _on_disk(self, size: int, path: str) -> None:
        """The caps on what the image takes on disk, before a file of ``size`` is written."""
        lim = self.limits
        if self.expanded_max and self.file_bytes > self.expanded_max:
            raise too_large(
                f"the image expands to more than {self.expanded_max} bytes (reached at "
                f"{path!r}), over {self.expanded_why}: make the image smaller, or raise "
                f"{self.expanded_why.split()[0]} if it is right",
                path=path, limit=self.expanded_why.split()[0], value=self.expanded_max,
            )
        if lim.store_max_bytes and lim.store_used_bytes + self.file_bytes > lim.store_max_bytes:
            raise too_large(
                f"the image store would pass image_store_max_bytes = {lim.store_max_bytes} "
                f"(its images take {lim.store_used_bytes} bytes; this one more than "
                f"{self.file_bytes}): remove functions you do not need (faasctl rm), or raise "
                "image_store_max_bytes",
                path=path, limit="image_store_max_bytes", value=lim.store_max_bytes,
            )
        if self.unchecked + size >= FREE_CHECK_BYTES:
            self._check_free(size)
            self.unchecked = 0
        else:
            self.unchecked += size

    def entry(self) -> None:
        """Count one tar entry."""
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise too_large(
                f"the image has more than {self.limits.max_entries} files and directories: "
                "make it smaller (multi-stage build, slimmer base image)",
                limit="max_entries", value=self.limits.max_entries,
            )
        if self.on_entry is not None:
            self.on_entry(self.entries)

    def stream(self, n: int) -> None:
        """Count n uncompressed layer bytes (headers and padding too: a bomb hits this)."""
        self.stream_bytes += n
        if self.stream_bytes > self.limits.max_bytes:
            raise too_large(
                f"the image's layers uncompress to more than {self.limits.max_bytes} bytes: "
                "make the image smaller",
                limit="max_bytes", value=self.limits.max_bytes,
            )

    def file(self, size: int, path: str) -> None:
        """Count a regular file's apparent size (a sparse file counts in full)."""
        if size > self.limits.max_file_bytes:
            raise too_large(
                f"file {path!r} in the image is {size} bytes, over the "
                f"{self.limits.max_file_bytes}-byte limit for one file: "
                "keep big data out of the image",
                path=path, size=size, limit="max_file_bytes",
            )
        self.file_bytes += size
        if self.file_bytes > self.limits.max_bytes:
            raise too_large(
                f"the image's files add up to more than {self.limits.max_bytes} bytes "
                f"(reached at {path!r}): make the image smaller",
                path=path, limit="max_bytes", value=self.limits.max_bytes,
            )
        self._on_disk(size, path)

    def node(self, path: str) -> None:
        """Count one directory, file or symlink at NODE_BYTES against the expanded size,
        the store's quota and the free-space floor: else 500,000 empty directories (a few
        MB of gzip) would take 2 GB and 500,000 inodes while the image counted 0 bytes."""
        self.file_bytes += NODE_BYTES
        self._on_disk(NODE_BYTES, path)


def expanded_cap(limits: Limits, archive_bytes: int) -> tuple[int, str]:
    """The most one image may expand to (0: no cap) and the setting that says so: the
    smaller of image_max_bytes and image_expand_ratio times the archive's size (at least
    ``expand_floor``, so that a small real image is never refused by the ratio)."""
    caps = []
    if limits.image_max_bytes:
        caps.append((limits.image_max_bytes, f"image_max_bytes = {limits.image_max_bytes}"))
    if limits.expand_ratio:
        ratio = max(int(limits.expand_ratio * archive_bytes), limits.expand_floor)
        caps.append((ratio, f"image_expand_ratio = {limits.expand_ratio:g} times the "
                            f"{archive_bytes}-byte upload (at least {limits.expand_floor} bytes)"))
    return min(caps) if caps else (0, "")


def clean_path(name: str, limits: Limits, where: str) -> str:
    """Normalize a tar entry name to ``a/b/c`` ("" is the root); refuse ones that climb out.

    ``.`` components and repeated slashes go; an absolute name or a ``..`` component is
    a bad_image (never silently rewritten: such a tar was not made by a build tool).
    """
    if "\x00" in name:
        raise bad_image(f"{where}: entry name {name[:100]!r} contains a NUL byte", name=name[:200])
    if name.startswith("/"):
        raise bad_image(
            f"{where}: entry {name[:200]!r} has an absolute path; layer entries must be relative: "
            "rebuild the image with docker build or buildah",
            name=name[:200],
        )
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise bad_image(
            f"{where}: entry {name[:200]!r} has a '..' component that would climb out of the "
            "image: this archive is not a build tool's output; do not deploy it",
            name=name[:200],
        )
    path = "/".join(parts)
    if len(os.fsencode(path)) > limits.max_path_bytes or len(parts) > limits.max_depth:
        raise too_large(
            f"{where}: entry name {name[:100]!r}... is longer than {limits.max_path_bytes} bytes "
            f"or deeper than {limits.max_depth} directories: shorten it",
            name=name[:200], limit="max_path_bytes",
        )
    return path


# -- uncompressing --------------------------------------------------------------


class _Prefixed:
    """``raw`` with the already-read ``head`` put back in front."""

    def __init__(self, raw: Reader, head: bytes):
        self._raw, self._head = raw, head

    def read(self, n: int = _CHUNK) -> bytes:
        if self._head:
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._raw.read(n)


class _Gunzip:
    """gzip (several members allowed, like Go's reader); output bounded per call."""

    def __init__(self, raw: Reader, head: bytes):
        self._raw, self._in = raw, head
        self._z: zlib._Decompress | None = None

    def read(self, n: int) -> bytes:
        while True:
            if not self._in:
                self._in = self._raw.read(_CHUNK)
                if not self._in:
                    if self._z is not None:
                        raise bad_image("the gzip stream of a layer ends early: "
                                        "the archive is truncated")
                    return b""
            if self._z is None:
                self._z = zlib.decompressobj(31)
            try:
                out = self._z.decompress(self._in, n)
            except zlib.error as exc:
                raise bad_image(f"a layer's gzip data is corrupt ({exc}): "
                                "save the image again") from None
            if self._z.eof:
                self._in, self._z = self._z.unused_data, None
            else:
                self._in = self._z.unconsumed_tail
            if out:
                return out


class _Unzstd:
    def __init__(self, raw: Reader, head: bytes):
        import zstandard  # only the extraction child needs it

        self._error = zstandard.ZstdError
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            _Prefixed(raw, head), read_size=_CHUNK, read_across_frames=True
        )

    def read(self, n: int) -> bytes:
        try:
            return self._reader.read(n)
        except self._error as exc:
            raise bad_image(f"a layer's zstd data is corrupt ({exc}): "
                            "save the image again") from None


def decompressed(raw: Reader) -> Reader:
    """The uncompressed stream of a layer, recognising gzip and zstd by their magic bytes."""
    head = raw.read(_CHUNK)
    if head.startswith(b"\x1f\x8b"):
        return _Gunzip(raw, head)
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return _Unzstd(raw, head)
    if head.startswith((b"BZh", b"\xfd7zXZ\x00")):
        raise bad_image("a layer is compressed with bzip2 or xz: "
                        "only plain, gzip and zstd layers are supported")
    return _Prefixed(raw, head)


class _Stream:
    """The uncompressed layer, read ahead by helper threads, as a forward-only file for tarfile.

    Three threads share a layer: a reader reads the archive and uncompresses it, a
    hasher computes its sha256, and the calling thread parses headers and writes files
    (pread, zlib, zstd, sha256 and write all release the GIL). The reader hands every
    chunk to both others. Hashing has its own thread because reading plus hashing in
    one thread was the slowest stage of an uncompressed layer (the page-cache copy and
    sha256 cost about as much as writing the files). A chunk is an immutable ``bytes``
    read once from the archive: the bytes hashed are exactly the bytes written. Both
    queues are small and bounded (memory stays a few MiB).

    tarfile gets this object as a plain fileobj with ``tell`` and a forward-only
    ``seek``: it parses headers as they stream by, exactly as in its "r|" mode, but
    without that mode's internal buffer, which copies itself on every read (most of
    the CPU time of a large layer). A backward seek is a bug and raises.
    """

    def __init__(self, raw: Reader, budget: Budget):
        self._sha = hashlib.sha256()
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=_AHEAD)
        self._to_hash: queue.Queue[bytes | None] = queue.Queue(maxsize=_AHEAD)
        self._stop = threading.Event()
        self._buf, self._pos, self._offset, self._ended = memoryview(b""), 0, 0, False
        self._hasher = threading.Thread(target=self._hash, daemon=True)
        self._hasher.start()
        self._reader = threading.Thread(target=self._produce, args=(raw, budget), daemon=True)
        self._reader.start()

    def _produce(self, raw: Reader, budget: Budget) -> None:
        try:
            source = decompressed(raw)
            while not self._stop.is_set():
                data = source.read(_CHUNK)
                if data:
                    budget.stream(len(data))  # a bomb stops here, whatever tarfile reads
                    self._put(self._to_hash, data)
                self._put(self._queue, data)
                if not data:
                    return
        except BaseException as exc:
            self._put(self._queue, exc)
        finally:
            self._to_hash.put(None)  # cannot block for long: the hasher always empties its queue

    def _hash(self) -> None:
        while (data := self._to_hash.get()) is not None:
            self._sha.update(data)

    def _put(self, q: queue.Queue, item: bytes | BaseException) -> None:
        # Polls the stop flag: after an error nobody empties the main queue.
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _next_chunk(self) -> bool:
        if self._ended:
            return False
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if not item:
            self._ended = True
            return False
        self._buf, self._pos = memoryview(item), 0
        return True

    def read1(self, n: int = _CHUNK) -> memoryview:
        """Up to n bytes, fewer at a chunk boundary; empty at the end.

        A view into the chunk, not a copy: file data goes from it straight to write(2).
        """
        if self._pos >= len(self._buf) and not self._next_chunk():
            return memoryview(b"")
        out = self._buf[self._pos:self._pos + n]
        self._pos += len(out)
        self._offset += len(out)
        return out

    def read(self, n: int = _CHUNK) -> bytes:
        """Exactly n bytes unless the stream ends first (tarfile counts on full reads)."""
        out = self.read1(n)
        if len(out) == n or not out:
            return out.tobytes()
        parts, got = [out], len(out)
        while got < n and (more := self.read1(n - got)):
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def tell(self) -> int:
        return self._offset

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or offset < self._offset:
            raise ValueError("the layer stream cannot seek backwards")
        while self._offset < offset and self.read1(offset - self._offset):
            pass
        return self._offset

    def seekable(self) -> bool:
        return False

    def drain(self) -> None:
        """Read to the end (data after the tar's end marker is part of the diff_id)."""
        while self._next_chunk():
            pass

    def hexdigest(self) -> str:
        """The sha256 of the whole stream, once :meth:`drain` has returned."""
        self._hasher.join()  # the reader has ended, so the hasher's queue ends with None
        return self._sha.hexdigest()

    def close(self) -> None:
        """Stop the helper threads (the reader may be blocked on a full queue after an error)."""
        self._stop.set()


# -- applying -------------------------------------------------------------------


def apply_layer(root: SafeRoot, raw: Reader, diff_id: str, label: str,
                budget: Budget) -> LayerStats:
    """Apply one layer read from ``raw`` onto ``root``; raise ImageError if it is bad.

    ``label`` names the layer in errors (e.g. "layer 2 of 3 (blobs/sha256/ab12...)").
    """
    stream = _Stream(raw, budget)
    applier = _Applier(root, budget, label)
    try:
        _apply_entries(stream, applier, label)
        applier.finish()
        stream.drain()
    finally:
        stream.close()
    actual = "sha256:" + stream.hexdigest()
    if actual != diff_id:
        raise bad_image(
            f"{label} does not match its digest: the config says {diff_id}, "
            f"its content is {actual} (the layer is truncated, corrupted or was swapped): "
            "save the image again",
            layer=label, expected=diff_id, actual=actual,
        )
    return applier.stats


def _apply_entries(stream: _Stream, applier: _Applier, label: str) -> None:
    try:
        with tarfile.TarFile(fileobj=stream, mode="r", encoding="utf-8",
                             errors="surrogateescape") as tf:
            while (member := tf.next()) is not None:
                tf.members.clear()  # tarfile keeps every header; we need none of them back
                applier.entry(tf, member)
    except (tarfile.TarError, EOFError) as exc:
        raise bad_image(
            f"{label} is truncated or not a tar archive ({exc}): save the image again",
            layer=label,
        ) from None


class _Applier:
    def __init__(self, root: SafeRoot, budget: Budget, label: str):
        self.root, self.budget, self.label = root, budget, label
        self.created: set[str] = set()
        root.created = self.created
        self.dir_times: dict[str, int] = {}
        self.stats = LayerStats()

    def entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self.budget.entry()
        self.stats.entries += 1
        path = clean_path(m.name, self.budget.limits, self.label)
        try:
            self._entry(tf, m, path)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise too_large(f"no room to write {path!r} ({exc.strerror}): free disk space",
                                path=path) from None
            raise bad_image(
                f"{self.label}: cannot create {path!r}: {exc.strerror}",
                path=path, layer=self.label,
            ) from None

    def _entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo, path: str) -> None:
        base = path.rpartition("/")[2]
        if base.startswith(WHITEOUT):
            self._whiteout(path, base)
            return
        if not path and not m.isdir():
            raise bad_image(
                f"{self.label}: the root entry '{m.name}' is not a directory: "
                "this archive is hostile or broken"
            )
        uid, gid = self._owner(m, path)
        mode = m.mode & 0o1777  # setuid and setgid are stripped; sticky is harmless
        if m.isdir() or m.isreg() or m.issym():
            self.budget.node(path)
        if m.isdir():
            self.root.make_dir(path, mode, uid, gid)
            self.dir_times[path] = _ns(m.mtime)  # set after the children, which change it
            self.created.add(path)
            return
        if m.isreg():
            self.budget.file(m.size, path)
            sparse = m.issparse()
            # Non-sparse data is read straight from the stream (TarFile.fileobj is our
            # _Stream), skipping tarfile's per-file wrapper; tarfile skips the padding.
            read = tf.extractfile(m).read if sparse else tf.fileobj.read1
            self.root.write_file(path, mode, uid, gid, _ns(m.mtime), read, m.size, sparse)
        elif m.issym():
            self.root.make_symlink(path, self._symlink_target(m, path), uid, gid, _ns(m.mtime))
        elif m.islnk():
            target = clean_path(m.linkname, self.budget.limits, f"{self.label}: hardlink {path!r}")
            if not target:
                raise bad_image(f"{self.label}: hardlink {path!r} points to the root directory",
                                path=path)
            self.root.make_hardlink(path, target)
        else:  # device nodes, FIFOs, unknown types: never created in a rootfs
            self.stats.dropped += 1
            return
        self.dir_times.pop(path, None)
        self.created.add(path)

    def _owner(self, m: tarfile.TarInfo, path: str) -> tuple[int, int]:
        # Numeric ids only: uname/gname are never looked up.
        for value in (m.uid, m.gid):
            if not isinstance(value, int) or not 0 <= value <= _MAX_ID:
                raise bad_image(f"{self.label}: entry {path!r} has owner id {value!r}, "
                                f"outside 0..{_MAX_ID}", path=path)
        return m.uid, m.gid

    def _symlink_target(self, m: tarfile.TarInfo, path: str) -> str:
        target = m.linkname
        if not target or "\x00" in target:
            raise bad_image(f"{self.label}: symlink {path!r} has an empty or NUL-holding target",
                            path=path)
        if len(os.fsencode(target)) > self.budget.limits.max_path_bytes:
            raise too_large(
                f"{self.label}: symlink {path!r} has a target longer than "
                f"{self.budget.limits.max_path_bytes} bytes",
                path=path,
            )
        return target

    def _whiteout(self, path: str, base: str) -> None:
        parent = path.rpartition("/")[0]
        self.stats.whiteouts += 1
        if base == OPAQUE:
            self.root.clear_dir(parent, self.created)
            return
        if base.startswith(_AUFS_META):
            self.stats.dropped += 1
            return
        name = base[len(WHITEOUT):]
        if name in ("", ".", ".."):
            raise bad_image(
                f"{self.label}: whiteout {path!r} names no file ('{name}'): "
                "this archive is hostile or broken",
                path=path,
            )
        victim = f"{parent}/{name}" if parent else name
        if victim not in self.created:  # a whiteout hides lower layers, never its own layer
            self.root.remove(victim)

    def finish(self) -> None:
        for path, mtime_ns in self.dir_times.items():
            self.root.set_times(path, mtime_ns)
        self.root.created = None


def _ns(mtime: float) -> int:
    """A tar mtime (int or pax float, maybe absurd) as nanoseconds utimensat accepts."""
    if isinstance(mtime, float) and not math.isfinite(mtime):
        return 0
    ns = int(mtime * 1_000_000_000) if isinstance(mtime, float) else int(mtime) * 1_000_000_000
    return max(-_NS_RANGE, min(_NS_RANGE, ns))
