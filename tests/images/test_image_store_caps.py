"""What an image may take on disk: its expanded size (absolute and as a ratio to its
upload), the store's quota and the free-space floor; each refusal leaves nothing."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from runner.images.errors import ImageError
from runner.images.extract import extract
from runner.images.layers import NODE_BYTES
from runner.images.limits import Limits, MiB
from runner.store import ImageStore
from tests.imagebuild import File, Layer, build_image


def zeros_layer(files: int, size: int) -> Layer:
    """A streamed layer of ``files`` files of ``size`` zero bytes each."""
    def chunks():
        for i in range(files):
            info = tarfile.TarInfo(f"zero{i}")
            info.size = size
            yield info.tobuf(tarfile.USTAR_FORMAT)
            yield bytes(size) + bytes(-size % 512)
        yield bytes(1024)
    return Layer(chunks=chunks)


def bomb(path: Path, files: int, size: int, compression: str = "gzip"):
    return build_image(path, [zeros_layer(files, size)], fmt="oci", compression=compression)


def refused(scratch, limits: Limits, fragment: str) -> ImageError:
    before = scratch.snapshot()
    with pytest.raises(ImageError) as err:
        extract(scratch.archive(), scratch.images, limits=limits)
    assert err.value.code == "too_large", err.value
    assert fragment in err.value.message, err.value.message
    assert scratch.snapshot() == before
    scratch.assert_no_partial()  # not a byte of the partial rootfs left
    return err.value


def test_a_gzip_layer_of_zeros_is_stopped_by_the_expansion_ratio(scratch) -> None:
    bomb(scratch.archive(), 3, 8 * MiB)  # 24 MiB of zeros in a few KiB
    assert os.path.getsize(scratch.archive()) < 200_000
    limits = Limits(expand_ratio=20, expand_floor=20 * MiB)
    err = refused(scratch, limits, "image_expand_ratio = 20 times")
    assert err.details["limit"] == "image_expand_ratio" and err.details["path"] == "zero2"
    assert "raise image_expand_ratio" in err.message
    # the floor is what keeps a small real image clear of the ratio
    result = extract(scratch.archive(), scratch.images, limits=Limits(expand_ratio=20,
                                                                      expand_floor=32 * MiB))
    assert result.expanded_bytes == 24 * MiB + 3 * NODE_BYTES


def test_the_expanded_size_cap_holds_for_an_uncompressed_image_too(scratch) -> None:
    build_image(scratch.archive(), [[File("a", bytes(6 * MiB)), File("b", bytes(6 * MiB))]])
    err = refused(scratch, Limits(image_max_bytes=10 * MiB), "image_max_bytes = 10485760")
    assert err.details["limit"] == "image_max_bytes"


def test_the_store_quota_is_checked_before_and_during_extraction(scratch) -> None:
    bomb(scratch.archive(), 2, 4 * MiB)  # small to upload: only extraction shows its size
    err = refused(scratch, Limits(store_max_bytes=20 * MiB, store_used_bytes=15 * MiB),
                  "would pass image_store_max_bytes = 20971520")
    assert err.details["limit"] == "image_store_max_bytes"
    refused(scratch, Limits(store_max_bytes=20 * MiB, store_used_bytes=20 * MiB),
            "the image store is full")
    extract(scratch.archive(), scratch.images,
            limits=Limits(store_max_bytes=20 * MiB, store_used_bytes=10 * MiB))


@pytest.fixture
def small_fs(scratch):
    """The images directory on a real 64 MiB filesystem (a tmpfs, mounted here only)."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs",
                    str(scratch.images)], check=True)
    try:
        yield scratch
    finally:
        subprocess.run(["umount", str(scratch.images)], check=True)


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_the_free_space_floor_is_checked_before_and_during_extraction(small_fs) -> None:
    scratch = small_fs
    bomb(scratch.archive(), 4, 8 * MiB)
    empty = free(scratch.images)
    refused(scratch, Limits(min_free_bytes=100 * MiB), "less than min_free_bytes = 104857600")
    # 64 MiB free: three files of 8 MiB leave 40 MiB, the fourth would not
    err = refused(scratch, Limits(min_free_bytes=40 * MiB), "min_free_bytes")
    assert err.details["limit"] == "min_free_bytes"
    assert free(scratch.images) == empty  # what was written is gone again
    extract(scratch.archive(), scratch.images, limits=Limits(min_free_bytes=16 * MiB))


def test_the_store_counts_what_its_images_take(tmp_path) -> None:
    """add counts each new image, keep forgets removed ones, recover counts what is
    there (recorded, or walked for an image without a record)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    store = ImageStore(str(tmp_path), os.getuid(), Limits(store_max_bytes=20 * MiB))
    store.recover()

    def add(upload: str, marker: bytes) -> dict:
        build_image(spool / f"{upload}.tar", [[File("data", bytes(8 * MiB)),
                                               File("marker", marker)]])
        return asyncio.run(store.add(upload, None))
    one = 8 * MiB + 1 + 2 * NODE_BYTES  # two files' data, and their inodes
    first = add("u1", b"1")
    assert store.used == one
    add("u2", b"2")
    assert store.used == 2 * one
    assert add("u3", b"2")["reused"] is True  # the same image again costs nothing
    with pytest.raises(Exception) as err:
        add("u4", b"3")  # a third would pass 20 MiB
    assert err.value.code.value == "too_large" and "image_store_max_bytes" in err.value.message
    assert sorted(os.listdir(tmp_path / "images")) == sorted(
        [".incoming"] + [d.removeprefix("sha256:") for d in store.sizes])
    store.pinned.clear()
    store.keep([first["digest"]])
    assert store.used == one
    config = tmp_path / "images" / first["digest"][7:] / "config.json"
    record = json.loads(config.read_text())
    del record["expanded_bytes"]  # an image extracted before sizes were recorded
    config.write_text(json.dumps(record))
    again = ImageStore(str(tmp_path), os.getuid())
    assert again.recover()["image_bytes"] == 8 * MiB + 1
    add("u5", b"3")  # room again


def test_empty_directories_and_files_count_against_the_caps(scratch) -> None:
    """An image of nothing but empty entries: each takes an inode (a directory a block
    too), so each counts NODE_BYTES; else 500,000 of them (a few MB of gzip) would take
    2 GB and 500,000 inodes while the quota and the ratio counted 0 bytes."""
    def empties():
        for i in range(3000):
            info = tarfile.TarInfo(f"d{i}" if i % 2 else f"f{i}")
            info.type = tarfile.DIRTYPE if i % 2 else tarfile.REGTYPE
            yield info.tobuf(tarfile.USTAR_FORMAT)
        yield bytes(1024)
    build_image(scratch.archive(), [Layer(chunks=empties)], fmt="oci", compression="gzip")
    err = refused(scratch, Limits(store_max_bytes=20 * MiB, store_used_bytes=10 * MiB),
                  "would pass image_store_max_bytes")
    assert err.details["limit"] == "image_store_max_bytes"
    refused(scratch, Limits(expand_ratio=20, expand_floor=4 * MiB), "image_expand_ratio")
    result = extract(scratch.archive(), scratch.images, limits=Limits(store_max_bytes=20 * MiB))
    assert result.expanded_bytes >= 3000 * 4096
