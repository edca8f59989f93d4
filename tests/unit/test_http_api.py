"""The controller's HTTP API against docs/openapi.json, with a fake controller.

HttpApi serves on an ephemeral loopback port; a fake stands in for the Controller's
handler table, the one faasctl's requests reach. The tests run as root, an operator.
Every documented operation is called and its answer (status, content type, JSON body)
checked against the document; every route the server knows must be in the document and
the other way round; bad input must be refused with the documented status and stable
code before any op runs.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import secrets
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common import fnsettings, protocol, rpc
from common.errors import Code, FaasError
from common.log import EventLog
from controller import routes
from controller.access import Operators
from controller.health import AgentHealth
from controller.http import MAX_HEADER, METRICS_TYPE, Endpoints, HttpApi
from controller.main import Controller
from controller.routes import MAX_JSON, ROUTES
from tests import openapi_check as oc

SPEC = oc.load()
DOCS = Path(__file__).resolve().parents[2] / "docs"
DIGEST = {1: "sha256:" + "1" * 64, 2: "sha256:" + "2" * 64, 3: "sha256:" + "3" * 64}
KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(1, 33))).decode()
IMAGE = b"TAR" + bytes(3 * protocol.CHUNK_SIZE + 123)  # several chunks' worth


# --- the fake controller ------------------------------------------------------------


class FakeController:
    """The op_* coroutines HttpApi may call, over a tiny in-memory state. Each records
    (op, args) as called, so tests see which op ran with which checked arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.callers: list[str | None] = []  # rpc.caller as each upload_begin saw it
        self.functions: dict[str, dict[str, Any]] = {}
        self.peers: dict[str, dict[str, Any]] = {}
        self.uploads: dict[str, dict[str, Any]] = {}
        self.max_upload = 4 * protocol.CHUNK_SIZE
        self._add("fib", DIGEST[1])
        self._add("fib", DIGEST[2])
        self._add("solo", DIGEST[3])
        self.peers["laptop"] = {"name": "laptop", "public_key": KEY_A,
                                "address": "fd00:faa5:0:100::2", "state": "enabled",
                                "created": 1700000000.25, "expires": None}

    def _add(self, name: str, digest: str, size: int = 1024) -> dict[str, Any]:
        f = self.functions.setdefault(name, {
            "address": f"fd00:faa5:1::{10 + len(self.functions):x}", "created": 1700000000.0,
            "settings": fnsettings.defaults(), "versions": []})
        version = len(f["versions"]) + 1
        f["versions"].append({"version": version, "digest": digest, "size": size,
                              "created": 1700000000.0 + version, "command": ["/handler"]})
        f["version"] = version
        return f

    def _record(self, op: str, args: dict[str, Any]) -> None:
        self.calls.append((op, args))

    def _fn(self, name: str) -> dict[str, Any]:
        f = self.functions.get(name)
        if f is None:
            raise FaasError(Code.NOT_FOUND, f"no function named {name!r}", {"name": name})
        current = f["versions"][f["version"] - 1]
        return {"name": name, "address": f["address"], "version": f["version"],
                "created": f["created"], "digest": current["digest"],
                "command": current["command"], "settings": f["settings"]}

    def _peer(self, name: str) -> dict[str, Any]:
        if name not in self.peers:
            raise FaasError(Code.NOT_FOUND, f"no VPN peer named {name!r}", {"name": name})
        return dict(self.peers[name])

    async def op_status(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("status", args)
        me = {"name": "controller", "state": "up", "pid": 100, "boot_id": "0123abcd",
              "version": "0.1.0", "uptime": 12.5, "rss": 30 << 20, "last_seen": 1700000000.0,
              "synced": True, "restarts": 0, "error": None, "flags": []}
        up = AgentHealth("runner", state="up", pid=101, boot_id="4567cdef", version="0.1.0",
                         uptime=12.0, rss=28 << 20, last_seen=1700000000.0,
                         synced_boot="4567cdef", last_sync=1699999999.0, generation=7)
        down = AgentHealth("netagent", state="down", failures=3, error="timeout: no answer")
        return {"processes": [me, up.row(7), down.row(7), AgentHealth("dnsagent").row(7)],
                "generation": 7, "functions": [
                    {"name": "fib", "problem": "warm pool 0+1 starting of min_warm 2",
                     "serious": False}]}

    async def op_upload_begin(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("upload_begin", args)
        self.callers.append(rpc.caller.get())
        uid = secrets.token_hex(16)
        self.uploads[uid] = {"name": args["name"], "data": bytearray()}
        return {"upload": uid, "chunk": protocol.CHUNK_SIZE, "window": protocol.UPLOAD_WINDOW}

    async def op_upload_chunk(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("upload_chunk", {**args, "data": len(args["data"])})
        up = self.uploads[args["upload"]]
        if args["offset"] != len(up["data"]):
            raise FaasError(Code.BAD_REQUEST, "chunks out of order")
        if len(up["data"]) + len(args["data"]) > self.max_upload:
            del self.uploads[args["upload"]]
            raise FaasError(Code.TOO_LARGE, f"image over {self.max_upload} bytes")
        up["data"] += args["data"]
        return {"received": len(up["data"])}

    async def op_upload_abort(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("upload_abort", args)
        self.uploads.pop(args["upload"], None)
        return {}

    async def op_deploy(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("deploy", args)
        up = self.uploads.pop(args["upload"])
        if not up["data"].startswith(b"TAR"):
            raise FaasError(Code.BAD_IMAGE, "not a docker save archive")
        self._add(up["name"], DIGEST[3], len(up["data"]))
        fn = self._fn(up["name"])
        return {k: fn[k] for k in ("name", "version", "address", "digest", "command")} | {
            "reused": False, "size": len(up["data"]), "seconds": 0.25}

    async def op_list(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("list", args)
        return {"functions": [self._fn(n) for n in sorted(self.functions)]}

    async def op_info(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("info", args)
        info = self._fn(args["name"])
        info["versions"] = [dict(v) for v in self.functions[args["name"]]["versions"]]
        return info

    async def op_versions(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("versions", args)
        f = self._fn(args["name"])
        return {"name": args["name"], "versions": [
            v | {"current": v["version"] == f["version"]}
            for v in self.functions[args["name"]]["versions"]]}

    async def op_rollback(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("rollback", args)
        f = self._fn(args["name"])
        known = [v["version"] for v in self.functions[args["name"]]["versions"]]
        version = args["version"]
        if version is None:
            older = [v for v in known if v < f["version"]]
            if not older:
                raise FaasError(Code.CONFLICT, "no earlier version", {"versions": known})
            version = older[-1]
        if version not in known:
            raise FaasError(Code.NOT_FOUND, f"no version {version}", {"versions": known})
        self.functions[args["name"]]["version"] = version
        return self._fn(args["name"])

    async def op_set(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("set", args)
        f = self._fn(args["name"])
        settings = fnsettings.apply(f["settings"], args["settings"])
        self.functions[args["name"]]["settings"] = settings
        return {"name": args["name"], "settings": settings}

    async def op_logs(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("logs", args)
        return {"lines": [{"ts": 1700000001.5, "container": "fib-1a2b", "stream": "stdout",
                           "rid": "0123456789ab", "line": "hello"}], "offset": 96}

    async def op_rm(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("rm", args)
        f = self._fn(args["name"])
        del self.functions[args["name"]]
        return f

    async def op_vpn_add(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("vpn_add", args)
        if args["name"] in self.peers:
            raise FaasError(Code.CONFLICT, "exists", {"name": args["name"]})
        private = None if args["public_key"] else base64.b64encode(bytes(32)).decode()
        peer = {"name": args["name"], "public_key": args["public_key"] or KEY_B,
                "address": f"fd00:faa5:0:100::{2 + len(self.peers):x}", "state": "enabled",
                "created": 1700000002.0, "expires": 1700600000.0 if args["expires"] else None}
        self.peers[args["name"]] = peer
        return {**peer, "config": f"[Interface]\nPrivateKey = {private}\n",
                "private_key_included": private is not None}

    async def op_vpn_list(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("vpn_list", args)
        return {"peers": [{**p, "latest_handshake": 1700000003, "endpoint": "[fdff:1::2]:4444",
                           "rx_bytes": 10, "tx_bytes": 20, "on_interface": True}
                          for p in self.peers.values()]}

    async def op_vpn_rm(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("vpn_rm", args)
        peer = self._peer(args["name"])
        del self.peers[args["name"]]
        return peer

    async def op_vpn_disable(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("vpn_disable", args)
        self._peer(args["name"])
        self.peers[args["name"]]["state"] = "disabled"
        return self._peer(args["name"])

    async def op_vpn_enable(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("vpn_enable", args)
        self._peer(args["name"])
        self.peers[args["name"]].update(state="enabled", expires=None)
        return self._peer(args["name"])


    async def op_token_create(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("token_create", args)
        return {"name": args["name"], "role": args["role"], "created": 1700000004.0,
                "expires": None, "last_used": None, "token": "faas_" + "A" * 43}

    async def op_token_list(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("token_list", args)
        return {"tokens": [{"name": "ci", "role": "deploy", "created": 1700000004.0,
                            "expires": 1700600000.0, "last_used": None}]}

    async def op_token_rm(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("token_rm", args)
        if args["name"] != "ci":
            raise FaasError(Code.NOT_FOUND, f"no token named {args['name']!r}",
                            {"name": args["name"]})
        return {"name": "ci", "role": "deploy", "created": 1700000004.0,
                "expires": 1700600000.0, "last_used": None}


    async def op_volume_create(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("volume_create", args)
        return {"name": args["name"], "size": 1 << 30, "used": 1 << 20, "free": 1000 << 20,
                "mounted": True, "functions": []}

    async def op_volume_list(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("volume_list", args)
        return {"volumes": [{"name": "data", "size": 1 << 30, "used": None, "free": None,
                             "mounted": False, "functions": ["fib"]}]}

    async def op_volume_rm(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("volume_rm", args)
        return {"name": args["name"]}

    async def op_secret_create(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("secret_create", args)
        return {"name": args["name"], "size": len(args["value"]), "updated": 1700000005.0}

    async def op_secret_list(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("secret_list", args)
        return {"secrets": [{"name": "db", "size": 9, "updated": 1700000005.0,
                             "functions": ["fib"]}]}

    async def op_secret_rm(self, args: dict[str, Any]) -> dict[str, Any]:
        self._record("secret_rm", args)
        return {"name": args["name"]}


def handlers_of(fake: Any) -> dict[str, Any]:
    """The fake as a handler table: every op of the protocol, looked up at call time so
    a test may replace one of the fake's methods."""
    def handler(op: str) -> Any:
        async def call(args: dict[str, Any]) -> Any:
            return await getattr(fake, f"op_{op}")(args)
        return call
    return {op: handler(op) for op in protocol.OPS["controller"]}


def metrics_of(fake: Any) -> Any:
    async def metrics() -> str:
        if not hasattr(fake, "metrics_text"):
            raise FaasError(Code.NOT_FOUND, "this controller keeps no metrics yet")
        return await fake.metrics_text()
    return metrics


def with_metrics(fake: FakeController) -> None:
    async def metrics_text() -> str:
        return "# TYPE faasd_functions gauge\nfaasd_functions 2\n"
    fake.metrics_text = metrics_text  # type: ignore[attr-defined]


# --- a server and a raw HTTP client -------------------------------------------------


@pytest.fixture
def fake() -> FakeController:
    return FakeController()


@pytest.fixture
def api(fake):
    """HttpApi on 127.0.0.1:<ephemeral> in a loop of its own thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = HttpApi(handlers_of(fake), Endpoints("127.0.0.1:0"),
                     EventLog("controller", stream=io.StringIO()), operators=Operators("faas"),
                     metrics=metrics_of(fake))
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(5)
    yield server

    async def shutdown() -> None:  # connections still lingering go with the server
        await server.stop()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    interim: list[int] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def ctype(self) -> str:
        return self.headers.get("content-type", "")


def exchange(api: HttpApi, raw: bytes, timeout: float = 10, head: bool = False) -> Reply:
    """Send raw bytes, read the whole answer (the server closes), parse it. An answer
    to HEAD has the length of the body it does not carry."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=timeout) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    interim = []
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"no complete answer: {data[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        # aiohttp answers a request it could not parse as HTTP/1.0 (closing is implied), or
        # 0.9 for a request line without a version
        assert version in ("HTTP/1.1", "HTTP/1.0", "HTTP/0.9")
        if status.startswith("1"):
            interim.append(int(status))
            data = rest
            continue
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:])}
        assert int(headers["content-length"]) == len(rest) or (head and not rest)
        assert headers.get("connection") == "close" or version != "HTTP/1.1"
        assert re.fullmatch(r"[0-9a-f]{12}", headers["x-request-id"])
        return Reply(int(status), headers, rest, interim)


def request(api: HttpApi, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, chunked: bool = False) -> Reply:
    head = {"Host": f"127.0.0.1:{api.port}", "Connection": "close", **(headers or {})}
    if method in routes.CHANGING and path != "/api/new":
        head.setdefault("Content-Type", "application/json")
    payload = b""
    if chunked:
        head["Transfer-Encoding"] = "chunked"
        data = body or b""
        for i in range(0, len(data), 100_000):
            piece = data[i:i + 100_000]
            payload += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        payload += b"0\r\n\r\n"
    elif body is not None:
        head.setdefault("Content-Length", str(len(body)))
        payload = body
    text = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items())
    return exchange(api, text.encode() + b"\r\n" + payload, head=method == "HEAD")


def jbody(value: Any) -> bytes:
    return json.dumps(value).encode()


def checked(reply: Reply, method: str, template: str) -> Any:
    """The answer fits what the document says of this operation and this status."""
    return oc.check_answer(SPEC, method, template, reply.status, reply.ctype, reply.body)


def refused(reply: Reply, method: str, template: str, status: int, code: str) -> dict:
    assert reply.status == status, reply.body
    error = checked(reply, method, template)["error"]
    assert error["code"] == code, error
    return error


# --- one good call of every documented operation -------------------------------------


@dataclass
class Case:
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    op: str | None = None  # the op expected to have served it, with these checked args
    args: dict[str, Any] | None = None
    setup: Callable[[FakeController], None] | None = None


GOOD: dict[tuple[str, str], Case] = {
    ("GET", "/healthz"): Case("/healthz"),
    ("GET", "/metrics"): Case("/metrics", setup=with_metrics),
    ("GET", "/api/status"): Case("/api/status", op="status", args={}),
    ("POST", "/api/new"): Case("/api/new", IMAGE, {"X-Image-Name": "newfn"}, op="deploy"),
    ("GET", "/api/list"): Case("/api/list", op="list", args={}),
    ("GET", "/api/functions/{name}"): Case("/api/functions/fib", op="info",
                                           args={"name": "fib"}),
    ("DELETE", "/api/functions/{name}"): Case("/api/functions/fib", op="rm",
                                              args={"name": "fib"}),
    ("GET", "/api/functions/{name}/versions"): Case("/api/functions/fib/versions",
                                                    op="versions", args={"name": "fib"}),
    ("POST", "/api/functions/{name}/rollback"): Case(
        "/api/functions/fib/rollback", jbody({"version": 1}), op="rollback",
        args={"name": "fib", "version": 1}),
    ("GET", "/api/functions/{name}/settings"): Case("/api/functions/fib/settings", op="info",
                                                    args={"name": "fib"}),
    ("PATCH", "/api/functions/{name}/settings"): Case(
        "/api/functions/fib/settings", jbody({"memory": "256M", "env.GREETING": "hi"}),
        op="set", args={"name": "fib", "settings": {"memory": "256M", "env.GREETING": "hi"}}),
    ("POST", "/api/functions/{name}/settings"): Case(
        "/api/functions/fib/settings", jbody({"reuse": "true", "timeout": "10"}),
        op="set", args={"name": "fib", "settings": {"reuse": "true", "timeout": "10"}}),
    ("GET", "/api/functions/{name}/logs"): Case(
        "/api/functions/fib/logs?since=1700000000&offset=12", op="logs",
        args={"name": "fib", "since": 1700000000.0, "offset": 12}),
    ("GET", "/api/peers"): Case("/api/peers", op="vpn_list", args={}),
    ("POST", "/api/peers"): Case("/api/peers", jbody({"name": "phone", "expires": "7d"}),
                                 op="vpn_add", args={"name": "phone", "public_key": None,
                                                     "expires": "7d"}),
    ("DELETE", "/api/peers/{name}"): Case("/api/peers/laptop", op="vpn_rm",
                                          args={"name": "laptop"}),
    ("POST", "/api/peers/{name}/disable"): Case("/api/peers/laptop/disable", op="vpn_disable",
                                                args={"name": "laptop"}),
    ("POST", "/api/peers/{name}/enable"): Case("/api/peers/laptop/enable", op="vpn_enable",
                                               args={"name": "laptop"}),
    ("GET", "/api/tokens"): Case("/api/tokens", op="token_list", args={}),
    ("POST", "/api/tokens"): Case(
        "/api/tokens", jbody({"name": "ci", "role": "deploy", "expires": "30d"}),
        op="token_create", args={"name": "ci", "role": "deploy", "expires": "30d"}),
    ("DELETE", "/api/tokens/{name}"): Case("/api/tokens/ci", op="token_rm",
                                           args={"name": "ci"}),
    ("GET", "/api/volumes"): Case("/api/volumes", op="volume_list", args={}),
    ("POST", "/api/volumes"): Case("/api/volumes", jbody({"name": "data", "size": "1G"}),
                                   op="volume_create", args={"name": "data", "size": "1G"}),
    ("DELETE", "/api/volumes/{name}"): Case("/api/volumes/data", op="volume_rm",
                                            args={"name": "data"}),
    ("GET", "/api/secrets"): Case("/api/secrets", op="secret_list", args={}),
    ("PUT", "/api/secrets/{name}"): Case(
        "/api/secrets/db", b"pw\x00\xffrest", {"Content-Type": "application/octet-stream"},
        op="secret_create", args={"name": "db", "value": b"pw\x00\xffrest"}),
    ("DELETE", "/api/secrets/{name}"): Case("/api/secrets/db", op="secret_rm",
                                            args={"name": "db"}),
}


def test_every_documented_operation_has_a_case():
    assert set(GOOD) == oc.operations(SPEC)


@pytest.mark.parametrize("method,template", sorted(GOOD), ids=lambda v: v)
def test_every_operation_answers_as_documented(api, fake, method, template):
    case = GOOD[method, template]
    if case.setup:
        case.setup(fake)
    if case.headers.get("Content-Type", "application/json") == "application/json" and \
            case.body is not None and template != "/api/new":  # it fits the document too
        body_schema = oc.operation(SPEC, method, template)["requestBody"]
        oc.validate(SPEC, body_schema["content"]["application/json"]["schema"],
                    json.loads(case.body))
    reply = request(api, method, case.path, case.body, case.headers)
    assert reply.status == 200, reply.body
    value = checked(reply, method, template)
    if case.op is not None:
        assert fake.calls[-1][0] == case.op
    if case.args is not None:
        assert fake.calls == [(case.op, case.args)]
    if template == "/metrics":
        assert reply.ctype == METRICS_TYPE and "faasd_functions 2" in value


def test_upload_goes_through_the_ops_faasctl_new_uses(api, fake):
    reply = request(api, "POST", "/api/new", IMAGE,
                    {"X-Image-Name": "newfn", "X-Image-Tag": "newfn:latest"})
    body = checked(reply, "POST", "/api/new")
    assert body["name"] == "newfn" and body["size"] == len(IMAGE)
    ops = [op for op, _ in fake.calls]
    assert ops[0] == "upload_begin" and ops[-1] == "deploy"
    assert set(ops[1:-1]) == {"upload_chunk"} and len(ops) >= 2 + 4
    assert fake.calls[0][1] == {"name": "newfn", "tag": "newfn:latest"}
    chunks = [args for op, args in fake.calls if op == "upload_chunk"]
    assert all(c["data"] <= protocol.CHUNK_SIZE for c in chunks)
    assert sum(c["data"] for c in chunks) == len(IMAGE) and fake.uploads == {}


def test_chunked_upload_with_expect_continue(api, fake):
    reply = request(api, "POST", "/api/new", IMAGE,
                    {"X-Image-Name": "chunky", "Expect": "100-continue"}, chunked=True)
    assert reply.interim == [100]
    assert checked(reply, "POST", "/api/new")["size"] == len(IMAGE)


@pytest.mark.parametrize("body", [None, b"", b"{}", b"{\"version\": null}"])
def test_rollback_without_a_version_serves_the_one_before(api, fake, body):
    reply = request(api, "POST", "/api/functions/fib/rollback", body)
    assert checked(reply, "POST", "/api/functions/{name}/rollback")["version"] == 1
    assert fake.calls == [("rollback", {"name": "fib", "version": None})]


def test_settings_read_back_typed(api, fake):
    request(api, "PATCH", "/api/functions/fib/settings",
            jbody({"memory": "256M", "reuse": "yes", "env.A": "1"}))
    reply = request(api, "GET", "/api/functions/fib/settings")
    settings = checked(reply, "GET", "/api/functions/{name}/settings")["settings"]
    assert settings["memory"] == 256 << 20 and settings["reuse"] is True
    assert settings["env"] == {"A": "1"}


def test_peer_with_its_own_key_gets_no_private_key(api, fake):
    reply = request(api, "POST", "/api/peers", jbody({"name": "desk", "public_key": KEY_B}))
    peer = checked(reply, "POST", "/api/peers")
    assert peer["private_key_included"] is False and peer["public_key"] == KEY_B


def test_list_is_a_plain_list(api):
    reply = request(api, "GET", "/api/list")
    assert [f["name"] for f in checked(reply, "GET", "/api/list")] == ["fib", "solo"]


def test_query_strings_are_ignored_where_none_is_taken(api, fake):
    reply = request(api, "GET", "/api/functions/fib/versions?x=1")
    assert reply.status == 200 and fake.calls == [("versions", {"name": "fib"})]


# --- refusals: documented status, stable code, no op run -----------------------------

BAD_FUNCTION_NAMES = ["Bad", "ns", "x-", "-x", "a" * 64, "a.b", "a_b", "", "%66ib", "fib%00"]
BAD_PEER_NAMES = ["Bad", "x-", "a" * 64, "a.b", ""]


def name_routes(prefix: str) -> list[tuple[str, str]]:
    return sorted((m, t) for m, t in oc.operations(SPEC)
                  if t.startswith(prefix) and "{name}" in t)


@pytest.mark.parametrize("method,template", name_routes("/api/functions/"), ids=str)
def test_bad_function_names_are_refused_before_any_op(api, fake, method, template):
    for name in BAD_FUNCTION_NAMES:
        body = GOOD[method, template].body
        reply = request(api, method, template.replace("{name}", name), body)
        error = refused(reply, method, template, 400, "bad_request")
        assert error["details"] == {"field": "name"}, name
    assert fake.calls == []


@pytest.mark.parametrize("method,template", name_routes("/api/peers/"), ids=str)
def test_bad_peer_names_are_refused_before_any_op(api, fake, method, template):
    for name in BAD_PEER_NAMES:
        reply = request(api, method, template.replace("{name}", name))
        refused(reply, method, template, 400, "bad_request")
    assert fake.calls == []


def test_bad_image_name_is_refused_before_the_body_is_read(api, fake):
    for name in ("Bad", "ns", "", "a" * 64):
        reply = request(api, "POST", "/api/new", IMAGE, {"X-Image-Name": name})
        error = refused(reply, "POST", "/api/new", 400, "bad_request")
        assert "X-Image-Name" in error["message"]
    reply = request(api, "POST", "/api/new", IMAGE,  # no name at all
                    {"Content-Type": "application/x-tar"})
    refused(reply, "POST", "/api/new", 400, "bad_request")
    reply = request(api, "POST", "/api/new", IMAGE)  # no name, no type: a form could do it
    refused(reply, "POST", "/api/new", 403, "forbidden")
    assert fake.calls == []


BAD_BODIES = [
    ("PATCH", "/api/functions/{name}/settings", b"{"),
    ("PATCH", "/api/functions/{name}/settings", b"[1]"),
    ("PATCH", "/api/functions/{name}/settings", b"null"),
    ("PATCH", "/api/functions/{name}/settings", b"\xff\xfe"),
    ("PATCH", "/api/functions/{name}/settings", b'{"memory": 256}'),
    ("PATCH", "/api/functions/{name}/settings", b'{"memory": NaN}'),
    ("PATCH", "/api/functions/{name}/settings", b'{"bad key": "1"}'),
    ("PATCH", "/api/functions/{name}/settings", b"[" * 200_000),
    ("PATCH", "/api/functions/{name}/settings", None),
    ("POST", "/api/functions/{name}/settings", b""),
    ("POST", "/api/functions/{name}/rollback", b'{"version": "1"}'),
    ("POST", "/api/functions/{name}/rollback", b'{"version": 0}'),
    ("POST", "/api/functions/{name}/rollback", b'{"version": true}'),
    ("POST", "/api/functions/{name}/rollback", b'{"version": 1.5}'),
    ("POST", "/api/functions/{name}/rollback", b'{"name": "solo"}'),
    ("POST", "/api/functions/{name}/rollback", b'{"bogus": 1}'),
    ("POST", "/api/functions/{name}/rollback", b"1"),
    ("POST", "/api/peers", b"{}"),
    ("POST", "/api/peers", b'{"name": "Bad"}'),
    ("POST", "/api/peers", b'{"name": "x", "public_key": "not-a-key"}'),
    ("POST", "/api/peers", b'{"name": "x", "public_key": "' + b"A" * 42 + b'B="}'),
    ("POST", "/api/peers", b'{"name": "x", "expires": "7y"}'),
    ("POST", "/api/peers", b'{"name": "x", "extra": 1}'),
    ("POST", "/api/peers", None),
]


@pytest.mark.parametrize("method,template,body", BAD_BODIES, ids=str)
def test_bad_bodies_are_refused_before_any_op(api, fake, method, template, body):
    reply = request(api, method, template.replace("{name}", "fib"), body)
    refused(reply, method, template, 400, "bad_request")
    assert fake.calls == []


def test_settings_the_op_refuses_are_bad_requests(api, fake):
    reply = request(api, "PATCH", "/api/functions/fib/settings", jbody({"nosuch": "1"}))
    refused(reply, "PATCH", "/api/functions/{name}/settings", 400, "bad_request")
    reply = request(api, "PATCH", "/api/functions/fib/settings", jbody({"memory": "lots"}))
    refused(reply, "PATCH", "/api/functions/{name}/settings", 400, "bad_request")


@pytest.mark.parametrize("query", ["since=abc", "offset=-1", "offset=1.5", "bogus=1",
                                   "offset=1&offset=2", "since=nan", "since"])
def test_bad_log_queries_are_refused(api, fake, query):
    reply = request(api, "GET", f"/api/functions/fib/logs?{query}")
    refused(reply, "GET", "/api/functions/{name}/logs", 400, "bad_request")
    assert fake.calls == []


def test_oversize_json_bodies_are_413(api, fake):
    big = jbody({"env.X": "x" * MAX_JSON})
    for chunked in (False, True):
        reply = request(api, "PATCH", "/api/functions/fib/settings", big, chunked=chunked)
        refused(reply, "PATCH", "/api/functions/{name}/settings", 413, "too_large")
    announced = request(api, "POST", "/api/peers", b"{}",
                        {"Content-Length": str(MAX_JSON + 1)})  # refused before reading
    refused(announced, "POST", "/api/peers", 413, "too_large")
    assert fake.calls == []


def test_oversize_image_is_413_and_the_upload_dropped(api, fake):
    fake.max_upload = protocol.CHUNK_SIZE
    reply = request(api, "POST", "/api/new", IMAGE, {"X-Image-Name": "huge"})
    refused(reply, "POST", "/api/new", 413, "too_large")
    assert fake.uploads == {} and "deploy" not in [op for op, _ in fake.calls]


def test_bad_images_are_422(api, fake):
    for body in (b"junk", b""):
        reply = request(api, "POST", "/api/new", body, {"X-Image-Name": "junk"})
        refused(reply, "POST", "/api/new", 422, "bad_image")


def test_upload_without_length_or_chunks_is_refused(api, fake):
    # aiohttp's parser refuses the stray body before any op runs (the hand-written server
    # began an upload and dropped it)
    reply = exchange(api, b"POST /api/new HTTP/1.1\r\nX-Image-Name: fn\r\n\r\nTAR")
    refused(reply, "POST", "/api/new", 400, "bad_request")
    assert fake.uploads == {} and fake.calls == []


def test_not_found_and_conflict_come_from_the_ops(api, fake):
    for method, template, path in [
            ("GET", "/api/functions/{name}", "/api/functions/ghost"),
            ("DELETE", "/api/functions/{name}", "/api/functions/ghost"),
            ("GET", "/api/functions/{name}/versions", "/api/functions/ghost/versions"),
            ("GET", "/api/functions/{name}/settings", "/api/functions/ghost/settings"),
            ("POST", "/api/functions/{name}/rollback", "/api/functions/ghost/rollback"),
            ("DELETE", "/api/peers/{name}", "/api/peers/ghost"),
            ("POST", "/api/peers/{name}/disable", "/api/peers/ghost/disable"),
            ("POST", "/api/peers/{name}/enable", "/api/peers/ghost/enable")]:
        refused(request(api, method, path), method, template, 404, "not_found")
    reply = request(api, "POST", "/api/functions/fib/rollback", jbody({"version": 9}))
    assert refused(reply, "POST", "/api/functions/{name}/rollback", 404,
                   "not_found")["details"] == {"versions": [1, 2]}
    reply = request(api, "POST", "/api/functions/solo/rollback")
    refused(reply, "POST", "/api/functions/{name}/rollback", 409, "conflict")
    reply = request(api, "POST", "/api/peers", jbody({"name": "laptop"}))
    refused(reply, "POST", "/api/peers", 409, "conflict")


def test_agent_errors_keep_their_status(api, fake):
    async def down(args):
        raise FaasError(Code.UNAVAILABLE, "netagent is not answering")
    fake.op_vpn_add = down
    reply = request(api, "POST", "/api/peers", jbody({"name": "x"}))
    refused(reply, "POST", "/api/peers", 503, "unavailable")

    async def slow(args):
        raise FaasError(Code.TIMEOUT, "no answer in 10s")
    fake.op_vpn_add = slow
    reply = request(api, "POST", "/api/peers", jbody({"name": "x"}))
    refused(reply, "POST", "/api/peers", 504, "timeout")


def test_a_bug_is_500_with_the_request_id_and_no_traceback(api, fake):
    async def broken(args):
        raise RuntimeError("secret internals")
    fake.op_versions = broken
    reply = request(api, "GET", "/api/functions/fib/versions")
    error = refused(reply, "GET", "/api/functions/{name}/versions", 500, "internal")
    assert reply.headers["x-request-id"] in error["message"]
    assert "secret" not in reply.body.decode()


def test_metrics_without_a_source_are_404(api, fake):
    reply = request(api, "GET", "/metrics")
    refused(reply, "GET", "/metrics", 404, "not_found")


def test_wrong_methods_are_405_with_allow(api, fake):
    paths = {t: {m for m, t2 in oc.operations(SPEC) if t2 == t} for _, t in oc.operations(SPEC)}
    for template, methods in sorted(paths.items()):
        path = template.replace("{name}", "fib")
        for method in sorted({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"} - methods):
            reply = request(api, method, path)
            assert reply.status == 405, (method, path)
            assert set(reply.headers["allow"].split(", ")) == methods
            if method == "HEAD":  # the answer to HEAD carries no body
                continue
            error = oc.check_generic(SPEC, "MethodNotAllowed", 405, reply.ctype, reply.body)
            assert error["error"]["code"] == "bad_request"
    assert fake.calls == []


@pytest.mark.parametrize("path", ["/", "/api", "/api/", "/api/lists", "/api/list/",
                                  "/api/functions", "/api/functions/fib/nope",
                                  "/api/functions/fib/settings/memory", "/api/peers/a/b/c",
                                  "/healthz/x", "//api/list"])
def test_unknown_paths_are_404(api, fake, path):
    reply = request(api, "GET", path)
    assert reply.status == 404
    assert oc.check_generic(SPEC, "NotFound", 404, reply.ctype,
                            reply.body)["error"]["code"] == "not_found"
    assert oc.template_of(SPEC, path) is None
    assert fake.calls == []


def test_malformed_requests(api, fake):
    for raw in (b"GARBAGE\r\n\r\n", b"GET /api/list\r\n\r\n", b"GET /api/list HTTP/2\r\n\r\n",
                b"GET /api/list HTTP/1.1\r\nno colon here\r\n\r\n"):
        reply = exchange(api, raw)
        assert reply.status == 400, raw
        oc.check_generic(SPEC, "BadRequest", 400, reply.ctype, reply.body)
    reply = exchange(api, b"GET /api/list HTTP/1.1\r\nX-Big: " + b"a" * MAX_HEADER + b"\r\n\r\n")
    assert reply.status == 413
    oc.check_generic(SPEC, "TooLarge", 413, reply.ctype, reply.body)
    assert fake.calls == []


def test_bad_chunked_encoding_is_refused(api, fake):
    head = (b"PATCH /api/functions/fib/settings HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    for body in (b"zz\r\n{}\r\n0\r\n\r\n", b"2\r\n{}XX0\r\n\r\n"):
        reply = exchange(api, head + body)
        refused(reply, "PATCH", "/api/functions/{name}/settings", 400, "bad_request")
    assert fake.calls == []


# --- the document and the code describe the same API ---------------------------------


def test_routes_and_document_agree():
    assert {(r.method, r.path) for r in ROUTES} == oc.operations(SPEC)
    assert len(ROUTES) == len({(r.method, r.path) for r in ROUTES})
    for route in ROUTES:
        documented = oc.operation(SPEC, route.method, route.path)
        assert documented.get("x-faasd-op") == route.op, (route.method, route.path)


def test_every_route_reaches_a_controller_op():
    for route in ROUTES:
        if route.op is not None:
            assert route.op in protocol.OPS["controller"]
            assert callable(getattr(Controller, f"op_{route.op}")), route.op
    new = oc.operation(SPEC, "POST", "/api/new")
    for op in new["x-faasd-ops"]:
        assert callable(getattr(Controller, f"op_{op}")) and op in protocol.OPS["controller"]


def test_documented_inputs_are_the_op_arguments():
    """Path, query and body together are exactly the protocol op's fields."""
    for route in ROUTES:
        if route.op is None:
            continue
        documented = oc.operation(SPEC, route.method, route.path)
        params = [oc.resolve(SPEC, p) for p in documented.get("parameters", [])]
        names = {p["name"] for p in params if p["in"] in ("path", "query")}
        assert {p["name"] for p in params if p["in"] == "path"} == set(
            re.findall(r"{(\w+)}", route.path))
        assert all(p["in"] == "header" for p in params if p["in"] not in ("path", "query"))
        assert bool([p for p in params if p["in"] == "query"]) == route.query
        body = documented.get("requestBody")
        assert (body is not None) == (route.body != routes.NO_BODY), route.path
        if route.path == "/api/new":
            headers = {p["name"] for p in params if p["in"] == "header"}
            assert headers == {"X-Image-Name", "X-Image-Tag"}
            names |= {"name", "tag"}
        elif route.body == routes.BYTES:
            assert list(body["content"]) == ["application/octet-stream"] and body["required"]
            names.add(route.body_field)
        elif body is not None:
            schema = oc.resolve(SPEC, body["content"]["application/json"]["schema"])
            assert body["required"] == (route.body == routes.JSON_BODY)
            if route.body_field:
                names.add(route.body_field)
            else:
                names |= set(schema["properties"])
        assert names == set(route.schema.args.fields), (route.method, route.path)


def test_documented_names_follow_the_protocol():
    name = SPEC["components"]["parameters"]["FunctionName"]["schema"]
    peer = SPEC["components"]["parameters"]["PeerName"]["schema"]
    samples = ["fib", "a", "a-b", "a" * 63, "0x", *BAD_FUNCTION_NAMES]
    for sample in samples:
        for schema, check in ((name, protocol.FunctionName()), (peer, protocol.PEER_NAME)):
            try:
                check.check(sample, "name")
                accepted = True
            except FaasError:
                accepted = False
            try:
                oc.validate(SPEC, schema, sample)
                documented = True
            except oc.SchemaError:
                documented = False
            if sample not in protocol.RESERVED_NAMES:  # the document says "not ns" in words
                assert accepted == documented, sample


def test_error_codes_and_statuses_are_documented():
    error = SPEC["components"]["schemas"]["Error"]["properties"]["error"]
    assert set(error["properties"]["code"]["enum"]) == {c.value for c in Code}
    table = (DOCS / "http.md").read_text()
    rows = re.findall(r"^\| (`[a-z_]+`(?:, `[a-z_]+`)*) \| (\d{3}) \|$", table, re.MULTILINE)
    in_doc = {code: int(status) for codes, status in rows for code in re.findall(r"`(\w+)`",
                                                                                  codes)}
    assert in_doc == {c.value: s for c, s in routes.HTTP_STATUS.items()}
    for item in SPEC["paths"].values():
        for op in item.values():
            for status, response in op["responses"].items():
                if status != "200":
                    assert int(status) in routes.HTTP_STATUS.values()
                    schema = oc.resolve(SPEC, response)["content"]["application/json"]
                    assert schema["schema"] == {"$ref": "#/components/schemas/Error"}


def test_the_validator_is_not_vacuous():
    fn = {"$ref": "#/components/schemas/Function"}
    good = {"name": "fib", "address": "fd00:faa5:1::a", "version": 1, "created": 1.0,
            "digest": DIGEST[1], "command": ["/h"], "settings": fnsettings.defaults()}
    oc.validate(SPEC, fn, good)
    for bad in ({**good, "extra": 1}, {k: v for k, v in good.items() if k != "digest"},
                {**good, "version": "1"}, {**good, "version": True}, {**good, "name": "Bad"},
                {**good, "command": [1]},
                {**good, "settings": {**good["settings"], "env": {"A": 1}}},
                {**good, "created": None}):
        with pytest.raises(oc.SchemaError):
            oc.validate(SPEC, fn, bad)
    oc.validate(SPEC, {"type": "number", "nullable": True}, None)
    with pytest.raises(oc.SchemaError):
        oc.validate(SPEC, {"type": "string", "oneOf": []}, "x")  # unknown keyword
    with pytest.raises(oc.SchemaError):
        oc.check_answer(SPEC, "GET", "/api/list", 418, "application/json", b"[]")

