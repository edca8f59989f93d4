"""The desired state: SQLite in WAL mode, one transaction per change.

The controller is the only writer. A crash at any instant leaves either the old or the
new state: every change below is one ``with self.tx():`` block. The schema is versioned
with ``PRAGMA user_version`` and migrated forward at open.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from common import egressnets, fnsettings
from common.errors import Code, FaasError

# Each entry migrates from version i to i+1; never edit one that has shipped.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE functions (
        name     TEXT PRIMARY KEY,
        address  TEXT NOT NULL UNIQUE,
        version  INTEGER NOT NULL,          -- the version being served
        created  REAL NOT NULL
    );
    CREATE TABLE versions (
        name     TEXT NOT NULL REFERENCES functions(name) ON DELETE CASCADE,
        version  INTEGER NOT NULL,
        digest   TEXT NOT NULL,             -- sha256:<hex> of the image config
        config   TEXT NOT NULL,             -- JSON: entrypoint, cmd, env, workdir, user
        size     INTEGER NOT NULL,          -- bytes uploaded
        created  REAL NOT NULL,
        PRIMARY KEY (name, version)
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO meta VALUES ('generation', '1');
    """,
    """
    ALTER TABLE functions ADD COLUMN settings TEXT NOT NULL DEFAULT '{}';
    """,
    """
    CREATE TABLE peers (
        name        TEXT PRIMARY KEY,
        public_key  TEXT NOT NULL UNIQUE,
        address     TEXT NOT NULL UNIQUE,
        state       TEXT NOT NULL CHECK (state IN ('enabled', 'disabled', 'expired')),
        created     REAL NOT NULL,
        expires     REAL                    -- unix time; NULL: never
    );
    """,
    """
    CREATE TABLE tokens (
        name       TEXT PRIMARY KEY,
        role       TEXT NOT NULL CHECK (role IN ('read', 'deploy', 'admin')),
        sha256     TEXT NOT NULL UNIQUE,    -- hex digest of the token; the token is not kept
        created    REAL NOT NULL,
        expires    REAL,                    -- unix time; NULL: never
        last_used  REAL                     -- unix time, to a minute; NULL: never
    );
    """,
)

TOKEN_COLUMNS = "name, role, created, expires, last_used"  # never the digest

FIRST_HOST = 0xA  # functions take addresses from ::a upward


@dataclass(frozen=True)
class Version:
    """One deployed version of a function."""

    name: str
    version: int
    digest: str
    config: dict[str, Any]
    size: int
    created: float

    def row(self) -> dict[str, Any]:
        return {"version": self.version, "digest": self.digest, "size": self.size,
                "created": self.created, "command": command_of(self.config)}


def command_of(config: dict[str, Any]) -> list[str]:
    """What a container of this image runs."""
    return list(config.get("entrypoint") or []) + list(config.get("cmd") or [])


