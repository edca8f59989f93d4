"""The runner's part of a backup: the secrets' values, only with ``--with-secrets``, and
the volumes' files, only with ``--with-volumes`` (runner/volumebackup.py).

Run by faasctl as ``python -I -m runner.backup ACTION``, as root (common/parts.py):
``secrets/`` is root's alone, so values are read and written here, by root, and never
pass through the unprivileged controller or onto stdout; only names are reported.

- export: every secret, as ``secrets.json`` (``{"format": 1, "secrets": {NAME:
  base64}}``), in the work directory; never through a symlink or a FIFO.
- ready: a conflict if ``secrets/`` is not a real directory.
- check: names are secret names, values base64 of at most SECRET_MAX bytes.
- install: root 0600 files in ``secrets/`` (root 0700), each replaced atomically; secrets
  already there and not in the archive are kept.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from typing import Any

from common import layout, parts
from common.errors import Code, FaasError
from common.files import atomic_write, read_small
from common.protocol import NAME_PATTERN, SECRET_MAX
from common.settings import Settings
from runner import volumebackup

MEMBER = "secrets.json"
FORMAT = 1
_NAME = re.compile(NAME_PATTERN)


def _bad(message: str) -> FaasError:
    return FaasError(Code.BAD_REQUEST, message)


def parse(data: bytes) -> dict[str, bytes]:
    """The values of a secrets.json as export writes it; bad_request naming the fault
    (a name, never a value)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except ValueError:
        raise _bad(f"{MEMBER} is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or \
            not isinstance(doc.get("secrets"), dict):
        raise _bad(f"{MEMBER} is not format {FORMAT} of faasd's secrets")
    values = {}
    for name, text in doc["secrets"].items():
        if not _NAME.fullmatch(name):
            raise _bad(f"{MEMBER}: {name[:70]!r} is not a secret name")
        try:
            values[name] = base64.b64decode(text, validate=True) if isinstance(text, str) \
                else None
        except (binascii.Error, ValueError):
            values[name] = None
        if values[name] is None or len(values[name]) > SECRET_MAX:
            raise _bad(f"{MEMBER}: secret {name} is not base64 of at most {SECRET_MAX} bytes")
    return values  # type: ignore[return-value]


# --- the actions ------------------------------------------------------------------------

def export(settings: Settings, work: str, members: dict[str, int], with_secrets: bool = True,
           with_volumes: bool = False) -> dict[str, Any]:
    """The secrets (``with_secrets``) and the volumes (``with_volumes``) into ``work``."""
    out: dict[str, Any] = {"files": {}, "volumes": {}}
    if with_secrets:
        out = {**out, **export_secrets(settings, work, members)}
    if with_volumes:
        got = volumebackup.export(settings, work)
        out["files"] = {**out["files"], **got["files"]}
        out["volumes"] = got["volumes"]
    return out


def export_secrets(settings: Settings, work: str, members: dict[str, int]) -> dict[str, Any]:
    """Every stored secret in one file in ``work``; their names."""
    store = layout.of(settings).secrets
    values = {}
    if os.path.isdir(store):
        for entry in sorted(os.scandir(store), key=lambda e: e.name):
            if _NAME.fullmatch(entry.name):
                data = read_small(entry.path, SECRET_MAX)
                if data is not None:
                    values[entry.name] = base64.b64encode(data).decode()
    body = json.dumps({"format": FORMAT, "secrets": values}).encode()
    if len(body) > members[MEMBER]:
        raise FaasError(Code.TOO_LARGE, f"the secrets take more than {members[MEMBER]} "
                        "bytes in a backup")
    path = os.path.join(work, MEMBER)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with open(fd, "wb") as f:
        f.write(body)
    return {"files": {MEMBER: path}, "secrets": sorted(values)}


def ready(settings: Settings, force: bool) -> None:
    """Conflict if secrets/ or volumes/ is not a directory."""
    parts.real_dir_or_none(layout.of(settings).secrets)
    volumebackup.ready(settings)


def check(settings: Settings, files: dict[str, str], sizes: dict[str, int] | None = None,
          force: bool = False) -> dict[str, Any]:
    """The files are what export writes; the secrets' names. ``sizes`` are the volumes'
    (the manifest's); ``force`` lets a volume of the same name be replaced."""
    volumebackup.check(settings, {n: p for n, p in files.items()
                                  if volumebackup.is_member(n)}, sizes, force)
    if MEMBER not in files:
        return {}
    with open(files[MEMBER], "rb") as f:
        return {"secrets": sorted(parse(f.read()))}


def install(settings: Settings, files: dict[str, str], owners: dict[str, list[int]],
            sizes: dict[str, int] | None = None, force: bool = False) -> None:
    """Root 0600 files in secrets/ (root 0700), as the runner makes them; each volume
    made anew and filled."""
    volumebackup.install(settings, {n: p for n, p in files.items()
                                    if volumebackup.is_member(n)}, sizes, force)
    if MEMBER not in files:
        return
    with open(files[MEMBER], "rb") as f:
        values = parse(f.read())
    store = layout.of(settings).secrets
    root = (int(owners["root"][0]), int(owners["root"][1]))
    layout.ensure_dir(store, root, 0o700)
    for name, value in values.items():
        atomic_write(os.path.join(store, name), value, 0o600, root)


if __name__ == "__main__":
    parts.serve(globals())
