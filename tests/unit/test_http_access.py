"""Who may use the HTTP API: operators by uid, tokens by role, never a foreign page.

A real HttpApi (aiohttp) over the fake handler table of test_http_api, on loopback TCP,
a unix socket and a second "VPN" listener on ::1. Requests from other users come from a
real client process run with setpriv as that uid, so the kernel's answer about the
socket's owner is the real one. The routes come from docs/openapi.json, not a hand list.
"""

from __future__ import annotations

import asyncio
import grp
import io
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import pytest

from common import protocol
from common.errors import Code, FaasError
from common.log import EventLog
from controller import access, http, routes
from controller.access import Caller, Operators
from controller.http import Endpoints, HttpApi, Storm, Tokens
from controller.routes import ROUTES
from tests import openapi_check as oc
from tests.unit.test_http_api import GOOD, FakeController, handlers_of, metrics_of, with_metrics

SPEC = oc.load()
NOBODY = pwd.getpwnam("nobody").pw_uid
NOGROUP = grp.getgrnam("nogroup").gr_gid
FAAS_GID = grp.getgrnam("faas").gr_gid

# The policy, written out once more by hand so that a change of a role in protocol.OPS
# shows up here: what the least role may do. Operators may do everything.
READ = {("GET", "/healthz"), ("GET", "/metrics"), ("GET", "/api/status"),
        ("GET", "/api/list"), ("GET", "/api/functions/{name}"),
        ("GET", "/api/functions/{name}/versions"), ("GET", "/api/functions/{name}/settings"),
        ("GET", "/api/functions/{name}/logs"), ("GET", "/api/peers"), ("GET", "/api/secrets"),
        ("GET", "/api/volumes")}
DEPLOY = READ | {("POST", "/api/new"), ("DELETE", "/api/functions/{name}"),
                 ("POST", "/api/functions/{name}/rollback"),
                 ("PATCH", "/api/functions/{name}/settings"),
                 ("POST", "/api/functions/{name}/settings")}
ALLOWED = {"read": READ, "deploy": DEPLOY, "admin": oc.operations(SPEC)}


# --- a server with tokens, a unix socket and a VPN listener ------------------------------


class TokenStore:
    """Tokens as the state keeps them: digest -> row."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.used: list[str] = []

    def add(self, name: str, role: str, expires: float | None = None) -> str:
        token = access.new_token()
        self.rows[access.token_digest(token)] = {"name": name, "role": role, "created": 1.0,
                                                 "expires": expires, "last_used": None}
        return token


@pytest.fixture
def store() -> TokenStore:
    return TokenStore()


@pytest.fixture
def logged() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
def server(fake, store, logged):
    """HttpApi on 127.0.0.1:<port>, [::1]:<port> as the VPN listener, and a unix socket
    in a directory other users may enter (pytest's tmp_path is root's alone)."""
    run_dir = tempfile.mkdtemp(prefix="faas-http-")
    os.chmod(run_dir, 0o755)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    with_metrics(fake)
    api = HttpApi(handlers_of(fake), Endpoints("127.0.0.1:0", unix=f"{run_dir}/http.sock",
                                               unix_gid=FAAS_GID, vpn="::1",
                                               loopback_twin=False),  # ::1 plays the VPN
                  EventLog("controller", stream=logged), operators=Operators("faas"),
                  tokens=Tokens(store.rows.get, lambda name, now: store.used.append(name)),
                  metrics=metrics_of(fake), max_connections=8)
    asyncio.run_coroutine_threadsafe(api.start(), loop).result(5)
    api.loop = loop  # type: ignore[attr-defined]
    yield api
    asyncio.run_coroutine_threadsafe(api.stop(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()
    shutil.rmtree(run_dir)


@pytest.fixture
def fake() -> FakeController:
    return FakeController()


# A client run as any uid: reads requests (JSON lines) on stdin, one connection each,
# prints [status, body] per request.
CLIENT = r"""
import json, socket, sys
out = []
for line in sys.stdin:
    r = json.loads(line)
    if r["unix"]:
        s = socket.socket(socket.AF_UNIX); s.connect(r["unix"])
    else:
        s = socket.create_connection((r["host"], r["port"]))
    body = r["body"].encode("latin-1")
    head = f"{r['method']} {r['path']} HTTP/1.1\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in r["headers"].items())
    head += f"Content-Length: {len(body)}\r\n\r\n" if body else "\r\n"
    s.sendall(head.encode() + body)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    out.append([int(head.split(b" ")[1]), rest.decode("latin-1")])
