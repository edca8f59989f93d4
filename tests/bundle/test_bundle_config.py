"""build_config, write_bundle and the seccomp profile, without running anything."""

from __future__ import annotations

import copy
import ctypes
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from runner import seccomp
from runner.bundle import (
    BundleError,
    EgressNet,
    FunctionSettings,
    MiB,
    build_config,
    container_env,
    write_bundle,
)

IMAGE = {"entrypoint": ["/bin/app"], "cmd": ["--serve"], "env": ["LANG=C.UTF-8"],
         "workdir": "", "user": "", "os": "linux", "architecture": "amd64"}
CTL = "/run/faasd/ctl/fn-1.sock"


def config(rootfs: Path, image: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    return build_config(str(rootfs), {**IMAGE, **(image or {})}, container_id="fn-1",
                        hostname="fn", control_socket=CTL, **kwargs)


def mount_at(cfg: dict[str, Any], destination: str) -> dict[str, Any]:
    (found,) = [m for m in cfg["mounts"] if m["destination"] == destination]
    return found


def test_defaults(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    json.dumps(cfg)  # what write_bundle must be able to write
    assert cfg["root"] == {"path": str(tmp_path), "readonly": True}
    assert cfg["hostname"] == "fn"
    proc = cfg["process"]
    assert proc["args"] == ["/bin/app", "--serve"]
    assert proc["cwd"] == "/"
    assert proc["user"]["uid"] == 65534 and proc["user"]["gid"] == 65534
    assert proc["user"]["additionalGids"] == []
    assert proc["noNewPrivileges"] is True
    assert proc["terminal"] is False
    assert proc["capabilities"] == {k: [] for k in ("bounding", "effective", "inheritable",
                                                    "permitted", "ambient")}
    assert {(r["type"], r["soft"], r["hard"]) for r in proc["rlimits"]} == {
        ("RLIMIT_CORE", 0, 0), ("RLIMIT_NOFILE", 1024, 1024)}


def test_namespaces(tmp_path: Path) -> None:
    linux = config(tmp_path)["linux"]
    assert sorted(n["type"] for n in linux["namespaces"]) == sorted(
        ["pid", "mount", "ipc", "uts", "cgroup", "network"])
    assert all("path" not in n for n in linux["namespaces"]), "new ones, never the host's"


def test_an_egress_container_joins_its_functions_namespace(tmp_path: Path) -> None:
    """network=egress: the network namespace netagent holds, the rest new; resolv.conf
    and hosts from the bundle, read-only, over the shared rootfs."""
    egress = EgressNet("/run/faasd/netns/fn", "/b/fn-1/resolv.conf", "/b/fn-1/hosts")
    cfg = config(tmp_path, egress=egress)
    spaces = cfg["linux"]["namespaces"]
    assert [n for n in spaces if "path" in n] == [{"type": "network",
                                                   "path": "/run/faasd/netns/fn"}]
    assert sorted(n["type"] for n in spaces) == sorted(
        ["pid", "mount", "ipc", "uts", "cgroup", "network"])
    for dest, src in (("/etc/resolv.conf", egress.resolv_conf), ("/etc/hosts", egress.hosts)):
        m = mount_at(cfg, dest)
        assert m["source"] == src and "ro" in m["options"] and m["type"] == "bind"
    with pytest.raises(BundleError, match="must be absolute"):
        config(tmp_path, egress=EgressNet("netns/fn", "/r", "/h"))


def test_masked_and_readonly_paths(tmp_path: Path) -> None:
    linux = config(tmp_path)["linux"]
    assert {"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
            "/sys/firmware"} <= set(linux["maskedPaths"])
    assert {"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
            "/proc/sysrq-trigger"} <= set(linux["readonlyPaths"])


def test_mounts(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    tmp = mount_at(cfg, "/tmp")
    assert tmp["type"] == "tmpfs"
    assert {"nosuid", "nodev", f"size={64 * MiB}", "uid=65534", "gid=65534"} <= set(
        tmp["options"])
    assert mount_at(cfg, "/dev")["type"] == "tmpfs"
    shm = mount_at(cfg, "/dev/shm")
    assert shm["type"] == "tmpfs" and "size=16m" in shm["options"]
    assert mount_at(cfg, "/dev/pts")["type"] == "devpts"
    assert mount_at(cfg, "/dev/mqueue")["type"] == "mqueue"
    assert mount_at(cfg, "/proc")["type"] == "proc"
    sys_mount = mount_at(cfg, "/sys")
    assert sys_mount["type"] == "sysfs" and "ro" in sys_mount["options"]
    cgroup = mount_at(cfg, "/sys/fs/cgroup")
    assert cgroup["type"] == "cgroup" and "ro" in cgroup["options"]
    ctl = mount_at(cfg, "/control.sock")
    assert ctl["source"] == CTL and "bind" in ctl["options"]
    dests = [m["destination"] for m in cfg["mounts"]]
    assert dests.index("/dev") < dests.index("/dev/shm"), "parents before children"
    assert dests.index("/sys") < dests.index("/sys/fs/cgroup")


def test_resources_and_cgroup(tmp_path: Path) -> None:
    linux = config(tmp_path)["linux"]
    assert linux["cgroupsPath"] == "/faasd/fn-1"
    res = linux["resources"]
    assert res["memory"] == {"limit": 512 * MiB, "swap": 512 * MiB}
    assert res["cpu"] == {"quota": 100_000, "period": 100_000}
    assert res["pids"] == {"limit": 128}
    assert res["devices"] == [{"allow": False, "access": "rwm"}]


def test_settings_change_limits(tmp_path: Path) -> None:
    settings = FunctionSettings(memory=128 * MiB, cpu=1.5, pids=32, nofile=4096,
                                tmp_bytes=8 * MiB, env={"GREETING": "hi"})
    cfg = config(tmp_path, settings=settings, cgroup_parent="/other")
    res = cfg["linux"]["resources"]
    assert res["memory"]["limit"] == 128 * MiB
    assert res["cpu"]["quota"] == 150_000
    assert res["pids"]["limit"] == 32
    assert {"type": "RLIMIT_NOFILE", "soft": 4096, "hard": 4096} in cfg["process"]["rlimits"]
    assert f"size={8 * MiB}" in mount_at(cfg, "/tmp")["options"]
    assert "GREETING=hi" in cfg["process"]["env"]
    assert cfg["linux"]["cgroupsPath"] == "/other/fn-1"


def test_env_merge() -> None:
    env = container_env(["A=1", "B=image", "FAAS_CONTROL_SOCKET=/evil", "E=x=y"],
                        {"B": "function", "C": ""})
    assert env == ["A=1", "B=function", "E=x=y", "PATH=" + "/usr/local/sbin:/usr/local/bin:"
                   "/usr/sbin:/usr/bin:/sbin:/bin", "C=", "FAAS_CONTROL_SOCKET=/control.sock"]
    assert "PATH=/opt/bin" in container_env(["PATH=/opt/bin"], {})
    assert not any(e.startswith("PATH=/usr") for e in container_env(["PATH=/opt/bin"], {}))


@pytest.mark.parametrize("env", [{"A=B": "x"}, {"": "x"}, {"A\0": "x"}, {"A": "x\0y"},
                                 {"FAAS_CONTROL_SOCKET": "/x"}, {"A": 1}])
def test_bad_env_is_refused(tmp_path: Path, env: dict[str, Any]) -> None:
    with pytest.raises(BundleError):
        config(tmp_path, settings=FunctionSettings(env=env))


def test_workdir_and_command_parts(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"workdir": "/app", "entrypoint": [], "cmd": ["python", "x.py"]})
    assert cfg["process"]["cwd"] == "/app"
    assert cfg["process"]["args"] == ["python", "x.py"]
    assert config(tmp_path, {"cmd": []})["process"]["args"] == ["/bin/app"]


@pytest.mark.parametrize("image", [{"entrypoint": [], "cmd": []},
                                   {"entrypoint": None, "cmd": None},
                                   {"entrypoint": ["a\0b"]}])
def test_empty_command_is_refused(tmp_path: Path, image: dict[str, Any]) -> None:
    with pytest.raises(BundleError, match="command"):
        config(tmp_path, image)


@pytest.mark.parametrize("kwargs", [
    {"container_id": "../x"}, {"container_id": "a/b"}, {"container_id": ""},
    {"container_id": "x" * 200}, {"hostname": "Fn_1"}, {"hostname": ""},
    {"control_socket": "relative.sock"}, {"cgroup_parent": "/a/../b"},
])
def test_bad_names_are_refused(tmp_path: Path, kwargs: dict[str, str]) -> None:
    args = {"container_id": "fn-1", "hostname": "fn", "control_socket": CTL, **kwargs}
    with pytest.raises(BundleError):
        build_config(str(tmp_path), IMAGE, **args)


def test_relative_workdir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="workdir"):
        config(tmp_path, {"workdir": "app"})


def test_relative_rootfs_is_refused() -> None:
    with pytest.raises(BundleError, match="rootfs"):
        build_config("images/x/rootfs", IMAGE, container_id="fn-1", hostname="fn",
                     control_socket=CTL)


@pytest.mark.parametrize("settings", [
    {"memory": 1 * MiB}, {"memory": 1.5}, {"cpu": 0}, {"cpu": True},
    {"cpu": 0.001}, {"pids": 0}, {"nofile": 1}, {"tmp_bytes": -1}, {"pids": True},
])
def test_bad_settings_are_refused(tmp_path: Path, settings: dict[str, Any]) -> None:
    with pytest.raises(BundleError):
        config(tmp_path, settings=FunctionSettings(**settings))


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        FunctionSettings().pids = 3  # type: ignore[misc]


# --- write_bundle -----------------------------------------------------------------------

def test_write_bundle_modes_and_atomic_replace(tmp_path: Path) -> None:
    bundle = tmp_path / "bundles" / "fn-1"
    cfg = config(tmp_path)
    path = write_bundle(str(bundle), cfg)
    assert path == str(bundle / "config.json")
    assert stat.S_IMODE(os.stat(bundle).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(Path(path).read_text()) == cfg
    first = os.stat(path).st_ino
    cfg2 = copy.deepcopy(cfg)
    cfg2["hostname"] = "other"
    write_bundle(str(bundle), cfg2)
    assert os.stat(path).st_ino != first, "replaced by rename, never rewritten in place"
    assert json.loads(Path(path).read_text())["hostname"] == "other"
    assert os.listdir(bundle) == ["config.json"], "no temporary file left"


def test_write_bundle_tightens_an_existing_dir(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    bundle.mkdir(mode=0o755)
    write_bundle(str(bundle), {"ociVersion": "1.0.2"})
    assert stat.S_IMODE(os.stat(bundle).st_mode) == 0o700


def test_write_bundle_failure_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_bundle(str(tmp_path / "b"), {"bad": object()})
    assert os.listdir(tmp_path / "b") == []


# --- seccomp ----------------------------------------------------------------------------

def _names(profile: dict[str, Any], action: str = "SCMP_ACT_ALLOW") -> set[str]:
    return {n for rule in profile["syscalls"] if rule["action"] == action
            for n in rule["names"]}


def test_seccomp_in_config_is_a_copy(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert cfg["linux"]["seccomp"] == seccomp.PROFILE
    cfg["linux"]["seccomp"]["syscalls"][0]["names"].append("reboot")
    assert "reboot" not in _names(seccomp.PROFILE)


def test_seccomp_default_deny() -> None:
    profile = seccomp.PROFILE
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["defaultErrnoRet"] == 1  # EPERM
    allowed = _names(profile)
    assert {"read", "write", "execve", "socket", "clone", "personality", "futex"} <= allowed
    for denied in ("ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2",
                   "unshare", "setns", "keyctl", "add_key", "request_key", "bpf",
                   "perf_event_open", "reboot", "kexec_load", "init_module", "swapon",
                   "io_uring_setup", "userfaultfd", "open_by_handle_at", "chroot",
                   "pivot_root", "acct", "settimeofday", "syslog", "fanotify_init",
                   "lookup_dcookie", "iopl", "ioperm", "kcmp", "pidfd_getfd"):
        assert denied not in allowed, denied


def test_seccomp_argument_filters() -> None:
    rules = {(r["names"][0], r["action"]): r for r in seccomp.PROFILE["syscalls"]
             if len(r["names"]) == 1 and r["names"][0] in ("clone", "clone3", "socket")}
    (clone_arg,) = rules[("clone", "SCMP_ACT_ALLOW")]["args"]
    assert clone_arg == {"index": 0, "value": 0x7E020000, "valueTwo": 0,
                         "op": "SCMP_CMP_MASKED_EQ"}
    assert rules[("clone3", "SCMP_ACT_ERRNO")]["errnoRet"] == 38
    assert rules[("socket", "SCMP_ACT_ALLOW")]["args"] == [
        {"index": 0, "value": 40, "valueTwo": 0, "op": "SCMP_CMP_NE"}]
    personalities = sorted(r["args"][0]["value"] for r in seccomp.PROFILE["syscalls"]
                           if r["names"] == ["personality"])
    assert personalities == [0, 8, 0x20000, 0x20008, 0xFFFFFFFF]


def test_seccomp_architectures() -> None:
    assert seccomp.profile_for("x86_64")["architectures"] == [
        "SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    arm = seccomp.profile_for("arm64")
    assert arm["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    assert "set_tls" in _names(arm) and "arch_prctl" not in _names(arm)
    assert "arch_prctl" in _names(seccomp.profile_for("x86_64"))
    with pytest.raises(ValueError, match="riscv"):
        seccomp.profile_for("riscv64")


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_seccomp_names_are_known_to_libseccomp(machine: str) -> None:
    # An unknown name is a typo: runc and crun silently skip it, so it would be a
    # syscall the profile means to allow and does not (or the reverse).
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    profile = seccomp.profile_for(machine)
    names = {n for rule in profile["syscalls"] for n in rule["names"]}
    unknown = sorted(n for n in names if lib.seccomp_syscall_resolve_name(n.encode()) == -1)
    assert unknown == []
    assert len(names) > 300
