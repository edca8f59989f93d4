"""faasctl backup and restore without root: the archive, the consistent copy of the live
database, and a restore that refuses every bad archive before it writes anything."""

from __future__ import annotations

import base64
import fcntl
import gzip
import hashlib
import io
import json
import os
import secrets
import sqlite3
import stat
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from cli import archive as ar
from cli import backup as bk
from common import parts
from common.errors import EXIT_STATUS, Code, FaasError
from common.settings import load, vpn_server
from controller import backup as controller_part
from controller.state import MIGRATIONS, State
from dnsagent import zone

BIN = Path(sys.executable).parent
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64
CONFIG = {"entrypoint": [], "cmd": ["/handler"], "env": [], "workdir": "/", "user": ""}


def wg_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def make_settings(base: Path, **extra: str):
    env = {"FAAS_ROOT": str(base / "root"), "FAAS_RUN": str(base / "run"),
           "FAAS_CONFIG": "/dev/null", "FAAS_WG_INTERFACE": f"wgu{secrets.token_hex(3)}"}
    env.update({f"FAAS_{k.upper()}": v for k, v in extra.items()})
    return load(env)


OWNERS = bk.Owners((os.getuid(), os.getgid()), (os.getuid(), os.getgid()))


class Host:
    """A $FAAS_ROOT as a running server leaves it: state, zone, key, endpoints, and the
    directories a backup must leave out."""

    def __init__(self, base: Path):
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.settings = make_settings(base)
        self.root = Path(self.settings.root)
        self.state = State(str(self.root / "state" / "state.db"), self.settings.function_prefix,
                           self.settings.vpn_prefix)
        self.state.add_version("alpha", DIGEST_B, CONFIG, 100)
        self.state.add_version("alpha", DIGEST_A, CONFIG, 100)
        self.state.add_version("beta", DIGEST_B, CONFIG, 100)
        self.peer_key = wg_key()
        self.state.add_peer("laptop", self.peer_key, None)
        records = zone.check_records(
            [{"name": f["name"], "address": f["address"]} for f in self.state.functions()],
            zone.ipaddress.IPv6Network(self.settings.function_prefix))
        (self.root / "dns").mkdir(mode=0o755)
        self.zone = zone.render(records, 2024010502,
                                vpn_server(self.settings.vpn_prefix).ip)
        (self.root / "dns" / "faas.db").write_text(self.zone)
        (self.root / "dns" / "serial").write_text("2024010502\n")
        (self.root / "dns" / "rndc.conf").write_text("key secret\n")
        (self.root / "wireguard").mkdir(mode=0o700)
        self.key = wg_key() + "\n"
        (self.root / "wireguard" / "private.key").write_text(self.key)
        (self.root / "wireguard" / "endpoints.json").write_text(
            json.dumps({self.peer_key: "[fdff:1::2]:40000"}))
        for d in ("images/" + "a" * 64 + "/rootfs", "spool", "logs", "named", "bundles"):
            (self.root / d).mkdir(parents=True)
            (self.root / d / "junk").write_text("not in a backup")


@pytest.fixture
def host(tmp_path):
    h = Host(tmp_path / "old")
    yield h
    h.state.close()


@pytest.fixture
def archive(host, tmp_path) -> Path:
    path = tmp_path / "out" / "faasd.tar.gz"
    path.parent.mkdir()
    bk.backup(host.settings, str(path))
    return path


@pytest.fixture
def fresh(tmp_path):
    """A fresh install's settings and root: the directories, nothing in them."""
    settings = make_settings(tmp_path / "new")
    root = Path(settings.root)
    for d in ("logs", "state", "dns", "spool"):
        (root / d).mkdir(parents=True)
    return settings


def tree(root: Path) -> list[tuple]:
    """Every path under ``root`` with its type, mode, owner and content hash."""
    if not root.exists():
        return []
    out = []
    for dirpath, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) \
                else os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            out.append((str(p.relative_to(root)), st.st_mode, st.st_uid, st.st_gid, digest))
    return sorted(out)


def members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path, "r:gz") as tf:
        return [(ti, tf.extractfile(ti).read()) for ti in tf.getmembers()]


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