print(json.dumps(out))
"""


def run_as(uid: int | None, requests: list[dict[str, Any]], gid: int = NOGROUP,
           groups: str = "--clear-groups") -> list[tuple[int, Any]]:
    """Send requests from a process of this uid (None: ourselves, root)."""
    argv = [sys.executable, "-c", CLIENT]
    if uid is not None:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", groups, *argv]
    stdin = "".join(json.dumps(r) + "\n" for r in requests)
    out = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [(status, json.loads(body) if body.startswith(("{", "[")) else body)
            for status, body in json.loads(out.stdout)]


def req(api: HttpApi, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None, *, host: str = "127.0.0.1",
        unix: bool = False, token: str | None = None) -> dict[str, Any]:
    hdrs = {"Host": f"{host if ':' not in host else f'[{host}]'}:{api.port}"}
    if method in routes.CHANGING and path != "/api/new":
        hdrs["Content-Type"] = "application/json"
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    hdrs.update(headers or {})
    return {"method": method, "path": path, "headers": hdrs, "host": host, "port": api.port,
            "unix": api.endpoints.unix if unix else None,
            "body": (body or b"").decode("latin-1")}


def every_operation(api: HttpApi) -> list[tuple[tuple[str, str], dict[str, Any]]]:
    """One good request per operation of the OpenAPI document."""
    return [((m, t), req(api, m, GOOD[m, t].path, GOOD[m, t].body, GOOD[m, t].headers))
            for m, t in sorted(oc.operations(SPEC))]


# --- operators by uid --------------------------------------------------------------------


def test_a_user_outside_the_group_gets_403_on_every_route(server, fake):
    ops = every_operation(server)
    answers = run_as(NOBODY, [r for _, r in ops])
    for ((method, template), _), (status, body) in zip(ops, answers):
        assert status == 403, (method, template, body)
        message = body["error"]["message"]
        assert "uid 65534 (nobody)" in message and "usermod -aG faas nobody" in message
    assert fake.calls == []  # nothing ran, nothing changed


def test_a_user_without_a_passwd_entry_gets_403(server, fake):
    [(status, body)] = run_as(54321, [req(server, "GET", "/api/list")])
    assert status == 403 and "uid 54321 (no passwd entry)" in body["error"]["message"]


def test_a_group_member_and_root_may_do_everything(server, fake):
    faas = pwd.getpwnam("faas")  # the faas user: primary group faas
    for uid, gid in ((faas.pw_uid, faas.pw_gid), (None, 0)):
        for (method, template), one in every_operation(server):
            fake.__init__()  # a fresh state for each: rm and rollback need theirs
            with_metrics(fake)
            [(status, body)] = run_as(uid, [one], gid=gid)
            assert status == 200, (uid, method, template, body)


def test_uid_lookup_over_ipv4_ipv6_and_v4_mapped():
    def pair(family: int, host: str, dual: bool = False) -> tuple[Any, ...]:
        srv = socket.socket(family)
        if dual:
            srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        srv.bind((host, 0))
        srv.listen()
        port = srv.getsockname()[1]
        proc = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOGROUP}",
                                 "--clear-groups", sys.executable, "-c",
                                 "import socket,sys; s=socket.create_connection((sys.argv[1],"
                                 " int(sys.argv[2]))); sys.stdin.read()",
                                 "127.0.0.1" if dual else host, str(port)],
                                stdin=subprocess.PIPE)
        conn, _ = srv.accept()
        return srv, proc, conn
    for family, host, dual in ((socket.AF_INET, "127.0.0.1", False),
                               (socket.AF_INET6, "::1", False),
                               (socket.AF_INET6, "::", True)):
        srv, proc, conn = pair(family, host, dual)
        try:
            if dual:
                assert conn.getpeername()[0] == "::ffff:127.0.0.1"
            assert access.peer_uid(conn.getsockname(), conn.getpeername()) == NOBODY
            started = time.perf_counter()
            for _ in range(200):
                access.peer_uid(conn.getsockname(), conn.getpeername())
            per_lookup = (time.perf_counter() - started) / 200
            assert per_lookup < 0.002, per_lookup  # docs/http.md: about 20 µs
        finally:
            proc.stdin.close()  # type: ignore[union-attr]
            proc.wait()
            conn.close()
            srv.close()
    assert access.peer_uid(("127.0.0.1", 1), ("127.0.0.1", 2)) is None  # no such socket


def test_membership_is_reread_after_a_few_seconds(monkeypatch):
    now = [100.0]
    ops = Operators("faas", clock=lambda: now[0])
    members: list[str] = []
    user = pwd.struct_passwd(("alice", "x", 1234, 1234, "", "/", "/bin/sh"))
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: user)
    monkeypatch.setattr(grp, "getgrnam",
                        lambda name: grp.struct_group(("faas", "x", FAAS_GID, members)))
    assert ops.check(1234) == (False, "uid 1234 (alice)")
    members.append("alice")  # usermod -aG faas alice
    assert ops.check(1234)[0] is False  # still cached
    now[0] += access.CACHE_SECONDS + 0.1
    assert ops.check(1234) == (True, "uid 1234 (alice)")  # supplementary member
    assert ops.check(0) == (True, "uid 0 (root)")


# --- the unix socket -----------------------------------------------------------------


def test_unix_socket_is_group_faas_0660_and_checks_the_peer(server, fake):
    st = os.stat(server.endpoints.unix)
    assert oct(st.st_mode & 0o777) == "0o660" and st.st_gid == FAAS_GID
    [(status, body)] = run_as(None, [req(server, "GET", "/api/list", unix=True)])
    assert status == 200 and [f["name"] for f in body] == ["fib", "solo"]
    # a process of group faas with a uid outside it (newgrp/sg): the socket lets it in
    [(status, body)] = run_as(NOBODY, [req(server, "GET", "/api/list", unix=True)],
                              gid=FAAS_GID)
    assert status == 200, body
    # nobody in nogroup with the file's mode loosened: SO_PEERCRED still refuses
    os.chmod(server.endpoints.unix, 0o666)
    [(status, body)] = run_as(NOBODY, [req(server, "GET", "/api/list", unix=True)])
    assert status == 403 and "nobody" in body["error"]["message"]


# --- tokens --------------------------------------------------------------------------


@pytest.mark.parametrize("role", protocol.ROLES)
def test_a_token_does_exactly_what_its_role_allows(server, fake, store, role):
    token = store.add(f"t-{role}", role)
    for (method, template), one in every_operation(server):
        fake.__init__()
        with_metrics(fake)
        one["headers"]["Authorization"] = f"Bearer {token}"
        [(status, body)] = run_as(NOBODY, [one])  # the token decides, not the uid
        if (method, template) in ALLOWED[role]:
            assert status == 200, (role, method, template, body)
        else:
            assert status == 403, (role, method, template, body)
            assert body["error"]["details"]["reason"] == "role"
            assert fake.calls == []
    assert store.used and set(store.used) == {f"t-{role}"}


def test_the_role_table_is_the_one_of_the_protocol():
    for route in ROUTES:
        least = next(r for r in protocol.ROLES if (route.method, route.path) in ALLOWED[r])
        assert route.role == least, (route.method, route.path)


def test_bad_unknown_and_expired_tokens_are_401(server, fake, store):
    expired = store.add("old", "admin", expires=time.time() - 1)
    for header, reason in ((f"Bearer {expired}", "expired_token"),
                           ("Bearer faas_" + "x" * 43, "unknown_token"),
                           ("Bearer nonsense", "unknown_token"),
                           ("Basic dXNlcjpwYXNz", "bad_authorization"),
                           ("Bearer", "bad_authorization")):
        [(status, body)] = run_as(None, [req(server, "GET", "/api/list",
                                             headers={"Authorization": header})])
        assert status == 401 and body["error"]["code"] == "unauthorized"
        assert body["error"]["details"]["reason"] == reason
        assert expired not in json.dumps(body)
    assert fake.calls == []


def test_the_vpn_listener_takes_tokens_only(server, fake, store):
    [(status, body)] = run_as(None, [req(server, "GET", "/api/list", host="::1")])
    assert status == 401 and body["error"]["details"]["reason"] == "no_token"
    token = store.add("laptop", "deploy")
    [(status, body)] = run_as(None, [req(server, "GET", "/api/list", host="::1",
                                         token=token)])
    assert status == 200
    [(status, body)] = run_as(None, [req(server, "POST", "/api/peers", b'{"name": "x"}',
                                         host="::1", token=token)])
    assert status == 403 and fake.calls == [("list", {})]


class _Transport:
    def __init__(self, peer: str):
        self.peer = peer

    def get_extra_info(self, key: str) -> Any:
        return {"sockname": ("192.0.2.1", 8080), "peername": (self.peer, 40000)}[key]


class _Request:
    def __init__(self, peer: str, headers: dict[str, str] | None = None):
        self.transport = _Transport(peer)
        self.headers = headers or {}


def test_a_tokenless_caller_from_another_host_is_refused(server):
    for peer in ("192.0.2.7", "fd00:faa5:0:100::2", "::ffff:192.0.2.7"):
        with pytest.raises(FaasError) as info:
            asyncio.run(server._caller(_Request(peer), http.LOCAL))
        assert info.value.code == Code.UNAUTHORIZED


def test_a_caller_with_a_token_from_another_host_is_its_token(server, store):
    token = store.add("ci", "read")
    caller = asyncio.run(server._caller(
        _Request("192.0.2.7", {"Authorization": f"Bearer {token}"}), http.LOCAL))
    assert caller == Caller("token ci", "read")


# --- rebinding and CSRF --------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    {"Host": "evil.example:8080"},                      # DNS rebinding
    {"Host": "evil.example"},
    {"Host": "127.0.0.1.evil.example:8080"},
    {"Host": "fib.faas"},
    {"Host": "localhost:8080", "Origin": "http://evil.example"},  # CSRF
    {"Host": "localhost:8080", "Origin": "null"},
    {"Host": "localhost:8080", "Origin": "https://localhost:8080"},
    {"Host": "localhost:8080", "Origin": "http://localhost.evil.example"},
])
def test_foreign_host_or_origin_is_refused(server, fake, headers):
    for method, path, body in (("GET", "/api/list", None),
                               ("DELETE", "/api/functions/fib", None),
                               ("POST", "/api/new", b"TAR")):
        extra = {"X-Image-Name": "x"} if path == "/api/new" else {}
        [(status, answer)] = run_as(None, [req(server, method, path, body,
                                               {**headers, **extra})])
        assert status == 403, (headers, path)
        assert answer["error"]["details"]["reason"] in ("foreign_host", "cross_site")
    assert fake.calls == []


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "localhost:1"])
def test_own_names_and_same_origin_pass(server, fake, host):
    origin = f"http://{host}"
    [(status, _)] = run_as(None, [req(server, "GET", "/api/list",
                                      headers={"Host": host, "Origin": origin})])
    assert status == 200


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", None])
def test_state_changing_requests_need_json_or_bytes(server, fake, ctype):
    """What a cross-site form can send is refused, even to an operator."""
    cases = [("DELETE", "/api/functions/fib", None),
             ("POST", "/api/functions/fib/rollback", None),
             ("PATCH", "/api/functions/fib/settings", b'{"memory": "256M"}'),
             ("POST", "/api/peers", b'{"name": "x"}'),
             ("POST", "/api/new", b"TAR")]  # without X-Image-Name
    for method, path, body in cases:
        one = req(server, method, path, body)
        one["headers"].pop("Content-Type", None)
        if ctype is not None:
            one["headers"]["Content-Type"] = ctype
        [(status, answer)] = run_as(None, [one])
        assert status == 403 and answer["error"]["details"]["reason"] == "content_type"
    assert fake.calls == []


def test_the_guides_plain_curl_deploy_still_works(server, fake):
    """curl --data-binary sends a form type; X-Image-Name (which no page can send
    cross-site without a preflight) lets it through."""
    one = req(server, "POST", "/api/new", b"TAR" + bytes(1000),
              {"X-Image-Name": "newfn",
               "Content-Type": "application/x-www-form-urlencoded"})
    [(status, body)] = run_as(None, [one])
    assert status == 200 and body["name"] == "newfn"


def test_uploads_are_counted_per_uid_or_token(server, fake, store):
    """The controller's per-caller upload slots see who called over HTTP: the operator's
    uid from the kernel, or the token's name; never something the request says."""
    token = store.add("ci", "deploy")
    deploy = {"X-Image-Name": "newfn", "Content-Type": "application/octet-stream"}
    by_uid = req(server, "POST", "/api/new", b"TAR" + bytes(100), deploy)
    by_token = req(server, "POST", "/api/new", b"TAR" + bytes(100),
                   {**deploy, "Authorization": f"Bearer {token}"})
    assert [s for s, _ in run_as(None, [by_uid, by_token])] == [200, 200]
    assert fake.callers == [f"uid {os.getuid()}", "token ci"]


