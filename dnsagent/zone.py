"""The ``faas.`` zone as pure logic: validate records, render RFC 1035 text, serials.

Nothing here touches the disk or the network; :mod:`dnsagent.main` does the writing,
checking and reloading. Every name and address that reaches :func:`render` has been
through :func:`check_records`, which is strict on purpose: a zone file is a line-based
language with directives (``$INCLUDE``, ``$ORIGIN``), comments (``;``), quoting and
parentheses, so a name that is anything but a plain DNS label could rewrite the zone
or make ``named`` read another file. The controller checks names too; this is the
second wall, and the one next to the file.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from typing import Any

from common.errors import Code, FaasError
from common.protocol import RESERVED_NAMES

ORIGIN = "faas."
# Short TTLs: a function deployed a moment ago must resolve at once, and a client that
# asked just before must not cache the NXDOMAIN for long (the negative TTL is the
# smaller of the SOA's TTL and its minimum field, RFC 2308).
TTL = 5
REFRESH, RETRY, EXPIRE, NEGATIVE_TTL = 3600, 600, 86400, 5
NS_LABEL = "ns"
TXT_LABEL = "_functions"
TXT_STRING_MAX = 255  # one <character-string> (RFC 1035 3.3)
# Room for the whole name list in one TXT record: its RDATA must stay under 65535
# bytes and the answer must fit one TCP DNS message, so keep a margin for the header,
# the question and the owner name.
TXT_RDATA_MAX = 60000
MAX_RECORDS = 65536

# A DNS label as function names are (common.protocol.NAME_PATTERN), written out again
# here with explicit ASCII classes: fullmatch, so a trailing newline cannot slip past.
LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)

SERIAL_BITS = 32
SERIAL_MOD = 1 << SERIAL_BITS
SERIAL_HALF = 1 << (SERIAL_BITS - 1)


@dataclass(frozen=True, order=True)
class Record:
    """One function's AAAA record: a checked label and a checked address."""

    name: str
    address: ipaddress.IPv6Address


def _refuse(message: str, **details: Any) -> FaasError:
    return FaasError(Code.BAD_REQUEST, message, details)


def check_name(name: Any) -> str:
    """Return ``name`` if it is a function label; refuse anything else (bad_request)."""
    if not isinstance(name, str) or not LABEL.fullmatch(name):
        raise _refuse(f"{str(name)[:80]!r} is not a DNS label (a-z, 0-9, inner '-', at most "
                      "63)", name=str(name)[:80])
    if name in RESERVED_NAMES:
        raise _refuse(f"{name!r} is reserved in the zone", name=name)
    return name


def check_address(address: Any, prefix: ipaddress.IPv6Network) -> ipaddress.IPv6Address:
    """Return ``address`` as an IPv6 address inside ``prefix``; refuse anything else.

    A scope id (``fe80::1%eth0``) is refused: Python keeps whatever follows ``%``
    verbatim, newlines and all, and still counts the address as inside the prefix.
    """
    text = str(address)[:80]
    if not isinstance(address, str) or "%" in address:
        raise _refuse(f"{text!r} is not an IPv6 address", address=text)
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        raise _refuse(f"{text!r} is not an IPv6 address", address=text) from None
    if ip not in prefix:
        raise _refuse(f"{ip} is outside the function prefix {prefix}", address=str(ip))
    return ip


def check_records(raw: Any, prefix: ipaddress.IPv6Network) -> list[Record]:
    """Validate the desired record set as a whole: sorted records, or bad_request.

    One bad entry refuses everything, so a refused sync changes nothing.
    """
    if not isinstance(raw, list):
        raise _refuse("records must be a list")
    if len(raw) > MAX_RECORDS:
        raise _refuse(f"more than {MAX_RECORDS} records")
    records: dict[str, Record] = {}
    for item in raw:
        if not isinstance(item, dict) or set(item) != {"name", "address"}:
            raise _refuse("each record must be a map with exactly name and address")
        name = check_name(item["name"])
        if name in records:
            raise _refuse(f"{name!r} appears twice", name=name)
        records[name] = Record(name, check_address(item["address"], prefix))
    return sorted(records.values())


