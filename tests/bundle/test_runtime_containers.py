"""Real containers from build_config + write_bundle, on runc and on crun: the probe
(probe.c) reports from inside what a function container can and cannot do."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from runner.bundle import FunctionSettings, MiB
from runner.runtime import ContainerNotFound, Running, cgroup_mode

if TYPE_CHECKING:
    from conftest import Containers

ZERO_CAPS = "0000000000000000"


@pytest.fixture
def checks(containers: Containers) -> dict:
    """The probe's report from a container with every default."""
    return containers.run("checks").json


def test_rootfs_is_read_only_and_tmp_writable(checks: dict) -> None:
    assert checks["write_root"] == errno.EROFS
    assert checks["mkdir_root"] == errno.EROFS
    assert checks["write_tmp"] == 0
    assert checks["sys_readonly"] == 1
    assert checks["proc_sys_write"] in (errno.EROFS, errno.EACCES)


def test_own_pid_namespace(checks: dict) -> None:
    assert checks["pid"] == 1
    assert checks["proc_pids"] == ["1"]  # no host process, not even the runtime's


def test_no_network_but_loopback(checks: dict) -> None:
    assert checks["netdevs"] == ["lo"]


def test_no_capabilities_no_new_privileges_seccomp(checks: dict) -> None:
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert checks[field] == ZERO_CAPS, field
    assert checks["NoNewPrivs"] == "1"
    assert checks["Seccomp"] == "2"  # a filter, not strict mode


def test_seccomp_refuses_what_the_profile_denies(checks: dict) -> None:
    for call in ("unshare_newuser", "unshare_newns", "clone_newuser", "mount", "keyctl",
                 "ptrace", "io_uring_setup", "socket_vsock", "personality_bad"):
        assert checks[call] == errno.EPERM, call
    assert checks["clone3"] == errno.ENOSYS  # so that libc falls back to clone
    # and what it allows still works
    for call in ("personality_query", "personality_linux32", "socket_inet", "fork", "thread"):
        assert checks[call] == 0, call


def test_masked_proc_paths(checks: dict) -> None:
    assert Path("/proc/timer_list").read_bytes(), "the host's file has content"
    assert checks["proc_timer_list_bytes"] == 0
    assert checks["proc_keys_bytes"] == 0


def test_rlimits_user_hostname_cwd_env(checks: dict) -> None:
    assert (checks["core_soft"], checks["core_hard"]) == (0, 0)
    assert (checks["nofile_soft"], checks["nofile_hard"]) == (1024, 1024)
    assert (checks["uid"], checks["gid"], checks["groups"]) == (65534, 65534, [])
    assert checks["hostname"] == "probe"
    assert checks["cwd"] == "/"
    assert "FAAS_CONTROL_SOCKET=/control.sock" in checks["env"]
    assert any(e.startswith("PATH=/usr/local/sbin:") for e in checks["env"])


def test_minimal_dev(checks: dict) -> None:
    assert {"null", "zero", "full", "random", "urandom", "tty", "pts", "shm",
            "mqueue"} <= set(checks["dev"])
    # no disk, memory or console device of the host
    assert not {"mem", "kmem", "port", "console", "vda", "sda", "kmsg"} & set(checks["dev"])


def test_image_user_groups_workdir_and_env(containers: Containers) -> None:
    report = containers.run("checks", user="app", workdir="/home/app",
                            env=("A=image", "B=image", "PATH=/bin"),
                            settings=FunctionSettings(env={"B": "function", "C": "c"})).json
    assert (report["uid"], report["gid"], report["groups"]) == (1000, 1001, [2000])
    assert report["cwd"] == "/home/app"
    env = report["env"]
    assert {"A=image", "B=function", "C=c", "PATH=/bin"} <= set(env)
    assert "B=image" not in env
    assert report["write_tmp"] == 0, "/tmp belongs to the container's user"


def test_numeric_user(containers: Containers) -> None:
    report = containers.run("checks", user="4321:8765").json
    assert (report["uid"], report["gid"], report["groups"]) == (4321, 8765, [])


