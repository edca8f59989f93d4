"""Who may use a real controller's HTTP API, with curl as real users in its namespace.

The routes come from docs/openapi.json: a user outside the faas group gets 403 on every
one and the state does not change; a throwaway user whose only tie to faas is a
supplementary group (useradd -G faas) gets through, as does root; the unix socket in
$FAAS_RUN serves operators; with http_listen_vpn the server's VPN address serves tokens
only; the guide's plain curl deploy works; a browser-style cross-site request does not.
"""

from __future__ import annotations

import grp
import json
import pwd
import secrets
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from harness import poll, run

from tests import openapi_check as oc

SPEC = oc.load()
API = "http://127.0.0.1:8080"
VPN_API = "http://[fd00:faa5:0:100::1]:8080"
NAME = "acl-fn"
BODIES = {  # a valid body for each operation that takes one
    ("POST", "/api/functions/{name}/rollback"): {"version": 1},
    ("PATCH", "/api/functions/{name}/settings"): {"memory": "256M"},
    ("POST", "/api/functions/{name}/settings"): {"memory": "256M"},
    ("POST", "/api/peers"): {"name": "intruder"},
    ("POST", "/api/tokens"): {"name": "intruder", "role": "admin"},
}


@pytest.fixture(scope="module")
def platform_config() -> str:
    return 'vpn_endpoint = "[fdff:1::1]:51820"\nhttp_listen_vpn = true\n'


@pytest.fixture(scope="module")
def member() -> Iterator[pwd.struct_passwd]:
    """A throwaway user in group faas by a supplementary group only, removed after."""
    name = f"faasit{secrets.token_hex(3)}"
    run("useradd", "--system", "--no-create-home", "--no-user-group", "--gid", "nogroup",
        "--groups", "faas", "--shell", "/usr/sbin/nologin", name)
    try:
        yield pwd.getpwnam(name)
    finally:
        run("userdel", name, check=False)


def curl(platform, method: str, url: str, *, user: tuple[int, int, str] | None = None,
         body: Any = None, headers: tuple[str, ...] = (), file: Any = None,
         unix: str | None = None) -> tuple[int, Any]:
    """One request with curl in the platform's namespace, as ``user`` (uid, gid, groups
    option of setpriv) or root; (status, decoded JSON body)."""
    argv: list[Any] = ["curl", "-s", "-m", "120", "-o", "-", "-w", "\n%{http_code}",
                       "-X", method]
    for header in headers:
        argv += ["-H", header]
    data = None
    if unix is not None:
        argv += ["--unix-socket", unix]
    if file is not None:
        argv += ["--data-binary", f"@{file}"]
    elif body is not None:
        data = json.dumps(body).encode()
        argv += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
    elif method in ("POST", "PUT", "PATCH", "DELETE"):
        argv += ["-H", "Content-Type: application/json"]
    argv.append(url)
    if user is not None:
        uid, gid, groups = user
        argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", groups, *argv]
    out = subprocess.run(platform.netns.argv(*argv), input=data, capture_output=True,
                         timeout=180, check=False)
    assert out.returncode == 0, out.stderr
    text, _, status = out.stdout.decode().rpartition("\n")
    return int(status), json.loads(text) if text else None


def state(platform) -> dict[str, Any]:
    """What an operator sees of everything an intruder might change."""
    got = {}
    for what in ("list", "vpn list", "token list"):
        got[what] = json.loads(platform.faasctl("--json", *what.split()).stdout)
    for fn in got["list"]["functions"]:
        got[fn["name"]] = json.loads(platform.faasctl("--json", "info", fn["name"]).stdout)
    return got


def operations() -> list[tuple[str, str]]:
    return sorted(oc.operations(SPEC))


def test_guides_curl_deploys_as_root(platform, image_tar):
    platform.wait_healthy()
    status, body = curl(platform, "POST", f"{API}/api/new", file=image_tar,
                        headers=(f"X-Image-Name: {NAME}",))
    assert status == 200 and body["name"] == NAME, body
    status, body = curl(platform, "POST", f"{API}/api/new", file=image_tar,
                        headers=(f"X-Image-Name: {NAME}",))
    assert status == 200 and body["version"] == 2, body