def write_tar(path: Path, entries, compress: bool = True) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None and ti.isreg() else None)
    path.write_bytes(gzip.compress(buf.getvalue()) if compress else buf.getvalue())
    return path


def rebuild(valid: Path, path: Path, replace=None, extra=(), drop=(), manifest=None,
            fix=True) -> Path:
    """The valid archive with members replaced, added or dropped; the manifest's file
    list recomputed (unless ``fix`` is false) so that only the change itself is wrong."""
    entries = [(ti, data) for ti, data in members(valid) if ti.name not in drop]
    entries = [regular(ti.name, (replace or {}).get(ti.name, data)) for ti, data in entries]
    doc = json.loads(entries[0][1])
    doc.update(manifest or {})
    if fix:
        doc["files"] = {ti.name: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                        for ti, d in entries[1:] if ti.name != "manifest.json"}
    entries[0] = regular("manifest.json", json.dumps(doc).encode())
    return write_tar(path, entries + list(extra))


def restore(path: Path, settings, force: bool = False) -> str:
    out = io.StringIO()
    bk.restore(str(path), settings, force, OWNERS, out)
    return out.getvalue()


def refused(path: Path, settings, code: Code = Code.BAD_REQUEST, force: bool = False) -> str:
    root = Path(settings.root)
    before = tree(root)
    with pytest.raises(FaasError) as info:
        restore(path, settings, force)
    assert info.value.code == code, info.value.message
    assert tree(root) == before, "a refused restore changed $FAAS_ROOT"
    return info.value.message


# --- backup ---------------------------------------------------------------------------

def test_archive_holds_state_zone_keys_and_manifest_only(host, archive):
    got = members(archive)
    assert [ti.name for ti, _ in got] == ["manifest.json", "wireguard/private.key",
                                          "wireguard/endpoints.json", "dns/serial",
                                          "dns/faas.db", "state.db"]
    assert all(ti.type == tarfile.REGTYPE and ti.mode == 0o600 and ti.uid == 0
               for ti, _ in got)
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert os.listdir(archive.parent) == [archive.name]  # no temporary file left
    data = {ti.name: d for ti, d in got}
    assert data["wireguard/private.key"].decode() == host.key
    assert data["dns/faas.db"].decode() == host.zone
    assert data["dns/serial"] == b"2024010502\n"
    manifest = json.loads(data["manifest.json"])
    assert manifest["format"] == bk.FORMAT and manifest["schema"] == len(MIGRATIONS)
    assert manifest["settings"] == {"function_prefix": "fd00:faa5:1::/64",
                                    "vpn_prefix": "fd00:faa5:0:100::/64",
                                    "wg_interface": host.settings.wg_interface,
                                    "wg_port": 51820}
    assert manifest["images"] == [
        {"digest": DIGEST_A, "uses": [{"name": "alpha", "version": 2, "current": True}]},
        {"digest": DIGEST_B, "uses": [{"name": "alpha", "version": 1, "current": False},
                                      {"name": "beta", "version": 1, "current": True}]}]
    assert [p["public_key"] for p in manifest["peers"]] == [host.peer_key]
    for name, entry in manifest["files"].items():
        assert entry == {"size": len(data[name]),
                         "sha256": hashlib.sha256(data[name]).hexdigest()}
    blob = archive.read_bytes()
    assert b"not in a backup" not in gzip.decompress(blob)


def test_backup_replaces_an_existing_file_atomically(host, archive):
    archive.write_text("old")
    archive.chmod(0o644)
    bk.backup(host.settings, str(archive))
    assert members(archive)[0][0].name == "manifest.json"
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert os.listdir(archive.parent) == [archive.name]


def test_backup_never_follows_a_planted_symlink(host, tmp_path):
    zone_file = host.root / "dns" / "faas.db"
    zone_file.unlink()
    zone_file.symlink_to("/etc/passwd")
    target = tmp_path / "b.tar.gz"
    with pytest.raises(OSError):
        bk.backup(host.settings, str(target))
    assert not target.exists() and os.listdir(tmp_path) == ["old"]