# --- connections ---------------------------------------------------------------------


def test_connections_are_capped_and_refusals_logged_once(server, logged):
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(8)]
    try:
        def served() -> int:
            return server.open
        deadline = time.monotonic() + 5
        while served() < 8:
            assert time.monotonic() < deadline, server.open
            time.sleep(0.01)
        refused = []
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.settimeout(5)
            refused.append(s.recv(1))  # closed at once, nothing read or answered
            s.close()
        assert refused == [b""] * 50
    finally:
        for s in idle:
            s.close()
    lines = [json.loads(x) for x in logged.getvalue().splitlines()]
    storms = [x for x in lines if x["event"] == "http_connections_refused"]
    assert len(storms) == 1 and storms[0]["count"] == 1 and storms[0]["max"] == 8
    deadline = time.monotonic() + 5
    while server.open:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    [(status, _)] = run_as(None, [req(server, "GET", "/api/list")])
    assert status == 200


HOLD = r"""
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
held = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
print("ready", flush=True)
sys.stdin.read()  # holds them until the test closes our stdin
"""


def test_a_user_outside_the_group_cannot_take_the_operators_connections(server):
    """Idle connections of a local user who may not use the API fill only the share of
    http_max_connections that is not kept for operators: root is still served, and the
    same user's next connection is closed at once."""
    holder = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOGROUP}",
                               "--clear-groups", sys.executable, "-c", HOLD,
                               str(server.port), "8"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 5
        while server.open != 6:  # 8 - 2 kept for operators: the other 2 are closed
            assert time.monotonic() < deadline, server.open
            time.sleep(0.01)
        [(status, _)] = run_as(None, [req(server, "GET", "/api/list")])
        assert status == 200
        [(status, _)] = run_as(None, [req(server, "GET", "/api/list", unix=True)])
        assert status == 200
    finally:
        holder.stdin.close()
        holder.wait(10)


