"""A VPN peer's WireGuard config: the one definition of the format, written and read.

The controller writes it for a new peer (``faasctl vpn add``, :func:`render`); the client
reads it strictly (``faasctl vpn connect``, :func:`parse`). The format is wg-quick's, of
which only the keys below are read: any other key is reported and dropped, so nothing
else from the file (a PostUp line, say) reaches a command. Stdlib only.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KEEPALIVE = 25  # seconds: keeps a NAT mapping on the client's side open
DNS_DOMAIN = "faas"

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_ENDPOINT = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]{1,5})")




class ConfigError(ValueError):
    """The file cannot be used; the message names the file and line and says why."""


def render(*, name: str, address: str, server_key: str, endpoint: str, dns: str,
           allowed: str, private_key: str | None) -> str:
    """A complete wg-quick config for peer ``name``. Without a private key it has a
    comment in its place: ``faasctl vpn connect`` fills in the key the client keeps."""
    if private_key is not None:
        key_line = f"PrivateKey = {private_key}"
    else:
        key_line = ("# PrivateKey: yours, never sent to the server; `faasctl vpn connect` "
                    "uses the one it keeps")
    return "\n".join([
        f"# faasd VPN peer {name}",
        "[Interface]",
        key_line,
        f"Address = {address}/128",
        f"DNS = {dns}, {DNS_DOMAIN}",
        "",
        "[Peer]",
        f"PublicKey = {server_key}",
        f"Endpoint = {endpoint}",
        f"AllowedIPs = {allowed}",
        f"PersistentKeepalive = {KEEPALIVE}",
        "",
    ])



@dataclass(frozen=True)
class ClientConfig:
    """The parts of the server's file that ``connect`` uses; nothing else is kept."""

    address: ipaddress.IPv6Interface
    peer_key: str
    endpoint: str
    allowed_ips: tuple[ipaddress.IPv6Network, ...]
    private_key: str | None = None
    dns_servers: tuple[ipaddress.IPv6Address, ...] = ()
    dns_domains: tuple[str, ...] = ()
    keepalive: int | None = None


def check_key(value: str) -> str:
    """A WireGuard key as ``wg`` prints it: 32 bytes in canonical padded base64."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not base64; a WireGuard key is 44 characters such as "
                         "`wg genkey` prints") from None
    if len(raw) != 32:
        raise ValueError(f"is {len(raw)} bytes of base64; a WireGuard key is exactly 32")
    if base64.b64encode(raw).decode() != value:
        raise ValueError("is not in canonical base64; copy the key exactly as it was printed")
    return value


# Keys come from wireguard-tools, run through each caller's own process seam; private
# keys go in on stdin and come out on stdout, never on a command line.
GENKEY = ("wg", "genkey")
PUBKEY = ("wg", "pubkey")  # the private key on stdin, newline-terminated


def key_from(output: str, command: tuple[str, ...]) -> str:
    """The key that ``command`` (GENKEY or PUBKEY) printed, checked; ValueError saying
    what it printed instead, never the text itself (it may be a private key)."""
    key = output.strip()
    try:
        return check_key(key)
    except ValueError as exc:
        raise ValueError(f"`{' '.join(command)}` printed something that {exc}") from None


def _address(value: str) -> ipaddress.IPv6Interface:
    hint = "must be one IPv6 address with /128, such as fd00:faa5:0:100::2/128"
    if "," in value or "%" in value:
        raise ValueError(hint)
    try:
        iface = ipaddress.IPv6Interface(value)
    except ValueError:
        raise ValueError(f"{hint} (faasd's VPN is IPv6 only)") from None
    if iface.network.prefixlen != 128:
        raise ValueError(f"{hint}, not /{iface.network.prefixlen}")
    return iface


def _dns(value: str) -> list[ipaddress.IPv6Address | str]:
    """wg-quick's DNS line: addresses are servers, anything else is a search domain."""
    entries: list[ipaddress.IPv6Address | str] = []
    for entry in (e.strip() for e in value.split(",")):
        try:
            ip = ipaddress.ip_address(entry)
        except ValueError:
            if not _DOMAIN.fullmatch(entry):
                raise ValueError(f"{entry!r} is neither an IPv6 address nor a domain "
                                 "name") from None
            entries.append(entry.rstrip(".").lower())
            continue
        if ip.version != 6:
            raise ValueError(f"{entry} is IPv4; the tunnel carries IPv6 only, so the server's "
                             "DNS is at an IPv6 address such as fd00:faa5:0:100::1")
        entries.append(ip)
    return entries


def _endpoint(value: str) -> str:
    match = _ENDPOINT.fullmatch(value)
    if match is None:
        if value.count(":") > 1 and not value.startswith("["):
            raise ValueError("an IPv6 endpoint needs brackets: [fdff:1::1]:51820")
        raise ValueError("must be HOST:PORT or [IPv6]:PORT, such as [fdff:1::1]:51820")
    if match["v6"] is not None:
        try:
            ipaddress.IPv6Address(match["v6"])
        except ValueError:
            raise ValueError(f"[{match['v6']}] is not an IPv6 address") from None
    elif not _DOMAIN.fullmatch(match["host"]):
        raise ValueError(f"{match['host']!r} is not a host name or IPv4 address")
    if not 1 <= int(match["port"]) <= 65535:
        raise ValueError(f"port {match['port']} is not between 1 and 65535")
    return value


