"""Secrets end to end: stored by root, a 0400 file of the container's user at
/run/secrets/NAME on a tmpfs, never printed anywhere, rotated for the next container,
and refused where they would break something."""

from __future__ import annotations

import base64
import gzip
import json
import os
import secrets
import signal
import stat
import tarfile
from pathlib import Path

import pytest
from harness import BIN, deploy, poll, run
from harness import http_get as get

from tests.imagebuild import Dir, File, build_image

USER = 4321  # the image's USER: the secret's copy must be this user's


@pytest.fixture(scope="module", params=["runc", "crun"])
def platform_config(request) -> str:
    """Every test runs on both OCI runtimes: a platform each."""
    return f'runtime = "{request.param}"\n'


@pytest.fixture(scope="module")
def user_image(tmp_path_factory, handler_binary) -> Path:
    """The test handler running as uid:gid 4321:4322, not root."""
    path = tmp_path_factory.mktemp("secret-image") / "handler.tar"
    build_image(path, [[Dir("tmp", mode=0o1777), File("handler", handler_binary, mode=0o755)]],
                {"config": {"Cmd": ["/handler"], "User": f"{USER}:{USER + 1}"}})
    return path


def new_value() -> str:
    return f"sv-{secrets.token_hex(16)}"


def api(platform, method: str, path: str, *args: str) -> tuple[int, str]:
    out = run(*platform.netns.argv("curl", "-s", "-X", method, "-w", "\n%{http_code}", *args,
                                   f"http://127.0.0.1:8080{path}"), check=False)
    body, _, code = out.stdout.rpartition("\n")
    return int(code or 0), body


def everything_printed(platform, names: list[str]) -> str:
    """Every output the platform gives about these functions and secrets, and every log."""
    texts = []
    for args in (("list",), ("--json", "list"), ("secret", "list"), ("--json", "secret", "list"),
                 ("status",), ("--json", "top"), *((c, n) for n in names
                                                    for c in ("info", "versions")),
                 *(("--json", "info", n) for n in names), *(("logs", n) for n in names)):
        out = platform.faasctl(*args)  # each must work: an empty output proves nothing
        texts += [out.stdout, out.stderr]
    for path in ("/api/list", "/api/secrets", "/api/status", "/metrics",
                 *(f"/api/functions/{n}{tail}" for n in names
                   for tail in ("", "/settings", "/versions", "/logs"))):
        code, body = api(platform, "GET", path)
        assert code == 200, (path, body)
        texts.append(body)
    logs = [p for p in platform.base.rglob("*.log") if p.is_file()]
    assert any(p.name == "supervisord.log" for p in logs) and any(
        p.parent.name == "functions" for p in logs)
    texts += [p.read_text(errors="replace") for p in logs]
    state = platform.root / "state"
    texts += [p.read_bytes().decode("latin-1") for p in state.iterdir() if p.is_file()]
    return "\n".join(texts)


def test_a_secret_is_the_container_users_file_and_printed_nowhere(platform, user_image):
    value = new_value()
    platform.faasctl("secret", "create", "db", input=value)
    address = deploy(platform, user_image, "sec", "secrets=db")
    code, body = get(platform, address, "/secret/db")
    assert code == 200, body
    uid, gid, mode, writable, seen = body.split(" ", 4)
    assert (int(uid), int(gid), mode, writable, seen) == (USER, USER + 1, "400", "ro", value)
    # root's copy: 0600 in a 0700 directory of root's; none in the controller's database
    store = platform.root / "secrets"
    st, dst = os.stat(store / "db"), os.stat(store)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    assert (dst.st_uid, stat.S_IMODE(dst.st_mode)) == (0, 0o700)
    # the copies live on a tmpfs, and only while their container does
    copies = platform.run_dir / "secrets"
    assert any(line.split()[4] == str(copies) and " - tmpfs " in line
               for line in open("/proc/self/mountinfo"))
    poll("the finished container's copies removed",
         lambda: not [c for c in os.listdir(copies) if c.startswith("sec-")], 10)
    # listed by name and size, never by value: and nowhere else either
    listed = json.loads(platform.faasctl("--json", "secret", "list").stdout)["secrets"]
    assert listed == [{"name": "db", "size": len(value), "updated": listed[0]["updated"],
                       "functions": ["sec"]}]
    printed = everything_printed(platform, ["sec"])
    assert "secret_stored" in printed and '"sec"' in printed and "request " in printed
    assert value not in printed


def test_a_rotated_secret_reaches_the_next_container(platform, user_image):
    first, second = new_value(), new_value()
    platform.faasctl("secret", "create", "api", input=first)
    address = deploy(platform, user_image, "rot", "secrets=api", "reuse=true", "min_warm=1")
    assert get(platform, address, "/secret/api")[1].endswith(f" {first}")
    code, body = api(platform, "PUT", "/api/secrets/api", "-H",
                     "Content-Type: application/octet-stream", "--data-binary", second)
    assert code == 200 and json.loads(body) == {**json.loads(body), "name": "api",
                                                "size": len(second)}
    assert second not in body
    # warm and reused containers were started with the old value: none of them serves
    for _ in range(3):
        assert get(platform, address, "/secret/api")[1].endswith(f" {second}")
    assert first not in everything_printed(platform, ["rot"])
    assert second not in everything_printed(platform, ["rot"])


