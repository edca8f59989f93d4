"""faasctl backup on a running server, restore on a fresh install, end to end.

The old server deploys two functions (one of them twice) and adds a VPN peer; its
backup is restored into a second instance in a new network namespace with an empty
root, as on a new machine. After `faasd up` every function, address, peer and the
server's WireGuard key are back; the functions answer once their images are redeployed.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from harness import BIN, Netns, Platform, poll, run

from tests.imagebuild import Dir, File, build_image

DNS = "fd00:faa5:0:100::1"


@pytest.fixture(scope="module")
def platform_config() -> str:
    return 'vpn_endpoint = "[fdff:1::1]:51820"\n'


@pytest.fixture(scope="module")
def second_image(tmp_path_factory, handler_binary) -> Path:
    """The test handler again, with one more file: another digest."""
    path = tmp_path_factory.mktemp("image2") / "second.tar"
    build_image(path, [[Dir("tmp", mode=0o1777), File("handler", handler_binary, mode=0o755),
                        File("marker", b"second")]], {"config": {"Cmd": ["/handler"]}})
    return path


def deploy(platform: Platform, name: str, image: Path) -> dict:
    return json.loads(platform.faasctl("--json", "new", name, "-f", image).stdout)


def functions(platform: Platform) -> dict[str, str]:
    listed = json.loads(platform.faasctl("--json", "list").stdout)["functions"]
    return {f["name"]: f["address"] for f in listed}


def peers(platform: Platform) -> list[tuple[str, str, str]]:
    listed = json.loads(platform.faasctl("--json", "vpn", "list").stdout)["peers"]
    return [(p["name"], p["address"], p["public_key"]) for p in listed]


def wg(platform: Platform, *args: str) -> str:
    return run(*platform.netns.argv("wg", "show", platform.interface, *args)).stdout.strip()


def curl(platform: Platform, address: str) -> tuple[int, str]:
    out = run(*platform.netns.argv("curl", "-s", "-g", "-m", "5", "-o", "-", "-w",
                                   "\n%{http_code}", f"http://[{address}]/"), check=False)
    body, _, code = out.stdout.rpartition("\n")
    return int(code or 0), body


def dig(platform: Platform, name: str) -> str:
    return run(*platform.netns.argv("dig", "+short", "+time=1", "+tries=1", "AAAA", name,
                                    f"@{DNS}"), check=False).stdout.strip()


def answers(platform: Platform, address: str) -> bool:
    code, body = curl(platform, address)
    return code == 200 and body.startswith("ok ")


def faasctl_in(platform: Platform, *args) -> subprocess.CompletedProcess[str]:
    """faasctl run as root in the platform's namespace (restore looks for the interface)."""
    return run(*platform.netns.argv(BIN / "faasctl", *args), env=platform.env, check=False)


def down(platform: Platform) -> None:
    """`faasd down`: supervisord stopped, the interface and its chains removed."""
    platform.stop()
    run(*platform.netns.argv(BIN / "faasd", "down"), env=platform.env)


@pytest.fixture
def fresh(platform):
    """A second instance on a "new machine": its own namespace, nothing on disk yet."""
    ns = Netns("faas-new")
    p = Platform(ns, platform.config)
    yield p
    try:
        down(p)
    finally:
        p.remove()
        left = ns.delete()
        assert not left, f"processes left in {ns.name}: {left}"


def test_restore_on_a_fresh_install_brings_everything_back(platform, fresh, image_tar,
                                                           second_image, tmp_path):
    platform.wait_healthy()
    old_alpha = deploy(platform, "alpha", second_image)
    alpha = deploy(platform, "alpha", image_tar)
    beta = deploy(platform, "beta", second_image)
    assert alpha["version"] == 2 and old_alpha["digest"] == beta["digest"] != alpha["digest"]
    client_key = run("wg", "pubkey", input=run("wg", "genkey").stdout).stdout.strip()
    platform.faasctl("vpn", "add", "laptop", "--public-key", client_key)
    poll("the peer on the interface", lambda: client_key in wg(platform, "peers"), 10)
    before = {"functions": functions(platform), "peers": peers(platform),
              "server_key": wg(platform, "public-key")}
    assert curl(platform, alpha["address"])[0] == 200

    archive = tmp_path / "backups" / "faasd.tar.gz"
    archive.parent.mkdir()
    out = run(BIN / "faasctl", "backup", archive, env=platform.env)
    assert alpha["digest"] in out.stdout and beta["digest"] in out.stdout
    assert archive.stat().st_mode & 0o777 == 0o600

    # The old server still runs: restoring onto it is refused, and changes nothing.
    refused = faasctl_in(platform, "restore", archive)
    assert refused.returncode == 4 and "faasd down" in refused.stderr
    down(platform)

    restored = faasctl_in(fresh, "restore", archive)
    assert restored.returncode == 0, restored.stderr
    text = restored.stdout
    assert alpha["digest"] in text and beta["digest"] in text
    assert "faasctl new alpha -f IMAGE.tar" in text and "faasctl new beta -f IMAGE.tar" in text
    assert f"Server public key: {before['server_key']}" in text
    again = faasctl_in(fresh, "restore", archive)
    assert again.returncode == 4 and "--force" in again.stderr

    fresh.start()
    fresh.wait_healthy(30)
    assert functions(fresh) == before["functions"]
    assert peers(fresh) == before["peers"]
    assert wg(fresh, "public-key") == before["server_key"]
    poll("the peer's /128 on the new interface",
         lambda: f"{client_key}\t{before['peers'][0][1]}/128" in wg(fresh, "allowed-ips"), 10)
    zone_text = (fresh.root / "dns" / "faas.db").read_text()
    for name, address in before["functions"].items():
        assert re.search(rf"^{name} IN AAAA {re.escape(address)}$", zone_text, re.MULTILINE)
    poll("beta.faas from the restored DNS",
         lambda: dig(fresh, "beta.faas") == beta["address"], 15)

    # No image yet: the runner answers 502 for the function and keeps running.
    runner = fresh.status()["runner"]["pid"]
    assert curl(fresh, alpha["address"])[0] == 502
    assert fresh.status()["runner"]["pid"] == runner

    # The same image again: the same digest, a new version, the old address answers.
    for name, image, old in (("alpha", image_tar, alpha), ("beta", second_image, beta)):
        again = deploy(fresh, name, image)
        assert (again["digest"], again["address"]) == (old["digest"], old["address"])
        assert again["version"] == old["version"] + 1
        poll(f"{name} answering on its old address",
             lambda address=old["address"]: answers(fresh, address), 30)
    assert functions(fresh) == before["functions"]
