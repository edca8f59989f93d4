"""faasctl backup FILE / faasctl restore FILE: what cannot be redeployed, in one archive.

Both run as root on the server, without the controller (the WireGuard private key is
root's alone). ``backup`` writes a gzip tar holding a manifest, a consistent copy of the
controller's SQLite database, the zone and its serial, the server's WireGuard key and
the peers' last endpoints; never the images (they redeploy), the spool, the logs or
``named/`` (rendered at every start). ``restore`` refuses while any part of the
platform runs, checks the whole archive before it writes anything, puts each file in
place atomically with the owner and mode the daemons expect, and says which images to
redeploy. docs/backup.md has the reasons.

This module runs the commands; cli/archive.py owns the archive's format; what each
member holds is answered for by the daemon that owns it (controller/backup.py,
netagent/backup.py, dnsagent/backup.py), run as a program through common/parts.py.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import IO, Any

from cli.archive import (
    FORMAT,
    MANIFEST,
    caps_of,
    check_manifest,
    check_settings,
    images,
    make_manifest,
    member_of,
    unpack,
    write_archive,
)
from common import layout, parts
from common.daemon import owner_ids
from common.errors import EXIT_STATUS, Code, FaasError
from common.files import read_small
from common.proc import alive
from common.protocol import SERVICES
from common.settings import Settings, SettingsError, load

__all__ = ["FORMAT", "Owners", "backup", "restore", "main"]

BACKUP_HELP = ("On the server, as root: write the state, zone, WireGuard key and peer list "
               "into FILE (gzip tar, mode 0600); images are not in it, they redeploy")
RESTORE_HELP = ("On a stopped server, as root: put FILE's state, zone and keys in place and "
                "say which images to redeploy (exit 4 while faasd runs or state exists)")


@dataclass(frozen=True)
class Owners:
    """uid and gid for "faas" and "root" files (tests pass their own ids)."""

    faas: tuple[int, int]
    root: tuple[int, int] = (0, 0)

    def wire(self) -> dict[str, list[int]]:
        return {"faas": list(self.faas), "root": list(self.root)}


def _of_part(part: str, files: dict[str, str]) -> dict[str, str]:
    return {name: path for name, path in files.items()
            if (m := member_of(name)) is not None and m.part == part}


# --- backup ----------------------------------------------------------------------------

def backup(settings: Settings, target: str, with_secrets: bool = False,
           with_volumes: bool = False) -> dict[str, Any]:
    """Write the archive to ``target`` atomically (mode 0600); return its manifest.
    Each daemon's part copies its own files into a private directory first; the
    runner's, the secrets' values only ``with_secrets`` and the volumes' files only
    ``with_volumes``."""
    with tempfile.TemporaryDirectory(prefix="faasd-backup-") as work:
        files: dict[str, str] = {}
        facts: dict[str, Any] = {}
        for part in ("controller", *(p for p in parts.PARTS if p != "controller")):
            if part in parts.OPTIONAL and not (with_secrets or with_volumes):
                continue
            sub = os.path.join(work, part)
            os.mkdir(sub, 0o700)
            extra = {"with_secrets": with_secrets, "with_volumes": with_volumes} \
                if part == "runner" else {}
            got = parts.call(part, "export", settings, work=sub, members=caps_of(part),
                             **extra)
            exported = got.pop("files", {})
            if not isinstance(exported, dict) or any(
                    getattr(member_of(name), "part", None) != part
                    or os.path.dirname(str(path)) != sub
                    for name, path in exported.items()):
                raise FaasError(Code.INTERNAL, f"{part}'s backup part exported files it does "
                                "not answer for")
            files.update(exported)
            facts.update(got)
        manifest = make_manifest(settings, files, facts["contents"],
                                 facts.get("server_public_key"), facts.get("volumes"))
        if with_secrets:
            manifest["secrets"] = facts.get("secrets", [])  # names: the values are a member
        write_archive(target, manifest, files)
    return manifest


# --- restore ---------------------------------------------------------------------------

@dataclass
class Archive:
    """A checked archive: its manifest, its files unpacked into a private directory,
    and what its state.db holds."""

    manifest: dict[str, Any]
    files: dict[str, str]
    contents: dict[str, Any]  # schema, functions, versions, peers (controller/backup.py)
    warnings: list[str]
    server_key: str | None = None  # the public half of the archived private key
    force: bool = False  # restore --force: volumes of the same name are replaced
    secrets: list[str] | None = None  # names of the secrets it holds (with --with-secrets)


def _runner_args(part: str, manifest: dict[str, Any], force: bool) -> dict[str, Any]:
    """The runner's part needs the volumes' sizes (the manifest's) and --force."""
    return {"sizes": manifest["volumes"], "force": force} if part == "runner" else {}


def read_archive(path: str, work: str, settings: Settings, force: bool = False) -> Archive:
    """Unpack into ``work`` and have each part check its files; nothing under
    $FAAS_ROOT is touched."""
    files = unpack(path, work)
    with open(files.pop(MANIFEST), "rb") as f:
        manifest = check_manifest(f.read(), files)
    warnings = check_settings(manifest, settings)
    facts: dict[str, Any] = {}
    for part in ("controller", *(p for p in parts.PARTS if p != "controller")):
        mine = _of_part(part, files)
        if mine:
            facts.update(parts.call(part, "check", settings, files=mine,
                                    **_runner_args(part, manifest, force)))
    return Archive(manifest, files, facts["contents"], warnings, facts.get("server_public_key"),
                   force, facts.get("secrets") or [])


def check_stopped(settings: Settings) -> None:
    """Conflict unless the whole platform is down: no live supervisord, no daemon holding
    its lock (netagent's part also refuses while the WireGuard interface exists)."""
    paths = layout.of(settings)
    pid = _pid_in(paths.supervisord_pid)
    if pid and alive(pid):
        raise FaasError(Code.CONFLICT, f"faasd is running (supervisord pid {pid} in "
                        f"{paths.supervisord_pid}): stop it first with `faasd down`")
    for service in SERVICES:
        holder = _lock_holder(paths.lock(service))
        if holder is not None:
            raise FaasError(Code.CONFLICT, f"faas-{service} is running (pid {holder} holds its "
                            "lock): stop the platform first with `faasd down`")


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


def check_root(root: str) -> None:
    """$FAAS_ROOT is a real directory (or missing); each part checks its own below it."""
    parts.real_dir_or_none(root)


def install(archive: Archive, settings: Settings, owners: Owners) -> None:
    """Each part puts its files into place, atomically; the controller's state.db last."""
    if not os.path.exists(settings.root):
        layout.ensure_dir(settings.root, owners.root, 0o755)
    for part in parts.PARTS:
        mine = _of_part(part, archive.files)
        if mine:
            parts.call(part, "install", settings, files=mine, owners=owners.wire(),
                       **_runner_args(part, archive.manifest, archive.force))


def restore(path: str, settings: Settings, force: bool, owners: Owners,
            out: IO[str]) -> Archive:
    """Refuse (conflict) while the platform runs or state is there, refuse (bad_request)
    a bad archive, and only then write; report to ``out``."""
    check_stopped(settings)
    check_root(settings.root)
    for part in parts.PARTS:
        parts.call(part, "ready", settings, force=force)
    with tempfile.TemporaryDirectory(prefix="faasd-restore-") as work:
        archive = read_archive(path, work, settings, force)
        install(archive, settings, owners)
    report(archive, settings, out)
    return archive


def report(archive: Archive, settings: Settings, out: IO[str]) -> None:
    """What came back, and which images must be redeployed for it to serve."""
    m, c = archive.manifest, archive.contents
    have = [_count(len(c["functions"]), "function"), _count(len(c["peers"]), "VPN peer")]
    have += ["the zone"] if "dns/faas.db" in archive.files else []
    have += ["the WireGuard server key"] if "wireguard/private.key" in archive.files else []
    if "secrets.json" in archive.files:
        have.append(_count(len(archive.secrets), "secret"))
    have += [_count(len(m["volumes"]), "volume")] if m["volumes"] else []
    print(f"Restored {', '.join(have)} into {settings.root}, from the backup of "
          f"{m['hostname']} (faasd {m['faasd_version']}, {m['created_utc']}).", file=out)
    if archive.server_key:
        print(f"Server public key: {archive.server_key} (peers' configs stay valid).", file=out)
    for warning in archive.warnings:
        print(f"Warning: {warning}.", file=out)
    needed = images(c["versions"])
    if not needed:
        print("No images are needed. Start the platform: faasd up", file=out)
        return
    latest = {}
    for v in c["versions"]:
        latest[v["name"]] = max(latest.get(v["name"], 0), v["version"])
    print("\nStart the platform (faasd up), then redeploy these images; a function answers "
          "on its old address as soon as its image is back:", file=out)
    for image in needed:
        _report_image(image, layout.of(settings), latest, out)
    print("\nRedeploying the same image gives the same digest, and one upload serves every "
          "function and version using that digest. `faasctl new` records it as a new "
          "version with the same content (the version numbers above go up by one); the "
          "restored versions stay, so `faasctl rollback` works once their images are back.",
          file=out)


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _report_image(image: dict[str, Any], paths: layout.Layout, latest: dict[str, int],
                  out: IO[str]) -> None:
    digest, uses = image["digest"], image["uses"]
    present = os.path.isdir(paths.image_rootfs(digest))
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
    b.add_argument("--with-secrets", action="store_true",
                   help="also the secrets' values (faasctl secret): the archive is then as "
                   "sensitive as all of them")
    b.add_argument("--with-volumes", action="store_true",
                   help="also the files of every volume (docs/volumes.md)")
    r = sub.add_parser("restore", help=RESTORE_HELP, description=RESTORE_HELP)
    r.add_argument("file", metavar="FILE", help="an archive faasctl backup wrote")
    r.add_argument("--force", action="store_true",
                   help="replace the functions and peers already in $FAAS_ROOT, and "
                   "volumes of the same names")


def summary(target: str, manifest: dict[str, Any], out: IO[str]) -> None:
    files = manifest["files"]
    if "secrets" in manifest:
        print(f"{target} holds the values of {_count(len(manifest['secrets']), 'secret')} "
              f"({', '.join(manifest['secrets']) or 'none'}): keep it as you keep them.",
              file=out)
    else:
        print("Secrets' values are not in it (faasctl backup --with-secrets FILE adds them).",
              file=out)
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
            summary(ns.file, backup(settings, ns.file, ns.with_secrets, ns.with_volumes),
                    sys.stdout)
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
