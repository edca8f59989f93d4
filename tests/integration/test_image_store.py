"""What deployed images may take on disk, through faasctl and the real runner: a
compression bomb is stopped by the expansion cap, the store by its quota; every refusal
leaves nothing under images/."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
from harness import poll

from common.errors import EXIT_STATUS, Code
from tests.imagebuild import File, Layer, build_image

MiB = 1 << 20


@pytest.fixture(scope="module")
def platform_config() -> str:
    # The expansion settings are the defaults (20 times the upload, at least 256 MiB).
    return f"image_store_max_bytes = {400 * MiB}\n"


def zeros(path: Path, files: int, size: int, marker: bytes = b""):
    """An OCI archive of one gzip layer of ``files`` files of zeros: a few hundred KiB."""
    def chunks():
        for i in range(files):
            info = tarfile.TarInfo(f"zero{i}")
            info.size = size
            yield info.tobuf(tarfile.USTAR_FORMAT)
            for _ in range(size >> 20):
                yield bytes(1 << 20)
        yield bytes(1024)
    layers = [Layer(chunks=chunks), [File("handler", b"#!/bin/sh\n" + marker, mode=0o755)]]
    return build_image(path, layers, {"config": {"Cmd": ["/handler"]}}, fmt="oci",
                       compression="gzip")


def images(platform) -> list[str]:
    return sorted(os.listdir(platform.root / "images"))


def nothing_left(platform) -> bool:
    staging = [n for n in images(platform) if n.startswith(".staging")]
    return not (staging or os.listdir(platform.root / "images" / ".incoming")
                or os.listdir(platform.root / "spool"))


def test_a_gzip_bomb_is_refused_and_leaves_nothing(platform, tmp_path):
    platform.wait_healthy()
    zeros(tmp_path / "bomb.tar", 3, 100 * MiB)  # 300 MiB of zeros
    assert os.path.getsize(tmp_path / "bomb.tar") < 2 * MiB
    before = images(platform)
    out = platform.faasctl("new", "bomb", "-f", tmp_path / "bomb.tar", check=False)
    assert out.returncode == EXIT_STATUS[Code.TOO_LARGE], out.stderr
    assert "too_large" in out.stderr and "image_expand_ratio" in out.stderr
    assert images(platform) == before and nothing_left(platform)
    assert platform.faasctl("info", "bomb", check=False).returncode == \
        EXIT_STATUS[Code.NOT_FOUND]


def test_the_store_quota_refuses_until_a_function_is_removed(platform, tmp_path):
    platform.wait_healthy()
    for name in ("one", "two", "three"):
        zeros(tmp_path / f"{name}.tar", 1, 150 * MiB, name.encode())
    platform.faasctl("new", "one", "-f", tmp_path / "one.tar")
    platform.faasctl("new", "two", "-f", tmp_path / "two.tar")
    before = images(platform)
    out = platform.faasctl("new", "three", "-f", tmp_path / "three.tar", check=False)
    assert out.returncode == EXIT_STATUS[Code.TOO_LARGE], out.stderr
    assert f"image_store_max_bytes = {400 * MiB}" in out.stderr
    assert images(platform) == before and nothing_left(platform)
    platform.faasctl("rm", "one")
    poll("the image of one freed", lambda: len(images(platform)) == len(before) - 1, 10)
    platform.faasctl("new", "three", "-f", tmp_path / "three.tar")
