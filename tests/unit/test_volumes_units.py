"""Volumes without root: the runner's bounds and bookkeeping with a fake for mkfs and
mount, the containers' bind mounts, and the controller's checks. The real filesystems
are tests/integration/test_volumes.py's."""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace
from typing import Any

import pytest

from common.errors import Code, FaasError
from common.layout import Layout
from controller.volumes import VolumeOps
from runner.bundle import BundleError, FunctionSettings, build_config
from runner.fleet import Fleet
from runner.volumes import MIN_BYTES, Volumes, bind_mounts

MiB = 1 << 20


class FakeTools:
    """mkfs.ext4, mount and umount as argv lists; ``fail`` names a tool that fails."""

    def __init__(self, fail: str = ""):
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, argv: list[str]) -> None:
        self.calls.append(argv)
        if argv[0] == self.fail:
            raise OSError(f"{argv[0]} failed (1): fake")


@pytest.fixture
def tools() -> FakeTools:
    return FakeTools()


def volumes(tmp_path, tools, max_bytes=64 * MiB, total=96 * MiB, min_free=0) -> Volumes:
    paths = Layout(str(tmp_path), str(tmp_path / "run"))
    os.makedirs(paths.volume_mounts)
    return Volumes(paths, max_bytes, total, min_free, run=tools)


def code_of(call: Any) -> Code:
    with pytest.raises(FaasError) as err:
        call()
    return err.value.code


def test_create_makes_a_sparse_image_formats_and_mounts_it(tmp_path, tools):
    v = volumes(tmp_path, tools)
    v.mounted = lambda name: False  # the fake mounts nothing; data/ is made in mnt/<name>
    row = v.create("data", 16 * MiB)
    image = tmp_path / "volumes" / "data.img"
    assert row["name"] == "data" and row["size"] == 16 * MiB
    assert image.stat().st_size == 16 * MiB and image.stat().st_blocks * 512 < MiB
    assert (image.stat().st_mode & 0o777) == 0o600
    assert [c[0] for c in tools.calls] == ["mkfs.ext4", "mount"]
    assert "-m" in tools.calls[0] and tools.calls[0][-1] == str(image)
    assert "loop,nodev,nosuid,noexec" in tools.calls[1]
    assert v.names() == ["data"]


@pytest.mark.parametrize("size,why", [(MIN_BYTES - 1, "max_volume_bytes"),
                                      (65 * MiB, "max_volume_bytes")])
def test_sizes_outside_the_bounds_are_forbidden(tmp_path, tools, size, why):
    v = volumes(tmp_path, tools)
    with pytest.raises(FaasError) as err:
        v.create("data", size)
    assert err.value.code == Code.FORBIDDEN and why in err.value.message
    assert tools.calls == [] and v.names() == []


def test_the_total_and_the_free_space_are_bounds_too(tmp_path, tools):
    v = volumes(tmp_path, tools)
    v.mounted = lambda name: False
    v.create("one", 64 * MiB)
    assert code_of(lambda: v.create("two", 64 * MiB)) == Code.FORBIDDEN  # 128 > 96 MiB
    st = os.statvfs(tmp_path)
    v.min_free_bytes = st.f_bavail * st.f_frsize  # nothing may be used
    assert code_of(lambda: v.create("three", 8 * MiB)) == Code.FORBIDDEN
    assert v.names() == ["one"]


def test_an_existing_volume_is_a_conflict(tmp_path, tools):
    v = volumes(tmp_path, tools)
    v.mounted = lambda name: False
    v.create("data", 8 * MiB)
    assert code_of(lambda: v.create("data", 8 * MiB)) == Code.CONFLICT


def test_a_failed_mkfs_leaves_nothing(tmp_path):
    v = volumes(tmp_path, FakeTools(fail="mkfs.ext4"))
    with pytest.raises(OSError):
        v.create("data", 8 * MiB)
    assert os.listdir(tmp_path / "volumes") == ["mnt"] and os.listdir(v.mnt) == []


