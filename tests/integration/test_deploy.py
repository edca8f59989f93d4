"""Deploying images end to end: faasctl and HTTP uploads into the real runner, versions,
rollback, removal, and what is left when an upload or a daemon dies half-way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest
from harness import BIN, poll, run

from common.errors import EXIT_STATUS, Code
from tests.imagebuild import Dir, File, Layer, Symlink, build_image

HANDLER = b"#!/bin/sh\necho hello\n"


@pytest.fixture(scope="module")
def platform_config() -> str:
    # image_expand_ratio = 0: big_image is a zstd bomb on purpose (test_image_store.py
    # holds the ratio cap)
    return ("upload_idle_seconds = 2\nupload_min_rate = 20000\nupload_rate_window = 2\n"
            "upload_slots_per_user = 2\nimage_expand_ratio = 0\n")


def image(path: Path, marker: bytes = b"v1", fmt: str = "legacy", compression: str = "none"):
    layers = [
        [Dir("app"), File("app/handler", HANDLER, mode=0o755), Symlink("bin", "app")],
        [File("app/version", marker, mode=0o644, uid=1000, gid=1000)],
    ]
    return build_image(path, layers, {"config": {"Cmd": ["/app/handler"], "User": "1000"}},
                       fmt=fmt, compression=compression)


def big_image(path: Path, size: int):
    """One layer with a file of ``size`` zero bytes: small to upload, slow to extract."""
    def chunks():
        info = tarfile.TarInfo("big")
        info.size = size
        yield info.tobuf(tarfile.USTAR_FORMAT)
        block = bytes(1 << 20)
        for _ in range(size >> 20):
            yield block
        yield bytes(-size % 512) + bytes(1024)
    return build_image(path, [Layer(chunks=chunks)], fmt="oci", compression="zstd")


def faasctl_json(platform, *args, check=True):
    out = platform.faasctl("--json", *args, check=check)
    return json.loads(out.stdout) if out.stdout.strip() else None, out


def functions(platform) -> dict[str, dict]:
    return {f["name"]: f for f in faasctl_json(platform, "list")[0]["functions"]}


def images_dir(platform) -> Path:
    return platform.root / "images"


def leftovers(platform) -> list[str]:
    spool = os.listdir(platform.root / "spool")
    staging = [n for n in os.listdir(images_dir(platform)) if n.startswith(".staging")]
    incoming = os.listdir(images_dir(platform) / ".incoming")
    return spool + staging + incoming


@pytest.mark.parametrize("fmt,compression", [("legacy", "none"), ("docker25", "gzip"),
                                             ("oci", "zstd")])
def test_faasctl_new_deploys_every_format(platform, tmp_path, fmt, compression):
    platform.wait_healthy()
    name = f"fn-{fmt}"
    built = image(tmp_path / "img.tar", fmt=fmt, compression=compression)
    result, out = faasctl_json(platform, "new", name, "-f", tmp_path / "img.tar")
    assert result["name"] == name and result["version"] == 1
    assert result["digest"] == built.digest and result["command"] == ["/app/handler"]
    rootfs = images_dir(platform) / built.digest[7:] / "rootfs"
    assert (rootfs / "app" / "handler").read_bytes() == HANDLER
    st = (rootfs / "app" / "version").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1000, 1000, 0o644)
    assert os.readlink(rootfs / "bin") == "app"
    ip = platform.faasctl("ip", name).stdout.strip()
    assert ip == result["address"] and ip.startswith("fd00:faa5:1::")
    assert functions(platform)[name]["address"] == ip
    assert leftovers(platform) == []


def test_stdin_upload_with_progress_and_redeploy_extracts_nothing(platform, tmp_path):
    platform.wait_healthy()
    built = image(tmp_path / "img.tar", b"stdin")
    with open(tmp_path / "img.tar", "rb") as src:
        first = run(BIN / "faasctl", "new", "piped", env=platform.env, stdin=src)
    assert "upload" in first.stderr and "piped version 1" in first.stdout
    with open(tmp_path / "img.tar", "rb") as src:
        second = json.loads(run(BIN / "faasctl", "--json", "new", "piped", env=platform.env,
                                stdin=src).stdout)
    assert second["version"] == 2 and second["reused"] is True
    assert second["digest"] == built.digest and second["seconds"] < 1.0
    info = faasctl_json(platform, "info", "piped")[0]
    assert [v["version"] for v in info["versions"]] == [1, 2]


def curl(platform, *args) -> tuple[int, dict]:
    out = run(*platform.netns.argv("curl", "-s", "-w", "\n%{http_code}", *args))
    body, _, code = out.stdout.rpartition("\n")
    return int(code), json.loads(body)


def test_http_api_new_and_list(platform, tmp_path):
    platform.wait_healthy()
    built = image(tmp_path / "img.tar", b"http")
    code, body = curl(platform, "-X", "POST", "-H", "X-Image-Name: via-http", "--data-binary",
                      f"@{tmp_path / 'img.tar'}", "http://127.0.0.1:8080/api/new")
    assert code == 200, body
    assert body["name"] == "via-http" and body["command"] == ["/app/handler"]
    assert body["address"].startswith("fd00:faa5:1::") and body["digest"] == built.digest
    code, listed = curl(platform, "http://127.0.0.1:8080/api/list")
    assert code == 200 and "via-http" in [f["name"] for f in listed]
    # chunked transfer (a pipe of unknown length)
    code, body = curl(platform, "-X", "POST", "-H", "X-Image-Name: chunked", "-H",
                      "Transfer-Encoding: chunked", "--data-binary", f"@{tmp_path / 'img.tar'}",
                      "http://127.0.0.1:8080/api/new")
    assert code == 200 and body["name"] == "chunked"


def test_bad_names_are_refused_before_any_byte(platform, tmp_path):
    platform.wait_healthy()
    image(tmp_path / "img.tar")
    before = functions(platform)
    for name in ("Bad", "ns", "x-", "a" * 64, "a.b", "_functions"):
        out = platform.faasctl("new", name, "-f", tmp_path / "img.tar", check=False)
        assert out.returncode == EXIT_STATUS[Code.BAD_REQUEST], name
        assert "function name" in out.stderr or "reserved" in out.stderr
        code, body = curl(platform, "-X", "POST", "-H", f"X-Image-Name: {name}",
                          "--data-binary", f"@{tmp_path / 'img.tar'}",
                          "http://127.0.0.1:8080/api/new")
        assert code == 400 and body["error"]["code"] == "bad_request"
    assert functions(platform) == before and leftovers(platform) == []


def test_hostile_image_is_refused_and_leaves_nothing(platform, tmp_path):
    platform.wait_healthy()
    before_fns, before_imgs = functions(platform), sorted(os.listdir(images_dir(platform)))
    bad = tarfile.TarInfo("../../escape")
    bad.size = 0
    from tests.imagebuild import Raw
    build_image(tmp_path / "bad.tar", [[Raw(bad)]])
    out = platform.faasctl("new", "evil", "-f", tmp_path / "bad.tar", check=False)
    assert out.returncode == EXIT_STATUS[Code.BAD_IMAGE], out.stderr
    assert "bad_image" in out.stderr
    assert functions(platform) == before_fns
    assert sorted(os.listdir(images_dir(platform))) == before_imgs
    assert leftovers(platform) == []
    assert not (platform.root.parent / "escape").exists()


def test_versions_rollback_and_rm_frees_images(platform, tmp_path):
    platform.wait_healthy()
    one = image(tmp_path / "1.tar", b"one")
    two = image(tmp_path / "2.tar", b"two")
    platform.faasctl("new", "ver", "-f", tmp_path / "1.tar")
    platform.faasctl("new", "ver", "-f", tmp_path / "2.tar")
    versions = faasctl_json(platform, "versions", "ver")[0]["versions"]
    assert [(v["version"], v["digest"], v["current"]) for v in versions] == [
        (1, one.digest, False), (2, two.digest, True)]
    assert faasctl_json(platform, "rollback", "ver")[0]["version"] == 1
    assert functions(platform)["ver"]["digest"] == one.digest
    assert faasctl_json(platform, "rollback", "ver", "2")[0]["version"] == 2
    out = platform.faasctl("rollback", "ver", "9", check=False)
    assert out.returncode == EXIT_STATUS[Code.NOT_FOUND]
    address = functions(platform)["ver"]["address"]
    platform.faasctl("rm", "ver")
    assert "ver" not in functions(platform)
    for built in (one, two):
        poll("image freed", lambda b=built: not (images_dir(platform) / b.digest[7:]).exists(), 10)
    out = platform.faasctl("rm", "ver", check=False)
    assert out.returncode == EXIT_STATUS[Code.NOT_FOUND]
    # the address is free again for the next new function
    platform.faasctl("new", "again", "-f", tmp_path / "1.tar")
    assert functions(platform)["again"]["address"] == address


def test_upload_cut_off_half_way_leaves_nothing(platform, tmp_path):
    platform.wait_healthy()
    before = functions(platform)
    proc = subprocess.Popen([BIN / "faasctl", "new", "cutoff"], env=platform.env,
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    proc.stdin.write(b"\0" * (3 << 20))
    proc.stdin.flush()
    spool = platform.root / "spool"
    poll("bytes in the spool", lambda: any(f.stat().st_size for f in spool.iterdir()), 10)
    proc.kill()
    proc.wait()
    poll("the spool emptied", lambda: leftovers(platform) == [], 10)
    assert functions(platform) == before


@pytest.mark.parametrize("victim", ["controller", "runner"])
def test_daemon_killed_during_extraction_leaves_nothing(platform, tmp_path, victim):
    platform.wait_healthy()
    before = functions(platform)
    big_image(tmp_path / "big.tar", (768 + len(victim)) << 20)  # a digest of its own
    proc = subprocess.Popen([BIN / "faasctl", "new", "big", "-f", tmp_path / "big.tar"],
                            env=platform.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    def staging() -> list[str]:
        return [n for n in os.listdir(images_dir(platform)) if n.startswith(".staging")]
    poll("extraction under way", staging, 30, interval=0.02)
    os.kill(platform.status()[victim]["pid"], signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    platform.wait_healthy()
    poll("no spool, staging or incoming left", lambda: leftovers(platform) == [], 20)
    assert functions(platform) == before


def interface_addresses(platform) -> set[str]:
    out = run(*platform.netns.argv("ip", "-6", "-j", "addr", "show", "dev", platform.interface),
              check=False)
    if out.returncode != 0:
        return set()
    return {a["local"] for link in json.loads(out.stdout) for a in link["addr_info"]
            if a["local"].startswith("fd00:faa5:1:")}


def test_function_addresses_follow_the_state(platform, tmp_path):
    platform.wait_healthy()
    image(tmp_path / "img.tar", b"addr")
    address = faasctl_json(platform, "new", "addr", "-f", tmp_path / "img.tar")[0]["address"]
    poll("the address on the interface", lambda: address in interface_addresses(platform), 5)
    assert interface_addresses(platform) == {f["address"] for f in functions(platform).values()}
    # netagent killed: its wireguard-go dies with it, the next netagent rebuilds it all
    os.kill(platform.status()["netagent"]["pid"], signal.SIGKILL)
    poll("the address back", lambda: address in interface_addresses(platform), 5)
    zone = platform.root / "dns" / "faas.db"
    poll("the name in the zone", lambda: f"addr IN AAAA {address}" in zone.read_text(), 5)
    platform.faasctl("rm", "addr")
    poll("the address gone", lambda: address not in interface_addresses(platform), 5)
    poll("the name gone", lambda: "addr IN AAAA" not in zone.read_text(), 5)


def test_netagent_refuses_an_address_outside_the_prefix(platform):
    from test_platform import raw_request

    from common import protocol
    platform.wait_healthy()
    before = interface_addresses(platform)
    reply = raw_request(platform.run_dir / "netagent.sock", [protocol.make_request(
        "sync", {"generation": 99, "state": {"addresses": ["fd00:faa5:1::a", "2001:db8::1"]}},
        "t1")])
    assert not reply.ok and reply.error.code is Code.FORBIDDEN
    assert "not a function address of the function prefix" in reply.error.message
    assert interface_addresses(platform) == before


def test_logs_go_with_the_function(platform, image_tar):
    """A removed function's log is deleted, a request in flight at the time included, and
    a new function of the same name never shows what the old one wrote."""
    from test_invoke import get
    platform.wait_healthy()
    address = faasctl_json(platform, "new", "reborn", "-f", image_tar)[0]["address"]
    slow = subprocess.Popen(platform.netns.argv(
        "curl", "-s", "-g", "-m", "20", "-o", "/dev/null", "-w", "%{http_code}",
        f"http://[{address}]/slow"), stdout=subprocess.PIPE, text=True)
    assert get(platform, address, "/")[0] == 200

    def requests() -> list[str]:
        out = platform.faasctl("--json", "logs", "reborn")
        return [line for line in (json.loads(x)["line"] for x in out.stdout.splitlines())
                if line.startswith("request ")]
    old = poll("both requests in the log", lambda: len(requests()) == 2 and requests(), 10)
    platform.faasctl("rm", "reborn")
    slow.communicate(timeout=30)  # (its address left with the function: no answer)
    platform.wait_healthy()  # a request in flight at rm upsets nothing
    logfile = platform.root / "logs" / "functions" / "reborn.log"
    poll("the log deleted", lambda: not logfile.exists(), 10)
    out = platform.faasctl("logs", "reborn", check=False)
    assert out.returncode == EXIT_STATUS[Code.NOT_FOUND]
    address = faasctl_json(platform, "new", "reborn", "-f", image_tar)[0]["address"]
    assert get(platform, address, "/")[0] == 200
    new = poll("the new function's line", requests, 10)
    assert len(new) == 1 and not set(new) & set(old), (old, new)


def call(platform, op: str, args: dict):
    """One controller request from this process (as root), by a connection of its own."""
    from test_platform import raw_request

    from common import protocol
    return raw_request(platform.run_dir / "controller.sock",
                       [protocol.make_request(op, args, protocol.new_id())])


def test_a_trickling_upload_is_dropped_while_a_steady_one_goes_on(platform):
    """One byte now and then resets no timer: under upload_min_rate over a window, the
    upload is dropped with its bytes; a steady upload at the same time is not."""
    platform.wait_healthy()
    slow = call(platform, "upload_begin", {"name": "trickle", "tag": None}).result["upload"]
    steady = call(platform, "upload_begin", {"name": "steady", "tag": None}).result["upload"]
    sent = {slow: 0, steady: 0}

    def send(upload: str, data: bytes):
        reply = call(platform, "upload_chunk", {"upload": upload, "offset": sent[upload],
                                                "data": data})
        if reply.ok:
            sent[upload] += len(data)
        return reply

    def trickle_refused():
        steady_reply = send(steady, bytes(64 << 10))  # 256 KiB/s
        assert steady_reply.ok, steady_reply.error
        reply = send(slow, b"x")  # 4 bytes/s, the idle timer (2 s) never fires
        return None if reply.ok else reply.error
    error = poll("the trickle dropped", trickle_refused, 15, interval=0.25)
    assert error.code is Code.NOT_FOUND and "upload_min_rate" in error.message, error
    assert sent[slow] >= 4  # it did send now and then, and was still dropped
    assert send(steady, bytes(64 << 10)).ok
    assert call(platform, "upload_abort", {"upload": steady}).ok
    assert leftovers(platform) == []


def begin_as(platform, uid: int, gid: int, groups: list[int], name: str) -> dict:
    """upload_begin sent by a process of another user: its reply as JSON."""
    script = ("import json, sys; sys.path[:0] = sys.argv[2:]\n"
              "from test_platform import raw_request\nfrom common import protocol\n"
              "r = raw_request(sys.argv[1], [protocol.make_request('upload_begin', "
              f"{{'name': {name!r}, 'tag': None}}, protocol.new_id())])\n"
              "print(json.dumps({'ok': r.ok, 'result': r.result, "
              "'error': r.error and r.error.to_wire()}))")
    here = Path(__file__).parent
    out = run("setpriv", f"--reuid={uid}", f"--regid={gid}",
              "--groups=" + ",".join(map(str, groups)), BIN / "python", "-c", script,
              platform.run_dir / "controller.sock", here, here.parents[1])
    return json.loads(out.stdout)


def test_upload_slots_are_per_calling_user(platform):
    """A user with upload_slots_per_user uploads open is refused another; another user
    (told apart by the kernel's peer credentials, not by anything sent) is not."""
    import grp
    platform.wait_healthy()
    mine = [call(platform, "upload_begin", {"name": f"mine{i}", "tag": None}).result["upload"]
            for i in range(2)]
    refused = call(platform, "upload_begin", {"name": "mine2", "tag": None})
    assert not refused.ok and refused.error.code is Code.UNAVAILABLE
    assert "too many uploads in progress for you: 2" in refused.error.message
    faas = grp.getgrnam("faas").gr_gid
    other = begin_as(platform, 65534, 65534, [faas], "theirs")
    assert other["ok"], other
    for upload in mine + [other["result"]["upload"]]:
        assert call(platform, "upload_abort", {"upload": upload}).ok
    assert leftovers(platform) == []