def test_a_storm_is_logged_once_per_interval_with_its_count():
    out = io.StringIO()

    async def storm() -> None:
        s = Storm(EventLog("controller", stream=out), "http_connections_refused",
                  interval=0.2)
        for _ in range(1000):
            s.hit(max=8)
        deadline = time.monotonic() + 5
        while out.getvalue().count("\n") < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        s.close()
    asyncio.run(storm())
    counts = [json.loads(x)["count"] for x in out.getvalue().splitlines()]
    assert counts == [1, 999]


def test_the_api_gets_a_handler_table_not_the_controller():
    """One dispatch path: the HTTP API calls the checked handler table the ZeroMQ server
    gets, and controller/http.py does not import controller/main.py (no circle)."""
    import ast
    from pathlib import Path
    tree = ast.parse((Path(http.__file__)).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "controller.main" not in imported
    with pytest.raises(ValueError):  # a table that is not the protocol's is refused
        HttpApi({"list": handlers_of(FakeController())["list"]}, Endpoints("127.0.0.1:0"),
                EventLog("controller", stream=io.StringIO()), operators=Operators("faas"))


def _serve(api: HttpApi):
    """Run ``api`` on a loop in a thread; returns a function that stops it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(api.start(), loop).result(5)
    api.loop = loop  # type: ignore[attr-defined]

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(api.stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    return stop


def test_localhost_on_ipv6_reaches_the_api_too(fake):
    """On 127.0.0.1 the API also holds [::1] at the same port, where `localhost` may
    resolve first: no other user can listen there and catch an operator's requests."""
    api = HttpApi(handlers_of(fake), Endpoints("127.0.0.1:0"),
                  EventLog("controller", stream=io.StringIO()), operators=Operators("faas"))
    stop = _serve(api)
    try:
        [(status, _)] = run_as(None, [req(api, "GET", "/api/list", host="::1")])
        assert status == 200
        [(status, body)] = run_as(NOBODY, [req(api, "GET", "/api/list", host="::1")])
        assert status == 403, body
        squat = socket.socket(socket.AF_INET6)
        with pytest.raises(OSError):  # taken: nobody else may listen there
            squat.bind(("::1", api.port))
        squat.close()
    finally:
        stop()


def test_a_squatted_ipv6_loopback_port_is_reported_and_ipv4_still_served(fake):
    squat = socket.socket(socket.AF_INET6)
    squat.bind(("::1", 0))
    squat.listen()
    port = squat.getsockname()[1]
    logged = io.StringIO()
    try:
        api = HttpApi(handlers_of(fake), Endpoints(f"127.0.0.1:{port}"),
                      EventLog("controller", stream=logged), operators=Operators("faas"))
    except OSError:
        pytest.fail("could not build the API")
    try:
        stop = _serve(api)
    except OSError as exc:  # 127.0.0.1 at that port taken by chance: nothing to test
        squat.close()
        pytest.fail(f"127.0.0.1:{port} is taken by another process: {exc}")
    try:
        [(status, _)] = run_as(None, [req(api, "GET", "/api/list")])
        assert status == 200
        assert "http_twin_taken" in logged.getvalue()
        assert f"ss -ltnp 'sport = :{port}'" in logged.getvalue()
    finally:
        stop()
        squat.close()