def test_names_are_image_files_with_volume_names_only(tmp_path, tools):
    v = volumes(tmp_path, tools)
    base = tmp_path / "volumes"
    (base / "good.img").write_bytes(b"")
    (base / "Bad_Name.img").write_bytes(b"")
    (base / "notes.txt").write_bytes(b"")
    os.symlink("/etc/passwd", base / "link.img")
    os.mkdir(base / "dir.img")
    assert v.names() == ["good"]


def test_paths_are_made_from_volume_names_only(tmp_path, tools):
    v = volumes(tmp_path, tools)
    for bad in ("../etc", "a/b", "", "A"):
        assert code_of(lambda b=bad: v.image(b)) == Code.BAD_REQUEST


def test_rm_of_a_missing_volume_is_not_found(tmp_path, tools):
    assert code_of(lambda: volumes(tmp_path, tools).remove("nope")) == Code.NOT_FOUND


def test_a_container_start_fails_for_a_missing_or_unmounted_volume(tmp_path, tools):
    v = volumes(tmp_path, tools)
    with pytest.raises(BundleError, match="volume nope does not exist"):
        v.sources(["nope:/data"])
    (tmp_path / "volumes" / "cold.img").write_bytes(b"")
    with pytest.raises(BundleError, match="volume cold is not mounted"):
        v.sources(["cold:/data:ro"])


# --- the containers' bind mounts ---------------------------------------------------------


def test_bind_mounts_rw_and_ro_parents_first():
    got = bind_mounts(["a:/srv/a/deep", "b:/srv/a:ro"], {"a": "/v/a/data", "b": "/v/b/data"})
    assert [m["destination"] for m in got] == ["/srv/a", "/srv/a/deep"]
    assert got[0] == {"destination": "/srv/a", "type": "bind", "source": "/v/b/data",
                      "options": ["bind", "nosuid", "nodev", "noexec", "ro"]}
    assert got[1]["options"][-1] == "rw"


@pytest.mark.parametrize("specs", [["a:/proc"], ["a:/"], ["a:/x/../proc/sys"], ["a:rel"],
                                   ["a:/x", "a:/x"], ["b:/x"]])
def test_bad_mounts_never_reach_the_config(specs):
    with pytest.raises(BundleError):
        bind_mounts(specs, {"a": "/v/a/data"})


def test_the_config_holds_the_volumes_after_faasds_own_mounts(tmp_path):
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    config = build_config(str(rootfs), {"cmd": ["/h"]}, container_id="c1", hostname="fn",
                          control_socket="/run/ctl/c1.sock",
                          settings=FunctionSettings(mounts=["data:/data"]),
                          volumes=bind_mounts(["data:/data"], {"data": "/v/mnt/data/data"}))
    assert config["mounts"][-1]["destination"] == "/data"
    assert config["mounts"][-1]["source"] == "/v/mnt/data/data"


def test_the_fleet_knows_which_functions_mount_a_volume():
    fleet = Fleet.__new__(Fleet)
    fleet.specs = {n: {"settings": {"mounts": m}} for n, m in
                   (("b", ["data:/d"]), ("a", ["logs:/l", "data:/x:ro"]), ("c", []))}
    assert fleet.mounting("data") == ["a", "b"] and fleet.mounting("logs") == ["a"]
    assert fleet.mounting("other") == []


# --- the controller -------------------------------------------------------------------


class FakeRunner:
    def __init__(self, names: list[str]):
        self.names = names
        self.calls: list[tuple[str, dict]] = []

    async def call(self, op: str, args: dict, **kw: Any) -> Any:
        self.calls.append((op, args))
        if op == "volume_list":
            return {"volumes": [{"name": n, "size": 8 * MiB, "used": 0, "free": 8 * MiB,
                                 "mounted": True} for n in self.names]}
        return {"name": args["name"], "size": args.get("size", 0)}


def controller(names: list[str], functions: dict[str, list[str]]) -> VolumeOps:
    ops = VolumeOps()
    ops.state = SimpleNamespace(functions=lambda: [
        {"name": n, "settings": {"mounts": m}} for n, m in functions.items()])
    ops.clients = {"runner": FakeRunner(names)}
    ops.log = SimpleNamespace(info=lambda *a, **k: None)
    return ops


