"""Turn an uploaded archive into a published rootfs, once per image digest.

Layout under ``images_dir`` (``$FAAS_ROOT/images``, mode 0700)::

    <hex digest>/rootfs/        the image's files, as the image says (modes, owners)
    <hex digest>/config.json    the checked, normalized config (ImageConfig.to_dict + digest)
    .staging-<random>/          work in progress; never used, removed on error and at start

All reading of the untrusted archive happens in a child process (``_child.py``, started
through ``_child_main.py``; its messages: ``child_protocol.py``) with
CPU, memory and file-size rlimits; this process enforces the wall-clock limit and kills
the child on expiry. The child builds ``rootfs`` and ``config.json`` inside the staging
directory and syncs the filesystem; only then does this process rename the staging
directory to ``<hex digest>``, so a published directory is always complete.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.proc import die_with_parent
from runner.images import child_protocol as protocol
from runner.images.config import ImageConfig
from runner.images.errors import ImageError, bad_image, too_large
from runner.images.limits import Limits
from runner.images.safefs import remove_tree

Progress = Callable[[str, int, "int | None"], None]

STAGING_PREFIX = ".staging-"
_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_child_main.py")
_HEX = re.compile(r"[0-9a-f]{64}")
DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class ExtractResult:
    """A published image: where its rootfs is and what its config says."""

    digest: str  # "sha256:<hex>", the image id
    config: ImageConfig
    rootfs: str
    reused: bool  # True: it was already there, nothing was extracted
    dropped: int = 0  # entries left out on purpose (device nodes, FIFOs, ...)
    expanded_bytes: int = 0  # what its regular files add up to (0 when reused)


def extract(
    archive_path: str | os.PathLike[str],
    images_dir: str | os.PathLike[str],
    tag: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    progress: Progress | None = None,
    *,
    sync: bool = True,
) -> ExtractResult:
    """Extract the image of ``archive_path`` (by ``tag`` if several) unless already there.

    ``progress(phase, done, total)`` is called a few times a second at most: phase
    "verify" while the archive's index and config are read, then "extract" with bytes of
    layer data read out of ``total``. ``sync=False`` skips the final syncfs (benchmarks).
    Raises ImageError for anything wrong with the image or over ``limits``; the
    staging directory is gone whatever happens.
    """
    if not os.path.isfile(archive_path):
        raise FileNotFoundError(f"no archive at {os.fspath(archive_path)!r}")
    images = os.fspath(images_dir)
    os.makedirs(images, mode=0o700, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=images)
    try:
        params = protocol.encode_params(
            archive=os.path.abspath(archive_path), images_dir=os.path.realpath(images),
            staging=os.path.realpath(staging), tag=tag, limits=limits.to_dict(), sync=sync)
        outcome = _run_child(params, limits, progress)
        return _publish(images, staging, outcome, sync)
    finally:
        remove_tree(staging)


def _publish(images: str, staging: str, outcome: dict[str, Any], sync: bool) -> ExtractResult:
    digest = outcome["digest"]
    final = os.path.join(images, digest.removeprefix("sha256:"))
    result = ExtractResult(
        digest, ImageConfig.from_dict(outcome["config"]), os.path.join(final, "rootfs"),
        bool(outcome["reused"]), outcome["dropped"],
        outcome.get("bytes", 0),
    )
    if result.reused:
        return result
    try:
        os.rename(staging, final)
    except OSError:
        if _complete(final):  # another extraction of the same image won the race: use its result
            return ExtractResult(result.digest, result.config, result.rootfs, True, result.dropped)
        remove_image(images, digest)  # something incomplete that no extraction published
        os.rename(staging, final)
    if sync:
        fd = os.open(images, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)  # make the rename itself durable
        finally:
            os.close(fd)
    return result


def _complete(image_dir: str) -> bool:
    return (os.path.isdir(os.path.join(image_dir, "rootfs"))
            and os.path.isfile(os.path.join(image_dir, "config.json")))


def rootfs_path(images_dir: str | os.PathLike[str], digest: str) -> str | None:
    """The rootfs of an extracted image, or None if that digest is not (completely) there."""
    image_dir = os.path.join(images_dir, _hex(digest))
    return os.path.join(image_dir, "rootfs") if _complete(image_dir) else None


def cleanup_staging(images_dir: str | os.PathLike[str]) -> int:
    """Remove what interrupted extractions left; call at daemon start, before any extract.

    Returns how many leftovers were removed.
    """
    try:
        names = os.listdir(images_dir)
    except FileNotFoundError:
        return 0
    removed = 0
    for name in names:
        if name.startswith(STAGING_PREFIX):
            remove_tree(os.path.join(images_dir, name))
            removed += 1
    return removed


def remove_image(images_dir: str | os.PathLike[str], digest: str) -> bool:
    """Delete an extracted image (read-only directories included); False if it was not there.

    The directory is first renamed to a staging name, so a crash halfway leaves only
    something :func:`cleanup_staging` removes, never a half-deleted published rootfs.
    """
    image_dir = os.path.join(images_dir, _hex(digest))
    doomed = os.path.join(images_dir, f"{STAGING_PREFIX}rm-{os.urandom(6).hex()}")
    try:
        os.rename(image_dir, doomed)
    except FileNotFoundError:
        return False
    remove_tree(doomed)
    return True


def _hex(digest: str) -> str:
    hexd = digest.removeprefix("sha256:")
    if not _HEX.fullmatch(hexd):
        raise ValueError(f"not an image digest: {digest[:80]!r}")
    return hexd


# -- the child ------------------------------------------------------------------------


def _run_child(params: bytes, limits: Limits, progress: Progress | None) -> dict[str, Any]:
    """Run the extraction child to completion (or kill it); return its result message."""
    with subprocess.Popen(
        [sys.executable, "-I", _CHILD],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        close_fds=True, start_new_session=True,
        # It must not outlive the runner (start_new_session puts it out of the group
        # supervisord kills): an orphan would keep writing into a staging directory
        # that the next runner is removing.
        preexec_fn=die_with_parent,
    ) as proc:
        try:
            assert proc.stdin is not None
            try:
                proc.stdin.write(params)
                proc.stdin.close()
            except BrokenPipeError:
                pass  # it died at once; its exit status says why
            messages, stderr, timed_out = _read_child(proc, time.monotonic() + limits.wall_seconds,
                                                      progress)
            status = proc.wait(timeout=0 if timed_out else 5)  # it closed its pipes: it is exiting
        except subprocess.TimeoutExpired:
            proc.kill()
            status = proc.wait()
        except BaseException:
            proc.kill()
            raise
    return _outcome(messages, stderr, status, timed_out, limits)


def _read_child(
    proc: subprocess.Popen[bytes], deadline: float, progress: Progress | None
) -> tuple[list[Any], bytes, bool]:
    """Collect the child's JSON lines (calling ``progress``) and stderr until EOF or deadline."""
    assert proc.stdout is not None and proc.stderr is not None
    messages: list[Any] = []
    out, err = b"", b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return messages, err, True
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif key.fileobj is proc.stderr:
                    err = (err + chunk)[-65536:]
                else:
                    out += chunk
                    *lines, out = out.split(b"\n")
                    for line in lines:
                        msg = protocol.parse_line(line)
                        if protocol.PROGRESS in msg:
                            if progress is not None:
                                progress(*msg[protocol.PROGRESS])
                        else:
                            messages.append(msg)
    return messages, err, False


def _outcome(messages: list[Any], stderr: bytes, status: int, timed_out: bool,
             limits: Limits) -> dict[str, Any]:
    if timed_out:
        raise too_large(
            f"extracting the image took longer than {limits.wall_seconds:g} s: "
            "make the image smaller or raise the time limit",
            limit="wall_seconds", value=limits.wall_seconds,
        )
    last = messages[-1] if messages else {}
    if protocol.ERROR in last:
        raise ImageError.from_dict(last[protocol.ERROR])
    if protocol.RESULT in last and status == 0:
        return last[protocol.RESULT]
    if status == -signal.SIGXCPU or (status == -signal.SIGKILL and not last):
        raise too_large(
            f"the extraction process was killed ({_signame(-status)}): the image needed more than "
            f"{limits.cpu_seconds} s of CPU or {limits.memory_bytes >> 20} MiB of memory; "
            "make it smaller",
            signal=_signame(-status),
        )
    if status < 0:
        raise bad_image(
            f"the extraction process died of {_signame(-status)} while reading the image",
            signal=_signame(-status),
        )
    detail = last.get(protocol.CRASH) or stderr.decode(errors="replace")[-2000:]
    raise RuntimeError(f"image extraction failed (exit status {status}): {detail}")


def _signame(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
