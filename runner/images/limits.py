"""Caps on what one image may cost, in one frozen dataclass with safe defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """Every cap of one extraction; exceeding any of them is a ``too_large`` error.

    The byte caps count uncompressed bytes (the layer tar streams, and the apparent
    size of every regular file, so a sparse or compressed bomb hits them as early as
    its header says so). ``cpu_seconds``, ``memory_bytes`` and ``wall_seconds`` bind the
    extraction child process.
    """

    max_bytes: int = 8 * GiB  # all layers together, uncompressed
    max_file_bytes: int = 4 * GiB  # one regular file (apparent size)
    max_entries: int = 500_000  # tar entries over all layers, and members of the archive
    max_path_bytes: int = 4096  # one entry name or symlink target, in bytes
    max_depth: int = 256  # components of one entry name
    max_json_bytes: int = 16 * MiB  # manifest.json, index.json, manifests, config
    max_layers: int = 256
    cpu_seconds: int = 900
    memory_bytes: int = 2 * GiB
    wall_seconds: float = 1800.0
    # What the image may cost on disk, counted as the apparent size of its regular files
    # (0: no such cap). The runner's store sets them from its settings per extraction.
    image_max_bytes: int = 0  # setting image_max_bytes
    expand_ratio: float = 0.0  # setting image_expand_ratio: times the archive's size ...
    expand_floor: int = 256 * MiB  # ... but never below this, for small real images
    store_max_bytes: int = 0  # setting image_store_max_bytes: every image together ...
    store_used_bytes: int = 0  # ... of which the images already there hold this much
    min_free_bytes: int = 0  # setting min_free_bytes, on the images filesystem

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for the child process."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Limits:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a version skew bug)."""
        return cls(**data)
