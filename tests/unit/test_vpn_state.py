"""VPN peers in the controller: allocation, conflicts, expiry, and the client config."""

from __future__ import annotations

import base64
import ipaddress

import pytest

from common import wgconf
from common.errors import Code, FaasError
from controller import vpn
from controller.state import State

KEY_A, KEY_B, KEY_C = "A" * 43 + "=", "B" * 43 + "=", "C" * 43 + "="


@pytest.fixture
def state(tmp_path):
    s = State(str(tmp_path / "state" / "state.db"), "fd00:faa5:1::/64", "fd00:faa5:0:100::/64")
    yield s
    s.close()


def test_peers_get_addresses_from_2_and_reuse_freed_ones(state):
    assert state.add_peer("a", KEY_A, None)["address"] == "fd00:faa5:0:100::2"
    assert state.add_peer("b", KEY_B, None)["address"] == "fd00:faa5:0:100::3"
    state.remove_peer("a")
    assert state.add_peer("c", KEY_C, None)["address"] == "fd00:faa5:0:100::2"


@pytest.mark.parametrize("name,key", [("a", KEY_B), ("b", KEY_A)])
def test_a_name_or_key_twice_is_a_conflict_and_changes_nothing(state, name, key):
    state.add_peer("a", KEY_A, None)
    generation = state.generation
    with pytest.raises(FaasError) as info:
        state.add_peer(name, key, None)
    assert info.value.code is Code.CONFLICT
    assert state.generation == generation and len(state.peers()) == 1


def test_disabled_and_expired_peers_leave_the_desired_state(state):
    state.add_peer("a", KEY_A, None)
    state.add_peer("b", KEY_B, 100.0)
    state.add_peer("c", KEY_C, None)
    state.set_peer_state("c", "disabled")
    assert state.expire_peers(99.0) == []
    assert state.expire_peers(100.0) == ["b"]
    assert [p["public_key"] for p in state.active_peers()] == [KEY_A]
    assert state.set_peer_state("b", "enabled")["expires"] is None  # enabling clears it
    assert len(state.active_peers()) == 2
    # the runner names callers from the same enabled peers (a disabled one is nobody)
    assert state.peer_names() == [{"name": "a", "address": "fd00:faa5:0:100::2"},
                                  {"name": "b", "address": "fd00:faa5:0:100::3"}]


def test_unknown_peer_is_not_found(state):
    with pytest.raises(FaasError) as info:
        state.remove_peer("ghost")
    assert info.value.code is Code.NOT_FOUND


def test_expiry_units():
    assert vpn.expiry("30m", now=0) == 1800 and vpn.expiry("7d", now=0) == 7 * 86400
    assert vpn.expiry(None) is None


def test_client_config_with_and_without_a_private_key():
    common = dict(address="fd00:faa5:0:100::2", server_key=KEY_A, endpoint="vpn.example:51820",
                  dns="fd00:faa5:0:100::1", allowed="fd00:faa5::/32", name="laptop")
    with_key = wgconf.render(private_key=KEY_B, **common)
    assert f"PrivateKey = {KEY_B}" in with_key
    assert "Address = fd00:faa5:0:100::2/128" in with_key
    assert "DNS = fd00:faa5:0:100::1, faas" in with_key
    assert "AllowedIPs = fd00:faa5::/32" in with_key
    assert "PrivateKey =" not in wgconf.render(private_key=None, **common)


def test_the_config_the_server_writes_is_the_config_the_client_reads():
    """One module writes and reads the format: whatever render() writes, parse() reads
    back to the same values, with nothing ignored."""
    server, client = base64.b64encode(b"s" * 32).decode(), base64.b64encode(b"c" * 32).decode()
    common = dict(address="fd00:faa5:0:100::2", server_key=server, endpoint="[fdff:1::1]:51820",
                  dns="fd00:faa5:0:100::1", allowed="fd00:faa5::/32", name="laptop")
    for private in (client, None):
        config, ignored = wgconf.parse(wgconf.render(private_key=private, **common))
        assert ignored == []
        assert config.address == ipaddress.IPv6Interface("fd00:faa5:0:100::2/128")
        assert (config.peer_key, config.endpoint, config.private_key) == (
            server, "[fdff:1::1]:51820", private)
        assert config.allowed_ips == (ipaddress.IPv6Network("fd00:faa5::/32"),)
        assert config.dns_servers == (ipaddress.IPv6Address("fd00:faa5:0:100::1"),)
        assert config.dns_domains == (wgconf.DNS_DOMAIN,)
        assert config.keepalive == wgconf.KEEPALIVE


def test_no_endpoint_is_a_clear_conflict():
    with pytest.raises(FaasError) as info:
        vpn.check_endpoint("")
    assert info.value.code is Code.CONFLICT and "vpn_endpoint" in info.value.message


def test_a_key_from_wireguard_tools_is_checked_and_never_echoed():
    """Every caller of `wg genkey`/`wg pubkey` (controller, netagent, faasctl vpn) reads
    the key through one check; what it printed instead is not repeated in the error."""
    key = base64.b64encode(b"k" * 32).decode()
    assert wgconf.key_from(key + "\n", wgconf.GENKEY) == key
    with pytest.raises(ValueError) as info:
        wgconf.key_from("SECRETSECRET\n", wgconf.PUBKEY)
    assert "`wg pubkey` printed something that" in str(info.value)
    assert "SECRETSECRET" not in str(info.value)
