"""Secrets without a platform: the runner's store and copies, the container's mount, the
controller's checks, the CLI's and HTTP's reading of a value (which nothing may print)."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import stat
from typing import Any

import pytest

from cli import backup as bk
from cli import main as cli
from common import fnsettings, protocol
from common.errors import Code, FaasError
from common.log import EventLog
from controller.secretops import SecretOps
from runner.bundle import SECRETS_DIR, build_config
from runner.secretstore import MissingSecret, SecretStore, fs_type

VALUE = b"hunter2\x00\xff-top"


@pytest.fixture
def store(tmp_path) -> SecretStore:
    os.mkdir(tmp_path / "store", 0o700)
    os.mkdir(tmp_path / "copies", 0o700)
    return SecretStore(str(tmp_path / "store"), str(tmp_path / "copies"))


def test_values_are_stored_0600_replaced_whole_and_listed_without_them(store):
    row = store.put("db", b"old")
    assert row["name"] == "db" and row["size"] == 3
    store.put("db", VALUE)
    st = os.stat(os.path.join(store.store, "db"))
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert [r["name"] for r in store.rows()] == ["db"] and store.rows()[0]["size"] == len(VALUE)
    assert "hunter2" not in repr(store.rows())
    assert os.listdir(store.store) == ["db"]  # no temporary file left beside it


def test_bad_names_and_oversized_values_change_nothing(store):
    for name in ("../etc", "A", "", "a/b", "-x"):
        with pytest.raises(FaasError) as err:
            store.put(name, b"x")
        assert err.value.code is Code.BAD_REQUEST
    with pytest.raises(FaasError) as err:
        store.put("big", bytes(protocol.SECRET_MAX + 1))
    assert err.value.code is Code.TOO_LARGE
    assert os.listdir(store.store) == []


def test_rm_is_refused_while_a_function_uses_it_and_names_them(store):
    store.put("db", VALUE)
    with pytest.raises(FaasError) as err:
        store.remove("db", ["web", "api"])
    assert err.value.code is Code.CONFLICT and err.value.details["functions"] == ["api", "web"]
    assert "api, web" in err.value.message and "hunter2" not in err.value.message
    assert store.names() == {"db"}
    store.remove("db", [])
    assert store.names() == set()
    with pytest.raises(FaasError) as err:
        store.remove("db", [])
    assert err.value.code is Code.NOT_FOUND


def test_a_containers_copies_are_its_users_read_only_and_removed_with_it(store):
    store.put("db", VALUE)
    store.put("api", b"k")
    uid, gid = os.getuid(), os.getgid()
    path = store.materialize("fn-1", ["db", "api"], uid, gid)
    assert sorted(os.listdir(path)) == ["api", "db"]
    for name in ("db", "api"):
        st = os.stat(os.path.join(path, name))
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o400)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o500
    with open(os.path.join(path, "db"), "rb") as f:
        assert f.read() == VALUE
    store.drop("fn-1")
    assert os.listdir(store.copies) == []


def test_a_missing_secret_is_named_and_leaves_no_copies(store):
    store.put("db", VALUE)
    with pytest.raises(MissingSecret, match="secret gone is not stored"):
        store.materialize("fn-1", ["db", "gone"], os.getuid(), os.getgid())
    assert os.listdir(store.copies) == []


def test_a_symlink_planted_in_the_store_is_not_followed(store, tmp_path):
    (tmp_path / "host-file").write_bytes(b"host")
    os.symlink(tmp_path / "host-file", os.path.join(store.store, "db"))
    with pytest.raises(MissingSecret):
        store.materialize("fn-1", ["db"], os.getuid(), os.getgid())


def test_the_filesystem_of_a_path_is_its_deepest_mount(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
                    "30 22 0:5 / /run rw,nosuid - tmpfs tmpfs rw\n"
                    "31 22 0:6 / /runner rw - ext4 /dev/sdb rw\n"
                    "40 30 0:7 / /run/faasd/secrets rw - tmpfs faasd-secrets rw\n")
    assert fs_type("/run/faasd", str(info)) == ("tmpfs", False)
    assert fs_type("/run/faasd/secrets", str(info)) == ("tmpfs", True)
    assert fs_type("/runner/x", str(info)) == ("ext4", False)
    assert fs_type("/var/lib", str(info)) == ("ext4", False)


def test_the_copies_are_bound_read_only_at_run_secrets_only_when_there_are_any(tmp_path):
    image = {"cmd": ["/app"], "user": "1000:1000"}
    kw: dict[str, Any] = {"container_id": "fn-1", "hostname": "fn",
                          "control_socket": "/run/faasd/ctl/fn-1.sock"}
    plain = build_config(str(tmp_path), image, **kw)
    assert SECRETS_DIR not in [m["destination"] for m in plain["mounts"]]
    config = build_config(str(tmp_path), image, **kw, secrets_dir="/run/faasd/secrets/fn-1")
    [mount] = [m for m in config["mounts"] if m["destination"] == SECRETS_DIR]
    assert mount["source"] == "/run/faasd/secrets/fn-1" and mount["type"] == "bind"
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(mount["options"])
    assert not any("hunter2" in e for e in config["process"]["env"])


# --- the controller ----------------------------------------------------------------------


class FakeState:
    maxima = None

    def __init__(self, uses: dict[str, list[str]]):
        self.uses = uses

    def specs(self) -> list[dict[str, Any]]:
        return [{"name": n, "settings": {**fnsettings.defaults(), "secrets": s}}
                for n, s in sorted(self.uses.items())]

    def function(self, name: str) -> dict[str, Any]:
        return {"name": name, "settings": fnsettings.defaults()}


class FakeRunner:
    def __init__(self, stored: list[str]):
        self.stored = stored
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def call(self, op: str, args: dict[str, Any]) -> Any:
        self.calls.append((op, args))
        if op == "secret_list":
            return {"secrets": [{"name": n, "size": 1, "updated": 1.0} for n in self.stored]}
        if op == "secret_put":
            return {"name": args["name"], "size": len(args["value"]), "updated": 1.0}
        return {"name": args["name"]}


class Ctl(SecretOps):
    def __init__(self, uses: dict[str, list[str]], stored: list[str]):
        self.state = FakeState(uses)  # type: ignore[assignment]
        self.clients = {"runner": FakeRunner(stored)}  # type: ignore[dict-item]
        self.out = io.StringIO()
        self.log = EventLog("controller", "debug", self.out)


def test_set_with_unknown_secrets_is_refused_naming_them():
    ctl = Ctl({}, ["db"])
    asyncio.run(ctl.check_secrets("fn", {"secrets": "db"}))
    with pytest.raises(FaasError) as err:
        asyncio.run(ctl.check_secrets("fn", {"secrets": "db,nope,other"}))
    assert err.value.code is Code.NOT_FOUND and err.value.details["secrets"] == ["nope",
                                                                                 "other"]
    ctl.clients["runner"].calls.clear()  # type: ignore[attr-defined]
    asyncio.run(ctl.check_secrets("fn", {"memory": "64M"}))  # no secrets: no runner call
    asyncio.run(ctl.check_secrets("fn", {"secrets": ""}))
    assert ctl.clients["runner"].calls == []  # type: ignore[attr-defined]


def test_rm_in_use_is_refused_by_the_controller_before_the_runner_hears_of_it():
    ctl = Ctl({"web": ["db"], "api": ["db", "k"], "other": []}, ["db", "k"])
    with pytest.raises(FaasError) as err:
        asyncio.run(ctl.op_secret_rm({"name": "db"}))
    assert err.value.code is Code.CONFLICT and err.value.details["functions"] == ["api", "web"]
    assert ctl.clients["runner"].calls == []  # type: ignore[attr-defined]


def test_create_forwards_the_value_and_neither_answer_nor_log_holds_it():
    ctl = Ctl({"web": ["db"]}, ["db"])
    row = asyncio.run(ctl.op_secret_create({"name": "db", "value": VALUE}))
    assert row == {"name": "db", "size": len(VALUE), "updated": 1.0}
    assert ctl.clients["runner"].calls == [  # type: ignore[attr-defined]
        ("secret_put", {"name": "db", "value": VALUE})]
    listed = asyncio.run(ctl.op_secret_list({}))
    assert listed["secrets"][0]["functions"] == ["web"]
    ctl.log.flush()
    assert "secret_set" in ctl.out.getvalue() and "hunter2" not in ctl.out.getvalue()


# --- the CLI --------------------------------------------------------------------------------


def test_faasctl_secret_create_reads_a_file_or_stdin_never_an_argument(tmp_path, monkeypatch):
    ns = cli.build_parser().parse_args(["secret", "create", "db", "-f", str(tmp_path / "v")])
    assert ns.value == str(tmp_path / "v")
    (tmp_path / "v").write_bytes(VALUE)
    assert cli._read_bytes(str(tmp_path / "v"), 1 << 20) == VALUE
    assert cli._read_bytes(str(tmp_path / "v"), 3) == VALUE[:3]  # a huge file is not read
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(VALUE)))
    assert cli._read_bytes("-", 1 << 20) == VALUE
    assert cli.build_parser().parse_args(["secret", "create", "db"]).value == "-"
    with pytest.raises(FaasError) as err:
        cli._read_bytes(str(tmp_path / "missing"), 10)
    assert err.value.code is Code.BAD_REQUEST and str(tmp_path / "missing") in err.value.message


def test_an_oversized_value_is_refused_without_quoting_it():
    with pytest.raises(FaasError) as err:
        protocol.SECRET_CREATE.args.check(
            {"name": "db", "value": b"hunter2" * protocol.SECRET_MAX}, "args")
    assert err.value.code is Code.BAD_REQUEST and "hunter2" not in str(err.value.to_wire())


# --- backup and restore -------------------------------------------------------------------


def _host_with_secrets(tmp_path):
    from tests.unit.test_backup import Host
    host = Host(tmp_path / "old")
    store = host.root / "secrets"
    store.mkdir(mode=0o700)
    (store / "db").write_bytes(VALUE)
    (store / "api").write_bytes(b"k" * 100)
    return host


def test_a_backup_holds_secrets_only_when_asked_and_says_so(tmp_path):
    from tests.unit.test_backup import members
    host = _host_with_secrets(tmp_path)
    try:
        plain, full = tmp_path / "plain.tar.gz", tmp_path / "full.tar.gz"
        out = io.StringIO()
        bk.summary(str(plain), bk.backup(host.settings, str(plain)), out)
        assert "secrets.json" not in [ti.name for ti, _ in members(plain)]
        assert b"hunter2" not in gzip.decompress(plain.read_bytes())
        assert "--with-secrets" in out.getvalue()
        out = io.StringIO()
        manifest = bk.backup(host.settings, str(full), with_secrets=True)
        bk.summary(str(full), manifest, out)
        assert manifest["secrets"] == ["api", "db"]
        assert "holds the values of 2 secrets (api, db)" in out.getvalue()
        assert "hunter2" not in out.getvalue()
        assert stat.S_IMODE(full.stat().st_mode) == 0o600
        got = {ti.name: (ti.mode, data) for ti, data in members(full)}
        assert got["secrets.json"][0] == 0o600
        assert [ti.name for ti, _ in members(full)][-2:] == ["secrets.json", "state.db"]
    finally:
        host.state.close()


def test_restore_puts_secrets_back_root_0600(tmp_path):
    from tests.unit.test_backup import make_settings, restore
    host = _host_with_secrets(tmp_path)
    try:
        path = tmp_path / "full.tar.gz"
        bk.backup(host.settings, str(path), with_secrets=True)
    finally:
        host.state.close()
    settings = make_settings(tmp_path / "new")
    for d in ("logs", "state", "dns", "spool"):
        os.makedirs(os.path.join(settings.root, d))
    out = restore(path, settings)
    assert "2 secrets" in out and "hunter2" not in out
    store = os.path.join(settings.root, "secrets")
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o700
    with open(os.path.join(store, "db"), "rb") as f:
        assert f.read() == VALUE
    assert stat.S_IMODE(os.stat(os.path.join(store, "db")).st_mode) == 0o600


def test_a_bad_secrets_member_refuses_the_restore_naming_no_value(tmp_path):
    from runner import backup as part
    for doc, fault in (({"format": 1, "secrets": {"../x": "YQ=="}}, "not a secret name"),
                       ({"format": 1, "secrets": {"db": "!!hunter2"}}, "not base64"),
                       ({"format": 2, "secrets": {}}, "not format 1"),
                       ({"format": 1, "secrets": {"db": "A" * (protocol.SECRET_MAX * 2)}},
                        "at most")):
        with pytest.raises(FaasError) as err:
            part.parse(json.dumps(doc).encode())
        assert err.value.code is Code.BAD_REQUEST and fault in err.value.message
        assert "hunter2" not in err.value.message


def test_a_sync_naming_a_secret_by_path_is_refused_whole():
    import ipaddress

    from runner.bounds import check_state
    prefix = ipaddress.IPv6Network("fd00:faa5:1::/64")
    for bad in (["../../etc/shadow"], ["db", "db"], ["/run/secrets/db"], ["DB"]):
        state = {"images": [], "functions": [{
            "name": "fn", "address": "fd00:faa5:1::a", "digest": "sha256:" + "a" * 64,
            "settings": {**fnsettings.defaults(), "secrets": bad}}]}
        with pytest.raises(FaasError) as err:
            check_state(state, prefix, {})
        assert err.value.code is Code.BAD_REQUEST and "secrets" in err.value.message


def test_faasctl_prints_names_sizes_and_users_of_secrets():
    from cli.render import RENDERERS
    out = io.StringIO()
    RENDERERS["secret_list"]({"secrets": [
        {"name": "db", "size": 9, "updated": 1700000005.0, "functions": ["web", "api"]},
        {"name": "unused", "size": 1, "updated": 1700000005.0, "functions": []}]}, out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "UPDATED", "USED", "BY"]
    assert lines[1].split()[:2] == ["db", "9"] and lines[1].split()[-1] == "web,api"
    assert lines[2].split()[-1] == "-"
    out = io.StringIO()
    RENDERERS["secret_create"]({"name": "db", "size": 9, "updated": 1.0}, out)
    assert out.getvalue() == "secret db: 9 bytes stored\n"
