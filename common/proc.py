"""Processes: children that must not outlive their daemon, orphans it adopts, and
whether one still runs."""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """For ``preexec_fn``: the kernel sends ``sig`` to the child when its parent dies,
    even by SIGKILL, so a killed daemon leaves no orphan behind."""
    _libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def adopt_orphans(on: bool = True) -> None:
    """Become a child subreaper: a descendant whose parent exits (a container whose
    runtime started it detached) becomes our child, ours to wait for and reap."""
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def alive(pid: int) -> bool:
    """The process runs: not a zombie waiting for a parent to reap it (Z), nor dead (X)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False