class State:
    """The controller's database."""

    def __init__(self, path: str, function_prefix: str, vpn_prefix: str = "fd00:faa5:0:100::/64",
                 maxima: dict[str, float] | None = None):
        self.prefix = ipaddress.IPv6Network(function_prefix)
        self.maxima = maxima  # the host's (fnsettings.host_maxima): caps defaults and sets
        self.egress_caps: Any = None  # the host's Settings: max_egress_functions, _calls
        self.vpn_prefix = ipaddress.IPv6Network(vpn_prefix)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._specs: tuple[int, list[dict[str, Any]]] | None = None  # (generation, specs)
        self._migrate()

    def _migrate(self) -> None:
        current = self.db.execute("PRAGMA user_version").fetchone()[0]
        if current > len(MIGRATIONS):
            raise RuntimeError(f"state.db schema {current} is newer than this controller "
                               f"({len(MIGRATIONS)}): upgrade faasd")
        for i in range(current, len(MIGRATIONS)):
            # One script, one transaction: the schema and its version number move together.
            self.db.executescript(f"BEGIN IMMEDIATE; {MIGRATIONS[i]}; "
                                  f"PRAGMA user_version = {i + 1}; COMMIT;")

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed whole or not at all."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    # --- reading -------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])

    def functions(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every function with its address and current version (only ``name``, if given)."""
        where, params = ("WHERE f.name = ?", (name,)) if name is not None else ("", ())
        rows = self.db.execute(
            "SELECT f.name, f.address, f.version, f.created, f.settings, v.digest, v.config"
            " FROM functions f JOIN versions v ON v.name = f.name AND v.version = f.version"
            f" {where} ORDER BY f.name", params)
        return [{"name": r["name"], "address": r["address"], "version": r["version"],
                 "created": r["created"], "digest": r["digest"],
                 "command": command_of(json.loads(r["config"])),
                 "settings": fnsettings.apply(json.loads(r["settings"]), {}, self.maxima)}
                for r in rows]

    def specs(self) -> list[dict[str, Any]]:
        """What the runner needs to serve every function: address, image digest,
        settings. Not the image's config: the runner has its own record of that (the
        stored copy is for list and info). Read once per generation: each agent's
        desired state asks for it, and each read parses every function's settings.
        Callers must not change what it returns (it is the cache's own)."""
        generation = self.generation
        if self._specs is None or self._specs[0] != generation:
            self._specs = (generation, self._read_specs())
        return self._specs[1]

    def _read_specs(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT f.name, f.address, f.settings, v.digest FROM functions f"
            " JOIN versions v ON v.name = f.name AND v.version = f.version ORDER BY f.name")
        return [{"name": r["name"], "address": r["address"], "digest": r["digest"],
                 "settings": fnsettings.apply(json.loads(r["settings"]), {}, self.maxima)}
                for r in rows]

    def function(self, name: str) -> dict[str, Any]:
        """One function, or not_found."""
        for f in self.functions(name):
            return f
        raise FaasError(Code.NOT_FOUND, f"no function named {name!r}; faasctl list shows them",
                        {"name": name})

    def versions(self, name: str) -> list[Version]:
        """Every version of a function, oldest first."""
        self.function(name)
        rows = self.db.execute("SELECT * FROM versions WHERE name=? ORDER BY version", (name,))
        return [Version(r["name"], r["version"], r["digest"], json.loads(r["config"]),
                        r["size"], r["created"]) for r in rows]

    def digests(self) -> set[str]:
        """Every image digest some version uses: the rootfs the runner must keep."""
        return {r[0] for r in self.db.execute("SELECT DISTINCT digest FROM versions")}

    def egress(self) -> list[dict[str, Any]]:
        """netagent's share of the network=egress functions: name, address, the private
        ranges it may reach, and the address and ports of each function it may call
        (one removed since is left out)."""
        specs = self.specs()
        by_name = {s["name"]: s for s in specs}
        return [{"name": s["name"], "address": s["address"],
                 "egress_allow": s["settings"]["egress_allow"],
                 "may_call": [{"address": by_name[n]["address"],
                               "ports": by_name[n]["settings"]["ports"]}
                              for n in s["settings"]["may_call"] if n in by_name]}
                for s in specs if s["settings"]["network"] == "egress"]

    def addresses(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT address FROM functions ORDER BY address")]

    # --- changing ------------------------------------------------------------------

    def _bump(self, db: sqlite3.Connection) -> None:
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")

    def _allocate(self, db: sqlite3.Connection) -> str:
        used = {int(ipaddress.IPv6Address(r[0]))
                for r in db.execute("SELECT address FROM functions")}
        base = int(self.prefix.network_address)
        for offset in range(FIRST_HOST, self.prefix.num_addresses):
            if base + offset not in used:
                return str(ipaddress.IPv6Address(base + offset))
        raise FaasError(Code.CONFLICT, f"function prefix {self.prefix} is full; widen "
                        "function_prefix or remove functions")

    def add_version(self, name: str, digest: str, config: dict[str, Any],
                    size: int) -> dict[str, Any]:
        """Record a new version and serve it; a new function gets an address."""
        now = time.time()
        with self.tx() as db:
            row = db.execute("SELECT address FROM functions WHERE name=?", (name,)).fetchone()
            if row is None:
                address = self._allocate(db)
                version = 1
                db.execute("INSERT INTO functions (name, address, version, created) "
                           "VALUES (?, ?, 0, ?)", (name, address, now))
            else:
                address = row["address"]
                version = db.execute("SELECT MAX(version) FROM versions WHERE name=?",
                                     (name,)).fetchone()[0] + 1
            db.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?)",
                       (name, version, digest, json.dumps(config), size, now))
            db.execute("UPDATE functions SET version=? WHERE name=?", (version, name))
            self._bump(db)
        return {"name": name, "version": version, "address": address, "digest": digest,
                "command": command_of(config)}

    def rollback(self, name: str, version: int | None) -> dict[str, Any]:
        """Serve an earlier version: the one given, else the one before the current."""
        current = self.function(name)["version"]
        known = [v.version for v in self.versions(name)]
        if version is None:
            older = [v for v in known if v < current]
            if not older:
                raise FaasError(Code.CONFLICT, f"{name} has no version before {current}",
                                {"versions": known})
            version = older[-1]
        if version not in known:
            raise FaasError(Code.NOT_FOUND, f"{name} has no version {version}; it has "
                            f"{', '.join(map(str, known))}", {"versions": known})
        with self.tx() as db:
            db.execute("UPDATE functions SET version=? WHERE name=?", (version, name))
            self._bump(db)
        return self.function(name)

    def set(self, name: str, changes: dict[str, str]) -> dict[str, Any]:
        """Apply KEY=VALUE changes to a function's settings, all or none; changed values
        above the host's maxima are refused."""
        settings = fnsettings.apply(self.function(name)["settings"], changes, self.maxima)
        if "may_call" in changes:  # a name that is no function is a typo: say so now
            known = {r[0] for r in self.db.execute("SELECT name FROM functions")}
            missing = [n for n in settings["may_call"] if n not in known]
            if missing:
                raise FaasError(Code.NOT_FOUND, f"may_call: no function named "
                                f"{', '.join(missing)}; faasctl list shows them",
                                {"key": "may_call", "missing": missing})
        if self.egress_caps is not None and {"network", "may_call"} & set(changes):
            self.check_egress_caps(name, settings)
        with self.tx() as db:
            db.execute("UPDATE functions SET settings=? WHERE name=?", (json.dumps(settings), name))
            self._bump(db)
        return settings

    def check_egress_caps(self, name: str, settings: dict[str, Any]) -> None:
        """netagent refuses a whole sync past root's caps on egress functions and their
        may_call entries: a change that takes the totals past one is refused now (one
        that lowers them, never)."""
        specs = {s["name"]: s["settings"] for s in self.specs()}

        def counts() -> tuple[int, int]:
            egress = [s for s in specs.values() if s["network"] == "egress"]
            return len(egress), sum(1 for s in egress for n in s["may_call"] if n in specs)
        before = counts()
        specs[name] = settings
        after = counts()
        bad = egressnets.over_caps(*after, self.egress_caps)
        if bad and (after[0] > before[0] or after[1] > before[1]):
            raise FaasError(Code.CONFLICT, f"{bad}: root may raise it in the settings file "
                            "(docs/settings.md)", {"key": "network" if after[0] > before[0]
                                                   else "may_call"})

    def remove(self, name: str) -> dict[str, Any]:
        """Forget a function and all its versions."""
        f = self.function(name)
        with self.tx() as db:
            db.execute("DELETE FROM versions WHERE name=?", (name,))
            db.execute("DELETE FROM functions WHERE name=?", (name,))
            self._bump(db)
        return f

    # --- VPN peers ---------------------------------------------------------------------

    def peers(self) -> list[dict[str, Any]]:
        """Every peer, by name."""
        return [dict(r) for r in self.db.execute("SELECT * FROM peers ORDER BY name")]

    def peer(self, name: str) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM peers WHERE name=?", (name,)).fetchone()
        if row is None:
            raise FaasError(Code.NOT_FOUND, f"no VPN peer named {name!r}; "
                            "see faasctl vpn list", {"name": name})
        return dict(row)

    def active_peers(self) -> list[dict[str, str]]:
        """What netagent must let in: enabled peers, key and address."""
        return [{"public_key": r["public_key"], "address": r["address"]} for r in
                self.db.execute("SELECT public_key, address FROM peers WHERE state='enabled'"
                                " ORDER BY address")]

    def peer_names(self) -> list[dict[str, str]]:
        """What the runner needs to know its callers: enabled peers, name and address."""
        return [{"name": r["name"], "address": r["address"]} for r in
                self.db.execute("SELECT name, address FROM peers WHERE state='enabled'"
                                " ORDER BY address")]

    def add_peer(self, name: str, public_key: str, expires: float | None) -> dict[str, Any]:
        """A new peer with the next free address of the VPN prefix (from ::2)."""
        with self.tx() as db:
            if db.execute("SELECT 1 FROM peers WHERE name=?", (name,)).fetchone():
                raise FaasError(Code.CONFLICT, f"a VPN peer named {name!r} exists; remove it "
                                "first (faasctl vpn rm) or pick another name", {"name": name})
            if db.execute("SELECT 1 FROM peers WHERE public_key=?", (public_key,)).fetchone():
                raise FaasError(Code.CONFLICT, "another peer already has this public key",
                                {"public_key": public_key})
            used = {int(ipaddress.IPv6Address(r[0]))
                    for r in db.execute("SELECT address FROM peers")}
            base = int(self.vpn_prefix.network_address)
            for offset in range(2, min(self.vpn_prefix.num_addresses, 1 << 20)):
                if base + offset not in used:
                    break
            else:
                raise FaasError(Code.CONFLICT, f"VPN prefix {self.vpn_prefix} is full")
            address = str(ipaddress.IPv6Address(base + offset))
            db.execute("INSERT INTO peers VALUES (?, ?, ?, 'enabled', ?, ?)",
                       (name, public_key, address, time.time(), expires))
            self._bump(db)
        return self.peer(name)

    def set_peer_state(self, name: str, state: str) -> dict[str, Any]:
        """enabled, disabled or expired; enabling clears an expiry."""
        self.peer(name)
        with self.tx() as db:
            if state == "enabled":
                db.execute("UPDATE peers SET state=?, expires=NULL WHERE name=?", (state, name))
            else:
                db.execute("UPDATE peers SET state=? WHERE name=?", (state, name))
            self._bump(db)
        return self.peer(name)

    def remove_peer(self, name: str) -> dict[str, Any]:
        peer = self.peer(name)
        with self.tx() as db:
            db.execute("DELETE FROM peers WHERE name=?", (name,))
            self._bump(db)
        return peer

    def expire_peers(self, now: float) -> list[str]:
        """Mark enabled peers past their expiry as expired; their names."""
        names = [r[0] for r in self.db.execute(
            "SELECT name FROM peers WHERE state='enabled' AND expires IS NOT NULL "
            "AND expires <= ?", (now,))]
        if names:
            with self.tx() as db:
                db.executemany("UPDATE peers SET state='expired' WHERE name=?",
                               [(n,) for n in names])
                self._bump(db)
        return names

    # --- HTTP API tokens ---------------------------------------------------------------
    # Not part of the desired state: no agent needs them, so no generation bump.

    def tokens(self) -> list[dict[str, Any]]:
        """Every token, by name, without its digest."""
        return [dict(r) for r in
                self.db.execute(f"SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY name")]

    def add_token(self, name: str, role: str, sha256: str,
                  expires: float | None) -> dict[str, Any]:
        """Record a new token by its digest; a taken name is a conflict."""
        with self.tx() as db:
            if db.execute("SELECT 1 FROM tokens WHERE name=?", (name,)).fetchone():
                raise FaasError(Code.CONFLICT, f"a token named {name!r} exists; remove it "
                                "first (faasctl token rm) or pick another name", {"name": name})
            db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, NULL)",
                       (name, role, sha256, time.time(), expires))
        return self.token(name)

    def token(self, name: str) -> dict[str, Any]:
        row = self.db.execute(f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE name=?",
                              (name,)).fetchone()
        if row is None:
            raise FaasError(Code.NOT_FOUND, f"no token named {name!r}; see faasctl token "
                            "list", {"name": name})
        return dict(row)

    def token_by_digest(self, sha256: str) -> dict[str, Any] | None:
        """The token whose digest this is, or None."""
        row = self.db.execute(f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE sha256=?",
                              (sha256,)).fetchone()
        return dict(row) if row is not None else None

    def token_used(self, name: str, now: float) -> None:
        """Note a use, at most one write a minute per token."""
        with self.tx() as db:
            db.execute("UPDATE tokens SET last_used=? WHERE name=? AND "
                       "(last_used IS NULL OR last_used < ?)", (now, name, now - 60))

    def remove_token(self, name: str) -> dict[str, Any]:
        token = self.token(name)
        with self.tx() as db:
            db.execute("DELETE FROM tokens WHERE name=?", (name,))
        return token
