"""The extraction child: killed half-way, over its limits, leftovers and removal."""

from __future__ import annotations

import os
import stat
import tarfile
import threading
import time
from pathlib import Path

import pytest

from runner.images.errors import ImageError
from runner.images.extract import cleanup_staging, extract, remove_image, rootfs_path
from runner.images.limits import Limits, MiB
from tests.imagebuild import Dir, File, Layer, build_image

HOOK = "_FAASD_IMAGES_TEST_HOOK"


def _image(scratch, files: int = 50) -> None:
    layers = [[File(f"f{i:03d}", b"x" * 1000) for i in range(files)],
              [File("handler", b"h", 0o755)]]
    build_image(scratch.archive(), layers)


def _fails(scratch, code: str, fragment: str, limits: Limits | None = None) -> ImageError:
    before = scratch.snapshot()
    with pytest.raises(ImageError) as err:
        extract(scratch.archive(), scratch.images, limits=limits or Limits())
    assert err.value.code == code, err.value
    assert fragment in err.value.message, err.value.message
    assert scratch.snapshot() == before
    scratch.assert_no_partial()
    return err.value


def test_child_killed_half_way(scratch, monkeypatch) -> None:
    _image(scratch)
    monkeypatch.setenv(HOOK, "crash:20")  # SIGKILL itself after writing 19 files
    _fails(scratch, "too_large", "killed")
    monkeypatch.delenv(HOOK)
    result = extract(scratch.archive(), scratch.images)  # a retry starts from scratch
    assert not result.reused and len(os.listdir(result.rootfs)) == 51


def test_wall_clock_limit_kills_a_stuck_child(scratch, monkeypatch) -> None:
    _image(scratch)
    monkeypatch.setenv(HOOK, "hang:10")
    start = time.monotonic()
    _fails(scratch, "too_large", "longer than 1 s", Limits(wall_seconds=1))
    assert time.monotonic() - start < 10


def test_tiny_wall_limit(scratch) -> None:
    _image(scratch, 5)
    _fails(scratch, "too_large", "took longer", Limits(wall_seconds=0.001))


def test_cpu_limit(scratch, monkeypatch) -> None:
    _image(scratch, 5)
    monkeypatch.setenv(HOOK, "spin:2")
    _fails(scratch, "too_large", "CPU", Limits(cpu_seconds=1))


def test_memory_limit(scratch) -> None:
    # A pax header claiming 512 MiB: tarfile reads it whole into memory.
    def chunks():
        info = tarfile.TarInfo("././@PaxHeader")
        info.type, info.size = tarfile.XHDTYPE, 512 * MiB
        yield info.tobuf(tarfile.USTAR_FORMAT)
        block = b"a" * MiB
        for _ in range(512):
            yield block
        yield b"\0" * 1024

    build_image(scratch.archive(), [Layer(chunks=chunks, compression="zstd")])
    _fails(scratch, "too_large", "memory", Limits(memory_bytes=256 * MiB))


def test_progress_callback_failure_kills_the_child(scratch) -> None:
    _image(scratch, 5)

    def progress(phase: str, done: int, total: int | None) -> None:
        raise KeyboardInterrupt  # e.g. the daemon is shutting down

    with pytest.raises(KeyboardInterrupt):
        extract(scratch.archive(), scratch.images, progress=progress)
    scratch.assert_no_partial()


def _read_only_tree(top: Path) -> None:
    (top / "ro" / "sub").mkdir(parents=True)
    (top / "ro" / "sub" / "f").write_bytes(b"x")
    (top / "ro" / "link").symlink_to("/etc/passwd")
    for p in (top / "ro" / "sub" / "f", top / "ro" / "sub", top / "ro"):
        p.chmod(0o444 if p.is_file() else 0o555)


def test_cleanup_staging_removes_leftovers_only(scratch) -> None:
    _image(scratch, 3)
    kept = extract(scratch.archive(), scratch.images)
    leftover = scratch.images / ".staging-deadbeef"
    (leftover / "rootfs").mkdir(parents=True)
    _read_only_tree(leftover / "rootfs")
    (scratch.images / ".staging-empty").mkdir()
    assert cleanup_staging(scratch.images) == 2
    assert os.listdir(scratch.images) == [kept.digest[7:]]
    assert (Path(kept.rootfs) / "handler").exists()
    assert (Path("/etc/passwd")).exists()
    assert cleanup_staging(scratch.base / "missing") == 0


def test_remove_image_with_read_only_dirs(scratch) -> None:
    build_image(scratch.archive(), [[Dir("ro", 0o555), Dir("ro/sub", 0o500),
                                     File("ro/sub/f", b"x", 0o400)]])
    result = extract(scratch.archive(), scratch.images)
    assert stat.S_IMODE((Path(result.rootfs) / "ro").stat().st_mode) == 0o555
    assert rootfs_path(scratch.images, result.digest) == result.rootfs
    assert remove_image(scratch.images, result.digest)
    assert os.listdir(scratch.images) == []
    assert rootfs_path(scratch.images, result.digest) is None
    assert not remove_image(scratch.images, result.digest)
    with pytest.raises(ValueError):
        remove_image(scratch.images, "../../etc")


def test_concurrent_extractions_of_one_image(scratch) -> None:
    _image(scratch, 20)
    results, errors = [], []

    def run() -> None:
        try:
            results.append(extract(scratch.archive(), scratch.images))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r.digest for r in results}) == 1 and len(results) == 3
    assert [n for n in os.listdir(scratch.images)] == [results[0].digest[7:]]
    assert len(os.listdir(results[0].rootfs)) == 21


def test_missing_archive(scratch) -> None:
    with pytest.raises(FileNotFoundError):
        extract(scratch.archive("nope.tar"), scratch.images)
    scratch.assert_no_partial()


def test_an_unpublished_leftover_is_replaced(scratch) -> None:
    built = build_image(scratch.archive(), [[File("handler", b"h", 0o755)]])
    broken = scratch.images / built.digest[7:] / "rootfs"
    broken.mkdir(parents=True)  # no config.json: not a complete image
    (broken / "junk").write_bytes(b"j")
    result = extract(scratch.archive(), scratch.images)
    assert not result.reused and os.listdir(result.rootfs) == ["handler"]
