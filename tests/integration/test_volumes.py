"""Volumes end to end: real ext4 images on real loop devices, mounted by the runner and
bound into real containers; kept across a redeploy, a runner kill -9 and faasd down/up;
full only inside the functions that mount them (docs/volumes.md)."""

from __future__ import annotations

import json
import os
import signal
import sys
import tarfile
from pathlib import Path

import pytest
from harness import BIN, Netns, Platform, poll, run
from harness import http_get as get

MiB = 1 << 20
HERE = Path(__file__).parent


def api(platform, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """The HTTP API on loopback, as root (an operator)."""
    argv = ["curl", "-s", "-m", "10", "-X", method, "-o", "-", "-w", "\n%{http_code}",
            f"http://127.0.0.1:8080{path}"]
    argv[1:1] = ["-H", "Content-Type: application/json"]  # what a changing request needs
    if body is not None:
        argv[1:1] = ["-d", json.dumps(body)]
    out = run(*platform.netns.argv(*argv))
    text, _, code = out.stdout.rpartition("\n")
    return int(code), json.loads(text or "null")


def mounts_under(path) -> list[str]:
    """Mount points at or below ``path`` in this (the host's) mount table."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == str(path) or p.startswith(f"{path}/")]


def runner_tail(platform, n: int = 12) -> str:
    """The runner's last log lines, for a failure's message."""
    try:
        return "\n".join(json.dumps(line) for line in platform.log_lines("runner")[-n:])
    except OSError as exc:
        return repr(exc)


def volumes(platform) -> dict[str, dict]:
    rows = json.loads(platform.faasctl("--json", "volume", "list").stdout)["volumes"]
    return {v["name"]: v for v in rows}


def address(platform, name: str) -> str:
    return json.loads(platform.faasctl("--json", "ip", name).stdout)["address"]


def answers(platform, name: str, path: str, want: str, timeout: float = 20) -> str:
    addr = address(platform, name)
    return poll(f"{name} {path} -> {want!r}",
                lambda: (lambda r: r[1] if r == (200, want) else None)(get(platform, addr,
                                                                           path)), timeout)


@pytest.fixture(scope="module")
def platform(netns):
    p = Platform(netns)
    p.start()
    try:
        p.wait_healthy()
        yield p
    finally:
        p.stop()
        left = mounts_under(p.root)
        for point in reversed(left):  # a failed test must not leave loop mounts behind
            run("umount", "-l", point, check=False)
        p.remove()
        assert not left, f"volumes still mounted after faasd down: {left}"


@pytest.fixture(scope="module")
def keeper(platform, image_tar) -> str:
    platform.faasctl("volume", "create", "store", "--size", "16M")
    platform.faasctl("new", "keeper", "-f", image_tar)
    platform.faasctl("set", "keeper", "mounts=store:/data")
    answers(platform, "keeper", "/put/data/keep", "put")
    answers(platform, "keeper", "/get/data/keep", "kept")
    return "keeper"


def test_create_list_and_write(platform, keeper):
    row = volumes(platform)["store"]
    assert row["size"] == 16 * MiB and row["mounted"] and row["functions"] == ["keeper"]
    assert 0 < row["used"] < 16 * MiB
    text = platform.faasctl("volume", "list").stdout
    assert "store" in text and "16.0M" in text and "keeper" in text
    image = platform.root / "volumes" / "store.img"
    assert image.stat().st_size == 16 * MiB and (image.stat().st_mode & 0o777) == 0o600
    assert (os.stat(platform.root / "volumes").st_mode & 0o777) == 0o700
    # the image's user (65534) owns the volume's data directory: it wrote the file
    data = platform.root / "volumes" / "mnt" / "store" / "data"
    assert (data.stat().st_uid, (data / "keep").stat().st_uid) == (65534, 65534)


def test_no_other_function_sees_it(platform, keeper, image_tar):
    platform.faasctl("new", "stranger", "-f", image_tar)
    answers(platform, "stranger", "/get/data/keep", "No such file or directory")


def test_read_only_mount(platform, keeper, image_tar):
    platform.faasctl("new", "reader", "-f", image_tar)
    platform.faasctl("set", "reader", "mounts=store:/srv/store:ro")
    answers(platform, "reader", "/get/srv/store/keep", "kept")
    answers(platform, "reader", "/put/srv/store/other", "Read-only file system")
    platform.faasctl("set", "reader", "mounts=")


def test_kept_across_a_redeploy_and_a_rollback(platform, keeper, image_tar):
    before = json.loads(platform.faasctl("--json", "info", "keeper").stdout)["version"]
    platform.faasctl("new", "keeper", "-f", image_tar)
    assert json.loads(platform.faasctl("--json", "info", "keeper").stdout)["version"] \
        == before + 1
    answers(platform, "keeper", "/get/data/keep", "kept")
    platform.faasctl("rollback", "keeper")
    answers(platform, "keeper", "/get/data/keep", "kept")


def test_kept_across_runner_kill_9_and_mounted_once(platform, keeper):
    boot = platform.status()["runner"]["boot_id"]
    os.kill(platform.status()["runner"]["pid"], signal.SIGKILL)
    poll("a new runner synced", lambda: (lambda r: r["boot_id"] != boot and r["synced"]
                                         and r["state"] == "up")(platform.status()["runner"]),
         20)
    answers(platform, "keeper", "/get/data/keep", "kept")
    point = platform.root / "volumes" / "mnt" / "store"
    assert mounts_under(point) == [str(point)], "the volume was mounted twice"
    assert any(line["event"] == "volumes" and line["reused"] >= 1 and line["mounted"] == 0
               for line in platform.log_lines("runner"))


def test_kept_across_faasd_down_and_up(platform, keeper):
    platform.stop()
    assert mounts_under(platform.root) == [], runner_tail(platform)
    platform.start()
    platform.wait_healthy()
    answers(platform, "keeper", "/get/data/keep", "kept")
    assert volumes(platform)["store"]["mounted"]


def test_a_full_volume_is_enospc_in_its_function_only(platform, keeper, image_tar):
    platform.faasctl("volume", "create", "small", "--size", "8M")
    platform.faasctl("new", "filler", "-f", image_tar)
    platform.faasctl("set", "filler", "mounts=small:/data")
    addr = address(platform, "filler")
    status, body = poll("filler answering", lambda: (lambda r: r if r[0] == 200 else None)(
        get(platform, addr, "/fill/data/big")), 20)
    error, _, written = body.rpartition(" after ")
    assert error == "No space left on device", body
    assert 4 * MiB < int(written) <= 8 * MiB
    # the other volume, the rootfs' disk and the function's own /tmp are not full
    answers(platform, "keeper", "/put/data/more", "put")
    answers(platform, "filler", "/put/tmp/scratch", "put")
    image = platform.root / "volumes" / "small.img"
    assert image.stat().st_blocks * 512 <= 8 * MiB  # the host gave it no more than its size
    assert volumes(platform)["small"]["free"] < MiB
    answers(platform, "filler", "/rm/data/big", "removed")  # and it recovers once freed
    answers(platform, "filler", "/put/data/keep", "put")


def test_unknown_volume_in_mounts_is_refused_and_changes_nothing(platform, keeper):
    before = json.loads(platform.faasctl("--json", "info", "keeper").stdout)["settings"]
    out = platform.faasctl("set", "keeper", "mounts=store:/data,nope:/other", check=False)
    assert out.returncode == 3 and "no volume nope" in out.stderr, out.stderr
    status, body = api(platform, "PATCH", "/api/functions/keeper/settings",
                       {"mounts": "nope:/data"})
    assert status == 404 and body["error"]["code"] == "not_found", body
    assert json.loads(platform.faasctl("--json", "info", "keeper").stdout)["settings"] == before


@pytest.mark.parametrize("path", ["/proc", "/", "/sys/fs", "/run/secrets", "/dev"])
def test_a_mount_over_the_kernels_places_is_refused(platform, keeper, path):
    before = json.loads(platform.faasctl("--json", "info", "keeper").stdout)["settings"]
    out = platform.faasctl("set", "keeper", f"mounts=store:{path}", check=False)
    assert out.returncode == 2 and "mounts=" in out.stderr, out.stderr
    status, body = api(platform, "PATCH", "/api/functions/keeper/settings",
                       {"mounts": f"store:{path}"})
    assert status == 400 and body["error"]["code"] == "bad_request", body
    assert json.loads(platform.faasctl("--json", "info", "keeper").stdout)["settings"] == before


def test_rm_while_mounted_is_refused_naming_the_functions(platform, keeper, image_tar):
    platform.faasctl("new", "second", "-f", image_tar)
    platform.faasctl("set", "second", "mounts=store:/var/store")
    out = platform.faasctl("volume", "rm", "store", check=False)
    assert out.returncode == 4 and "keeper, second" in out.stderr, out.stderr
    status, body = api(platform, "DELETE", "/api/volumes/store")
    assert status == 409 and body["error"]["details"]["functions"] == ["keeper", "second"]
    assert volumes(platform)["store"]["mounted"]
    answers(platform, "keeper", "/get/data/keep", "kept")


def as_faas(platform, op: str, args: dict) -> dict:
    """One request straight to the runner as the faas user: a compromised controller."""
    out = run("setpriv", "--reuid=faas", "--regid=faas", "--init-groups", sys.executable,
              HERE / "rogue.py", platform.run_dir, "runner", op, json.dumps(args),
              env={**platform.env, "PYTHONPATH": str(HERE.parents[1])})
    return json.loads(out.stdout)


def test_the_runner_holds_the_bounds_against_the_faas_user(platform, keeper):
    refused = as_faas(platform, "volume_rm", {"name": "store"})
    assert refused["code"] == "conflict" and "keeper" in refused["message"], refused
    huge = as_faas(platform, "volume_create", {"name": "huge", "size": 1 << 50})
    assert huge["code"] == "forbidden" and "max_volume_bytes" in huge["message"], huge
    sneaky = as_faas(platform, "volume_create", {"name": "../../etc", "size": 8 * MiB})
    assert sneaky["code"] == "bad_request", sneaky
    assert sorted(volumes(platform)) == ["small", "store"]
    answers(platform, "keeper", "/get/data/keep", "kept")


def test_rm_once_unmounted_deletes_it(platform, keeper, image_tar):
    status, row = api(platform, "POST", "/api/volumes", {"name": "gone", "size": "4M"})
    assert status == 200 and row["size"] == 4 * MiB, row
    platform.faasctl("new", "brief", "-f", image_tar)
    platform.faasctl("set", "brief", "mounts=gone:/data")
    answers(platform, "brief", "/put/data/x", "put")
    platform.faasctl("set", "brief", "mounts=")
    platform.faasctl("volume", "rm", "gone")
    assert "gone" not in volumes(platform)
    assert not (platform.root / "volumes" / "gone.img").exists()
    assert mounts_under(platform.root / "volumes" / "mnt" / "gone") == []
    out = platform.faasctl("volume", "rm", "gone", check=False)
    assert out.returncode == 3, out.stderr


def test_sizes_outside_the_hosts_bounds_are_refused(platform):
    out = platform.faasctl("volume", "create", "huge", "--size", "1000G", check=False)
    assert out.returncode == 8 and "max_volume_bytes" in out.stderr, out.stderr
    out = platform.faasctl("volume", "create", "tiny", "--size", "1M", check=False)
    assert out.returncode == 8, out.stderr
    out = platform.faasctl("volume", "create", "store", "--size", "8M", check=False)
    assert out.returncode == 4, out.stderr
    assert not (platform.root / "volumes" / "huge.img").exists()
    assert not (platform.root / "volumes" / "tiny.img").exists()


def test_an_unmounted_volume_fails_its_functions_starts_only(platform, keeper, image_tar):
    point = platform.root / "volumes" / "mnt" / "store"
    run("umount", point)  # behind faasd's back
    platform.faasctl("new", "bystander", "-f", image_tar)
    addr = address(platform, "keeper")
    poll("keeper refused", lambda: get(platform, addr, "/get/data/keep")[0] not in (0, 200),
         20)
    answers(platform, "bystander", "/", "ok 1 pid 1")
    poll("the reason in the runner's log", lambda: any(
        "volume store is not mounted" in json.dumps(line)
        for line in platform.log_lines("runner")), 10)
    assert volumes(platform)["store"]["mounted"] is False
    platform.ctl("restart", "runner")  # a start mounts it again
    answers(platform, "keeper", "/get/data/keep", "kept")


def members(archive) -> list[str]:
    with tarfile.open(archive) as tf:
        return tf.getnames()


def test_backups_hold_volumes_only_with_with_volumes(platform, keeper, tmp_path):
    plain, full = tmp_path / "plain.tar.gz", tmp_path / "full.tar.gz"
    platform.faasctl("backup", plain)
    assert not [m for m in members(plain) if m.startswith("volumes/")]
    out = platform.faasctl("backup", "--with-volumes", full)
    assert "volumes/store.tar" in out.stdout
    assert "volumes/store.tar" in members(full)
    # The volume is lost with everything in it; restore brings it back at its size, with
    # its files and their owners, and the function reads them again.
    platform.stop()
    run(*platform.netns.argv(BIN / "faasd", "down"), env=platform.env)
    assert mounts_under(platform.root) == [], runner_tail(platform)
    stopped = tmp_path / "stopped.tar.gz"  # faasd down: each volume mounted just for it
    platform.faasctl("backup", "--with-volumes", stopped)
    assert "volumes/store.tar" in members(stopped) and mounts_under(platform.root) == []
    assert not [p for p in os.listdir(platform.root / "volumes") if p.startswith(".")]
    (platform.root / "volumes" / "store.img").unlink()
    restored = run(*platform.netns.argv(BIN / "faasctl", "restore", "--force", stopped),
                   env=platform.env, check=False)
    assert restored.returncode == 0, (restored.stdout, restored.stderr)
    assert "volume" in restored.stdout
    assert (platform.root / "volumes" / "store.img").stat().st_size == 16 * MiB
    assert mounts_under(platform.root) == []  # the runner mounts it at its start
    platform.start()
    platform.wait_healthy()
    answers(platform, "keeper", "/get/data/keep", "kept")
    data = platform.root / "volumes" / "mnt" / "store" / "data"
    assert (data.stat().st_uid, (data / "keep").stat().st_uid) == (65534, 65534)


def test_crun_binds_volumes_as_runc_does(image_tar):
    """The other runtime (crun, in a private mount namespace on a hybrid host) gets the
    same mount, rw and ro."""
    ns = Netns("faas-vol")
    p = Platform(ns, 'runtime = "crun"\n')
    p.start()
    try:
        p.wait_healthy()
        p.faasctl("volume", "create", "shared", "--size", "4M")
        p.faasctl("new", "writer", "-f", image_tar)
        p.faasctl("new", "reader", "-f", image_tar)
        p.faasctl("set", "writer", "mounts=shared:/data")
        p.faasctl("set", "reader", "mounts=shared:/data:ro")
        answers(p, "writer", "/put/data/keep", "put")
        answers(p, "reader", "/get/data/keep", "kept")
        answers(p, "reader", "/put/data/keep", "Read-only file system")
    finally:
        p.stop()
        left = mounts_under(p.root)
        for point in reversed(left):
            run("umount", "-l", point, check=False)
        p.remove()
        stray = ns.delete()
        assert not left and not stray, (left, stray)
