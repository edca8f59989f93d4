"""The HTTP API of a real controller, checked answer by answer against docs/openapi.json.

curl runs inside the platform's namespace against http://127.0.0.1:8080, as an operator
on that host would: deploy, versions, rollback, settings, logs, peers, status, metrics,
removal, and refusals. Every answer must have a documented status and fit the documented
schema; the last test checks that every documented operation was exercised here.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from typing import Any

import pytest
from harness import run

from controller.main import Controller
from tests import openapi_check as oc

SPEC = oc.load()
API = "http://127.0.0.1:8080"
NAME = "api-fn"
COVERED: set[tuple[str, str]] = set()


@pytest.fixture(scope="module")
def platform_config() -> str:
    return 'vpn_endpoint = "[fdff:1::1]:51820"\n'


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    value: Any  # the decoded body, checked against the document


def call(platform, method: str, path: str, body: Any = None, *, file=None,
         raw: bytes | None = None, headers: tuple[str, ...] = (),
         chunked: bool = False) -> Answer:
    """One request with curl in the platform's namespace; the answer checked against the
    document (the operation's own responses, or the shared ones for unknown paths and
    wrong methods)."""
    argv = ["curl", "-s", "-i", "-m", "120", "-X", method]
    for header in headers:
        argv += ["-H", header]
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
    if file is not None:  # as the guide does it: curl's default (form) Content-Type
        argv += ["--data-binary", f"@{file}"]
    elif data is not None:
        if not any(h.lower().startswith("content-type:") for h in headers):
            argv += ["-H", "Content-Type: application/json"]
        argv += ["--data-binary", "@-"]
    elif method in ("POST", "PUT", "PATCH", "DELETE"):
        argv += ["-H", "Content-Type: application/json"]  # a form could not send it
    if chunked:
        argv += ["-H", "Transfer-Encoding: chunked"]
    argv.append(API + path)
    out = subprocess.run(platform.netns.argv(*argv), input=data, capture_output=True,
                         timeout=180, check=False)
    assert out.returncode == 0, out.stderr
    status, answer_headers, payload = parse(out.stdout)
    assert answer_headers["x-request-id"]
    ctype = answer_headers.get("content-type", "")
    template = oc.template_of(SPEC, path)
    if template is None:
        assert status == 404
        value = oc.check_generic(SPEC, "NotFound", status, ctype, payload)
    elif (method, template) not in oc.operations(SPEC):
        assert status == 405
        value = oc.check_generic(SPEC, "MethodNotAllowed", status, ctype, payload)
    else:
        value = oc.check_answer(SPEC, method, template, status, ctype, payload)
        COVERED.add((method, template))
    return Answer(status, answer_headers, payload, value)


def parse(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """curl -i output: interim 1xx answers skipped, then the status, headers and body."""
    while True:
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        if status >= 200:
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (line.partition(":") for line in lines[1:])}
            assert int(headers["content-length"]) == len(data)
            return status, headers, data


def ok(answer: Answer) -> Any:
    assert answer.status == 200, answer.body
    return answer.value


def refused(answer: Answer, status: int, code: str) -> dict[str, Any]:
    assert answer.status == status, answer.body
    assert answer.value["error"]["code"] == code, answer.value
    return answer.value["error"]


def faasctl_json(platform, *args) -> Any:
    return json.loads(platform.faasctl("--json", *args).stdout)


def test_health_and_status(platform):
    platform.wait_healthy()
    assert ok(call(platform, "GET", "/healthz")) == {"ok": True}
    status = ok(call(platform, "GET", "/api/status"))
    assert status["processes"][0]["name"] == "controller"
    assert {p["name"] for p in status["processes"]} == {"controller", "netagent", "dnsagent",
                                                        "runner"}


def test_deploy_twice_and_list(platform, image_tar):
    platform.wait_healthy()
    first = ok(call(platform, "POST", "/api/new", file=image_tar,
                    headers=(f"X-Image-Name: {NAME}",)))
    assert first["name"] == NAME and first["version"] == 1 and first["reused"] is False
    second = ok(call(platform, "POST", "/api/new", file=image_tar, chunked=True,
                     headers=(f"X-Image-Name: {NAME}",)))
    assert second["version"] == 2 and second["reused"] is True
    assert second["address"] == first["address"] and second["digest"] == first["digest"]
    listed = ok(call(platform, "GET", "/api/list"))
    assert [f["version"] for f in listed if f["name"] == NAME] == [2]
    info = ok(call(platform, "GET", f"/api/functions/{NAME}"))
    assert [v["version"] for v in info["versions"]] == [1, 2]
    assert info == faasctl_json(platform, "info", NAME)  # the same op answers both


def test_versions_and_rollback(platform):
    versions = ok(call(platform, "GET", f"/api/functions/{NAME}/versions"))
    assert [(v["version"], v["current"]) for v in versions["versions"]] == [(1, False),
                                                                           (2, True)]
    assert ok(call(platform, "POST", f"/api/functions/{NAME}/rollback"))["version"] == 1
    assert faasctl_json(platform, "versions", NAME)["versions"][0]["current"] is True
    assert ok(call(platform, "POST", f"/api/functions/{NAME}/rollback",
                   {"version": 2}))["version"] == 2
    missing = call(platform, "POST", f"/api/functions/{NAME}/rollback", {"version": 9})
    assert refused(missing, 404, "not_found")["details"] == {"versions": [1, 2]}
    refused(call(platform, "POST", f"/api/functions/{NAME}/rollback", {"version": "1"}),
            400, "bad_request")
    refused(call(platform, "POST", f"/api/functions/{NAME}/rollback", raw=b"{"),
            400, "bad_request")
    assert faasctl_json(platform, "info", NAME)["version"] == 2


def test_settings(platform):
    before = ok(call(platform, "GET", f"/api/functions/{NAME}/settings"))["settings"]
    assert before == faasctl_json(platform, "info", NAME)["settings"]
    changed = ok(call(platform, "PATCH", f"/api/functions/{NAME}/settings",
                      {"memory": "256M", "env.GREETING": "hello"}))["settings"]
    assert changed["memory"] == 256 << 20 and changed["env"] == {"GREETING": "hello"}
    again = ok(call(platform, "POST", f"/api/functions/{NAME}/settings",
                    {"reuse": "true", "env.GREETING": ""}))["settings"]
    assert again["reuse"] is True and again["env"] == {} and again["memory"] == 256 << 20
    assert faasctl_json(platform, "info", NAME)["settings"] == again
    refused(call(platform, "PATCH", f"/api/functions/{NAME}/settings", {"nosuch": "1"}),
            400, "bad_request")
    refused(call(platform, "PATCH", f"/api/functions/{NAME}/settings", {"memory": 256}),
            400, "bad_request")
    refused(call(platform, "PATCH", f"/api/functions/{NAME}/settings",
                 raw=json.dumps({"env.X": "x" * (1 << 20)}).encode()), 413, "too_large")
    assert faasctl_json(platform, "info", NAME)["settings"] == again


def test_logs(platform):
    logs = ok(call(platform, "GET", f"/api/functions/{NAME}/logs?since=0&offset=0"))
    assert isinstance(logs["lines"], list) and logs["offset"] >= 0
    refused(call(platform, "GET", f"/api/functions/{NAME}/logs?offset=x"), 400, "bad_request")


def test_peers(platform):
    made = ok(call(platform, "POST", "/api/peers", {"name": "laptop"}))
    assert made["private_key_included"] is True and "PrivateKey = " in made["config"]
    assert "Endpoint = [fdff:1::1]:51820" in made["config"] and made["state"] == "enabled"
    private = run("wg", "genkey").stdout
    public = run("wg", "pubkey", input=private).stdout.strip()
    own = ok(call(platform, "POST", "/api/peers", {"name": "desk", "public_key": public,
                                                   "expires": "7d"}))
    assert own["private_key_included"] is False and own["public_key"] == public
    assert own["expires"] is not None and "PrivateKey = " not in own["config"]
    refused(call(platform, "POST", "/api/peers", {"name": "laptop"}), 409, "conflict")
    refused(call(platform, "POST", "/api/peers", {"name": "x", "public_key": "nope"}),
            400, "bad_request")
    peers = ok(call(platform, "GET", "/api/peers"))["peers"]
    assert [p["name"] for p in peers] == ["desk", "laptop"]
    assert ok(call(platform, "POST", "/api/peers/laptop/disable"))["state"] == "disabled"
    states = {p["name"]: p["state"] for p in faasctl_json(platform, "vpn", "list")["peers"]}
    assert states == {"desk": "enabled", "laptop": "disabled"}
    enabled = ok(call(platform, "POST", "/api/peers/desk/enable"))
    assert enabled["state"] == "enabled" and enabled["expires"] is None
    assert ok(call(platform, "POST", "/api/peers/laptop/enable"))["state"] == "enabled"
    for name in ("laptop", "desk"):
        assert ok(call(platform, "DELETE", f"/api/peers/{name}"))["name"] == name
    refused(call(platform, "DELETE", "/api/peers/laptop"), 404, "not_found")
    refused(call(platform, "POST", "/api/peers/Bad/disable"), 400, "bad_request")
    assert ok(call(platform, "GET", "/api/peers"))["peers"] == []


def test_metrics(platform):
    answer = call(platform, "GET", "/metrics")
    if not hasattr(Controller, "metrics_text"):  # documented: no metrics to give yet
        refused(answer, 404, "not_found")
    else:
        assert "faasd_" in ok(answer)
        assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"


def test_refusals(platform):
    for name in ("Bad", "ns", "a" * 64):
        refused(call(platform, "GET", f"/api/functions/{name}"), 400, "bad_request")
    refused(call(platform, "PUT", "/api/list"), 405, "bad_request")
    refused(call(platform, "GET", "/api/nope"), 404, "not_found")
    refused(call(platform, "GET", "/api/functions/ghost/versions"), 404, "not_found")


def test_remove(platform):
    removed = ok(call(platform, "DELETE", f"/api/functions/{NAME}"))
    assert removed["name"] == NAME
    refused(call(platform, "GET", f"/api/functions/{NAME}"), 404, "not_found")
    assert NAME not in [f["name"] for f in ok(call(platform, "GET", "/api/list"))]


def test_tokens(platform):
    made = ok(call(platform, "POST", "/api/tokens", {"name": "ci", "role": "deploy",
                                                    "expires": "30d"}))
    assert made["token"].startswith("faas_") and made["role"] == "deploy"
    listed = ok(call(platform, "GET", "/api/tokens"))
    assert [(t["name"], t["role"]) for t in listed] == [("ci", "deploy")]
    assert made["token"] not in json.dumps(listed)
    assert faasctl_json(platform, "token", "list")["tokens"] == listed
    refused(call(platform, "POST", "/api/tokens", {"name": "ci"}), 409, "conflict")
    refused(call(platform, "POST", "/api/tokens", {"name": "x", "role": "root"}),
            400, "bad_request")
    auth = (f"Authorization: Bearer {made['token']}",)
    assert isinstance(ok(call(platform, "GET", "/api/list", headers=auth)), list)
    refused(call(platform, "POST", "/api/peers", {"name": "x"}, headers=auth), 403,
            "forbidden")
    assert ok(call(platform, "DELETE", "/api/tokens/ci"))["name"] == "ci"
    refused(call(platform, "GET", "/api/list", headers=auth), 401, "unauthorized")
    refused(call(platform, "DELETE", "/api/tokens/ci"), 404, "not_found")
    logs = (platform.root / "logs" / "controller.log").read_text()
    assert made["token"] not in logs and "token_created" in logs


def test_secrets(platform):
    value = f"s3cret-{os.urandom(8).hex()}".encode()
    octets = ("Content-Type: application/octet-stream",)
    answer = call(platform, "PUT", "/api/secrets/db", raw=value, headers=octets)
    assert ok(answer) == {**answer.value, "name": "db", "size": len(value)}
    assert value not in answer.body
    listed = ok(call(platform, "GET", "/api/secrets"))
    assert [(s["name"], s["size"], s["functions"]) for s in listed] == [("db", len(value), [])]
    refused(call(platform, "PUT", "/api/secrets/Bad", raw=value, headers=octets),
            400, "bad_request")
    refused(call(platform, "PUT", "/api/secrets/big", raw=bytes((64 << 10) + 1),
                 headers=octets), 413, "too_large")
    assert ok(call(platform, "DELETE", "/api/secrets/db"))["name"] == "db"
    refused(call(platform, "DELETE", "/api/secrets/db"), 404, "not_found")
    for program in ("controller", "runner"):
        assert value.decode() not in (platform.root / "logs" / f"{program}.log").read_text()


def test_volumes(platform):
    made = ok(call(platform, "POST", "/api/volumes", {"name": "data", "size": "8M"}))
    assert made["name"] == "data"
    listed = ok(call(platform, "GET", "/api/volumes"))
    assert [(v["name"], v["size"], v["functions"]) for v in listed] == [("data", 8 << 20, [])]
    refused(call(platform, "POST", "/api/volumes", {"name": "data", "size": "8M"}),
            409, "conflict")
    refused(call(platform, "POST", "/api/volumes", {"name": "Bad", "size": "8M"}),
            400, "bad_request")
    assert ok(call(platform, "DELETE", "/api/volumes/data"))["name"] == "data"
    refused(call(platform, "DELETE", "/api/volumes/data"), 404, "not_found")
    assert ok(call(platform, "GET", "/api/volumes")) == []


def test_every_documented_operation_was_exercised():
    assert COVERED == oc.operations(SPEC)

