"""The server's wg-quick style file is read strictly: a bad line is named, exit 2."""

from __future__ import annotations

import ipaddress

import pytest
from vpnfakes import CLIENT_KEY, SERVER_KEY, FakeSystem, config_text

from cli.vpnclient import USAGE, VpnError, main, parse_config


def test_the_servers_file_parses():
    config, ignored = parse_config(config_text())
    assert config.private_key == CLIENT_KEY
    assert config.address == ipaddress.IPv6Interface("fd00:faa5:0:100::2/128")
    assert config.dns_servers == (ipaddress.IPv6Address("fd00:faa5:0:100::1"),)
    assert config.dns_domains == ("faas",)
    assert config.peer_key == SERVER_KEY
    assert config.endpoint == "[fdff:1::1]:51820"
    assert config.allowed_ips == (ipaddress.IPv6Network("fd00:faa5::/32"),)
    assert config.keepalive == 25
    assert ignored == []


def test_without_a_private_key_the_local_key_is_meant():
    config, _ = parse_config(config_text(private_key=None))
    assert config.private_key is None


def test_comments_case_repeats_and_host_endpoints():
    text = f"""
    # made by faasctl vpn add
    [interface]
    address = fd00:faa5:0:100::7      # no /128 is a /128
    dns = fd00:faa5:0:100::1
    DNS = faas.
    [PEER]
    publickey = {SERVER_KEY}
    ENDPOINT = vpn.example.org:51820
    AllowedIPs = fd00:faa5::/32, fd00:beef::/48
    AllowedIPs = fd00:cafe::/64
    PersistentKeepalive = off
    """
    config, _ = parse_config(text)
    assert str(config.address) == "fd00:faa5:0:100::7/128"
    assert config.dns_domains == ("faas",)
    assert config.endpoint == "vpn.example.org:51820"
    assert [str(n) for n in config.allowed_ips] == ["fd00:faa5::/32", "fd00:beef::/48",
                                                    "fd00:cafe::/64"]
    assert config.keepalive is None


def test_unknown_keys_are_reported_and_dropped():
    config, ignored = parse_config(config_text(extra="PostUp = rm -rf /\nMTU = 1280"), "c.conf")
    assert len(ignored) == 2
    assert ignored[0].startswith("c.conf:5: PostUp is not used")
    assert "rm -rf" not in repr(config)