def test_nobody_gets_403_on_every_route_and_nothing_changes(platform, image_tar):
    nobody = (pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid,
              "--clear-groups")
    before = state(platform)
    for method, template in operations():
        url = API + template.replace("{name}", NAME if "/functions/" in template else "ci")
        extra = {"file": image_tar, "headers": (f"X-Image-Name: {NAME}",)} \
            if template == "/api/new" else {"body": BODIES.get((method, template))}
        status, body = curl(platform, method, url, user=nobody, **extra)
        assert status == 403, (method, template, body)
        assert "not root or in group faas" in body["error"]["message"], body
    assert state(platform) == before


def test_a_supplementary_member_and_root_may(platform, member):
    as_member = (member.pw_uid, member.pw_gid, "--clear-groups")  # the kernel never says
    for user in (as_member, None):
        status, body = curl(platform, "GET", f"{API}/api/functions/{NAME}/versions",
                            user=user)
        assert status == 200 and len(body["versions"]) == 2, body
    status, body = curl(platform, "POST", f"{API}/api/functions/{NAME}/rollback",
                        user=as_member, body={"version": 1})
    assert status == 200 and body["version"] == 1, body


def test_unix_socket(platform, member):
    sock = str(platform.run_dir / "http.sock")
    status, body = curl(platform, "GET", "http://faasd/api/list", unix=sock)
    assert status == 200 and [f["name"] for f in body] == [NAME]
    as_member = (member.pw_uid, member.pw_gid, "--groups=" + str(grp.getgrnam("faas").gr_gid))
    status, body = curl(platform, "GET", "http://faasd/api/list", unix=sock, user=as_member)
    assert status == 200, body


def test_tokens_over_the_vpn_address(platform):
    poll("the VPN address up", lambda: curl(platform, "GET", f"{VPN_API}/healthz")[0] == 401,
         30)
    status, body = curl(platform, "GET", f"{VPN_API}/api/list")
    assert status == 401 and body["error"]["code"] == "unauthorized"
    out = platform.faasctl("token", "create", "laptop", "--role", "deploy",
                           "--expires", "1d")
    token = out.stdout.strip()
    assert token.startswith("faas_") and "store it now" in out.stderr
    auth = (f"Authorization: Bearer {token}",)
    status, body = curl(platform, "GET", f"{VPN_API}/api/functions/{NAME}", headers=auth)
    assert status == 200 and body["name"] == NAME
    status, body = curl(platform, "POST", f"{VPN_API}/api/functions/{NAME}/rollback",
                        headers=auth, body={"version": 2})
    assert status == 200 and body["version"] == 2
    status, body = curl(platform, "POST", f"{VPN_API}/api/peers", headers=auth,
                        body={"name": "sneaky"})
    assert status == 403 and body["error"]["details"]["reason"] == "role"
    listed = json.loads(platform.faasctl("--json", "token", "list").stdout)["tokens"]
    assert [t["name"] for t in listed] == ["laptop"] and listed[0]["last_used"] is not None
    platform.faasctl("token", "rm", "laptop")
    status, _ = curl(platform, "GET", f"{VPN_API}/api/list", headers=auth)
    assert status == 401
    logs = (platform.root / "logs" / "controller.log").read_text()
    assert token not in logs


def test_cross_site_requests_fail_even_for_root(platform):
    for headers in (("Host: attacker.example:8080",),
                    ("Origin: http://attacker.example",)):
        status, body = curl(platform, "DELETE", f"{API}/api/functions/{NAME}",
                            headers=headers)
        assert status == 403, body
    # a form post: text/plain, no custom header
    out = subprocess.run(platform.netns.argv(
        "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
        "-H", "Content-Type: text/plain", "--data", "x",
        f"{API}/api/functions/{NAME}/rollback"), capture_output=True, text=True, check=False)
    assert out.stdout == "403"
    assert json.loads(platform.faasctl("--json", "info", NAME).stdout)["version"] == 2
