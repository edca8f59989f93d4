"""Fixtures for the image extraction tests: a scratch tree with a sentinel "outside"."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # "from tests.imagebuild import ..." without PYTHONPATH
    sys.path.insert(0, str(ROOT))



def _scratch_parent() -> str | None:
    # File creation on this project's CI disk costs up to a millisecond; tmpfs does not.
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


@dataclass
class Scratch:
    """``base/outside`` holds sentinels, ``base/images`` is the images dir, ``base/in`` the
    archives."""

    base: Path

    @property
    def images(self) -> Path:
        return self.base / "images"

    @property
    def outside(self) -> Path:
        return self.base / "outside"

    def archive(self, name: str = "image.tar") -> Path:
        return self.base / "in" / name

    def snapshot(self) -> dict[str, Any]:
        """Everything under base except the images dir, plus the host's /etc/passwd."""
        return {**_tree(self.base, skip=self.images), "/etc/passwd": _describe(Path("/etc/passwd"))}

    def leftovers(self) -> list[str]:
        """What the images dir holds (after a failure: must be nothing)."""
        return sorted(os.listdir(self.images)) if self.images.exists() else []

    def assert_no_partial(self) -> None:
        """No staging directory and no (partial) rootfs in the images dir."""
        from runner.images.extract import STAGING_PREFIX

        left = self.leftovers()
        assert not [n for n in left if n.startswith(STAGING_PREFIX)], f"staging left: {left}"
        assert left == [], f"images dir not empty: {left}"


def _describe(p: Path) -> tuple[Any, ...]:
    st = p.lstat()
    if stat.S_ISLNK(st.st_mode):
        return ("link", os.readlink(p))
    if stat.S_ISDIR(st.st_mode):
        return ("dir", st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    return ("file", st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_nlink, digest)


def _tree(base: Path, skip: Path) -> dict[str, Any]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(base):
        d = Path(dirpath)
        if d == skip:
            dirnames.clear()
            continue
        out[str(d)] = _describe(d)
        for name in filenames:
            out[str(d / name)] = _describe(d / name)
        for name in list(dirnames):
            if (d / name).is_symlink():
                out[str(d / name)] = _describe(d / name)
    return out


@pytest.fixture
def scratch() -> Iterator[Scratch]:
    """A fresh scratch tree with a sentinel /outside/etc/passwd beside the images dir."""
    base = Path(tempfile.mkdtemp(prefix="faasd-img-", dir=_scratch_parent()))
    try:
        (base / "in").mkdir()
        # made before any snapshot: its creation is not a change
        (base / "images").mkdir(mode=0o700)
        (base / "outside" / "etc").mkdir(parents=True)
        (base / "outside" / "etc" / "passwd").write_text("sentinel:x:0:0::/:/bin/false\n")
        (base / "outside" / "dir").mkdir()
        yield Scratch(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
