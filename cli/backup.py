"""faasctl backup FILE / faasctl restore FILE: what cannot be redeployed, in one archive.

Both run as root on the server, without the controller (the WireGuard private key is
root's alone). ``backup`` writes a gzip tar holding a manifest, a consistent copy of the
controller's SQLite database, the zone and its serial, the server's WireGuard key and
the peers' last endpoints; never the images (they redeploy), the spool, the logs or
``named/`` (rendered at every start). ``restore`` refuses while any part of the
platform runs, checks the whole archive before it writes anything, puts each file in
place atomically with the owner and mode the daemons expect, and says which images to
redeploy. docs/backup.md has the reasons.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import io
import ipaddress
import json
import os
import re
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from common.daemon import VERSION, owner_ids
from common.proc import alive
from common.errors import EXIT_STATUS, Code, FaasError
from common.files import atomic_file
from common.protocol import SERVICES
from common.schema import WgKey
from common.settings import Settings, SettingsError, load, vpn_server
from controller.state import MIGRATIONS
from dnsagent import zone

FORMAT = 1  # the archive layout; restore knows KNOWN_FORMATS
KNOWN_FORMATS = (1,)
MANIFEST = "manifest.json"
MANIFEST_CAP = 1 << 20
MAX_ARCHIVE = 1 << 30  # the compressed file
CHUNK = 1 << 20
DIGEST = re.compile(r"sha256:[0-9a-f]{64}", re.ASCII)
ENDPOINT = re.compile(r"(\[[0-9a-fA-F:.]+\]|[0-9.]+):[0-9]{1,5}", re.ASCII)
PEER_STATES = ("enabled", "disabled", "expired")
SETTINGS_KEPT = ("function_prefix", "vpn_prefix", "wg_interface", "wg_port")
SETTINGS_REQUIRED = ("function_prefix", "vpn_prefix")  # the addresses in state need them

BACKUP_HELP = ("On the server, as root: write the state, zone, WireGuard key and peer list "
               "into FILE (gzip tar, mode 0600); images are not in it, they redeploy")
RESTORE_HELP = ("On a stopped server, as root: put FILE's state, zone and keys in place and "
                "say which images to redeploy (exit 4 while faasd runs or state exists)")


@dataclass(frozen=True)
class Member:
    """One file of the archive: where it lives under $FAAS_ROOT, whose it is, how big."""

    name: str  # in the archive
    directory: str  # under $FAAS_ROOT
    file: str
    owner: str  # "faas" (the configured user and group) or "root"
    mode: int
    cap: int
    required: bool = False


# In the order restore writes them: state.db last, so its presence means "restored".
MEMBERS = (
    Member("wireguard/private.key", "wireguard", "private.key", "root", 0o600, 64),
    Member("wireguard/endpoints.json", "wireguard", "endpoints.json", "root", 0o600, 16 << 20),
    Member("dns/serial", "dns", "serial", "faas", 0o644, 64),
    Member("dns/faas.db", "dns", "faas.db", "faas", 0o644, 16 << 20),
    Member("state.db", "state", "state.db", "faas", 0o600, 256 << 20, required=True),
)
BY_NAME = {m.name: m for m in MEMBERS}
# The directories restore may have to make; the same owners and modes as `faasd up`.
DIRS = {"state": ("faas", 0o700), "dns": ("faas", 0o755), "wireguard": ("root", 0o700)}


@dataclass(frozen=True)
class Owners:
    """uid and gid for "faas" and "root" files (tests pass their own ids)."""

    faas: tuple[int, int]
    root: tuple[int, int] = (0, 0)

    def of(self, who: str) -> tuple[int, int]:
        return self.faas if who == "faas" else self.root


def _bad(message: str) -> FaasError:
    return FaasError(Code.BAD_REQUEST, message)


def state_path(root: str) -> str:
    return os.path.join(root, "state", "state.db")


# --- the database ----------------------------------------------------------------------

@contextlib.contextmanager
def read_only(path: str) -> Iterator[sqlite3.Connection]:
    """A read-only connection. SQLite may create the -wal and -shm files beside a WAL
    database; made by root they would lock the controller out, so they are given back
    to the database file's owner."""
    st = os.stat(path)
    db = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True, timeout=10)
    try:
        db.execute("PRAGMA trusted_schema=OFF")
        yield db
    finally:
        db.close()
        for side in (path + "-wal", path + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                s = os.lstat(side)
                if stat.S_ISREG(s.st_mode) and (s.st_uid, s.st_gid) != (st.st_uid, st.st_gid):
                    os.chown(side, st.st_uid, st.st_gid, follow_symlinks=False)


def snapshot_db(src: str, dst: str) -> None:
    """A consistent copy of the database while the controller may be writing: the
    online backup API in one step is one read transaction, so one WAL snapshot. The
    copy is made a self-contained file (no WAL)."""
    with read_only(src) as db:
        out = sqlite3.connect(dst)
        try:
            db.backup(out)
            out.execute("PRAGMA journal_mode=DELETE")
        finally:
            out.close()


@dataclass
class Contents:
    """What a state.db holds, as far as backup and restore care."""

    schema: int
    functions: list[dict[str, Any]]
    versions: list[dict[str, Any]]  # name, version, digest, current
    peers: list[dict[str, Any]]

    def images(self) -> list[dict[str, Any]]:
        """Every image digest with the function versions using it."""
        by: dict[str, list[dict[str, Any]]] = {}
        for v in self.versions:
            by.setdefault(v["digest"], []).append(
                {"name": v["name"], "version": v["version"], "current": v["current"]})
        return [{"digest": d, "uses": uses} for d, uses in sorted(by.items())]


def read_contents(db: sqlite3.Connection) -> Contents:
    """Functions, versions and peers (peers arrived with schema 3)."""
    schema = db.execute("PRAGMA user_version").fetchone()[0]
    functions = [{"name": r[0], "address": r[1], "version": r[2]} for r in db.execute(
        "SELECT name, address, version FROM functions ORDER BY name")]
    versions = [{"name": r[0], "version": r[1], "digest": r[2], "current": bool(r[3])}
                for r in db.execute(
                    "SELECT v.name, v.version, v.digest, v.version = f.version FROM versions v"
                    " JOIN functions f ON f.name = v.name ORDER BY v.name, v.version")]
    peers = [] if schema < 3 else [
        {"name": r[0], "public_key": r[1], "address": r[2], "state": r[3]} for r in db.execute(
            "SELECT name, public_key, address, state FROM peers ORDER BY name")]
    return Contents(schema, functions, versions, peers)


# --- small file helpers ----------------------------------------------------------------

def read_small(path: str, cap: int) -> bytes | None:
    """A regular file's bytes (None if missing). Never follows a symlink or opens a FIFO
    the faas user might have planted in its directories; refuses one over ``cap``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FaasError(Code.INTERNAL, f"{path} is not a regular file")
        if st.st_size > cap:
            raise FaasError(Code.INTERNAL, f"{path} is larger than {cap} bytes")
        with open(fd, "rb", closefd=False) as f:
            return f.read(cap + 1)[:cap]
    finally:
        os.close(fd)


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def public_key(private: bytes) -> str | None:
    """The public half of a WireGuard key (``wg pubkey``, key on stdin), if wg is here."""
    wg = shutil.which("wg")
    if wg is None:
        return None
    out = subprocess.run([wg, "pubkey"], input=private, capture_output=True, timeout=5,
                         check=False)
    return out.stdout.decode().strip() if out.returncode == 0 else None


# --- backup ----------------------------------------------------------------------------

def backup(settings: Settings, target: str) -> dict[str, Any]:
    """Write the archive to ``target`` atomically (mode 0600); return its manifest."""
    src = state_path(settings.root)
    if not os.path.isfile(src) or os.path.islink(src):
        raise FaasError(Code.INTERNAL, f"no state database at {src}: nothing to back up "
                        "(is FAAS_ROOT right?)")
    with tempfile.TemporaryDirectory(prefix="faasd-backup-") as work:
        files = {"state.db": os.path.join(work, "state.db")}
        snapshot_db(src, files["state.db"])
        for m in MEMBERS:
            if m.name == "state.db":
                continue
            data = read_small(os.path.join(settings.root, m.directory, m.file), m.cap)
            if data is not None:
                files[m.name] = os.path.join(work, m.file)
                with open(files[m.name], "wb") as f:
                    f.write(data)
        manifest = make_manifest(settings, files)
        write_archive(target, manifest, files)
    return manifest


def make_manifest(settings: Settings, files: dict[str, str]) -> dict[str, Any]:
    """What the archive holds and where it came from; the images it needs."""
    with read_only(files["state.db"]) as db:
        contents = read_contents(db)
    key = None
    if "wireguard/private.key" in files:
        with open(files["wireguard/private.key"], "rb") as f:
            key = public_key(f.read())
    now = time.time()
    return {
        "format": FORMAT,
        "faasd_version": VERSION,
        "created": now,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "hostname": socket.gethostname(),
        "schema": contents.schema,
        "settings": {k: getattr(settings, k) for k in SETTINGS_KEPT},
        "server_public_key": key,
        "functions": contents.functions,
        "peers": [{k: p[k] for k in ("name", "address", "public_key")} for p in contents.peers],
        "images": contents.images(),
        "files": {name: {"size": os.path.getsize(path), "sha256": sha256_of(path)}
                  for name, path in sorted(files.items())},
    }


def write_archive(target: str, manifest: dict[str, Any], files: dict[str, str]) -> None:
    """manifest.json first, then the files in MEMBERS order; root 0600 members."""
    now = int(time.time())

    def info(name: str, size: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime, ti.uname, ti.gname = size, 0o600, now, "root", "root"
        return ti

    body = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    with atomic_file(target, 0o600) as f, \
            tarfile.open(fileobj=f, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(info(MANIFEST, len(body)), io.BytesIO(body))
        for m in MEMBERS:
            if m.name in files:
                with open(files[m.name], "rb") as src:
                    tf.addfile(info(m.name, os.fstat(src.fileno()).st_size), src)


# --- restore: reading and checking the archive -------------------------------------------

@dataclass
class Archive:
    """A checked archive: its manifest, its files unpacked into a private directory,
    and what its state.db holds."""

    manifest: dict[str, Any]
    files: dict[str, str]
    contents: Contents
    warnings: list[str]
    server_key: str | None = None  # the public half of the archived private key


def unpack(path: str, work: str) -> dict[str, str]:
    """The expected members, each copied to a file of ours in ``work`` (a member's own
    name is never a path); anything else in the archive refuses the whole of it."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _bad(f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _bad(f"{path} is not a regular file")
    if st.st_size > MAX_ARCHIVE:
        raise _bad(f"{path} is larger than {MAX_ARCHIVE >> 20} MiB: not a faasd backup")
    found: dict[str, str] = {}
    try:
        with tarfile.open(path, mode="r:gz") as tf:
            while (ti := tf.next()) is not None:
                check_member(ti, found)
                local = os.path.join(work, f"member-{len(found)}")
                copy_member(tf, ti, local)
                found[ti.name] = local
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _bad(f"{path} is not a readable gzip tar: {exc}") from None
    missing = [n for n in (MANIFEST, *(m.name for m in MEMBERS if m.required))
               if n not in found]
    if missing:
        raise _bad(f"the archive lacks {', '.join(missing)}: not a faasd backup")
    return found


def check_member(ti: tarfile.TarInfo, found: dict[str, str]) -> None:
    """Only the known names, once each, regular files, within each one's size cap."""
    name = ti.name[:100]
    cap = MANIFEST_CAP if ti.name == MANIFEST else getattr(BY_NAME.get(ti.name), "cap", None)
    if cap is None:
        raise _bad(f"unexpected member {name!r}: a faasd backup holds only {MANIFEST} and "
                   f"{', '.join(BY_NAME)}")
    if ti.name in found:
        raise _bad(f"member {name!r} appears twice")
    if ti.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise _bad(f"member {name!r} is not a regular file")
    if ti.size > cap:
        raise _bad(f"member {name!r} is {ti.size} bytes, more than its cap of {cap}")


def copy_member(tf: tarfile.TarFile, ti: tarfile.TarInfo, local: str) -> None:
    src = tf.extractfile(ti)
    assert src is not None  # a regular file
    left = ti.size
    fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with open(fd, "wb") as out:
        while left:
            chunk = src.read(min(CHUNK, left))
            if not chunk:
                raise _bad(f"member {ti.name!r} is truncated")
            out.write(chunk)
            left -= len(chunk)


def check_manifest(data: bytes, files: dict[str, str]) -> dict[str, Any]:
    """A manifest of a known format whose file list, sizes and hashes match the members."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except ValueError:
        raise _bad(f"{MANIFEST} is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in KNOWN_FORMATS or \
            isinstance(manifest.get("format"), bool):
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise _bad(f"archive format {str(fmt)[:20]!r} is not one this faasd knows "
                   f"({', '.join(map(str, KNOWN_FORMATS))}): upgrade faasd")
    listed = manifest.get("files")
    if not isinstance(listed, dict) or set(listed) != set(files):
        raise _bad(f"{MANIFEST} does not list exactly the archive's files")
    for name, entry in listed.items():
        if not isinstance(entry, dict) or entry.get("size") != os.path.getsize(files[name]) \
                or entry.get("sha256") != sha256_of(files[name]):
            raise _bad(f"{name} does not match its size and sha256 in {MANIFEST}")
    settings = manifest.get("settings")
    if not isinstance(settings, dict) or \
            not all(isinstance(settings.get(k), str) for k in SETTINGS_REQUIRED):
        raise _bad(f"{MANIFEST} lacks the settings {', '.join(SETTINGS_REQUIRED)}")
    for key, kind in (("hostname", str), ("faasd_version", str), ("created_utc", str)):
        if not isinstance(manifest.get(key), kind):
            manifest[key] = "?"
    return manifest


def check_settings(manifest: dict[str, Any], settings: Settings) -> list[str]:
    """The prefixes must be this host's (every address in the state lies in them); a
    different interface or port only deserves a warning."""
    old = manifest["settings"]
    for key in SETTINGS_REQUIRED:
        try:
            same = ipaddress.IPv6Network(old[key]) == ipaddress.IPv6Network(getattr(settings, key))
        except ValueError:
            raise _bad(f"{MANIFEST}: {key} {old[key][:60]!r} is not an IPv6 network") from None
        if not same:
            raise FaasError(Code.CONFLICT, f"the backup's {key} is {old[key]}, this host's is "
                            f"{getattr(settings, key)}: set {key} = \"{old[key]}\" in "
                            "faasd.toml (addresses are kept as they were)")
    warnings = []
    for key in ("wg_interface", "wg_port"):
        if key in old and old[key] != getattr(settings, key):
            warnings.append(f"the backup's {key} was {old[key]}, this host's is "
                            f"{getattr(settings, key)}" + (
                                ": peers dial the old port until their configs change"
                                if key == "wg_port" else ""))
    return warnings


def check_state(path: str, settings: Settings) -> Contents:
    """SQLite's own integrity check, a schema this code can migrate, and contents the
    agents will accept (names, addresses, keys, digests)."""
    try:
        with read_only(path) as db:
            rows = [r[0] for r in db.execute("PRAGMA integrity_check")]
            if rows != ["ok"]:
                raise _bad(f"state.db fails SQLite's integrity check: {'; '.join(rows[:3])}")
            if db.execute("PRAGMA foreign_key_check").fetchone() is not None:
                raise _bad("state.db fails SQLite's foreign key check")
            schema = db.execute("PRAGMA user_version").fetchone()[0]
            if schema > len(MIGRATIONS):
                raise _bad(f"state.db has schema {schema}, newer than this faasd "
                           f"({len(MIGRATIONS)}): upgrade faasd first")
            if schema < 1:
                raise _bad("state.db holds no faasd schema")
            contents = read_contents(db)
    except sqlite3.DatabaseError as exc:
        raise _bad(f"state.db is not a usable SQLite database: {exc}") from None
    check_rows(contents, settings)
    return contents


def check_rows(contents: Contents, settings: Settings) -> None:
    fn_prefix = ipaddress.IPv6Network(settings.function_prefix)
    vpn_prefix = ipaddress.IPv6Network(settings.vpn_prefix)
    serving = {v["name"] for v in contents.versions if v["current"]}
    try:
        for f in contents.functions:
            zone.check_name(f["name"])
            if f["name"] not in serving:
                raise _bad(f"{f['name']} serves version {f['version']}, which does not exist")
            zone.check_address(f["address"], fn_prefix)
        for v in contents.versions:
            if not isinstance(v["digest"], str) or not DIGEST.fullmatch(v["digest"]):
                raise _bad(f"{v['name']} version {v['version']} has a bad digest")
        for p in contents.peers:
            WgKey().check(p["public_key"], f"peer {str(p['name'])[:40]} public_key")
            ip = ipaddress.IPv6Address(p["address"]) if isinstance(p["address"], str) and \
                "%" not in p["address"] else None
            if ip is None or ip not in vpn_prefix or int(ip) - int(vpn_prefix.network_address) < 2:
                raise _bad(f"peer address {str(p['address'])[:60]!r} is not a peer "
                           f"address of {vpn_prefix}")
            if p["state"] not in PEER_STATES:
                raise _bad(f"peer state {str(p['state'])[:20]!r} is unknown")
    except FaasError as exc:
        raise _bad(f"state.db: {exc.message}") from None
    except ValueError as exc:
        raise _bad(f"state.db: {exc}") from None


def check_key(data: bytes) -> None:
    """The server's private key as netagent writes it: 32 bytes of base64, one newline."""
    text = data.decode("ascii", "replace")
    try:
        WgKey().check(text.removesuffix("\n"), "wireguard/private.key")
    except FaasError:
        raise _bad("wireguard/private.key is not a WireGuard key (32 bytes of base64)") from None


def check_endpoints(data: bytes) -> None:
    """{public key: "address:port"}, as netagent writes it."""
    try:
        endpoints = json.loads(data.decode("utf-8"))
    except ValueError:
        endpoints = None
    if not isinstance(endpoints, dict):
        raise _bad("wireguard/endpoints.json is not a JSON object")
    for key, value in endpoints.items():
        try:
            WgKey().check(key, "key")
        except FaasError:
            raise _bad("wireguard/endpoints.json has a key that is not a WireGuard key") from None
        if not isinstance(value, str) or not ENDPOINT.fullmatch(value):
            raise _bad(f"wireguard/endpoints.json: {str(value)[:60]!r} is not ADDRESS:PORT")


def check_serial(data: bytes) -> int:
    text = data.decode("ascii", "replace")
    serial = zone.parse_serial(text) if re.fullmatch(r"[0-9]{1,10}\n?", text) else None
    if serial is None:
        raise _bad("dns/serial is not a zone serial")
    return serial


def check_zone(data: bytes, settings: Settings) -> None:
    """Exactly what dnsagent renders for some records: a zone file is a language with
    $INCLUDE and friends, and named reads it before dnsagent's first sync."""
    text = data.decode("ascii", "replace")
    serial = zone.serial_of(text)
    lines = text.split("\n")
    raw = []
    for line in lines[8:-1]:
        m = re.fullmatch(r"([a-z0-9-]{1,63}) IN AAAA ([0-9a-f:]{2,39})", line)
        if m is None:
            raise _bad("dns/faas.db is not a zone faasd's dnsagent wrote")
        raw.append({"name": m.group(1), "address": m.group(2)})
    try:
        records = zone.check_records(raw, ipaddress.IPv6Network(settings.function_prefix))
    except FaasError as exc:
        raise _bad(f"dns/faas.db: {exc.message}") from None
    ns = vpn_server(settings.vpn_prefix).ip
    if serial is None or zone.render(records, serial, ns) != text:
        raise _bad("dns/faas.db is not a zone faasd's dnsagent wrote")


def read_archive(path: str, work: str, settings: Settings) -> Archive:
    """Unpack into ``work`` and check everything; nothing under $FAAS_ROOT is touched."""
    files = unpack(path, work)
    with open(files.pop(MANIFEST), "rb") as f:
        manifest = check_manifest(f.read(), files)
    warnings = check_settings(manifest, settings)
    contents = check_state(files["state.db"], settings)
    checks = {"wireguard/private.key": check_key, "wireguard/endpoints.json": check_endpoints,
              "dns/serial": check_serial,
              "dns/faas.db": lambda data: check_zone(data, settings)}
    for name, check in checks.items():
        if name in files:
            with open(files[name], "rb") as f:
                check(f.read())
    archive = Archive(manifest, files, contents, warnings)
    if "wireguard/private.key" in files:
        with open(files["wireguard/private.key"], "rb") as f:
            archive.server_key = public_key(f.read())
    return archive


# --- restore: refusing, then writing -------------------------------------------------------

def check_stopped(settings: Settings) -> None:
    """Conflict unless the whole platform is down: no live supervisord, no daemon holding
    its lock, no WireGuard interface left with the old key (`faasd down` removes it)."""
    pidfile = os.path.join(settings.run, "supervisord.pid")
    pid = _pid_in(pidfile)
    if pid and alive(pid):
        raise FaasError(Code.CONFLICT, f"faasd is running (supervisord pid {pid} in {pidfile}): "
                        "stop it first with `faasd down`")
    for service in SERVICES:
        holder = _lock_holder(os.path.join(settings.run, f"{service}.lock"))
        if holder is not None:
            raise FaasError(Code.CONFLICT, f"faas-{service} is running (pid {holder} holds its "
                            "lock): stop the platform first with `faasd down`")
    try:
        socket.if_nametoindex(settings.wg_interface)
    except OSError:
        return
    raise FaasError(Code.CONFLICT, f"the WireGuard interface {settings.wg_interface} still "
                    "exists with the current server key, which netagent would keep: "
                    "`faasd down` removes it")


def _pid_in(path: str) -> int:
    data = read_small(path, 64) if os.path.lexists(path) else None
    text = (data or b"").decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else 0


def _lock_holder(path: str) -> str | None:
    """The pid written in a lock a daemon holds (``common.rpc`` flocks it), else None.
    A shared probe: it never stops a daemon from taking its lock afterwards."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # missing, or a symlink no daemon would accept as its lock
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
    finally:
        os.close(fd)  # closing drops our probe lock
    return None


def check_existing(settings: Settings, force: bool) -> None:
    """Conflict if $FAAS_ROOT already has functions or peers, unless ``force``."""
    path = state_path(settings.root)
    if force or not os.path.lexists(path):
        return
    counts = _count_state(path)
    if counts is None:
        what = "a database faasd cannot read"
    elif any(counts.values()):
        what = (f"{_count(counts['functions'], 'function')} and "
                f"{_count(counts['peers'], 'VPN peer')}")
    else:
        return
    raise FaasError(Code.CONFLICT, f"{path} already holds {what}; restore --force replaces "
                    "it (its functions and peers are lost)")


def _count_state(path: str) -> dict[str, int] | None:
    """Functions and peers in the database at ``path``, read from a private copy (with
    its WAL): opening it in place would leave -wal and -shm files behind."""
    counts = {"functions": 0, "peers": 0}
    with tempfile.TemporaryDirectory(prefix="faasd-restore-") as work:
        try:
            for suffix in ("", "-wal"):
                data = read_small(path + suffix, BY_NAME["state.db"].cap)
                if data is not None:
                    with open(os.path.join(work, "state.db" + suffix), "wb") as f:
                        f.write(data)
            with read_only(os.path.join(work, "state.db")) as db:
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
                for table in counts:
                    if table in tables:
                        counts[table] = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        except (OSError, FaasError, sqlite3.DatabaseError):
            return None
    return counts


def check_dirs(root: str) -> None:
    """Every directory restore writes into is a real directory (or missing)."""
    for path in (root, *(os.path.join(root, d) for d in DIRS)):
        if os.path.lexists(path) and (os.path.islink(path) or not os.path.isdir(path)):
            raise FaasError(Code.CONFLICT, f"{path} is not a directory; faasd wants a real "
                            "directory there")


def ensure_dir(path: str, owner: tuple[int, int], mode: int) -> None:
    os.makedirs(path, mode=mode, exist_ok=True)
    st = os.lstat(path)
    if (st.st_uid, st.st_gid) != owner:
        os.chown(path, *owner, follow_symlinks=False)
    os.chmod(path, mode)


def install(archive: Archive, root: str, owners: Owners) -> None:
    """Every file into place, atomically, state.db last."""
    if not os.path.exists(root):
        ensure_dir(root, owners.root, 0o755)
    for directory, (who, mode) in DIRS.items():
        ensure_dir(os.path.join(root, directory), owners.of(who), mode)
    for m in MEMBERS:
        if m.name not in archive.files:
            continue  # absent from the archive: what is on disk stays
        target = os.path.join(root, m.directory, m.file)
        with open(archive.files[m.name], "rb") as src:
            data_source: IO[bytes] = src
            if m.name == "dns/serial":
                data_source = _newest_serial(src.read(), target)
            if m.name == "state.db":
                # A WAL or journal of the database being replaced would be replayed
                # into the new one.
                for side in ("-wal", "-shm", "-journal"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(target + side)
            with atomic_file(target, m.mode, owners.of(m.owner)) as out:
                shutil.copyfileobj(data_source, out, CHUNK)


def _newest_serial(data: bytes, target: str) -> IO[bytes]:
    """The greater of the archive's serial and one already here: a serial is never
    handed out twice, even when --force puts an older zone back."""
    ours = check_serial(data)
    try:
        here = zone.parse_serial((read_small(target, 64) or b"").decode("ascii", "replace"))
    except (OSError, FaasError):  # not a plain small file: it is replaced
        here = None
    serial = zone.latest(ours, here)
    return io.BytesIO(f"{serial}\n".encode())


def restore(path: str, settings: Settings, force: bool, owners: Owners,
            out: IO[str]) -> Archive:
    """Refuse (conflict) while the platform runs or state is there, refuse (bad_request)
    a bad archive, and only then write; report to ``out``."""
    check_stopped(settings)
    check_existing(settings, force)
    check_dirs(settings.root)
    with tempfile.TemporaryDirectory(prefix="faasd-restore-") as work:
        archive = read_archive(path, work, settings)
        install(archive, settings.root, owners)
    report(archive, settings, out)
    return archive


def report(archive: Archive, settings: Settings, out: IO[str]) -> None:
    """What came back, and which images must be redeployed for it to serve."""
    m, c = archive.manifest, archive.contents
    have = [_count(len(c.functions), "function"), _count(len(c.peers), "VPN peer")]
    have += ["the zone"] if "dns/faas.db" in archive.files else []
    have += ["the WireGuard server key"] if "wireguard/private.key" in archive.files else []
    print(f"Restored {', '.join(have)} into {settings.root}, from the backup of "
          f"{m['hostname']} (faasd {m['faasd_version']}, {m['created_utc']}).", file=out)
    if archive.server_key:
        print(f"Server public key: {archive.server_key} (peers' configs stay valid).", file=out)
    for warning in archive.warnings:
        print(f"Warning: {warning}.", file=out)
    images = c.images()
    if not images:
        print("No images are needed. Start the platform: faasd up", file=out)
        return
    latest = {}
    for v in c.versions:
        latest[v["name"]] = max(latest.get(v["name"], 0), v["version"])
    print("\nStart the platform (faasd up), then redeploy these images; a function answers "
          "on its old address as soon as its image is back:", file=out)
    for image in images:
        _report_image(image, settings.root, latest, out)
    print("\nRedeploying the same image gives the same digest, and one upload serves every "
          "function and version using that digest. `faasctl new` records it as a new "
          "version with the same content (the version numbers above go up by one); the "
          "restored versions stay, so `faasctl rollback` works once their images are back.",
          file=out)


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _report_image(image: dict[str, Any], root: str, latest: dict[str, int], out: IO[str]) -> None:
    digest, uses = image["digest"], image["uses"]
    present = os.path.isdir(os.path.join(root, "images", digest.removeprefix("sha256:"),
                                         "rootfs"))
    print(f"  {digest}{'  (already here)' if present else ''}", file=out)
    names = ", ".join(f"{u['name']} version {u['version']}"
                      + (" (serving)" if u["current"] else "") for u in uses)
    print(f"    used by {names}", file=out)
    serving = [u["name"] for u in uses if u["current"]]
    if present:
        return
    if serving:
        name = serving[0]
        print(f"    faasctl new {name} -f IMAGE.tar    (docker save of that image; {name} "
              f"becomes version {latest[name] + 1})", file=out)
    else:
        print("    only older versions use it: needed only to roll back to them", file=out)


# --- the command line ------------------------------------------------------------------------

def add_commands(sub: Any) -> None:
    """backup and restore as faasctl subcommands (for --help and for parsing here)."""
    b = sub.add_parser("backup", help=BACKUP_HELP, description=BACKUP_HELP)
    b.add_argument("file", metavar="FILE", help="the archive to write (replaced atomically)")
    r = sub.add_parser("restore", help=RESTORE_HELP, description=RESTORE_HELP)
    r.add_argument("file", metavar="FILE", help="an archive faasctl backup wrote")
    r.add_argument("--force", action="store_true",
                   help="replace the functions and peers already in $FAAS_ROOT")


def summary(target: str, manifest: dict[str, Any], out: IO[str]) -> None:
    files = manifest["files"]
    print(f"Wrote {target} ({os.path.getsize(target)} bytes, mode 0600: it holds the "
          f"server's private key): {_count(len(manifest['functions']), 'function')}, "
          f"{_count(len(manifest['peers']), 'VPN peer')}, {', '.join(sorted(files))}.",
          file=out)
    if manifest["images"]:
        print("Images are not in it; a restore needs these (keep their docker save "
              "tarballs):", file=out)
        for image in manifest["images"]:
            names = sorted({u["name"] for u in image["uses"]})
            print(f"  {image['digest']}  {', '.join(names)}", file=out)


def main(argv: list[str]) -> int:
    """``faasctl backup FILE`` and ``faasctl restore FILE [--force]``; the exit status:
    0 ok, 2 bad archive or usage, 4 conflict, 1 anything else."""
    parser = argparse.ArgumentParser(prog="faasctl")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    ns = parser.parse_args(argv)
    prog = f"faasctl {ns.command}"
    if os.geteuid() != 0:
        print(f"{prog}: run as root on the server (the WireGuard private key is root's)",
              file=sys.stderr)
        return EXIT_STATUS[Code.BAD_REQUEST]
    try:
        settings = load()
        if ns.command == "backup":
            summary(ns.file, backup(settings, ns.file), sys.stdout)
        else:
            restore(ns.file, settings, ns.force, Owners(owner_ids(settings)), sys.stdout)
    except SettingsError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_STATUS[Code.BAD_REQUEST]
    except FaasError as exc:
        print(f"{prog}: {exc.message}", file=sys.stderr)
        return EXIT_STATUS.get(exc.code, 1)
    except (OSError, sqlite3.Error, subprocess.SubprocessError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0