def txt_strings(names: Iterable[str]) -> tuple[list[str], int]:
    """The ``_functions`` TXT strings for ``names`` and how many names did not fit.

    The list is comma-separated, cut into strings of at most 255 bytes at name
    boundaries, each string but the last ending with its comma: joining the strings
    (as SPF and DKIM readers do) gives the whole list, and so does reading each string
    on its own and splitting on commas. No names at all is one empty string.
    """
    names = list(names)
    tokens = [n + "," for n in names[:-1]] + names[-1:]
    strings: list[str] = []
    used = 0
    for i, token in enumerate(tokens):
        extend = bool(strings) and len(strings[-1]) + len(token) <= TXT_STRING_MAX
        grown = len(token) + (0 if extend else 1)  # a new string costs its length byte
        if used + grown > TXT_RDATA_MAX:
            return strings, len(tokens) - i
        if extend:
            strings[-1] += token
        else:
            strings.append(token)
        used += grown
    return strings or [""], 0


def render(records: Iterable[Record], serial: int, ns: ipaddress.IPv6Address) -> str:
    """The zone file text: deterministic for a given record set, serial and NS address.

    Only checked :class:`Record` values are accepted; the text is the same bytes every
    time, which is how an unchanged record set is recognised without bumping the serial.
    """
    if not 0 <= serial < SERIAL_MOD:
        raise ValueError(f"serial {serial} out of range")
    records = sorted(records)
    strings, _ = txt_strings(r.name for r in records)
    txt = " ".join(f'"{s}"' for s in strings)
    lines = [
        "; The faas. zone, written by faasd's dnsagent from the controller's state.",
        "; Do not edit: the next change of functions replaces this file.",
        f"$ORIGIN {ORIGIN}",
        f"$TTL {TTL}",
        (f"@ IN SOA {NS_LABEL}.{ORIGIN} hostmaster.{ORIGIN} ( {serial} {REFRESH} {RETRY} "
         f"{EXPIRE} {NEGATIVE_TTL} )"),
        f"@ IN NS {NS_LABEL}.{ORIGIN}",
        f"{NS_LABEL} IN AAAA {_plain(ns)}",
        f"{TXT_LABEL} IN TXT {txt}",
    ]
    lines += [f"{r.name} IN AAAA {_plain(r.address)}" for r in records]
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=1 << 17)
def _plain(ip: ipaddress.IPv6Address) -> str:
    # Rebuilt from the integer, so no scope id can ever be printed. Remembered: the zone
    # is rendered at every sync and every second's check (docs/operations.md, "Scale").
    return str(ipaddress.IPv6Address(int(ip)))


_SOA_SERIAL = re.compile(r"^@ IN SOA \S+ \S+ \( ([0-9]{1,10}) ", re.MULTILINE | re.ASCII)


def serial_of(text: str | bytes | None) -> int | None:
    """The serial of a zone this module rendered, or None if there is none to read."""
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    m = _SOA_SERIAL.search(text)
    return parse_serial(m.group(1)) if m else None


def parse_serial(text: str) -> int | None:
    """A serial from text (a file's contents), or None if it is not one."""
    text = text.strip()
    if not re.fullmatch(r"[0-9]{1,10}", text, re.ASCII):
        return None
    value = int(text)
    return value if value < SERIAL_MOD else None


# --- serial arithmetic (RFC 1982, SERIAL_BITS = 32) ------------------------------


def serial_gt(a: int, b: int) -> bool:
    """``a`` is greater than ``b`` in RFC 1982 serial number arithmetic.

    Undefined pairs (exactly 2**31 apart) are neither greater nor smaller.
    """
    return (a < b and b - a > SERIAL_HALF) or (a > b and a - b < SERIAL_HALF)


def latest(*serials: int | None) -> int | None:
    """The greatest of the given serials in RFC 1982 terms (None entries ignored)."""
    best: int | None = None
    for s in serials:
        if s is not None and (best is None or serial_gt(s, best)):
            best = s
    return best


def date_serial(day: date) -> int:
    """``YYYYMMDD00`` for ``day``: the first serial of that day."""
    return (day.year * 10000 + day.month * 100 + day.day) * 100


def next_serial(previous: int | None, today: date) -> int:
    """The serial after ``previous``: strictly greater in RFC 1982 terms, always.

    ``YYYYMMDDnn`` while that lasts: a new day starts at ``YYYYMMDD00``; the same day
    adds one; once ``nn`` passes 99, or when the clock goes back, it keeps adding one
    to the plain integer, which stays greater (and the date catches up later).
    """
    start = date_serial(today)
    if previous is None:
        return start
    if serial_gt(start, previous):
        return start
    return (previous + 1) % SERIAL_MOD
