"""The controller's part of a backup: its SQLite database, ``state/state.db``.

Run by faasctl as ``python -I -m controller.backup ACTION`` (root; common/parts.py says
how, docs/backup.md why): the schema and the rows are the controller's business, so
reading them consistently, checking an untrusted copy and putting one back happen here.

- export: a consistent copy while the controller may be writing (SQLite's online backup
  API in one step is one read transaction, one WAL snapshot), made self-contained
  (``journal_mode=DELETE``), and what it holds (functions, versions, peers) for the
  manifest and the list of images to redeploy.
- ready: a conflict if the state directory is not a real directory, or the database
  already holds functions or peers (unless ``force``).
- check: SQLite's integrity and foreign key checks, a schema this controller can migrate
  (1 .. len(MIGRATIONS)), rows the agents will accept. The file is opened read-only with
  ``trusted_schema=OFF``.
- install: renamed into place owned by the faas user, 0600, after removing any -wal,
  -shm or -journal of the database it replaces (SQLite would replay an old WAL into it).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import sqlite3
import stat
import tempfile
import urllib.parse
from collections.abc import Iterator
from typing import Any

from common import layout, parts
from common.errors import Code, FaasError
from common.files import atomic_file, read_small
from common.protocol import FunctionName
from common.schema import WgKey
from common.settings import Settings
from controller.state import MIGRATIONS

MEMBER = "state.db"
PEER_STATES = ("enabled", "disabled", "expired")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}", re.ASCII)
CHUNK = 1 << 20


def _bad(message: str) -> FaasError:
    return FaasError(Code.BAD_REQUEST, message)


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


def read_contents(db: sqlite3.Connection) -> dict[str, Any]:
    """Schema, functions, versions (name, version, digest, current) and peers (peers
    arrived with schema 3)."""
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
    return {"schema": schema, "functions": functions, "versions": versions, "peers": peers}


# --- the actions ------------------------------------------------------------------------

def export(settings: Settings, work: str, members: dict[str, int]) -> dict[str, Any]:
    """state.db copied into ``work``, and what it holds."""
    src = layout.of(settings).state_db
    if not os.path.isfile(src) or os.path.islink(src):
        raise FaasError(Code.INTERNAL, f"no state database at {src}: nothing to back up "
                        "(is FAAS_ROOT right?)")
    dst = os.path.join(work, MEMBER)
    try:
        snapshot_db(src, dst)
        with read_only(dst) as db:
            contents = read_contents(db)
    except sqlite3.Error as exc:
        raise FaasError(Code.INTERNAL, f"{src}: {exc}") from None
    return {"files": {MEMBER: dst}, "contents": contents}


def ready(settings: Settings, force: bool) -> None:
    """Conflict if the state directory is not a directory, or the database holds
    functions or peers and ``force`` is not given."""
    paths = layout.of(settings)
    parts.real_dir_or_none(paths.state_dir)
    path = paths.state_db
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


def check(settings: Settings, files: dict[str, str]) -> dict[str, Any]:
    """SQLite's own integrity check, a schema this code can migrate, and contents the
    agents will accept (names, addresses, keys, digests)."""
    try:
        with read_only(files[MEMBER]) as db:
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
    return {"contents": contents}


def install(settings: Settings, files: dict[str, str], owners: dict[str, list[int]]) -> None:
    """state.db into place; a WAL or journal of the one it replaces is removed first."""
    paths = layout.of(settings)
    spec = layout.dir_spec("state_dir")
    layout.ensure_dir(paths.state_dir, layout.ids(spec, owners), spec.mode)
    target = paths.state_db
    for side in ("-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target + side)
    with open(files[MEMBER], "rb") as src, \
            atomic_file(target, 0o600, tuple(owners["faas"])) as out:  # type: ignore[arg-type]
        shutil.copyfileobj(src, out, CHUNK)


# --- helpers ------------------------------------------------------------------------------

def check_rows(contents: dict[str, Any], settings: Settings) -> None:
    """What the agents would accept: names, addresses in the prefixes, digests, keys."""
    fn_prefix = ipaddress.IPv6Network(settings.function_prefix)
    vpn_prefix = ipaddress.IPv6Network(settings.vpn_prefix)
    serving = {v["name"] for v in contents["versions"] if v["current"]}
    try:
        for f in contents["functions"]:
            FunctionName().check(f["name"], "function name")
            if f["name"] not in serving:
                raise _bad(f"{f['name']} serves version {f['version']}, which does not exist")
            ip = _address(f["address"])
            if ip is None:
                raise _bad(f"{str(f['address'])[:80]!r} is not an IPv6 address")
            if ip not in fn_prefix:
                raise _bad(f"{ip} is outside the function prefix {fn_prefix}")
        for v in contents["versions"]:
            if not isinstance(v["digest"], str) or not DIGEST.fullmatch(v["digest"]):
                raise _bad(f"{v['name']} version {v['version']} has a bad digest")
        for p in contents["peers"]:
            WgKey().check(p["public_key"], f"peer {str(p['name'])[:40]} public_key")
            ip = _address(p["address"])
            if ip is None or ip not in vpn_prefix or int(ip) - int(vpn_prefix.network_address) < 2:
                raise _bad(f"peer address {str(p['address'])[:60]!r} is not a peer "
                           f"address of {vpn_prefix}")
            if p["state"] not in PEER_STATES:
                raise _bad(f"peer state {str(p['state'])[:20]!r} is unknown")
    except FaasError as exc:
        raise _bad(f"state.db: {exc.message}") from None


def _address(value: Any) -> ipaddress.IPv6Address | None:
    """An IPv6 address without a scope id (Python keeps whatever follows ``%``)."""
    if not isinstance(value, str) or "%" in value:
        return None
    try:
        return ipaddress.IPv6Address(value)
    except ValueError:
        return None




def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _count_state(path: str) -> dict[str, int] | None:
    """Functions and peers in the database at ``path``, read from a private copy (with
    its WAL): opening it in place would leave -wal and -shm files behind."""
    counts = {"functions": 0, "peers": 0}
    with tempfile.TemporaryDirectory(prefix="faasd-restore-") as work:
        try:
            for suffix in ("", "-wal"):
                data = read_small(path + suffix, 256 << 20)
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


if __name__ == "__main__":
    parts.serve(globals())
