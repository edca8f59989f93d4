"""The backup archive: its members, its manifest, writing it and reading it back safely.

This module owns the archive's format (docs/backup.md "The archive"), not what a member
holds: each member belongs to a daemon that exports, checks and installs it
(common/parts.py). Format 1: a gzip tar of ``manifest.json`` then the members in
:data:`MEMBERS` order, every one a regular file under its cap.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import ipaddress
import json
import os
import re
import socket
import stat
import tarfile
import time
import zlib
from dataclasses import dataclass
from typing import Any

from common.daemon import VERSION
from common.errors import Code, FaasError
from common.files import atomic_file
from common.settings import Settings

FORMAT = 1  # the archive layout; restore knows KNOWN_FORMATS
KNOWN_FORMATS = (1,)
MANIFEST = "manifest.json"
MANIFEST_CAP = 1 << 20
MAX_ARCHIVE = 1 << 30  # the compressed file, without volumes
MAX_ARCHIVE_VOLUMES = 1 << 44  # with --with-volumes: each volume's tar has its own cap
VOLUME_CAP = 1 << 42  # one volume's tar
VOLUME_MEMBER = re.compile(r"volumes/([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)\.tar")
CHUNK = 1 << 20
SETTINGS_KEPT = ("function_prefix", "vpn_prefix", "wg_interface", "wg_port")
SETTINGS_REQUIRED = ("function_prefix", "vpn_prefix")  # the addresses in state need them


@dataclass(frozen=True)
class Member:
    """One file of the archive: the daemon that answers for it, and its size cap."""

    name: str  # in the archive
    part: str  # the service whose backup module exports, checks and installs it
    cap: int
    required: bool = False


# In archive order, which is also the order restore installs them: state.db last.
MEMBERS = (
    Member("wireguard/private.key", "netagent", 64),
    Member("wireguard/endpoints.json", "netagent", 16 << 20),
    Member("dns/serial", "dnsagent", 64),
    Member("dns/faas.db", "dnsagent", 16 << 20),
    Member("secrets.json", "runner", 512 << 20),  # only with --with-secrets
    Member("state.db", "controller", 256 << 20, required=True),
)
BY_NAME = {m.name: m for m in MEMBERS}


def _bad(message: str) -> FaasError:
    return FaasError(Code.BAD_REQUEST, message)


def member_of(name: str) -> Member | None:
    """The member of that name: one of MEMBERS, or a volume's tar (``volumes/<name>.tar``,
    the runner's, only in a backup made with --with-volumes)."""
    if name in BY_NAME:
        return BY_NAME[name]
    return Member(name, "runner", VOLUME_CAP) if VOLUME_MEMBER.fullmatch(name) else None


def caps_of(part: str) -> dict[str, int]:
    """The members ``part`` answers for, with their caps."""
    return {m.name: m.cap for m in MEMBERS if m.part == part}


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def images(versions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every image digest with the function versions using it."""
    by: dict[str, list[dict[str, Any]]] = {}
    for v in versions:
        by.setdefault(v["digest"], []).append(
            {"name": v["name"], "version": v["version"], "current": v["current"]})
    return [{"digest": d, "uses": uses} for d, uses in sorted(by.items())]


# --- writing ----------------------------------------------------------------------------

def make_manifest(settings: Settings, files: dict[str, str], contents: dict[str, Any],
                  server_key: str | None, volumes: dict[str, int] | None = None
                  ) -> dict[str, Any]:
    """What the archive holds and where it came from; the images it needs."""
    now = time.time()
    return {
        "format": FORMAT,
        "faasd_version": VERSION,
        "created": now,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "hostname": socket.gethostname(),
        "schema": contents["schema"],
        "settings": {k: getattr(settings, k) for k in SETTINGS_KEPT},
        "server_public_key": server_key,
        "functions": contents["functions"],
        "peers": [{k: p[k] for k in ("name", "address", "public_key")}
                  for p in contents["peers"]],
        "images": images(contents["versions"]),
        "volumes": volumes or {},  # name -> size in bytes, of the volumes in the archive
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
        extra = sorted(n for n in files if n not in BY_NAME)  # volumes, before state.db
        for name in [*(m.name for m in MEMBERS[:-1]), *extra, MEMBERS[-1].name]:
            if name in files:
                with open(files[name], "rb") as src:
                    tf.addfile(info(name, os.fstat(src.fileno()).st_size), src)


# --- reading ----------------------------------------------------------------------------

def unpack(path: str, work: str) -> dict[str, str]:
    """The expected members, each copied to a file of ours in ``work`` (a member's own
    name is never a path); anything else in the archive refuses the whole of it."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _bad(f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _bad(f"{path} is not a regular file")
    if st.st_size > MAX_ARCHIVE_VOLUMES:
        raise _bad(f"{path} is larger than {MAX_ARCHIVE_VOLUMES >> 40} TiB: not a faasd "
                   "backup")
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
    cap = MANIFEST_CAP if ti.name == MANIFEST else getattr(member_of(ti.name), "cap", None)
    if cap is None:
        raise _bad(f"unexpected member {name!r}: a faasd backup holds only {MANIFEST}, "
                   f"{', '.join(BY_NAME)} and volumes/NAME.tar")
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
    volumes = manifest.setdefault("volumes", {})  # none in a backup made before volumes
    tars = {VOLUME_MEMBER.fullmatch(n).group(1) for n in files if VOLUME_MEMBER.fullmatch(n)}
    if not isinstance(volumes, dict) or set(volumes) != tars or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in volumes.values()):
        raise _bad(f"{MANIFEST}: its volumes and their sizes are not the archive's volumes")
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
