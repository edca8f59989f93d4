"""netagent's part of a backup: the server's WireGuard key and the peers' endpoints.

Run by faasctl as ``python -I -m netagent.backup ACTION``, as root (common/parts.py):
``wireguard/private.key`` is root's alone, so the key is read and written here, by root,
and never passes through the unprivileged controller or onto stdout; only its public
half is reported.

- export: both files as netagent wrote them, never through a symlink or a FIFO.
- ready: a conflict while the WireGuard interface exists: netagent keeps the key of an
  interface that exists (it only configures a new one), so a restored key would not take
  effect (``faasd down`` removes it); or if ``wireguard/`` is not a real directory.
- check: the key is 32 bytes of canonical base64 and a newline; endpoints.json maps
  WireGuard keys to ``ADDRESS:PORT``.
- install: root 0600 files in ``wireguard/`` (root 0700).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from typing import Any

from common import layout, parts
from common.errors import Code, FaasError
from common.files import atomic_write, read_small
from common.schema import WgKey
from common.settings import Settings

KEY = "wireguard/private.key"
ENDPOINTS = "wireguard/endpoints.json"
PATHS = {KEY: "wg_private_key", ENDPOINTS: "wg_endpoints"}  # member -> Layout property
ENDPOINT = re.compile(r"(\[[0-9a-fA-F:.]+\]|[0-9.]+):[0-9]{1,5}", re.ASCII)


def _bad(message: str) -> FaasError:
    return FaasError(Code.BAD_REQUEST, message)


def public_key(private: bytes) -> str | None:
    """The public half of a WireGuard key (``wg pubkey``, key on stdin), if wg is here."""
    wg = shutil.which("wg")
    if wg is None:
        return None
    out = subprocess.run([wg, "pubkey"], input=private, capture_output=True, timeout=5,
                         check=False)
    return out.stdout.decode().strip() if out.returncode == 0 else None


def check_key(data: bytes) -> None:
    """The server's private key as netagent writes it: 32 bytes of base64, one newline."""
    text = data.decode("ascii", "replace")
    try:
        WgKey().check(text.removesuffix("\n"), KEY)
    except FaasError:
        raise _bad(f"{KEY} is not a WireGuard key (32 bytes of base64)") from None


def check_endpoints(data: bytes) -> None:
    """{public key: "address:port"}, as netagent writes it."""
    try:
        endpoints = json.loads(data.decode("utf-8"))
    except ValueError:
        endpoints = None
    if not isinstance(endpoints, dict):
        raise _bad(f"{ENDPOINTS} is not a JSON object")
    for key, value in endpoints.items():
        try:
            WgKey().check(key, "key")
        except FaasError:
            raise _bad(f"{ENDPOINTS} has a key that is not a WireGuard key") from None
        if not isinstance(value, str) or not ENDPOINT.fullmatch(value):
            raise _bad(f"{ENDPOINTS}: {str(value)[:60]!r} is not ADDRESS:PORT")


# --- the actions ------------------------------------------------------------------------

def export(settings: Settings, work: str, members: dict[str, int]) -> dict[str, Any]:
    """The files that exist, copied into ``work``; the key's public half."""
    paths = layout.of(settings)
    files, key = {}, None
    for name, attr in PATHS.items():
        data = read_small(getattr(paths, attr), members[name])
        if data is None:
            continue
        files[name] = os.path.join(work, os.path.basename(name))
        with open(files[name], "wb") as f:
            f.write(data)
        if name == KEY:
            key = public_key(data)
    return {"files": files, "server_public_key": key}


def ready(settings: Settings, force: bool) -> None:
    """Conflict while the interface exists, or if wireguard/ is not a directory."""
    directory = layout.of(settings).wireguard_dir
    parts.real_dir_or_none(directory)
    try:
        socket.if_nametoindex(settings.wg_interface)
    except OSError:
        return
    raise FaasError(Code.CONFLICT, f"the WireGuard interface {settings.wg_interface} still "
                    "exists with the current server key, which netagent would keep: "
                    "`faasd down` removes it")


def check(settings: Settings, files: dict[str, str]) -> dict[str, Any]:
    """Each file present is what netagent writes; the key's public half."""
    key = None
    for name, checker in ((KEY, check_key), (ENDPOINTS, check_endpoints)):
        if name in files:
            with open(files[name], "rb") as f:
                data = f.read()
            checker(data)
            if name == KEY:
                key = public_key(data)
    return {"server_public_key": key}


def install(settings: Settings, files: dict[str, str], owners: dict[str, list[int]]) -> None:
    """Root 0600 files in wireguard/ (root 0700), as netagent makes them."""
    paths = layout.of(settings)
    root = (int(owners["root"][0]), int(owners["root"][1]))
    layout.ensure_dir(paths.wireguard_dir, root, 0o700)
    for name, attr in PATHS.items():
        if name in files:
            with open(files[name], "rb") as f:
                atomic_write(getattr(paths, attr), f.read(), 0o600, root)


if __name__ == "__main__":
    parts.serve(globals())