def test_snapshot_is_consistent_while_another_connection_writes(tmp_path):
    """Each transaction adds a row and bumps a counter: every copy must see both or
    neither, whatever the writer is doing."""
    path = str(tmp_path / "live.db")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript("CREATE TABLE rows (n INTEGER, pad TEXT); CREATE TABLE counter (n INTEGER);"
                     "INSERT INTO counter VALUES (0);")
    stop = threading.Event()

    def write() -> None:
        w = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        while not stop.is_set():
            w.execute("BEGIN IMMEDIATE")
            w.execute("INSERT INTO rows VALUES ((SELECT n FROM counter), ?)", ("x" * 3000,))
            w.execute("UPDATE counter SET n = n + 1")
            w.execute("COMMIT")
        w.close()

    writer = threading.Thread(target=write)
    writer.start()
    seen = set()
    try:
        for i in range(25):
            copy = str(tmp_path / f"copy{i}.db")
            controller_part.snapshot_db(path, copy)
            c = sqlite3.connect(copy)
            assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert c.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
            rows, counter = c.execute(
                "SELECT COUNT(*), (SELECT n FROM counter) FROM rows").fetchone()
            assert rows == counter
            seen.add(rows)
            c.close()
    finally:
        stop.set()
        writer.join()
    db.close()
    assert len(seen) > 1, "the writer never ran during the copies"


# --- restore: the good path -------------------------------------------------------------

def test_restore_round_trip_owners_modes_and_images_needed(host, archive, fresh):
    out = restore(archive, fresh)
    root = Path(fresh.root)
    for rel, mode in (("state", 0o700), ("state/state.db", 0o600), ("dns", 0o755),
                      ("dns/faas.db", 0o644), ("dns/serial", 0o644), ("wireguard", 0o700),
                      ("wireguard/private.key", 0o600), ("wireguard/endpoints.json", 0o600)):
        st = (root / rel).lstat()
        assert stat.S_IMODE(st.st_mode) == mode, rel
        assert (st.st_uid, st.st_gid) == OWNERS.faas, rel
    assert (root / "wireguard" / "private.key").read_text() == host.key
    assert (root / "dns" / "faas.db").read_text() == host.zone
    assert json.loads((root / "wireguard" / "endpoints.json").read_text()) == \
        {host.peer_key: "[fdff:1::2]:40000"}
    new = State(str(root / "state" / "state.db"), fresh.function_prefix, fresh.vpn_prefix)
    try:
        assert new.functions() == host.state.functions()
        assert new.peers() == host.state.peers()
        assert new.generation == host.state.generation
    finally:
        new.close()
    assert not [p for p in os.listdir(root / "state") if p.endswith(".tmp")]
    # What to redeploy: each digest, who uses it, and the command for the serving ones.
    assert DIGEST_A in out and DIGEST_B in out
    assert "faasctl new alpha -f IMAGE.tar" in out and "alpha becomes version 3" in out
    assert "faasctl new beta -f IMAGE.tar" in out
    assert "new version" in out


