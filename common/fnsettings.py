"""Per-function settings, declared once: name, type, parser, default, range, help.

``faasctl set NAME KEY=VALUE ...`` sends raw strings; the controller parses them here,
stores the typed values, and the runner reads them with the same defaults. ``env.X=V``
sets an environment variable of the function's containers (``env.X=`` removes it).

Everything else is derived from :data:`FN_SETTINGS`: the runner's wire schema
(``common.protocol.FUNCTION_SETTINGS``), the ``set`` op's help and ``faasctl set --help``
(:func:`cli_help`), the table in docs/settings.md (:func:`markdown_table`, printed by
``python -m common.fnsettings``) and the runner's defaults and bounds (``runner/serve.py``,
``runner/bundle.py``).
"""

from __future__ import annotations

import copy
import ipaddress
import os
import posixpath
import re
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from common.errors import Code, FaasError

_SIZE = re.compile(r"([0-9]+)([KMG]i?B?|B)?", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
ENV_NAME_MAX = 128  # characters of an env.NAME's NAME
ENV_NAME = re.compile(rf"[A-Za-z_][A-Za-z0-9_]{{0,{ENV_NAME_MAX - 1}}}")
VALUE_MAX = 4096  # characters of a value as sent, and of an environment variable's value
# The runner's own variables, and the dynamic loader's (LD_PRELOAD, LD_LIBRARY_PATH,
# ...): a function's env may not change what code its image runs.
RESERVED_ENV = ("FAAS_", "LD_")
MAX_ENV = 128
PER_CLIENT_OFF = 65536  # per_client at this value: no per-address cap at all
# Function, peer, secret and volume names: DNS labels (a function's becomes NAME.faas).
NAME_PATTERN = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_NAME = re.compile(NAME_PATTERN)
# Where a volume may not be mounted: the kernel's and faasd's own places in a container.
MOUNT_FORBIDDEN = ("/proc", "/sys", "/dev", "/run/secrets", "/control.sock")
RESERVED_PORTS = (53,)  # DNS: a peer's resolver is the server's VPN address, port 53


def _size(text: str) -> int:
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError("must be a size such as 512M, 1G or 268435456")
    return int(m.group(1)) * _UNITS[(m.group(2) or "")[:1].lower()]


def _size_text(n: int) -> str:
    """A size as :func:`_size` reads it, in the largest unit that divides it."""
    for unit in "GMK":
        if n and n % _UNITS[unit.lower()] == 0:
            return f"{n // _UNITS[unit.lower()]}{unit}"
    return str(n)


def parse_size(text: str) -> int:
    """Bytes of a size as ``set memory=`` takes it (268435456, 512M, 1G); ValueError if
    it is not one."""
    return _size(text)


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise ValueError("must be true or false")
    return low in ("true", "1", "yes", "on")


def _per_client(text: str) -> int:
    low = text.strip().lower()
    if low == "auto":
        return 0
    if low == "off":
        return PER_CLIENT_OFF
    try:
        return int(low)
    except ValueError:
        raise ValueError("must be a number of connections, auto (0) or off") from None


def per_client_limit(per_client: int, concurrency: int) -> int:
    """The cap in force: ``0`` (auto) is half the slots, at least one, so one address
    can never hold every slot; 0 returned means no cap (``off``)."""
    if per_client >= PER_CLIENT_OFF:
        return 0
    return per_client or max(1, concurrency // 2)


def _items(text: str) -> list[str]:
    """A comma-separated list; empty text (``key=``) is the empty list."""
    return [t.strip() for t in text.split(",") if t.strip()] if text.strip() else []


def _name(kind: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not _NAME.fullmatch(text):
            raise ValueError(f"{text[:80]!r} is not a {kind} name (1-63 of a-z, 0-9 and "
                             "inner '-')")
        return text
    return parse


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{text[:80]!r} is not a TCP port (1-65535)")
    if int(text) in RESERVED_PORTS:
        raise ValueError(f"port {text} is reserved (DNS of the VPN)")
    return int(text)


def _peer_or_any(text: str) -> str:
    return "*" if text == "*" else _name("peer")(text)


def _cidr_port(text: str) -> str:
    """``CIDR`` or ``CIDR:PORT`` (the port after the prefix length: ``10.0.0.0/8:5432``,
    ``fd12::/48:5432``), normalized: a bare address is its /32 or /128."""
    net, port = text, ""
    if "/" in text and ":" in text.rsplit("/", 1)[1]:
        net, port = text.rsplit(":", 1)
    try:
        parsed = ipaddress.ip_network(net, strict=False)
    except ValueError:
        raise ValueError(f"{text[:80]!r} is not a CIDR or CIDR:PORT (10.0.0.0/8, "
                         "192.168.1.5/32:5432, fd12::/48:443)") from None
    if port:
        _port_any(port)
    return f"{parsed}:{int(port)}" if port else str(parsed)


def _port_any(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{text[:80]!r} is not a TCP port (1-65535)")
    return int(text)


def _mount(text: str) -> str:
    """``VOLUME:/path`` or ``VOLUME:/path:ro``, the path normalized and absolute."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise ValueError(f"{text[:80]!r} is not VOLUME:/path[:ro]")
    name, path = _name("volume")(parts[0]), parts[1]
    norm = posixpath.normpath(path) if path.startswith("/") else ""
    if not norm or norm == "/" or norm.startswith("//") or "\x00" in path:
        raise ValueError(f"{text[:80]!r}: the path must be absolute and not /")
    if any(norm == f or norm.startswith(f + "/") or f.startswith(norm + "/")
           for f in MOUNT_FORBIDDEN):
        raise ValueError(f"{text[:80]!r}: may not mount over or above "
                         f"{', '.join(MOUNT_FORBIDDEN)}")
    return f"{name}:{norm}" + (":ro" if parts[2:] == ["ro"] else "")


def _mounts_apart(mounts: list[str]) -> None:
    """No mount at or under another's path: a volume another function can write would
    otherwise hold the mount point of the next (the precondition of runc's symlink race,
    CVE-2021-30465), and two at one path hide each other."""
    paths = sorted(m.split(":")[1] for m in mounts)
    for a, b in zip(paths, paths[1:]):
        if b == a or b.startswith(a + "/"):
            raise ValueError(f"{b} is at or under {a}: mount volumes at separate paths")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.strip() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text.strip()
    return parse


@dataclass(frozen=True)
class FnSetting:
    """One per-function setting: ``type`` is what :meth:`value` returns (int, float,
    bool, str or list), ``lo`` and ``hi`` its range (a number's; a list's least and most
    items). A list setting's ``parse`` reads one item (``key=a,b``: each item parsed,
    duplicates refused, ``key=`` the empty list); a str setting's the whole value."""

    key: str
    type: type
    parse: Callable[[str], Any]
    default: Any
    lo: float
    hi: float
    help: str
    reader: str = "runner"  # the root daemon that acts on it (the runner, or netagent)
    whole: Callable[[list[Any]], None] | None = None  # a list's check across its items

    def value(self, text: str) -> Any:
        if self.type is list:
            items = [self.parse(t) for t in _items(text)]
            if len(set(items)) != len(items):
                raise ValueError("lists an item twice")
            if not self.lo <= len(items) <= self.hi:
                raise ValueError(f"must list {self.lo:g} to {self.hi:g} items")
            if self.whole is not None:
                self.whole(items)
            return items
        v = self.parse(text)
        if not isinstance(v, (bool, str)) and not self.lo <= v <= self.hi:
            raise ValueError(f"must be between {self.lo:g} and {self.hi:g}")
        return v

    def canonical(self, value: Any) -> bool:
        """Whether a value as received (a sync) is one :meth:`value` could have made:
        how a root daemon checks a str or list setting without trusting the sender."""
        try:
            return self.value(self.show(value)) == value
        except (ValueError, TypeError, AttributeError):
            return False

    def show(self, value: Any) -> str:
        """A value as ``faasctl set`` takes it: a size in K/M/G, a bool as true/false,
        a list comma-separated."""
        if self.type is bool:
            return "true" if value else "false"
        if self.type is list:
            return ",".join(str(v) for v in value)
        if self.type is str:
            return value
        if self.parse is _size:
            return _size_text(value)
        return f"{value:g}"

    def range(self, dash: str = " – ") -> str:
        """``lo – hi`` as :meth:`show` writes values; empty for a bool or str; for a
        list, how many items."""
        if self.type is list:
            return f"{self.lo:g}{dash}{self.hi:g} items"
        if self.type in (bool, str):
            return ""
        return f"{self.show(self.lo)}{dash}{self.show(self.hi)}"


FN_SETTINGS: tuple[FnSetting, ...] = (
    FnSetting("memory", int, _size, 512 << 20, 16 << 20, 64 << 30,
              "memory limit of a container"),
    FnSetting("cpu", float, float, 1.0, 0.05, 64, "CPUs a container may use"),
    FnSetting("pids", int, int, 128, 8, 32768, "processes and threads a container may have"),
    FnSetting("timeout", float, float, 30.0, 0.1, 3600, "seconds a connection may take"),
    FnSetting("concurrency", int, int, 16, 1, 4096, "connections served at once"),
    FnSetting("queue", int, int, 64, 0, 65536,
              "connections that may wait for a slot; past it: 503"),
    FnSetting("min_warm", int, int, 0, 0, 256, "containers kept started and waiting"),
    FnSetting("reuse", bool, _bool, False, 0, 1,
              "a container that answers done gets the next one"),
    FnSetting("idle_timeout", float, float, 60.0, 1, 86400,
              "seconds an idle reused container lives"),
    FnSetting("first_byte_timeout", float, float, 5.0, 0, 3600, "seconds a new connection "
              "may take to send its first byte, holding no slot meanwhile (then it is "
              "closed, unanswered); 0: hand over at accept (protocols where the server "
              "speaks first)"),
    FnSetting("per_client", int, _per_client, 0, 0, PER_CLIENT_OFF, "connections one client "
              "address may hold (waiting, queued, served); past it: 503. 0 or auto: half "
              f"of concurrency, at least 1; off (stored as {PER_CLIENT_OFF}): no cap"),
    FnSetting("network", str, _choice("none", "egress"), "none", 0, 0,
              "none: the containers have only lo; egress: they share one namespace of the "
              "function's with a route to the internet (see docs/network.md)"),
    FnSetting("egress_allow", list, _cidr_port, [], 0, 64, "private ranges (RFC 1918, ULA) "
              "an egress function may reach anyway: CIDR or CIDR:PORT", reader="netagent"),
    FnSetting("may_call", list, _name("function"), [], 0, 64,
              "functions an egress function may reach, on their ports, by NAME.faas"),
    FnSetting("secrets", list, _name("secret"), [], 0, 32,
              "secrets readable in the containers as /run/secrets/NAME (faasctl secret)"),
    FnSetting("mounts", list, _mount, [], 0, 16,
              "volumes mounted in the containers: VOLUME:/path or VOLUME:/path:ro, "
              "none at or under another's path (faasctl volume)", whole=_mounts_apart),
    FnSetting("ports", list, _port, [80], 1, 16, "TCP ports the function serves on its "
              "address (53 is the VPN's DNS)"),
    FnSetting("allow", list, _peer_or_any, ["*"], 1, 64, "VPN peers that may connect, "
              "by name; * any peer (local callers are always let in)"),
)
BY_KEY = {s.key: s for s in FN_SETTINGS}


def defaults(maxima: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Every setting at its default, with no env; a default above this host's maximum
    (``maxima``) is that maximum, so a function nobody set fits the host."""
    caps = maxima or {}
    return {**{s.key: min(s.default, caps[s.key]) if s.key in caps else copy.copy(s.default)
               for s in FN_SETTINGS}, "env": {}}


def apply(current: dict[str, Any], changes: dict[str, str],
          maxima: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` changes onto ``current``; refuse the whole set on any error.
    ``maxima`` (:func:`host_maxima`) caps the changed keys: the runner would refuse
    the value at sync, so the operator learns it now."""
    out = {**defaults(maxima), **current}
    env = dict(out["env"])
    for key, text in changes.items():
        if key.startswith("env."):
            name = key[4:]
            if not ENV_NAME.fullmatch(name) or name.startswith(RESERVED_ENV):
                raise FaasError(Code.BAD_REQUEST, f"{key}: not a usable variable name (letters, "
                                "digits, _; not starting with FAAS_ or LD_)", {"key": key})
            if "\x00" in text:
                raise FaasError(Code.BAD_REQUEST, f"{key}: NUL in value", {"key": key})
            if text == "":
                env.pop(name, None)
            else:
                env[name] = text
            continue
        setting = BY_KEY.get(key)
        if setting is None:
            raise FaasError(Code.BAD_REQUEST, f"unknown setting {key!r}; known: "
                            f"{', '.join(BY_KEY)}, env.NAME", {"key": key})
        try:
            out[key] = setting.value(text)
        except ValueError as exc:
            raise FaasError(Code.BAD_REQUEST, f"{key}={text!r}: {exc}", {"key": key}) from None
        cap = (maxima or {}).get(key)
        if cap is not None and out[key] > cap:
            raise FaasError(Code.BAD_REQUEST, f"{key}={text!r}: above this host's maximum "
                            f"{cap:g} ({HOST_MAXIMA[key]} in the settings file)",
                            {"key": key, "maximum": cap})
    if len(env) > MAX_ENV:
        raise FaasError(Code.BAD_REQUEST, f"more than {MAX_ENV} environment variables")
    out["env"] = env
    return out


# Settings that name things the runner keeps apart from functions (faasctl secret,
# faasctl volume): the setting's key, and how an item names the thing it uses.
NAMED_RESOURCES: dict[str, Callable[[str], str]] = {
    "secrets": lambda item: item,
    "mounts": lambda item: item.split(":", 1)[0],  # VOLUME:/path[:ro]
}


def named(specs: Iterable[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """(name, settings) of each function spec, as :func:`users` takes them."""
    return [(spec["name"], spec["settings"]) for spec in specs]


def users(functions: Iterable[tuple[str, Mapping[str, Any]]],
          key: str) -> dict[str, list[str]]:
    """For each secret (``key`` "secrets") or volume ("mounts") some function uses, the
    names of those functions, sorted: what ``list`` shows and ``rm`` refuses on, for the
    controller and, again as root, the runner. ``functions``: (name, settings) pairs."""
    name_of = NAMED_RESOURCES[key]
    out: dict[str, set[str]] = {}
    for function, settings in functions:
        for item in settings[key]:
            out.setdefault(name_of(item), set()).add(function)
    return {name: sorted(fns) for name, fns in out.items()}


# Per-function settings that a host setting (common.settings, root's file) caps.
HOST_MAXIMA = {"memory": "max_memory", "cpu": "max_cpus", "pids": "max_pids",
               "timeout": "max_timeout", "concurrency": "max_concurrency",
               "queue": "max_queue", "min_warm": "max_min_warm"}


def host_maxima(settings: Any) -> dict[str, float]:
    """The highest value of each capped setting on this host: the table's bound lowered
    by the host's ``max_*`` setting (``max_memory`` and ``max_cpus`` 0: this machine's
    RAM and CPU count)."""
    out: dict[str, float] = {}
    for key, host_key in HOST_MAXIMA.items():
        cap = getattr(settings, host_key)
        if not cap and key == "memory":
            cap = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        elif not cap and key == "cpu":
            cap = os.cpu_count() or 1
        out[key] = min(BY_KEY[key].hi, cap)
    return out


def check_values(values: Mapping[str, Any], maxima: Mapping[str, float], where: str) -> None:
    """The root daemon's check of settings it was sent: above this host's maximum is
    forbidden, outside the table's range or an unusable env name is bad_request. Errors
    name the setting or variable, never an env value."""
    for s in FN_SETTINGS:
        value = values.get(s.key)
        if value is None or isinstance(value, bool):
            continue  # the schema typed it; a bool has no range
        if s.type in (str, list):
            if not s.canonical(value):
                raise FaasError(Code.BAD_REQUEST, f"{where}.{s.key} is not a value "
                                f"`faasctl set` could make ({s.help})",
                                {"field": f"{where}.{s.key}"})
            continue
        cap = maxima.get(s.key)
        if cap is not None and value > cap:
            raise FaasError(Code.FORBIDDEN, f"{where}.{s.key} = {value:g} is above this "
                            f"host's maximum {cap:g} ({HOST_MAXIMA[s.key]})",
                            {"field": f"{where}.{s.key}", "maximum": cap})
        if not s.lo <= value <= s.hi:
            raise FaasError(Code.BAD_REQUEST, f"{where}.{s.key} = {value:g} is not between "
                            f"{s.lo:g} and {s.hi:g}", {"field": f"{where}.{s.key}"})
    env = values.get("env") or {}
    if len(env) > MAX_ENV:
        raise FaasError(Code.BAD_REQUEST, f"{where}.env: more than {MAX_ENV} variables",
                        {"field": f"{where}.env"})
    for name in env:
        if not ENV_NAME.fullmatch(name):
            raise FaasError(Code.BAD_REQUEST, f"{where}.env: {name[:80]!r} is not a variable "
                            "name (letters, digits, _)", {"field": f"{where}.env"})
        if name.startswith(RESERVED_ENV):
            raise FaasError(Code.FORBIDDEN, f"{where}.env: {name} is reserved (FAAS_* is "
                            "faasd's, LD_* the dynamic loader's)", {"field": f"{where}.env"})


# --- help and docs, derived from the table ---------------------------------------------

ENV_HELP = (f"an environment variable of the containers (at most {MAX_ENV}; NAME: letters, "
            "digits, _, not starting with FAAS_ or LD_); env.NAME= removes it")


def keys_text() -> str:
    """Every key ``set`` takes, for one-line help: ``memory, cpu, ..., env.NAME``."""
    return ", ".join([*BY_KEY, "env.NAME"])


def cli_help(width: int = 79) -> str:
    """The keys with default, range and help, one entry each, for ``faasctl set --help``."""
    lines = ["settings (KEY  default (range): what it is):"]
    entries = [(s.key, (s.show(s.default) or "(none)")
                + (f" ({s.range('..')})" if s.range() else "") + f": {s.help}")
               for s in FN_SETTINGS]
    for key, text in [*entries, ("env.NAME", ENV_HELP)]:
        lines += textwrap.wrap(text, width, initial_indent=f"  {key:<20}",
                               subsequent_indent=" " * 22)
    return "\n".join(lines)


def markdown_table() -> str:
    """The per-function table of docs/settings.md (``python -m common.fnsettings``)."""
    rows = ["| key | default | range | what it is |", "|---|---|---|---|"]
    for s in FN_SETTINGS:
        shown = f"`{s.show(s.default)}`" if s.show(s.default) else "(none)"
        rows.append(f"| `{s.key}` | {shown} | {s.range()} | {s.help} |"
                    .replace("|  |", "| |"))
    rows.append(f"| `env.NAME` | | | {ENV_HELP} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