def test_set_mounts_of_an_unknown_volume_is_not_found():
    ops = controller(["data"], {})
    asyncio.run(ops.check_mounts({"mounts": "data:/d"}))
    with pytest.raises(FaasError) as err:
        asyncio.run(ops.check_mounts({"mounts": "data:/d,nope:/n,gone:/g"}))
    assert err.value.code == Code.NOT_FOUND and err.value.details["volumes"] == ["gone", "nope"]
    asyncio.run(ops.check_mounts({"mounts": ""}))  # unmounting everything needs no runner
    asyncio.run(ops.check_mounts({"memory": "1G"}))
    assert ops.clients["runner"].calls == [("volume_list", {})] * 2


def test_rm_while_mounted_names_the_functions_and_never_reaches_the_runner():
    ops = controller(["data"], {"b": ["data:/d"], "a": ["data:/x:ro"], "c": []})
    with pytest.raises(FaasError) as err:
        asyncio.run(ops.op_volume_rm({"name": "data"}))
    assert err.value.code == Code.CONFLICT and err.value.details["functions"] == ["a", "b"]
    assert "a, b" in err.value.message and ops.clients["runner"].calls == []


def test_create_takes_a_size_with_units():
    ops = controller([], {})
    asyncio.run(ops.op_volume_create({"name": "data", "size": "512M"}))
    assert ops.clients["runner"].calls == [("volume_create", {"name": "data",
                                                              "size": 512 * MiB})]
    with pytest.raises(FaasError) as err:
        asyncio.run(ops.op_volume_create({"name": "data", "size": "lots"}))
    assert err.value.code == Code.BAD_REQUEST


def test_list_adds_the_functions_that_mount_each():
    ops = controller(["data", "idle"], {"fn": ["data:/d"]})
    rows = asyncio.run(ops.op_volume_list({}))["volumes"]
    assert [(r["name"], r["functions"]) for r in rows] == [("data", ["fn"]), ("idle", [])]


# --- backup: the tars restore accepts ------------------------------------------------------


def tar_of(path, *entries: tuple[str, bytes | str | None, int]) -> str:
    """A tar of (name, data, type) entries: bytes a file, str a link's target, None a dir."""
    import io
    import tarfile
    with tarfile.open(path, "w") as tf:
        for name, data, kind in entries:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            if isinstance(data, str):
                ti.linkname = data
            if isinstance(data, bytes):
                ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if isinstance(data, bytes) else None)
    return str(path)


def test_a_volume_tar_is_checked_before_restore_writes(tmp_path):
    import tarfile

    from runner.volumebackup import check_tar
    reg, sym, lnk, dev = tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE
    good = tar_of(tmp_path / "good.tar", (".", None, tarfile.DIRTYPE), ("./a", b"", reg),
                  ("./l", "/etc/passwd", sym), ("./h", "a", lnk))
    check_tar(good, "v", 8 * MiB)
    for bad, entries in {
        "dotdot": [("../x", b"", reg)], "absolute": [("/etc/x", b"", reg)],
        "device": [("./null", b"", dev)], "under-symlink": [("./l", "/etc", sym),
                                                            ("./l/passwd", b"", reg)],
        "hardlink-out": [("./h", "/etc/shadow", lnk)],
        "too-big": [("./a", bytes(100), reg), ("./b", bytes(100), reg)],
    }.items():
        with pytest.raises(FaasError) as err:
            check_tar(tar_of(tmp_path / f"{bad}.tar", *entries), "v", 150)
        assert err.value.code == Code.BAD_REQUEST, bad


def test_a_config_without_the_volumes_its_settings_mount_is_refused(tmp_path):
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    with pytest.raises(BundleError, match="mounts volumes"):
        build_config(str(rootfs), {"cmd": ["/h"]}, container_id="c1", hostname="fn",
                     control_socket="/run/ctl/c1.sock",
                     settings=FunctionSettings(mounts=["data:/data"]))
