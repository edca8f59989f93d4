"""runner.runtime: cgroup mode detection, the argv it builds, errors, and crun on a
cgroup hybrid host (refused as is; working in its own mount namespace)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from runner.runtime import (
    ContainerNotFound,
    Crun,
    Runc,
    Runtime,
    RuntimeFailed,
    RuntimeUnavailable,
    cgroup_mode,
    crun_refuses_host,
    runtime_for,
)

if TYPE_CHECKING:
    from conftest import Containers

LINE = "{n} 1 0:{n} / {path} rw,relatime shared:{n} - {fs} {fs} rw\n"


def mountinfo(tmp_path: Path, *mounts: tuple[str, str]) -> str:
    path = tmp_path / "mountinfo"
    path.write_text("".join(LINE.format(n=i + 20, path=p, fs=fs)
                            for i, (p, fs) in enumerate([("/", "ext4"), *mounts])))
    return str(path)


def test_cgroup_modes(tmp_path: Path) -> None:
    v1 = [("/sys/fs/cgroup", "tmpfs"), ("/sys/fs/cgroup/memory", "cgroup")]
    assert cgroup_mode(mountinfo(tmp_path, ("/sys/fs/cgroup", "cgroup2"))) == "unified"
    assert cgroup_mode(mountinfo(tmp_path, *v1)) == "legacy"
    assert cgroup_mode(mountinfo(tmp_path, *v1, ("/sys/fs/cgroup/unified", "cgroup2"))) \
        == "hybrid"
    assert cgroup_mode(mountinfo(tmp_path)) == "none"
    # the last mount at a place is the one on top
    assert cgroup_mode(mountinfo(tmp_path, ("/sys/fs/cgroup", "cgroup2"),
                                 ("/sys/fs/cgroup", "tmpfs"),
                                 ("/sys/fs/cgroup/cpu", "cgroup"))) == "legacy"
    assert cgroup_mode(mountinfo(tmp_path, ("/sys/fs/cgroup\\040x", "cgroup2"))) == "none"


def test_this_host() -> None:
    assert cgroup_mode() in ("unified", "hybrid", "legacy")
    assert runtime_for("runc").hide_unified is False, "runc handles hybrid mode itself"
    assert runtime_for("crun").hide_unified is crun_refuses_host()


def test_argv_and_default_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAAS_RUN", "/run/faasd-x")
    assert runtime_for("runc").root == "/run/faasd-x/runc"
    assert runtime_for("/usr/bin/crun").root == "/run/faasd-x/crun"
    runtime = runtime_for("runc", root="/r")
    assert type(runtime) is Runc and runtime.detach
    assert runtime.kill_argv("c1", "KILL") == ["runc", "--root", "/r", "kill", "c1", "KILL"]
    assert runtime.delete_argv("c1") == ["runc", "--root", "/r", "delete", "--force", "c1"]
    assert runtime.run_argv("/b", "c1", "/b/pid") == [
        "runc", "--root", "/r", "run", "--detach", "--pid-file", "/b/pid", "--bundle", "/b", "c1"]
    assert runtime.run_argv("/b", "c1") == ["runc", "--root", "/r", "run", "--bundle", "/b", "c1"]
    assert runtime.preexec_fn is None
    crun = runtime_for("/usr/bin/crun", root="/r")
    assert type(crun) is Crun and not crun.detach
    # any other binary speaks runc's command line
    assert type(runtime_for("/opt/youki", root="/r")) is Runtime


def test_missing_binary_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(RuntimeUnavailable, match="not installed"):
        Runtime(str(tmp_path / "no-such-runc"), root=str(tmp_path / "s")).check()


@pytest.mark.parametrize("binary", ["runc", "crun"])
def test_errors_for_unknown_containers(tmp_path: Path, binary: str) -> None:
    runtime = runtime_for(binary, root=str(tmp_path / "state"))
    runtime.check()
    assert stat_mode(tmp_path / "state") == 0o700
    assert runtime.list() == []
    asyncio.run(runtime.delete("nope"))  # idempotent
    with pytest.raises(ContainerNotFound) as info:
        runtime.state("nope")
    assert "--root" not in str(info.value) and binary in str(info.value)
    with pytest.raises(ContainerNotFound) as info:
        asyncio.run(runtime.kill("nope", "TERM"))
    assert "--root" not in str(info.value) and binary in str(info.value)


def test_a_failed_delete_is_an_error(tmp_path: Path) -> None:
    # The one deletion path: a container whose state is still there and that the
    # runtime failed to delete is an error, with the runtime's message.
    fake = tmp_path / "fake-runc"
    fake.write_text("#!/bin/sh\necho 'cannot delete: busy' >&2\nexit 1\n")
    fake.chmod(0o755)
    runtime = Runtime(str(fake), root=str(tmp_path / "s"))
    (tmp_path / "s" / "c1").mkdir(parents=True)
    with pytest.raises(RuntimeFailed,
                       match="fake-runc delete --force c1 exited 1: cannot delete: busy"):
        asyncio.run(runtime.delete("c1"))
    (tmp_path / "s" / "c1").rmdir()
    asyncio.run(runtime.delete("c1"))  # gone is gone


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o7777


def test_a_hung_runtime_times_out(tmp_path: Path) -> None:
    fake = tmp_path / "fake-runc"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    runtime = Runtime(str(fake), root=str(tmp_path / "s"), timeout=0.3)
    with pytest.raises(RuntimeFailed, match="timed out"):
        runtime.list()
    (tmp_path / "s" / "c1").mkdir(parents=True)
    with pytest.raises(RuntimeFailed, match="timed out"):  # and the runtime is killed
        asyncio.run(asyncio.wait_for(runtime.delete("c1"), 5))


def test_crun_on_this_host(containers: Containers, tmp_path: Path) -> None:
    """Where crun refuses the host's cgroup layout, it does so with the hybrid-mode
    message unless run in its own mount namespace; that namespace never changes the
    host's mounts. Elsewhere crun needs no namespace at all."""
    if containers.runtime.name != "crun":
        assert containers.runtime.preexec_fn is None
        return
    before = Path("/proc/self/mountinfo").read_text()
    cid = containers.prepare("checks")
    plain = runtime_for("crun", root=containers.runtime.root)
    plain.hide_unified = False
    with containers.control_socket(cid):
        result = containers.run_prepared(cid, plain)
        if crun_refuses_host():
            assert result.returncode != 0
            assert "hybrid mode not supported" in result.stderr
            result = containers.run_prepared(cid)
        assert result.returncode == 0, result.stderr
    containers.remove(cid)
    assert Path("/proc/self/mountinfo").read_text() == before
    findmnt = subprocess.run(["findmnt", "-n", "/sys/fs/cgroup/unified"],
                             capture_output=True, check=False)
    assert findmnt.returncode == (0 if cgroup_mode() == "hybrid" else 1)