def test_unknown_secrets_in_set_are_refused_and_change_nothing(platform, image_tar):
    deploy(platform, image_tar, "plain")
    before = platform.faasctl("--json", "info", "plain").stdout
    out = platform.faasctl("set", "plain", "secrets=nope,other", "memory=64M", check=False)
    assert out.returncode == 3, out.stderr
    assert "no secret named nope, other" in out.stderr
    assert platform.faasctl("--json", "info", "plain").stdout == before
    code, body = api(platform, "PATCH", "/api/functions/plain/settings", "-H",
                     "Content-Type: application/json", "-d", '{"secrets": "nope"}')
    assert code == 404 and json.loads(body)["error"]["details"]["secrets"] == ["nope"]
    assert platform.faasctl("--json", "info", "plain").stdout == before


def test_rm_of_a_secret_in_use_is_refused_naming_the_functions(platform, image_tar):
    platform.faasctl("secret", "create", "shared", input=new_value())
    deploy(platform, image_tar, "user-a", "secrets=shared")
    deploy(platform, image_tar, "user-b", "secrets=shared")
    out = platform.faasctl("secret", "rm", "shared", check=False)
    assert out.returncode != 0 and "used by user-a, user-b" in out.stderr, out.stderr
    code, body = api(platform, "DELETE", "/api/secrets/shared", "-H",
                     "Content-Type: application/json")
    assert code == 409 and json.loads(body)["error"]["details"]["functions"] == [
        "user-a", "user-b"]
    assert (platform.root / "secrets" / "shared").exists()
    platform.faasctl("set", "user-a", "secrets=")
    platform.faasctl("rm", "user-b")
    platform.faasctl("secret", "rm", "shared")
    assert not (platform.root / "secrets" / "shared").exists()
    out = platform.faasctl("secret", "rm", "shared", check=False)
    assert out.returncode == 3 and "no secret shared" in out.stderr


def test_a_missing_secret_fails_that_start_only_naming_it(platform, image_tar, user_image):
    platform.faasctl("secret", "create", "gone", input=new_value())
    broken = deploy(platform, user_image, "broken", "secrets=gone")
    healthy = deploy(platform, image_tar, "healthy")
    os.unlink(platform.root / "secrets" / "gone")  # as after a restore without secrets
    code, _ = get(platform, broken, "/secret/gone")
    assert code in (0, 502, 503)
    poll("the runner's log names the missing secret", lambda: any(
        "secret gone is not stored" in str(line.get("error", ""))
        for line in platform.log_lines("runner")), 10)
    assert get(platform, healthy, "/")[0] == 200


def test_a_killed_runner_leaves_no_copies_and_serves_secrets_again(platform, user_image):
    value = new_value()
    platform.faasctl("secret", "create", "warm", input=value)
    address = deploy(platform, user_image, "warmfn", "secrets=warm", "min_warm=2")
    copies = platform.run_dir / "secrets"

    def mine() -> set[str]:
        return {c for c in os.listdir(copies) if c.startswith("warmfn-")}

    poll("two warm containers with their copies", lambda: len(mine()) == 2, 15)
    before = mine()
    runner = platform.status()["runner"]
    os.kill(runner["pid"], signal.SIGKILL)
    poll("the runner back and synced", lambda: platform.status()["runner"]["boot_id"]
         != runner["boot_id"] and platform.healthy(), 30)
    poll("the dead runner's copies removed", lambda: not before & mine(), 15)
    assert get(platform, address, "/secret/warm")[1].endswith(f" {value}")
    runtime = "crun" if "crun" in platform.config else "runc"

    def live() -> set[str]:
        out = run(runtime, "--root", platform.run_dir / runtime, "list", "-q", check=False)
        return set(out.stdout.split())

    poll("every copy belongs to a live container", lambda: mine() and mine() <= live(), 15)


def test_a_backup_holds_secrets_only_with_the_flag_and_says_so(platform, tmp_path):
    value = new_value()
    platform.faasctl("secret", "create", "kept", input=value)
    plain, full = tmp_path / "plain.tar.gz", tmp_path / "full.tar.gz"
    out = run(BIN / "faasctl", "backup", plain, env=platform.env)
    assert "not in it" in out.stdout and value not in out.stdout
    assert value.encode() not in gzip.decompress(plain.read_bytes())
    out = run(BIN / "faasctl", "backup", "--with-secrets", full, env=platform.env)
    assert "holds the values of" in out.stdout and "kept" in out.stdout
    assert value not in out.stdout + out.stderr
    assert stat.S_IMODE(full.stat().st_mode) == 0o600
    with tarfile.open(full, "r:gz") as tf:
        member = tf.getmember("secrets.json")
        doc = json.loads(tf.extractfile(member).read())
    assert member.mode == 0o600
    assert base64.b64decode(doc["secrets"]["kept"]).decode() == value
