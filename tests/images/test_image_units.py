"""Small pieces: names, config parsing, references, SafeRoot on its own."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from runner.images.archive import normalize_ref
from runner.images.config import (
    ImageConfig,
    host_architecture,
    load_json,
    parse_config,
    parse_diff_ids,
)
from runner.images.errors import ImageError
from runner.images.safefs import SafeRoot, remove_tree


def _doc(**config: object) -> dict:
    return {"os": "linux", "architecture": host_architecture(), "config": config,
            "rootfs": {"type": "layers", "diff_ids": []}}


def test_parse_config() -> None:
    cfg = parse_config(_doc(Entrypoint=["/h"], Cmd=["-v"], Env=["A=1", "B="],
                            WorkingDir="/srv/../app/", User="app"))
    assert cfg == ImageConfig(("/h",), ("-v",), ("A=1", "B="), "/app", "app", "linux",
                              host_architecture())
    assert cfg.command == ["/h", "-v"]
    assert ImageConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert parse_config(_doc(Cmd=["/h"])).workdir == "/"
    assert parse_config(_doc(Cmd=["/h"], WorkingDir="/procfs")).workdir == "/procfs"


@pytest.mark.parametrize("doc,fragment", [
    ({"os": "linux", "architecture": host_architecture()}, "no command"),
    ({"os": "linux", "architecture": host_architecture(), "config": None}, "no command"),
    ({"architecture": host_architecture(), "config": {"Cmd": ["/h"]}}, "os"),
    ({"os": "linux", "config": {"Cmd": ["/h"]}}, "architecture"),
    ([], "not a JSON object"),
])
def test_parse_config_refusals(doc: object, fragment: str) -> None:
    with pytest.raises(ImageError) as err:
        parse_config(doc)
    assert err.value.code == "bad_image" and fragment in err.value.message


def test_load_json_finds_nul_anywhere() -> None:
    with pytest.raises(ImageError, match="NUL"):
        load_json(json.dumps({"a": [{"b": ["ok", "x\x00"]}]}).encode(), "the config")
    with pytest.raises(ImageError, match="not valid JSON"):
        load_json(b"[" * 100_000, "the config")


def test_diff_ids() -> None:
    good = "sha256:" + "a" * 64
    assert parse_diff_ids({"rootfs": {"type": "layers", "diff_ids": [good]}}) == [good]
    for bad in ({"rootfs": {"type": "layers", "diff_ids": ["md5:x"]}}, {"rootfs": None}, {}):
        with pytest.raises(ImageError):
            parse_diff_ids(bad)


@pytest.mark.parametrize("ref,full", [
    ("fib", "docker.io/library/fib:latest"),
    ("fib:1", "docker.io/library/fib:1"),
    ("user/fib", "docker.io/user/fib:latest"),
    ("docker.io/library/fib:latest", "docker.io/library/fib:latest"),
    ("index.docker.io/library/fib", "docker.io/library/fib:latest"),
    ("localhost/fib", "localhost/fib:latest"),
    ("localhost:5000/a/b:c", "localhost:5000/a/b:c"),
    ("ghcr.io/o/fib@sha256:" + "0" * 64, "ghcr.io/o/fib@sha256:" + "0" * 64),
])
def test_normalize_ref(ref: str, full: str) -> None:
    assert normalize_ref(ref) == full


def test_saferoot_stays_inside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    rootdir = tmp_path / "root"
    rootdir.mkdir()
    root = SafeRoot(rootdir)
    try:
        root.make_symlink("up", "../../../..", 0, 0, 0)
        root.make_symlink("abs", str(outside), 0, 0, 0)
        root.make_dir("up/d", 0o755, 0, 0)  # "up" resolves to the root itself
        root.write_file("up/d/f", 0o644, 0, 0, 0, io.BytesIO(b"data").read, 4)
        assert (rootdir / "d/f").read_bytes() == b"data"
        with pytest.raises(ImageError, match="missing directory"):
            root.write_file("abs/f", 0o644, 0, 0, 0, io.BytesIO(b"x").read, 1)
        # A final component that is a symlink is replaced, never followed.
        root.write_file("abs", 0o600, 0, 0, 0, io.BytesIO(b"y").read, 1)
        assert (rootdir / "abs").read_bytes() == b"y"
        assert not root.remove("up/../../outside")  # no such name in-root
        assert root.remove("up")
        assert os.listdir(outside) == [] and sorted(os.listdir(rootdir)) == ["abs", "d"]
    finally:
        root.close()


def test_remove_tree_deeper_than_path_max(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    for _ in range(1500):  # 1500 * len("dir/") > PATH_MAX: only fd-relative calls reach the bottom
        os.mkdir("dir", dir_fd=fd)
        child = os.open("dir", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)
    assert remove_tree(tmp_path / "dir")
    assert os.listdir(tmp_path) == []
    assert not remove_tree(tmp_path / "dir")
