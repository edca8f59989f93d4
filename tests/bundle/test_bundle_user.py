"""resolve_user: the image's USER from the image's own /etc/passwd and /etc/group, never
the host's, whatever the image's author put there."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.bundle import BundleError, build_config, resolve_user


@pytest.fixture
def rootfs(tmp_path: Path, etc_files: dict[str, str]) -> Path:
    """A rootfs with the probe image's passwd (plus lines to skip) and group."""
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("# comment\n\nbroken-line\n" + etc_files["passwd"] +
                                         "huge:x:99999999999:1:x:/:/bin/sh\n")
    (root / "etc" / "group").write_text(etc_files["group"])
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A host directory with a passwd and group naming a user 'evil' with uid 0."""
    d = tmp_path / "host-etc"
    d.mkdir()
    (d / "passwd").write_text("evil:x:0:0::/:/bin/sh\napp:x:0:0::/:/bin/sh\n")
    (d / "group").write_text("evil:x:0:app\n")
    return d


@pytest.fixture
def alarm() -> Iterator[None]:
    """Fail rather than hang if a read blocks (a FIFO in the image)."""
    def fail(*_: object) -> None:
        raise AssertionError("resolve_user blocked")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(5)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("user, expected", [
    ("", (65534, 65534, [])),
    ("app", (1000, 1001, [2000])),
    ("app:extra", (1000, 2000, [])),
    ("app:other", (1000, 3000, [2000])),
    ("app:7", (1000, 7, [2000])),
    ("1000", (1000, 1001, [2000])),
    ("1000:1000", (1000, 1000, [])),  # numeric uid:gid: taken as is, nothing read
    ("4242", (4242, 0, [])),  # Docker: a uid without an entry gets group 0
    ("4242:4243", (4242, 4243, [])),
    ("4242:extra", (4242, 2000, [])),
    ("nobody", (65534, 65534, [])),
    ("root", (0, 0, [])),
])
def test_resolves(rootfs: Path, user: str, expected: tuple[int, int, list[int]]) -> None:
    assert resolve_user(str(rootfs), user) == expected


@pytest.mark.parametrize("user, message", [
    ("ghost", "'ghost' is not in the image's /etc/passwd"),
    ("app:ghosts", "'ghosts' is not in the image's /etc/group"),
    ("a:b:c", "user\\[:group\\]"),
    (":1000", "names no user"),
    ("4294967296", "out of range"),
    ("huge", "'huge' is not in"),  # its uid is out of range: the line is skipped
])
def test_refuses(rootfs: Path, user: str, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        resolve_user(str(rootfs), user)


def test_no_passwd(tmp_path: Path) -> None:
    assert resolve_user(str(tmp_path), "123") == (123, 0, [])
    assert resolve_user(str(tmp_path), "123:45") == (123, 45, [])
    with pytest.raises(BundleError, match="does not exist"):
        resolve_user(str(tmp_path), "app")


def test_passwd_symlink_to_the_hosts_file_is_not_followed(rootfs: Path) -> None:
    passwd = rootfs / "etc" / "passwd"
    passwd.unlink()
    passwd.symlink_to("/etc/passwd")  # absolute: the host's file if followed from the host
    with pytest.raises(BundleError, match="symlink"):
        resolve_user(str(rootfs), "root")
    with pytest.raises(BundleError, match="symlink"):
        resolve_user(str(rootfs), "0")  # a uid needs passwd for its group too
    assert resolve_user(str(rootfs), "0:0") == (0, 0, [])  # reads nothing


def test_a_user_only_the_outside_file_names_is_not_found(rootfs: Path, outside: Path) -> None:
    for name in ("passwd", "group"):
        (rootfs / "etc" / name).unlink()
        (rootfs / "etc" / name).symlink_to(outside / name)
    with pytest.raises(BundleError, match="symlink"):
        resolve_user(str(rootfs), "evil")
    with pytest.raises(BundleError, match="symlink"):
        build_config(str(rootfs), {"cmd": ["/x"], "user": "evil"}, container_id="c",
                     hostname="fn", control_socket="/run/c.sock")


def test_relative_symlink_escaping_the_rootfs(rootfs: Path, outside: Path) -> None:
    (rootfs / "etc" / "passwd").unlink()
    (rootfs / "etc" / "passwd").symlink_to(os.path.relpath(outside / "passwd",
                                                           rootfs / "etc"))
    with pytest.raises(BundleError, match="symlink"):
        resolve_user(str(rootfs), "evil")


def test_etc_itself_a_symlink(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    (root / "etc").symlink_to(outside)
    with pytest.raises(BundleError, match="symlink"):
        resolve_user(str(root), "evil")
    assert resolve_user(str(root), "") == (65534, 65534, []), "no USER reads nothing"


def test_group_symlink_refused_when_groups_are_needed(rootfs: Path, outside: Path) -> None:
    (rootfs / "etc" / "group").unlink()
    (rootfs / "etc" / "group").symlink_to(outside / "group")
    with pytest.raises(BundleError, match="group"):
        resolve_user(str(rootfs), "app")


def test_fifo_does_not_block(rootfs: Path, alarm: None) -> None:
    (rootfs / "etc" / "passwd").unlink()
    os.mkfifo(rootfs / "etc" / "passwd")
    with pytest.raises(BundleError, match="not a regular file"):
        resolve_user(str(rootfs), "app")


def test_directory_and_huge_files_refused(rootfs: Path) -> None:
    (rootfs / "etc" / "group").unlink()
    (rootfs / "etc" / "group").mkdir()
    with pytest.raises(BundleError):
        resolve_user(str(rootfs), "app:extra")
    with open(rootfs / "etc" / "passwd", "r+b") as f:
        f.truncate(64 << 20)  # sparse: costs no disk
    with pytest.raises(BundleError, match="larger"):
        resolve_user(str(rootfs), "app")