def test_only_stdio_reaches_the_container(containers: Containers, scratch: Path) -> None:
    # An inheritable fd in the runtime's process must not reach the container: the
    # runtimes close every fd above 2 unless --preserve-fds says otherwise.
    leak = os.open(scratch / "leak", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.set_inheritable(leak, True)
        report = containers.run("checks", pass_fds=(leak,)).json
    finally:
        os.close(leak)
    listing = str(report["listing_fd"])
    assert sorted(report["fds"]) == sorted(["0", "1", "2", listing])


def test_control_socket_reaches_the_runner(containers: Containers) -> None:
    cid = containers.prepare("checks")
    with containers.control_socket(cid) as listener:
        result = containers.run_prepared(cid)
        assert result.returncode == 0, result.stderr
        listener.settimeout(10)
        conn, _ = listener.accept()
        with conn:
            assert conn.recv(100) == b"hello"
    containers.remove(cid)


def test_pids_limit(containers: Containers) -> None:
    report = containers.run("fork", settings=FunctionSettings(pids=16)).json
    # pid 1 counts: at most 15 children; the limit, not anything else, stopped it
    assert 10 <= report["forked"] <= 15
    assert report["errno"] == errno.EAGAIN


def test_memory_limit(containers: Containers) -> None:
    small = FunctionSettings(memory=32 * MiB)
    assert containers.run("alloc", "8", settings=small).json == {"allocated": 8}
    over = containers.run("alloc", "64", settings=small)
    assert over.returncode == 128 + 9, over  # killed by the OOM killer, not swapped
    assert "allocated" not in over.stdout


def _cgroup_dir(pid: int, controller: str) -> Path:
    """The cgroup directory of ``pid`` for ``controller`` on this host."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    if cgroup_mode() == "unified":
        path = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
        return Path("/sys/fs/cgroup" + path)
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path(f"/sys/fs/cgroup/{controllers}{path}")
    raise AssertionError(f"no {controller} cgroup for {pid}: {lines}")


def _limits(pid: int) -> dict[str, str]:
    if cgroup_mode() == "unified":
        d = _cgroup_dir(pid, "")
        return {"memory": (d / "memory.max").read_text().strip(),
                "swap": (d / "memory.swap.max").read_text().strip()
                if (d / "memory.swap.max").exists() else "0",
                "cpu": (d / "cpu.max").read_text().strip(),
                "pids": (d / "pids.max").read_text().strip()}
    mem, cpu = _cgroup_dir(pid, "memory"), _cgroup_dir(pid, "cpu")
    memsw = mem / "memory.memsw.limit_in_bytes"
    return {"memory": (mem / "memory.limit_in_bytes").read_text().strip(),
            "swap": str(int(memsw.read_text()) - int((mem / "memory.limit_in_bytes")
                                                     .read_text())) if memsw.exists() else "0",
            "cpu": "{} {}".format((cpu / "cpu.cfs_quota_us").read_text().strip(),
                                  (cpu / "cpu.cfs_period_us").read_text().strip()),
            "pids": (_cgroup_dir(pid, "pids") / "pids.max").read_text().strip()}


async def _paused(containers: Containers, cid: str, out: int) -> Running:
    """Start ``probe pause`` as the runner starts a container; return once it runs."""
    running = await containers.runtime.spawn_run(
        containers.bundle(cid), cid, stdout=out, stderr=out,
        pidfile=os.path.join(containers.bundle(cid), "pid"))
    return running


def test_cgroup_limits_and_delete(containers: Containers) -> None:
    settings = FunctionSettings(memory=64 * MiB, cpu=0.5, pids=32)
    cid = containers.prepare("pause", settings=settings)
    runtime = containers.runtime

    async def main(r: int, w: int) -> None:
        running = await _paused(containers, cid, w)
        os.close(w)
        assert await asyncio.to_thread(os.read, r, 100) == b"ready\n"
        state = runtime.state(cid)
        assert state["status"] == "running"
        memory_dir = _cgroup_dir(state["pid"], "memory")
        assert "/faasd/" + cid in str(memory_dir)
        assert _limits(state["pid"]) == {"memory": str(64 * MiB), "swap": "0",
                                         "cpu": "50000 100000", "pids": "32"}
        await runtime.delete(cid)
        assert await asyncio.wait_for(running.wait(), 20) in (-9, 128 + 9)
        assert cid not in runtime.list()
        assert not memory_dir.exists(), "delete removes the container's cgroup"

    r, w = os.pipe()
    with containers.control_socket(cid), containers.adopted():
        try:
            asyncio.run(main(r, w))
        finally:
            os.close(r)
    containers.remove(cid)


def test_delete_of_a_running_container_and_kill(containers: Containers) -> None:
    cid = containers.prepare("pause")
    runtime = containers.runtime

    async def main(r: int, w: int) -> None:
        running = await _paused(containers, cid, w)
        os.close(w)
        assert await asyncio.to_thread(os.read, r, 100) == b"ready\n"
        assert cid in runtime.list()
        await runtime.kill(cid)  # KILL: an init ignores signals it has no handler for
        assert await asyncio.wait_for(running.wait(), 20) in (-9, 128 + 9)
        await runtime.delete(cid)
        await runtime.delete(cid)  # idempotent
        with pytest.raises(ContainerNotFound):
            await runtime.kill(cid)

    r, w = os.pipe()
    with containers.control_socket(cid), containers.adopted():
        try:
            asyncio.run(main(r, w))
        finally:
            os.close(r)
    assert cid not in runtime.list()
    assert runtime.list() == []
    containers.remove(cid)
    assert not os.path.exists(containers.bundle(cid))


def test_check_and_list_on_a_fresh_root(containers: Containers) -> None:
    containers.runtime.check()
    assert containers.runtime.list() == []
    version = subprocess.run([containers.runtime.binary, "--version"],
                             capture_output=True, check=False)
    assert version.returncode == 0
