"""The extraction child: reads the untrusted archive under rlimits, writes the staging dir.

Run by :mod:`runner.images.extract` as ``python -I _child_main.py``. Parameters arrive as one
JSON object on stdin; every message goes back as one JSON line on stdout: the messages
and their form are :mod:`runner.images.child_protocol`, shared with the parent.

Test hook: ``_FAASD_IMAGES_TEST_HOOK=crash:N`` (SIGKILL itself), ``hang:N`` (block
forever) or ``spin:N`` (burn CPU) after the N-th tar entry, so tests can interrupt an
extraction half-way deterministically. Nothing else reads that variable.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from runner.images import child_protocol as protocol
from runner.images.archive import LayerReader, read_archive
from runner.images.errors import ImageError, too_large
from runner.images.layers import Budget, apply_layer
from runner.images.limits import Limits
from runner.images.safefs import SafeRoot, syncfs

_PROGRESS_EVERY = 0.2  # seconds


def _emit(line: str) -> None:
    sys.stdout.write(line)
    sys.stdout.flush()


def _set_limits(limits: Limits) -> None:
    cpu = max(1, int(limits.cpu_seconds))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 2))  # SIGXCPU, then SIGKILL
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    # Belt and braces for the per-file cap: the kernel refuses writes past it (EFBIG).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE,
                       (limits.max_file_bytes + 1, limits.max_file_bytes + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.umask(0)  # modes come from the image, not from whoever started the daemon


class _Progress:
    """Rate-limited progress lines."""

    def __init__(self) -> None:
        self.phase, self.done, self.total, self._last = "verify", 0, None, 0.0

    def set(self, phase: str, done: int, total: int | None, force: bool = False) -> None:
        self.phase, self.done, self.total = phase, done, total
        now = time.monotonic()
        if force or now - self._last >= _PROGRESS_EVERY:
            self._last = now
            _emit(protocol.progress_line(phase, done, total))

    def add(self, n: int) -> None:
        self.set(self.phase, self.done + n, self.total)


def _test_hook() -> Callable[[int], None] | None:
    spec = os.environ.get("_FAASD_IMAGES_TEST_HOOK")
    if not spec:
        return None
    action, _, count = spec.partition(":")
    at = int(count)

    def hook(entries: int) -> None:
        if entries < at:
            return
        if action == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "hang":
            while True:
                signal.pause()
        elif action == "spin":
            while True:
                pass

    return hook


def extract_into(params: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """Read the archive and (unless already published) build staging/rootfs and config.json."""
    progress = _Progress()
    progress.set("verify", 0, None, force=True)
    spec = read_archive(params["archive"], params["tag"], limits)
    hexd = spec.digest.removeprefix("sha256:")
    published = os.path.join(params["images_dir"], hexd)
    result = {"digest": spec.digest, "config": spec.config.to_dict(), "reused": False, "dropped": 0,
              "bytes": 0}
    if (os.path.isdir(os.path.join(published, "rootfs"))
            and os.path.isfile(os.path.join(published, "config.json"))):
        return {**result, "reused": True}
    staging = params["staging"]

    def free() -> int:
        st = os.statvfs(staging)
        return st.f_bavail * st.f_frsize

    budget = Budget(limits, _test_hook(), os.stat(params["archive"]).st_size, free)
    budget.before_extracting()
    os.mkdir(os.path.join(staging, "rootfs"), 0o755)
    total = sum(layer.size for layer in spec.layers)
    progress.set("extract", 0, total, force=True)
    root = SafeRoot(os.path.join(staging, "rootfs"))
    fd = os.open(params["archive"], os.O_RDONLY | os.O_CLOEXEC)
    try:
        for i, ref in enumerate(spec.layers, 1):
            reader = LayerReader(fd, ref, progress.add)
            stats = apply_layer(root, reader, ref.diff_id,
                                f"layer {i} of {len(spec.layers)} ({ref.member})", budget)
            reader.finish()
            result["dropped"] += stats.dropped
        result["bytes"] = budget.file_bytes
        with open(os.path.join(staging, "config.json"), "x") as f:
            json.dump({"digest": spec.digest, "tags": list(spec.tags),
                       "expanded_bytes": budget.file_bytes,
                       **spec.config.to_dict()}, f, indent=1)
        if params["sync"]:
            syncfs(root.fd)
    finally:
        os.close(fd)
        root.close()
    progress.set("extract", total, total, force=True)
    return result


def main() -> None:
    """Entry point: parameters on stdin, JSON lines on stdout."""
    params = protocol.decode_params(sys.stdin.buffer.read())
    limits = Limits.from_dict(params["limits"])
    try:
        _set_limits(limits)
        _emit(protocol.result_line(extract_into(params, limits)))
    except ImageError as exc:
        _emit(protocol.error_line(exc.to_dict()))
    except MemoryError:
        _emit(protocol.error_line(too_large(
            f"extracting the image needed more than {limits.memory_bytes >> 20} MiB of memory: "
            "it is malformed or too large", limit="memory_bytes").to_dict()))
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            _emit(protocol.crash_line(traceback.format_exc()))
            return
        _emit(protocol.error_line(too_large(
            f"no room to extract the image ({exc.strerror}): free disk space").to_dict()))
    except BaseException:
        _emit(protocol.crash_line(traceback.format_exc()))
