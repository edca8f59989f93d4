"""dnsagent's part of a backup: the ``faas.`` zone and its serial.

Run by faasctl as ``python -I -m dnsagent.backup ACTION`` (common/parts.py). Nothing
here is needed to rebuild the platform: dnsagent rewrites the zone from the controller's
state at its first sync. The zone and serial stay in the archive (format 1, so archives
made before and after this module stay the same) for two reasons: ``named`` serves the
restored zone from its start, before that first sync, and a serial is never handed out
twice, even when ``--force`` puts an older zone back.

- export: ``dns/faas.db`` and ``dns/serial`` as dnsagent wrote them, never through a
  symlink or a FIFO (``dns/`` belongs to the faas user, who could plant one).
- ready: a conflict if ``dns/`` is not a real directory.
- check: the zone is exactly what :func:`dnsagent.zone.render` makes for some valid
  records, a serial and this host's VPN prefix: a zone file is a little language
  (``$INCLUDE`` and friends) and named reads it at start.
- install: faas 0644 files; the serial written is the greater of the archive's and the
  one already there.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any

from common import layout, parts
from common.errors import Code, FaasError
from common.files import atomic_write, read_small
from common.settings import Settings, vpn_server
from dnsagent import zone

SERIAL = "dns/serial"
ZONE = "dns/faas.db"
PATHS = {SERIAL: "serial_file", ZONE: "zone_file"}  # member -> Layout property, in order


def _bad(message: str) -> FaasError:
    return FaasError(Code.BAD_REQUEST, message)


def check_serial(data: bytes) -> int:
    text = data.decode("ascii", "replace")
    serial = zone.parse_serial(text) if re.fullmatch(r"[0-9]{1,10}\n?", text) else None
    if serial is None:
        raise _bad(f"{SERIAL} is not a zone serial")
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
            raise _bad(f"{ZONE} is not a zone faasd's dnsagent wrote")
        raw.append({"name": m.group(1), "address": m.group(2)})
    try:
        records = zone.check_records(raw, ipaddress.IPv6Network(settings.function_prefix))
    except FaasError as exc:
        raise _bad(f"{ZONE}: {exc.message}") from None
    ns = vpn_server(settings.vpn_prefix).ip
    if serial is None or zone.render(records, serial, ns) != text:
        raise _bad(f"{ZONE} is not a zone faasd's dnsagent wrote")


# --- the actions ------------------------------------------------------------------------

def export(settings: Settings, work: str, members: dict[str, int]) -> dict[str, Any]:
    paths = layout.of(settings)
    files = {}
    for name, attr in PATHS.items():
        data = read_small(getattr(paths, attr), members[name])
        if data is not None:
            files[name] = os.path.join(work, os.path.basename(name))
            with open(files[name], "wb") as f:
                f.write(data)
    return {"files": files}


def ready(settings: Settings, force: bool) -> None:
    directory = layout.of(settings).dns_dir
    parts.real_dir_or_none(directory)


def check(settings: Settings, files: dict[str, str]) -> dict[str, Any]:
    if SERIAL in files:
        with open(files[SERIAL], "rb") as f:
            check_serial(f.read())
    if ZONE in files:
        with open(files[ZONE], "rb") as f:
            check_zone(f.read(), settings)
    return {}


def install(settings: Settings, files: dict[str, str], owners: dict[str, list[int]]) -> None:
    """Serial, then zone, into dns/ (faas 0755) as faas 0644 files."""
    paths = layout.of(settings)
    spec = layout.dir_spec("dns_dir")
    layout.ensure_dir(paths.dns_dir, layout.ids(spec, owners), spec.mode)
    faas = (int(owners["faas"][0]), int(owners["faas"][1]))
    for name, attr in PATHS.items():
        if name not in files:
            continue  # absent from the archive: what is on disk stays
        with open(files[name], "rb") as f:
            data = f.read()
        if name == SERIAL:
            data = _newest_serial(data, paths.serial_file)
        atomic_write(getattr(paths, attr), data, 0o644, faas)


def _newest_serial(data: bytes, target: str) -> bytes:
    """The greater of the archive's serial and one already here: a serial is never
    handed out twice, even when --force puts an older zone back."""
    ours = check_serial(data)
    try:
        here = zone.parse_serial((read_small(target, 64) or b"").decode("ascii", "replace"))
    except (OSError, FaasError):  # not a plain small file: it is replaced
        here = None
    return f"{zone.latest(ours, here)}\n".encode()


if __name__ == "__main__":
    parts.serve(globals())
