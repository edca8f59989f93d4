"""Settings, declared once as data (name, type, default, check, help).

Read from ``/etc/faasd/faasd.toml`` (or the file ``FAAS_CONFIG`` names) with tomllib;
every key can be overridden by ``FAAS_<KEY>`` in the environment. A bad value is a
:class:`SettingsError` naming the key and where the value came from; daemons turn it
into a message on stderr and exit status 78 (EX_CONFIG) so supervisord marks them FATAL
instead of restarting them in a loop.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

DEFAULT_CONFIG = "/etc/faasd/faasd.toml"
EX_CONFIG = 78


class SettingsError(Exception):
    """A setting has a bad value, or the file cannot be read."""


def _absolute(v: str) -> None:
    if not os.path.isabs(v) or "\x00" in v:
        raise ValueError("must be an absolute path")


def _name(v: str) -> None:
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", v):
        raise ValueError("must be a system user or group name")


def _ifname(v: str) -> None:
    # Linux caps interface names at 15 bytes; a leading '-' would read as an option.
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]{0,14}", v):
        raise ValueError("must be an interface name: 1-15 of A-Z a-z 0-9 _ . = + -, not "
                         "starting with '-'")


def _v6net(v: str) -> None:
    try:
        net = ipaddress.IPv6Network(v)
    except ValueError:
        raise ValueError("must be an IPv6 network such as fd00:faa5:1::/64") from None
    if net.prefixlen > 120:
        raise ValueError("prefix must be /120 or wider")


def _between(lo: float, hi: float) -> Callable[[Any], None]:
    def check(v: float) -> None:
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
    return check


def _one_of(*choices: str) -> Callable[[Any], None]:
    def check(v: str) -> None:
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
    return check


def _endpoint(v: str) -> None:
    if v and not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}", v):
        raise ValueError("must be HOST:PORT or [IPv6]:PORT, or empty")


def _v4net(v: str) -> None:
    try:
        net = ipaddress.IPv4Network(v)
    except ValueError:
        raise ValueError("must be an IPv4 network such as 10.250.0.0/16") from None
    if net.prefixlen > 24:
        raise ValueError("prefix must be /24 or wider (a /30 per egress function)")


def _egress6(v: str) -> None:
    _v6net(v)
    if ipaddress.IPv6Network(v).prefixlen > 56:
        raise ValueError("prefix must be /56 or wider (a /64 per egress function)")


def _upstreams(v: list[str]) -> None:
    for addr in v:
        if not isinstance(addr, str) or "%" in addr:  # a scope id would reach named.conf
            raise ValueError(f"{addr!r} is not a plain IP address (no %scope)")
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            raise ValueError(f"{addr!r} is not an IP address") from None


@dataclass(frozen=True)
class Setting:
    """One setting: its TOML key, type, default, check and help."""

    key: str
    type: type
    default: Any
    help: str
    check: Callable[[Any], None] | None = None

    @property
    def env(self) -> str:
        return "FAAS_" + self.key.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("root", str, "/var/lib/faasd", "state, images, logs, zone and keys", _absolute),
    Setting("run", str, "/run/faasd", "sockets and control sockets (tmpfs)", _absolute),
    Setting("user", str, "faas", "the unprivileged user of controller and dnsagent", _name),
    Setting("group", str, "faas", "operators in this group may use faasctl", _name),
    Setting("log_level", str, "info", "debug, info, warning or error",
            _one_of("debug", "info", "warning", "error")),
    Setting("ping_interval", float, 1.0, "seconds between the controller's pings of each agent",
            _between(0.05, 60)),
    Setting("wg_interface", str, "wg0", "the WireGuard interface netagent owns", _ifname),
    Setting("wg_port", int, 51820, "WireGuard listen port (UDP)", _between(1, 65535)),
    Setting("vpn_prefix", str, "fd00:faa5:0:100::/64",
            "VPN network: the server is ::1, peers from ::2", _v6net),
    Setting("function_prefix", str, "fd00:faa5:1::/64",
            "function addresses are taken from here, from ::a upward", _v6net),
    Setting("client_prefix", str, "fd00:faa5::/32", "what clients route into the tunnel", _v6net),
    Setting("egress_prefix", str, "fd00:faa5:e::/48", "IPv6 of network=egress functions: "
            "a /64 each, NATed out (docs/network.md)", _egress6),
    Setting("egress_prefix4", str, "10.250.0.0/16", "IPv4 of network=egress functions: a "
            "/30 each, NATed out of the default route", _v4net),
    Setting("max_egress_functions", int, 256, "most network=egress functions this host "
            "holds (a namespace, a veth and rules each)", _between(0, 1 << 20)),
    Setting("max_egress_calls", int, 4096, "most may_call entries of all network=egress "
            "functions together (a firewall rule each)", _between(0, 1 << 20)),
    Setting("vpn_endpoint", str, "", "HOST:PORT that peers dial; printed in client configs",
            _endpoint),
    Setting("dns_upstreams", list, [], "resolvers for names outside faas., for VPN peers and "
            "egress functions (unset: the host's resolv.conf, for egress functions only)",
            _upstreams),
    Setting("runtime", str, "runc", "OCI runtime for function containers: runc or crun",
            _one_of("runc", "crun")),
    Setting("http_listen", str, "127.0.0.1:8080",
            "HOST:PORT of the controller's HTTP API (keep it on loopback)", _endpoint),
    Setting("http_listen_vpn", bool, False,
            "also serve the HTTP API on the server's VPN address, port of http_listen "
            "(tokens only there)"),
    Setting("http_max_connections", int, 256,
            "open HTTP API connections at most; more are closed at once", _between(4, 65536)),
    Setting("upload_max_bytes", int, 8 << 30, "largest image upload accepted, in bytes",
            _between(1 << 20, 1 << 40)),
    Setting("upload_idle_seconds", float, 60.0,
            "an upload that sends nothing for this long is dropped with its bytes",
            _between(1, 3600)),
    Setting("upload_min_rate", int, 10 << 10,
            "bytes/s an upload must average over each upload_rate_window, or it is dropped "
            "(0: no minimum)", _between(0, 1 << 30)),
    Setting("upload_rate_window", float, 30.0,
            "seconds over which upload_min_rate is measured; the first is the grace period",
            _between(1, 3600)),
    Setting("upload_slots", int, 8, "uploads in progress at once, everyone's together",
            _between(1, 1024)),
    Setting("upload_slots_per_user", int, 3,
            "uploads in progress at once by one caller (a uid, or an HTTP API token)",
            _between(1, 1024)),
    Setting("image_store_max_bytes", int, 20 << 30,
            "extracted images together may not pass this many bytes", _between(1 << 20, 1 << 50)),
    Setting("min_free_bytes", int, 1 << 30,
            "no extraction leaves less free space than this on the images filesystem",
            _between(0, 1 << 50)),
    Setting("image_max_bytes", int, 4 << 30, "largest expanded size of one image, in bytes",
            _between(1 << 20, 1 << 42)),
    Setting("max_volume_bytes", int, 16 << 30, "largest size of one volume, in bytes "
            "(faasctl volume create)", _between(4 << 20, 1 << 50)),
    Setting("volumes_max_bytes", int, 64 << 30, "the sizes of every volume together may not "
            "pass this many bytes (and no volume leaves less than min_free_bytes free)",
            _between(4 << 20, 1 << 50)),
    Setting("image_expand_ratio", float, 20.0,
            "an image may expand to this many times its upload's size, or 256 MiB if more "
            "(0: no ratio cap)", _between(0, 1e6)),
    # Host maxima of per-function settings: the runner refuses a sync above them
    # (forbidden), the controller a `faasctl set` (bad_request). Only root sets them.
    Setting("max_memory", int, 0, "largest memory limit of a container, in bytes; 0: this "
            "machine's RAM", _between(0, 1 << 50)),
    Setting("max_cpus", float, 0.0, "most CPUs a container may use; 0: this machine's CPU "
            "count", _between(0, 1024)),
    Setting("max_pids", int, 4096, "most processes and threads of a container",
            _between(8, 1 << 22)),
    Setting("max_timeout", float, 3600.0, "longest timeout of a function, in seconds",
            _between(0.1, 86400)),
    Setting("max_concurrency", int, 1024, "most connections a function serves at once",
            _between(1, 65536)),
    Setting("max_queue", int, 4096, "most connections that may wait for a function's slot",
            _between(0, 1 << 20)),
    Setting("max_min_warm", int, 64, "most containers a function keeps started and waiting",
            _between(0, 4096)),
    Setting("container_memory_budget", int, 0,
            "bytes of memory limits all running containers together may have; a container "
            "past it is not started (503). 0: 75 % of the host's MemTotal",
            _between(0, 1 << 50)),
)

_BY_KEY = {s.key: s for s in SETTINGS}


class Settings:
    """Read-only view of the settings in force; attribute access by key."""

    def __init__(self, values: Mapping[str, Any], sources: Mapping[str, str]):
        self._values = MappingProxyType(dict(values))
        self.sources = MappingProxyType(dict(sources))

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None

    def as_dict(self) -> dict[str, Any]:
        """Every setting and its value."""
        return dict(self._values)


def _coerce(setting: Setting, raw: Any, from_env: bool) -> Any:
    t = setting.type
    if from_env:
        if t is bool:
            low = raw.strip().lower()
            if low not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError("must be true or false")
            return low in ("1", "true", "yes", "on")
        if t is list:
            return [p.strip() for p in raw.split(",") if p.strip()]
        try:
            return t(raw)
        except ValueError:
            raise ValueError(f"must be {'an integer' if t is int else 'a number'}") from None
    if t is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if not isinstance(raw, t) or (t is not bool and isinstance(raw, bool)):
        raise ValueError(f"must be of type {t.__name__}, not {type(raw).__name__}")
    if t is list and not all(isinstance(x, str) for x in raw):
        raise ValueError("must be a list of strings")
    return raw


def _read_file(path: str, explicit: bool) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise SettingsError(f"config file {path} (from FAAS_CONFIG) does not exist") from None
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"cannot read config file {path}: {exc}") from None


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Defaults, then the TOML file, then FAAS_* variables; each value checked."""
    env = os.environ if env is None else env
    path = env.get("FAAS_CONFIG", DEFAULT_CONFIG)
    table = _read_file(path, "FAAS_CONFIG" in env)
    unknown = sorted(k for k in table if k not in _BY_KEY)
    if unknown:
        raise SettingsError(f"{path}: unknown key(s) {', '.join(unknown)}; known keys: "
                            f"{', '.join(_BY_KEY)}")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for s in SETTINGS:
        if s.env in env:
            raw, source, from_env = env[s.env], f"{s.env}={env[s.env]!r}", True
        elif s.key in table:
            raw, source, from_env = table[s.key], f"{path}: {s.key} = {table[s.key]!r}", False
        else:
            values[s.key], sources[s.key] = s.default, "default"
            continue
        try:
            value = _coerce(s, raw, from_env)
            if s.check is not None:
                s.check(value)
        except ValueError as exc:
            raise SettingsError(f"bad setting {s.key} ({source}): {exc}. {s.key} is: {s.help}"
                                ) from None
        values[s.key], sources[s.key] = value, source
    functions, vpn = (ipaddress.IPv6Network(values[k]) for k in ("function_prefix", "vpn_prefix"))
    if functions.overlaps(vpn):  # else a function address could be a peer's or the server's
        raise SettingsError(f"function_prefix {functions} and vpn_prefix {vpn} overlap "
                            f"({sources['function_prefix']}; {sources['vpn_prefix']}): the "
                            "root daemons hold function addresses to function_prefix, so it "
                            "must not contain the VPN's addresses")
    egress = ipaddress.IPv6Network(values["egress_prefix"])
    for key in ("function_prefix", "vpn_prefix"):
        if egress.overlaps(ipaddress.IPv6Network(values[key])):
            raise SettingsError(f"egress_prefix {egress} overlaps {key} "
                                f"({sources['egress_prefix']}; {sources[key]}): a function's "
                                "namespace would hold addresses of the VPN or of functions")
    return Settings(values, sources)


def vpn_server(vpn_prefix: str | ipaddress.IPv6Network) -> ipaddress.IPv6Interface:
    """The server's own address in the VPN, ``::1`` of ``vpn_prefix``, with the prefix's
    length: netagent puts it on the interface, named answers there, clients are told it."""
    net = ipaddress.IPv6Network(vpn_prefix)
    return ipaddress.IPv6Interface(f"{net.network_address + 1}/{net.prefixlen}")


def markdown_table() -> str:
    """The settings as the table in docs/settings.md (``python -m common.settings``)."""
    rows = ["| key | environment | type | default | what it is |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        default = f'"{s.default}"' if isinstance(s.default, str) else repr(s.default)
        rows.append(f"| `{s.key}` | `{s.env}` | {s.type.__name__} | `{default}` | {s.help} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
