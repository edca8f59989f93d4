"""The same image in every archive format and layer compression gives the same rootfs."""

from __future__ import annotations

import json
import os
import random
import stat
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from runner.images.errors import ImageError
from runner.images.extract import extract
from tests.imagebuild import (
    COMPRESSIONS,
    FORMATS,
    MTIME,
    Dir,
    File,
    Hardlink,
    Image,
    Layer,
    Opaque,
    Symlink,
    Whiteout,
    build_archive,
    build_image,
)

HANDLER = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 40  # static-looking binary
PASSWD = b"root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
SHARED = [Dir("data", 0o755)]  # appears twice: legacy archives store it once + a symlink

LAYERS: list[list[Any]] = [
    [
        Dir("etc"), File("etc/passwd", PASSWD),
        Dir("home"), Dir("home/app", 0o750, 1000, 1000),
        File("home/app/notes", b"n", 0o600, 1000, 1000),
        Dir("opt"), Dir("opt/data"), File("opt/data/old1", b"1"), Dir("opt/data/sub"),
        File("opt/data/sub/old2", b"2"),
        File("bin/busybox", b"bb", 0o755),  # parent "bin" is implicit
        File("usr/lib/libfoo.so", b"lib v1"),
        File("tmpfile.txt", b"to be deleted"),
        Dir("tmp", 0o1777),
        Dir("gone"), File("gone/x", b"x"),
        Symlink("lib", "usr/lib"),
        File("x", b"file that becomes a directory"),
        Dir("y"), File("y/child", b"dir that becomes a file"),
    ],
    SHARED,
    [
        Whiteout("tmpfile.txt"),
        Whiteout("gone"),
        # The opaque marker comes AFTER this layer's own opt/data entries: it must still
        # hide only the lower layer's content.
        Dir("opt/data", 0o700), File("opt/data/new", b"new"), Opaque("opt/data"),
        File("usr/lib/libfoo.so", b"lib v2"),
        Symlink("etc/abs", "/usr/lib/libfoo.so"),
        Hardlink("bin/sh", "bin/busybox"),  # target in a lower layer
    ],
    [
        File("handler", HANDLER, 0o755),
        Hardlink("handler2", "handler"),
        File("app/data", b"d", 0o640, 1000, 1000),
        Dir("app", 0o755, 1000, 1000),  # after its child: metadata must still stick
        Dir("x"), File("x/y", b"now a dir"),
        File("y", b"now a file"),
    ],
    SHARED,
]

# path -> (kind, mode, uid, gid, content or link target); None content: not checked
IMPLICIT = ("dir", 0o755, 0, 0, None)
EXPECTED: dict[str, tuple[Any, ...]] = {
    "app": ("dir", 0o755, 1000, 1000, None),
    "app/data": ("file", 0o640, 1000, 1000, b"d"),
    "bin": IMPLICIT,
    "bin/busybox": ("file", 0o755, 0, 0, b"bb"),
    "bin/sh": ("file", 0o755, 0, 0, b"bb"),
    "data": ("dir", 0o755, 0, 0, None),
    "etc": ("dir", 0o755, 0, 0, None),
    "etc/passwd": ("file", 0o644, 0, 0, PASSWD),
    "etc/abs": ("link", None, 0, 0, "/usr/lib/libfoo.so"),
    "handler": ("file", 0o755, 0, 0, HANDLER),
    "handler2": ("file", 0o755, 0, 0, HANDLER),
    "home": ("dir", 0o755, 0, 0, None),
    "home/app": ("dir", 0o750, 1000, 1000, None),
    "home/app/notes": ("file", 0o600, 1000, 1000, b"n"),
    "lib": ("link", None, 0, 0, "usr/lib"),
    "opt": ("dir", 0o755, 0, 0, None),
    "opt/data": ("dir", 0o700, 0, 0, None),
    "opt/data/new": ("file", 0o644, 0, 0, b"new"),
    "tmp": ("dir", 0o1777, 0, 0, None),
    "usr": IMPLICIT,
    "usr/lib": IMPLICIT,
    "usr/lib/libfoo.so": ("file", 0o644, 0, 0, b"lib v2"),
    "x": ("dir", 0o755, 0, 0, None),
    "x/y": ("file", 0o644, 0, 0, b"now a dir"),
    "y": ("file", 0o644, 0, 0, b"now a file"),
}
CONFIG = {
    "config": {
        "Entrypoint": ["/handler"], "Cmd": ["--port", "8080"], "Env": ["PATH=/bin", "MODE=test"],
        "WorkingDir": "/app", "User": "1000:1000",
    }
}


