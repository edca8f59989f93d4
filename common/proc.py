"""Child processes that must not outlive the daemon that started them."""

from __future__ import annotations

import ctypes
import signal

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """For ``preexec_fn``: the kernel sends ``sig`` to the child when its parent dies,
    even by SIGKILL, so a killed daemon leaves no orphan behind."""
    _libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