def test_restore_into_a_missing_root_makes_the_directories(archive, tmp_path):
    settings = make_settings(tmp_path / "bare")
    restore(archive, settings)
    root = Path(settings.root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o755
    assert (root / "state" / "state.db").is_file()


def test_an_image_already_here_is_not_asked_for(host, archive, fresh):
    (Path(fresh.root) / "images" / DIGEST_A[7:] / "rootfs").mkdir(parents=True)
    out = restore(archive, fresh)
    assert f"{DIGEST_A}  (already here)" in out
    assert "faasctl new alpha" not in out and "faasctl new beta" in out


def test_force_replaces_state_removes_its_wal_and_keeps_the_newer_serial(host, archive):
    host.state.add_version("gamma", DIGEST_A, CONFIG, 1)
    host.state.close()
    state_dir = host.root / "state"
    (state_dir / "state.db-wal").write_bytes(b"stale wal of the replaced database")
    (host.root / "dns" / "serial").write_text("2024020100\n")
    msg = refused(archive, host.settings, Code.CONFLICT)
    assert "already holds" in msg and "--force" in msg
    restore(archive, host.settings, force=True)
    assert not (state_dir / "state.db-wal").exists()
    db = sqlite3.connect(state_dir / "state.db")
    names = [r[0] for r in db.execute("SELECT name FROM functions ORDER BY name")]
    assert names == ["alpha", "beta"]
    db.close()
    assert (host.root / "dns" / "serial").read_text() == "2024020100\n"
    host.state = State(str(state_dir / "state.db"), host.settings.function_prefix)


def test_an_empty_state_needs_no_force(archive, fresh):
    State(os.path.join(fresh.root, "state", "state.db"), fresh.function_prefix).close()
    restore(archive, fresh)


def test_an_archive_assembled_by_hand_to_format_1_restores(tmp_path, fresh):
    """Users keep their archives: one put together member by member as docs/backup.md
    describes format 1, not by this faasd's backup, restores."""
    src = tmp_path / "hand"
    src.mkdir()
    state = State(str(src / "state.db"), fresh.function_prefix, fresh.vpn_prefix)
    state.add_version("gamma", DIGEST_A, CONFIG, 10)
    state.close()
    db = sqlite3.connect(src / "state.db")
    db.execute("PRAGMA journal_mode=DELETE")
    db.close()
    key = wg_key() + "\n"
    files = {"wireguard/private.key": key.encode(), "state.db": (src / "state.db").read_bytes()}
    manifest = {
        "format": 1, "faasd_version": "0.1.0", "created": 0.0,
        "created_utc": "2024-05-02T10:00:00Z", "hostname": "old-host",
        "schema": len(MIGRATIONS), "server_public_key": None,
        "settings": {"function_prefix": fresh.function_prefix, "vpn_prefix": fresh.vpn_prefix,
                     "wg_interface": fresh.wg_interface, "wg_port": 51820},
        "functions": [], "peers": [], "images": [],
        "files": {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                  for n, d in files.items()}}
    path = write_tar(tmp_path / "hand.tar.gz",
                     [regular("manifest.json", json.dumps(manifest).encode()),
                      *(regular(n, d) for n, d in files.items())])
    out = restore(path, fresh)
    assert "from the backup of old-host" in out and DIGEST_A in out
    assert "faasctl new gamma -f IMAGE.tar" in out
    assert (Path(fresh.root) / "wireguard" / "private.key").read_text() == key


def test_the_private_key_never_crosses_the_part_boundary(host, tmp_path):
    """netagent's part hands the key over as a file in faasctl's private directory;
    its answer on stdout holds the public half only."""
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    got = parts.call("netagent", "export", host.settings, work=str(work),
                     members=ar.caps_of("netagent"))
    assert host.key.strip() not in json.dumps(got)
    assert (work / "private.key").read_text() == host.key
    assert set(got["files"]) == {"wireguard/private.key", "wireguard/endpoints.json"}


# --- restore: refusing while the platform runs --------------------------------------------

def test_refused_while_supervisord_runs(archive, fresh):
    Path(fresh.run).mkdir()
    (Path(fresh.run) / "supervisord.pid").write_text(f"{os.getpid()}\n")
    assert "faasd down" in refused(archive, fresh, Code.CONFLICT)


def test_a_stale_or_zombie_supervisord_pid_does_not_count(archive, fresh):
    Path(fresh.run).mkdir()
    child = subprocess.Popen(["true"])
    try:
        for _ in range(200):  # until it has exited and waits, a zombie, for us
            with open(f"/proc/{child.pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    break
            threading.Event().wait(0.01)
        (Path(fresh.run) / "supervisord.pid").write_text(f"{child.pid}\n")
        restore(archive, fresh)
    finally:
        child.wait()


def test_refused_while_a_daemon_holds_its_lock(archive, fresh):
    Path(fresh.run).mkdir()
    lock = Path(fresh.run) / "controller.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"4242\n")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        msg = refused(archive, fresh, Code.CONFLICT)
        assert "4242" in msg and "faasd down" in msg
    finally:
        os.close(fd)
    restore(archive, fresh)  # released: a lock file alone is no daemon


def test_refused_while_the_wireguard_interface_exists(archive, tmp_path):
    settings = make_settings(tmp_path / "lo", wg_interface="lo")
    assert "faasd down" in refused(archive, settings, Code.CONFLICT)


# --- restore: hostile and broken archives -------------------------------------------------

def corrupt_page(data: bytes) -> bytes:
    """Page 2's b-tree type byte made invalid: SQLite calls the file malformed."""
    d = bytearray(data)
    d[int.from_bytes(d[16:18], "big")] = 0x0B
    return bytes(d)


def index_mismatch(data: bytes) -> bytes:
    """One function's address changed in its row but not in the UNIQUE index: the file
    opens and reads, only PRAGMA integrity_check finds it."""
    i = data.find(b"fd00:faa5:1::b")
    return data[:i + 13] + b"c" + data[i + 14:]


def newer_schema(data: bytes, tmp: Path) -> bytes:
    p = tmp / "newer.db"
    p.write_bytes(data)
    db = sqlite3.connect(p)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    return p.read_bytes()


def edited(data: bytes, tmp: Path, sql: str) -> bytes:
    p = tmp / "edited.db"
    p.write_bytes(data)
    db = sqlite3.connect(p)
    db.execute(sql)
    db.commit()
    db.close()
    return p.read_bytes()


def symlink(name: str, target: str):
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = tarfile.SYMTYPE, target
    return ti, None


def hardlink(name: str, target: str):
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = tarfile.LNKTYPE, target
    return ti, None


def huge(name: str):
    """A header that claims 1 TiB and no data behind it: refused before any is read."""
    ti = tarfile.TarInfo(name)
    ti.size = 1 << 40
    return ti


def state_of(valid: Path) -> bytes:
    return {ti.name: d for ti, d in members(valid)}["state.db"]


HOSTILE = {
    "dotdot": lambda v, p, t: rebuild(v, p, extra=[regular("../x", b"escape")]),
    "absolute": lambda v, p, t: rebuild(v, p, extra=[regular("/etc/x", b"escape")]),
    "dot-slash": lambda v, p, t: rebuild(v, p, extra=[regular("./dns/serial", b"1\n")]),
    "symlink": lambda v, p, t: rebuild(v, p, drop=["dns/faas.db"],
                                       extra=[symlink("dns/faas.db", "/etc/shadow")]),
    "hardlink": lambda v, p, t: rebuild(v, p, drop=["dns/serial"],
                                        extra=[hardlink("dns/serial", "state.db")]),
    "extra": lambda v, p, t: rebuild(v, p, extra=[regular("named/named.conf", b"include")]),
    "twice": lambda v, p, t: rebuild(v, p, extra=[regular("dns/serial", b"1\n")]),
    "huge-header": lambda v, p, t: p.write_bytes(gzip.compress(
        huge("state.db").tobuf(tarfile.PAX_FORMAT) + bytes(1024))) and p,
    "over-cap": lambda v, p, t: rebuild(v, p, replace={"dns/serial": b"1" * 100 + b"\n"}),
    "garbage-db": lambda v, p, t: rebuild(v, p, replace={"state.db": secrets.token_bytes(8192)}),
    "corrupt-db": lambda v, p, t: rebuild(v, p, replace={"state.db": corrupt_page(state_of(v))}),
    "index-mismatch": lambda v, p, t: rebuild(v, p, replace={
        "state.db": index_mismatch(state_of(v))}),
    "newer-schema": lambda v, p, t: rebuild(v, p, replace={
        "state.db": newer_schema(state_of(v), t)}),
    "bad-address": lambda v, p, t: rebuild(v, p, replace={"state.db": edited(
        state_of(v), t, "UPDATE functions SET address='2001:db8::1' WHERE name='beta'")}),
    "bad-digest": lambda v, p, t: rebuild(v, p, replace={"state.db": edited(
        state_of(v), t, "UPDATE versions SET digest='sha256:../../x' WHERE name='beta'")}),
    "bad-peer-key": lambda v, p, t: rebuild(v, p, replace={"state.db": edited(
        state_of(v), t, "UPDATE peers SET public_key='x'")}),
    "no-state": lambda v, p, t: rebuild(v, p, drop=["state.db"]),
    "unknown-format": lambda v, p, t: rebuild(v, p, manifest={"format": 99}),
    "hash-mismatch": lambda v, p, t: rebuild(v, p, replace={"dns/serial": b"2024010503\n"},
                                             fix=False),
    "short-key": lambda v, p, t: rebuild(v, p, replace={
        "wireguard/private.key": base64.b64encode(bytes(31)) + b"\n"}),
    "bad-endpoints": lambda v, p, t: rebuild(v, p, replace={
        "wireguard/endpoints.json": b'{"k": "x\\nEndpoint = evil"}'}),
    "zone-include": lambda v, p, t: rebuild(v, p, replace={
        "dns/faas.db": members(v)[4][1] + b"$INCLUDE /etc/shadow\n"}),
    "bad-serial": lambda v, p, t: rebuild(v, p, replace={"dns/serial": b"-1\n"}),
    "plain-tar": lambda v, p, t: write_tar(p, members(v), compress=False),
    "truncated": lambda v, p, t: p.write_bytes(v.read_bytes()[:-200]) and p,
    "empty": lambda v, p, t: p.write_bytes(b"") or p,
}


# Why each is refused: the first check it meets must be the one it is about.
REASON = {
    "dotdot": "unexpected member '../x'", "absolute": "unexpected member '/etc/x'",
    "dot-slash": "unexpected member './dns/serial'", "symlink": "not a regular file",
    "hardlink": "not a regular file", "extra": "unexpected member 'named/named.conf'",
    "twice": "appears twice", "huge-header": "more than its cap", "over-cap": "more than its cap",
    "garbage-db": "not a usable SQLite database", "corrupt-db": "malformed",
    "index-mismatch": "integrity check", "newer-schema": "newer than this faasd",
    "bad-address": "outside the function prefix", "bad-digest": "bad digest",
    "bad-peer-key": "not a WireGuard key", "no-state": "lacks state.db",
    "unknown-format": "format '99'", "hash-mismatch": "does not match its size and sha256",
    "short-key": "private.key is not a WireGuard key", "bad-endpoints": "endpoints.json",
    "zone-include": "not a zone", "bad-serial": "not a zone serial",
    "plain-tar": "not a readable gzip tar", "truncated": "not a readable gzip tar",
    "empty": "not a readable gzip tar",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_bad_archive_is_refused_and_nothing_is_written(case, archive, fresh, tmp_path):
    path = HOSTILE[case](archive, tmp_path / f"{case}.tar.gz", tmp_path)
    assert path.exists()
    assert REASON[case] in refused(path, fresh)


def test_bad_archive_over_existing_state_with_force_changes_nothing(host, archive, tmp_path):
    path = HOSTILE["corrupt-db"](archive, tmp_path / "bad.tar.gz", tmp_path)
    host.state.close()
    refused(path, host.settings, force=True)
    host.state = State(str(host.root / "state" / "state.db"), host.settings.function_prefix)


def test_other_prefixes_are_a_conflict_that_names_the_setting(archive, tmp_path):
    settings = make_settings(tmp_path / "other", function_prefix="fd00:faa5:2::/64")
    msg = refused(archive, settings, Code.CONFLICT)
    assert 'function_prefix = "fd00:faa5:1::/64"' in msg


def test_another_interface_or_port_is_only_a_warning(archive, tmp_path):
    settings = make_settings(tmp_path / "port", wg_port="51821")
    out = restore(archive, settings)
    assert "Warning: the backup's wg_port was 51820" in out


def test_exit_statuses_of_the_command_line(tmp_path):
    out = subprocess.run([BIN / "faasctl", "restore"], capture_output=True, text=True,
                         check=False)
    assert out.returncode == EXIT_STATUS[Code.BAD_REQUEST] and "FILE" in out.stderr
    help_text = subprocess.run([BIN / "faasctl", "--help"], capture_output=True, text=True,
                               check=False)
    assert "backup" in help_text.stdout and "restore" in help_text.stdout
    if os.geteuid() != 0:
        out = subprocess.run([BIN / "faasctl", "backup", tmp_path / "x"], capture_output=True,
                             text=True, check=False)
        assert out.returncode == 2 and "root" in out.stderr