def describe_tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """path -> (kind, mode, uid, gid, content/target) for everything under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", None, st.st_uid, st.st_gid, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, None)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, p.read_bytes())
            else:
                out[rel] = ("other", st.st_mode, st.st_uid, st.st_gid, None)
    return out


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_same_rootfs_in_every_format(scratch, fmt: str, compression: str) -> None:
    built = build_image(scratch.archive(), LAYERS, CONFIG, fmt=fmt, compression=compression)
    phases = []
    result = extract(scratch.archive(), scratch.images, progress=lambda *a: phases.append(a))

    assert result.digest == built.digest and not result.reused
    assert Path(result.rootfs) == scratch.images / built.digest[7:] / "rootfs"
    assert describe_tree(result.rootfs) == EXPECTED
    r = Path(result.rootfs)
    assert os.path.samefile(r / "bin/sh", r / "bin/busybox")
    assert os.path.samefile(r / "handler2", r / "handler")
    assert (r / "handler").stat().st_nlink == 2
    for path in ("app", "home/app", "opt/data", "handler", "etc/passwd", "app/data", "data"):
        assert (r / path).lstat().st_mtime_ns == MTIME * 10**9, path  # set after the children

    assert result.config.command == ["/handler", "--port", "8080"]
    assert result.config.env == ("PATH=/bin", "MODE=test")
    assert (result.config.workdir, result.config.user) == ("/app", "1000:1000")
    stored = json.loads((scratch.images / built.digest[7:] / "config.json").read_text())
    assert stored["digest"] == built.digest and stored["entrypoint"] == ["/handler"]
    assert {p[0] for p in phases} == {"verify", "extract"}
    assert phases[-1] == ("extract", phases[-1][2], phases[-1][2])
    assert [n for n in os.listdir(scratch.images)] == [built.digest[7:]]


def test_legacy_archive_shares_a_repeated_layer_by_symlink(scratch) -> None:
    build_image(scratch.archive(), LAYERS, CONFIG, fmt="legacy")
    with tarfile.open(scratch.archive()) as tf:
        links = [m for m in tf.getmembers() if m.issym()]
    assert (len(links) == 1 and links[0].name.endswith("/layer.tar")
            and links[0].linkname.startswith("../"))


def test_redeploy_reuses_the_rootfs(scratch) -> None:
    build_image(scratch.archive(), LAYERS, CONFIG, fmt="docker25", compression="gzip")
    first = extract(scratch.archive(), scratch.images)
    marker = (Path(first.rootfs) / "handler").stat().st_ino
    start = time.monotonic()
    again = extract(scratch.archive(), scratch.images)
    assert time.monotonic() - start < 1.0
    assert again.reused and again.digest == first.digest and again.rootfs == first.rootfs
    assert again.config == first.config
    assert (Path(again.rootfs) / "handler").stat().st_ino == marker  # nothing was rewritten
    # The same image in another format is the same image: nothing is extracted either.
    build_image(scratch.archive("other.tar"), LAYERS, CONFIG, fmt="oci", compression="zstd")
    assert extract(scratch.archive("other.tar"), scratch.images).reused


def _two_images(fmt: str, path: Path) -> list[Any]:
    base = [File("bin/tool", b"shared base", 0o755)]
    return build_archive(path, [
        Image([base, [File("handler", b"fn")]], tags=["fn:latest"]),
        Image([base, [File("handler", b"other")]], tags=["registry.example.com/team/other:v2"]),
    ], fmt=fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_multi_image_archive_by_tag(scratch, fmt: str) -> None:
    fn, other = _two_images(fmt, scratch.archive())
    for tag in ("fn:latest", "fn", "docker.io/library/fn:latest"):
        result = extract(scratch.archive(), scratch.images, tag=tag)
        assert result.digest == fn.digest, tag
        assert (Path(result.rootfs) / "handler").read_bytes() == b"fn"
    result = extract(scratch.archive(), scratch.images, tag="registry.example.com/team/other:v2")
    assert result.digest == other.digest
    assert (Path(result.rootfs) / "handler").read_bytes() == b"other"
    assert (Path(result.rootfs) / "bin/tool").read_bytes() == b"shared base"


@pytest.mark.parametrize("fmt", FORMATS)
def test_multi_image_archive_without_tag_is_ambiguous(scratch, fmt: str) -> None:
    _two_images(fmt, scratch.archive())
    with pytest.raises(ImageError) as err:
        extract(scratch.archive(), scratch.images)
    assert err.value.code == "ambiguous" and err.value.wire_code == "bad_request"
    assert "--tag" in err.value.message and "fn:latest" in err.value.message
    assert len(err.value.details["tags"]) == 2
    with pytest.raises(ImageError) as err:
        extract(scratch.archive(), scratch.images, tag="nope:1")
    assert err.value.code == "not_found" and "nope:1" in err.value.message
    scratch.assert_no_partial()


def test_oci_nested_index_and_bare_tag(scratch) -> None:
    layers = [[File("handler", b"h", 0o755)]]
    built = build_image(scratch.archive(), layers, fmt="oci", oci_nested=True, tags=["fn:1.0"])
    result = extract(scratch.archive(), scratch.images, tag="fn:1.0")
    assert result.digest == built.digest
    assert (Path(result.rootfs) / "handler").read_bytes() == b"h"


def test_select_by_image_id(scratch) -> None:
    _, other = _two_images("legacy", scratch.archive())
    assert extract(scratch.archive(), scratch.images, tag=other.digest[:19]).digest == other.digest


def test_compression_found_by_bytes_not_media_type(scratch) -> None:
    # The archive declares plain tar layers; the bytes are gzip and zstd.
    layers = [Layer([File("a", b"gz")], compression="gzip"),
              Layer([File("b", b"zst")], compression="zstd")]
    build_image(scratch.archive(), layers, fmt="oci", compression="none")
    result = extract(scratch.archive(), scratch.images)
    assert ((Path(result.rootfs) / "a").read_bytes() == b"gz"
            and (Path(result.rootfs) / "b").read_bytes() == b"zst")


def test_whiteout_never_hides_its_own_layer(scratch) -> None:
    layers = [
        [File("a", b"lower"), Dir("d"), File("d/lower", b"l")],
        [File("a", b"upper"), Whiteout("a"), File("b", b"own"), Whiteout("b"),
         File("d/upper", b"u"), Opaque("d")],
    ]
    build_image(scratch.archive(), layers)
    result = extract(scratch.archive(), scratch.images)
    tree = describe_tree(result.rootfs)
    assert tree["a"][4] == b"upper" and tree["b"][4] == b"own"
    assert "d/upper" in tree and "d/lower" not in tree


def test_replacing_a_symlink_to_a_directory(scratch) -> None:
    layers = [
        [Dir("real"), Symlink("d", "/real"), Symlink("f", "/real")],
        [Dir("d"), File("d/x", b"x"), File("f", b"file")],
    ]
    build_image(scratch.archive(), layers)
    r = Path(extract(scratch.archive(), scratch.images).rootfs)
    assert (r / "d").is_dir() and not (r / "d").is_symlink() and (r / "d/x").read_bytes() == b"x"
    assert (r / "f").read_bytes() == b"file" and os.listdir(r / "real") == []


def test_root_entry_metadata(scratch) -> None:
    from tests.imagebuild import Raw

    root = tarfile.TarInfo("./")
    root.type, root.mode, root.uid, root.gid = tarfile.DIRTYPE, 0o750, 7, 8
    build_image(scratch.archive(), [[Raw(root), File("./handler", b"h", 0o755)]])
    r = Path(extract(scratch.archive(), scratch.images).rootfs)
    st = r.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 7, 8)
    assert (r / "handler").read_bytes() == b"h"


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_large_layer_across_read_chunks(scratch, compression: str) -> None:
    # Several MiB of incompressible data in files of odd sizes: tar headers and file data
    # straddle the 1 MiB chunks the layer is uncompressed in.
    rnd = random.Random(7)
    files = {f"d{i % 3}/f{i}": rnd.randbytes(rnd.randint(0, 400_000)) for i in range(40)}
    build_image(scratch.archive(), [[File(p, data) for p, data in files.items()]],
                compression=compression)
    r = Path(extract(scratch.archive(), scratch.images).rootfs)
    assert {p: (r / p).read_bytes() for p in files} == files
