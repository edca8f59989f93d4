"""The host-wide container memory budget.

Every function's ``memory`` is a cgroup limit, not a reservation: the defaults (16 slots
of 512 MiB per function) let the containers of one busy function ask for more memory
than the host has, and the kernel's OOM killer would then pick among the host's
processes. The runner therefore counts the memory limit of every container it has
started and that has not exited yet (idle warm containers included) against one budget;
a container that would go past it is not started: its connection gets 503 with
Retry-After, as at capacity, and a warm-pool fill waits for the janitor's next round.
"""

from __future__ import annotations

BUDGET_SHARE = 0.75  # of MemTotal, when the setting is 0


def host_memory(path: str = "/proc/meminfo") -> int:
    """The host's MemTotal in bytes."""
    with open(path, encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no MemTotal in {path}")


def budget_bytes(setting: int) -> int:
    """The budget in force for ``container_memory_budget``: the value itself, or for 0
    three quarters of the host's memory (the rest is for the host and faasd)."""
    return setting or int(host_memory() * BUDGET_SHARE)


class MemoryBudget:
    """The memory limits of the containers started and not yet exited, against
    ``limit`` bytes (0: no limit). One per runner, shared by every function."""

    def __init__(self, limit: int = 0):
        self.limit = limit
        self.used = 0
        self._held: dict[str, int] = {}  # by container id

    def fits(self, n: int) -> bool:
        """Would a container with an ``n``-byte limit fit now?"""
        return not self.limit or self.used + n <= self.limit

    def take(self, key: str, n: int) -> bool:
        """Count container ``key``'s ``n`` bytes if they fit; False (nothing counted) if
        not."""
        if not self.fits(n):
            return False
        self._held[key] = n
        self.used += n
        return True

    def give_back(self, key: str) -> None:
        """Container ``key`` has exited (or never started); a second call does nothing."""
        self.used -= self._held.pop(key, 0)

    def snapshot(self) -> dict[str, int]:
        """For stats: the budget, what is counted against it, and by how many."""
        return {"budget": self.limit, "used": self.used, "containers": len(self._held)}