def replace_line(text: str, prefix: str, new: str) -> tuple[str, int]:
    """The sample config with its line starting ``prefix`` replaced; and the number of the
    line the error must name (the last of ``new``)."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(prefix))
    lines[at:at + 1] = new.splitlines()
    return "\n".join(lines) + "\n", at + len(new.splitlines())


BAD_LINES = [
    # (the line it replaces, the bad line(s), what the message must say)
    ("PrivateKey", "PrivateKey = not-base64!", "PrivateKey is not base64"),
    ("PrivateKey", "PrivateKey = " + CLIENT_KEY[:-4] + "AA==", "is 31 bytes"),
    ("PrivateKey", "PrivateKey = " + CLIENT_KEY[:-1] + "A", "is 33 bytes"),
    ("PrivateKey", "PrivateKey = " + CLIENT_KEY[:-2] + "N=", "not in canonical base64"),
    ("PrivateKey", "PrivateKey =", "PrivateKey has no value"),
    ("Address", "Address = 10.0.0.2/32", "IPv6 only"),
    ("Address", "Address = fd00:faa5:0:100::2/64", "not /64"),
    ("Address", "Address = fd00:faa5:0:100::2/128, fd00::3/128", "one IPv6 address"),
    ("Address", "Address = fe80::1%eth0/128", "one IPv6 address"),
    ("Address", "Address = fd00:faa5:0:100::2/128\nAddress = fd00::3/128",
     "Address is given twice (first on line 3)"),
    ("DNS", "DNS = 192.0.2.53", "IPv4"),
    ("DNS", "DNS = fd00::1, -bad-", "neither an IPv6 address nor a domain name"),
    ("Address", "Address fd00:faa5:0:100::2/128", "expected `Key = Value`"),
    ("DNS", "= value", "expected `Key = Value`"),
    ("[Interface]", "[Interfaces]", "unknown section [Interfaces]"),
    ("[Peer]", "[Peer", "unknown section [Peer"),
    ("PublicKey", "PublicKey = " + SERVER_KEY[:20], "PublicKey is 15 bytes"),
    ("Endpoint", "Endpoint = fdff:1::1:51820", "needs brackets"),
    ("Endpoint", "Endpoint = [fdff:1::zz]:51820", "is not an IPv6 address"),
    ("Endpoint", "Endpoint = [fdff:1::1]", "HOST:PORT"),
    ("Endpoint", "Endpoint = host:0", "port 0"),
    ("Endpoint", "Endpoint = host:70000", "port 70000"),
    ("Endpoint", "Endpoint = -host:51820", "not a host name"),
    ("Endpoint", "Endpoint = host: 51820", "HOST:PORT"),
    ("AllowedIPs", "AllowedIPs = 10.0.0.0/8", "not an IPv6 network"),
    ("AllowedIPs", "AllowedIPs = fd00:faa5::1/32", "has host bits set"),
    ("AllowedIPs", "AllowedIPs = fd00:faa5::/129", "fd00:faa5::/129"),
    ("AllowedIPs", "AllowedIPs = ::/0", "::/0"),
    ("AllowedIPs", "AllowedIPs = fd00:faa5::/32,", "not an IPv6 network"),
    ("PersistentKeepalive", "PersistentKeepalive = soon", "seconds from 0 to 65535"),
    ("PersistentKeepalive", "PersistentKeepalive = 65536", "seconds from 0 to 65535"),
    ("PersistentKeepalive", "PersistentKeepalive = \u00b2", "seconds from 0 to 65535"),
    ("PersistentKeepalive", "[Peer]", "a second [Peer] (the first is on line 6)"),
    ("PersistentKeepalive", "Endpoint = h:1", "Endpoint is given twice (first on line 8)"),
]


@pytest.mark.parametrize("old,line,message", BAD_LINES)
def test_a_bad_line_is_named(old, line, message):
    text, number = replace_line(config_text(), old, line)
    with pytest.raises(VpnError) as info:
        parse_config(text, "client.conf")
    assert info.value.status == USAGE
    assert str(info.value).startswith(f"client.conf:{number}: ")
    assert message in str(info.value)


@pytest.mark.parametrize("text,message", [
    (f"PublicKey = {SERVER_KEY}\n[Peer]\n", "client.conf:1: PublicKey comes before any section"),
    ("[Interface]\nAddress = fd00::2/128\n", "client.conf: no [Peer] section"),
    (f"[Peer]\nPublicKey = {SERVER_KEY}\n", "client.conf: no [Interface] section"),
    ("[Interface]\nPrivateKey = " + CLIENT_KEY + "\n[Peer]\nPublicKey = " + SERVER_KEY
     + "\nEndpoint = h:1\nAllowedIPs = fd00::/8\n", "client.conf:1: [Interface] has no Address"),
    ("[Interface]\nAddress = fd00::2/128\n\n[Peer]\nEndpoint = h:1\nAllowedIPs = fd00::/8\n",
     "client.conf:4: [Peer] has no PublicKey"),
    ("", "client.conf: no [Interface] section"),
])
def test_missing_sections_and_keys(text, message):
    with pytest.raises(VpnError) as info:
        parse_config(text, "client.conf")
    assert message in str(info.value)


def test_main_exits_2_on_a_bad_file_and_names_the_line(client_env, write_config, capsys):
    path = write_config(config_text().replace("Endpoint = [fdff:1::1]:51820",
                                              "Endpoint = [fdff:1::1]"))
    system = FakeSystem()
    assert main(["connect", str(path)], system) == 2
    err = capsys.readouterr().err
    assert f"{path}:8: Endpoint must be HOST:PORT" in err
    assert system.calls == []  # nothing was run for a bad file


@pytest.mark.parametrize("content", [None, b"\xff\xfe binary", b"x" * (65 << 10)])
def test_main_exits_2_on_a_missing_or_unreadable_file(client_env, tmp_path, capsys, content):
    path = tmp_path / "client.conf"
    if content is not None:
        path.write_bytes(content)
    assert main(["connect", str(path)], FakeSystem()) == 2
    assert str(path) in capsys.readouterr().err


def test_main_warns_when_others_may_read_a_config_with_a_key(client_env, write_config, capsys):
    path = write_config(config_text())
    path.chmod(0o644)
    assert main(["connect", str(path)], FakeSystem()) == 0
    assert f"chmod 600 {path}" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    [], ["connect"], ["frobnicate"], ["connect", "c.conf", "--interface", "-x"],
    ["connect", "c.conf", "--interface", "a-very-long-name0"], ["disconnect", "extra"],
    ["disconnect", "--interface", "../etc"],
])
def test_bad_usage_exits_2(argv, capsys):
    assert main(argv, FakeSystem()) == 2
    assert "usage: faasctl vpn" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert main(["connect", "--help"], FakeSystem()) == 0
    assert "--key-file" in capsys.readouterr().out