def _networks(value: str) -> list[ipaddress.IPv6Network]:
    nets = []
    for entry in (e.strip() for e in value.split(",")):
        try:
            net = ipaddress.IPv6Network(entry)
        except ipaddress.AddressValueError:
            raise ValueError(f"{entry!r} is not an IPv6 network such as fd00:faa5::/32") from None
        except ValueError as exc:  # host bits set, or a bad prefix length
            raise ValueError(f"{entry!r}: {exc}") from None
        if net.prefixlen == 0:
            # A plain route for ::/0 would replace this machine's default route and send
            # the tunnel's own packets into the tunnel.
            raise ValueError("::/0 (all IPv6) is not supported; route the server's prefix, "
                             "such as fd00:faa5::/32")
        nets.append(net)
    return nets


def _keepalive(value: str) -> int | None:
    if value.lower() == "off":
        return None
    if not re.fullmatch(r"[0-9]{1,5}", value) or int(value) > 65535:
        raise ValueError("must be seconds from 0 to 65535, or off")
    return int(value) or None


# (section, lower-case key) -> (field, parser, may repeat). Only these keys are read; any
# other key is reported and dropped, so nothing else from the file reaches a command.
_FIELDS: dict[tuple[str, str], tuple[str, Callable[[str], Any], bool]] = {
    ("interface", "privatekey"): ("private_key", check_key, False),
    ("interface", "address"): ("address", _address, False),
    ("interface", "dns"): ("dns", _dns, True),
    ("peer", "publickey"): ("peer_key", check_key, False),
    ("peer", "endpoint"): ("endpoint", _endpoint, False),
    ("peer", "allowedips"): ("allowed_ips", _networks, True),
    ("peer", "persistentkeepalive"): ("keepalive", _keepalive, False),
}
_REQUIRED = {"interface": {"address": "Address"},
             "peer": {"peer_key": "PublicKey", "endpoint": "Endpoint",
                      "allowed_ips": "AllowedIPs"}}
_SECTIONS = {"[interface]": "interface", "[peer]": "peer"}


class _Parser:
    """One pass over the file; every error names the file and line."""

    def __init__(self, source: str):
        self.source = source
        self.section: str | None = None
        self.sections: dict[str, int] = {}  # section -> line it starts on
        self.values: dict[str, Any] = {}
        self.seen: dict[str, int] = {}  # field -> line it was first given on
        self.ignored: list[str] = []

    def fail(self, number: int | None, message: str) -> ConfigError:
        where = f"{self.source}:{number}" if number else self.source
        return ConfigError(f"{where}: {message}")

    def line(self, number: int, raw: str) -> None:
        line = raw.split("#", 1)[0].strip()  # no value we read can contain '#'
        if not line:
            return
        if line.startswith("["):
            self.header(number, line)
        else:
            self.setting(number, line)

    def header(self, number: int, line: str) -> None:
        section = _SECTIONS.get(line.lower())
        if section is None:
            raise self.fail(number, f"unknown section {line}; a client config has "
                                    "[Interface] and [Peer]")
        if section in self.sections:
            raise self.fail(number, f"a second {line} (the first is on line "
                                    f"{self.sections[section]}); this client connects to "
                                    "one server")
        self.section, self.sections[section] = section, number

    def setting(self, number: int, line: str) -> None:
        key, eq, value = (part.strip() for part in line.partition("="))
        if not eq or not key:
            raise self.fail(number, f"expected `Key = Value`, got {line!r}")
        if self.section is None:
            raise self.fail(number, f"{key} comes before any section; put it under "
                                    "[Interface] or [Peer]")
        spec = _FIELDS.get((self.section, key.lower()))
        if spec is None:
            self.ignored.append(f"{self.source}:{number}: {key} is not used by "
                                "faasctl vpn connect; ignored")
            return
        self.store(number, key, value, spec)

    def store(self, number: int, key: str, value: str,
              spec: tuple[str, Callable[[str], Any], bool]) -> None:
        field, parse, repeats = spec
        if not value:
            raise self.fail(number, f"{key} has no value")
        if field in self.seen and not repeats:
            raise self.fail(number, f"{key} is given twice (first on line {self.seen[field]})")
        try:
            parsed = parse(value)
        except ValueError as exc:
            raise self.fail(number, f"{key} {exc}") from None
        self.seen.setdefault(field, number)
        if repeats:
            self.values.setdefault(field, []).extend(parsed)
        else:
            self.values[field] = parsed

    def result(self) -> ClientConfig:
        for section, fields in _REQUIRED.items():
            title = "[Interface]" if section == "interface" else "[Peer]"
            if section not in self.sections:
                raise self.fail(None, f"no {title} section; use the file `faasctl vpn add` "
                                      "printed on the server")
            for field, key in fields.items():
                if field not in self.values:
                    raise self.fail(self.sections[section], f"{title} has no {key}")
        v = self.values
        dns = v.get("dns", [])
        return ClientConfig(
            address=v["address"], peer_key=v["peer_key"], endpoint=v["endpoint"],
            allowed_ips=tuple(v["allowed_ips"]), private_key=v.get("private_key"),
            dns_servers=tuple(d for d in dns if isinstance(d, ipaddress.IPv6Address)),
            dns_domains=tuple(d for d in dns if isinstance(d, str)),
            keepalive=v.get("keepalive"))


def parse(text: str, source: str = "CONFIG") -> tuple[ClientConfig, list[str]]:
    """Parse a peer's file as :func:`render` writes it (or as a person edited it); returns
    the config and notes on the keys it ignored. A bad line raises :class:`ConfigError`
    naming ``source:line``."""
    parser = _Parser(source)
    for number, raw in enumerate(text.splitlines(), 1):
        parser.line(number, raw)
    return parser.result(), parser.ignored
