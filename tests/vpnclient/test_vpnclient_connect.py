"""connect runs exactly the parsed values, undoes a half-done attempt; disconnect undoes it."""

from __future__ import annotations

import json

import pytest
from vpnfakes import SERVER_KEY, FakeSystem, config_text

from cli.vpnclient import Result, main

IF = "wg-faas"
SETUP = [
    (f"wg set {IF} private-key KEY peer {SERVER_KEY} endpoint [fdff:1::1]:51820 "
     "allowed-ips fd00:faa5::/32 persistent-keepalive 25"),
    f"ip -6 addr add fd00:faa5:0:100::2/128 dev {IF}",
    f"ip link set dev {IF} up",
    f"ip -6 route replace fd00:faa5::/32 dev {IF}",
]


def changes(system: FakeSystem) -> list[str]:
    """The commands that changed something, with the key file's path made stable."""
    out = []
    for argv in system.calls:
        if argv[:3] == ["ip", "link", "show"] or argv[:2] in (["wg", "genkey"], ["wg", "pubkey"]):
            continue
        shown = [*argv[:4], "KEY", *argv[5:]] if argv[:2] == ["wg", "set"] else argv
        out.append(" ".join(shown))
    return out


def state_file(client_env, interface: str = IF):
    return client_env[0] / f"{interface}.json"


def test_connect_with_the_kernel_module(client_env, write_config, capsys):
    system = FakeSystem(kernel=True)
    assert main(["connect", str(write_config(config_text()))], system) == 0
    assert changes(system) == [f"ip link add dev {IF} type wireguard", *SETUP]
    state = json.loads(state_file(client_env).read_text())
    assert state["kind"] == "kernel" and state["dns"] is False
    assert state["routes"] == ["fd00:faa5::/32"]
    assert f"connected {IF} (kernel)" in capsys.readouterr().out


def test_connect_falls_back_to_wireguard_go(client_env, write_config):
    system = FakeSystem(kernel=False)
    assert main(["connect", str(write_config(config_text())), "--interface", "wgc1"],
                system) == 0
    setup = [line.replace(IF, "wgc1") for line in SETUP]
    assert changes(system) == ["ip link add dev wgc1 type wireguard", "wireguard-go wgc1",
                               *setup]
    assert json.loads(state_file(client_env, "wgc1").read_text())["kind"] == "wireguard-go"


def test_neither_kernel_nor_wireguard_go(client_env, write_config, capsys):
    system = FakeSystem(tools=("ip", "wg"))
    assert main(["connect", str(write_config(config_text()))], system) == 1
    assert "apt-get install wireguard-go" in capsys.readouterr().err
    assert not state_file(client_env).exists() and system.links == set()


def test_unknown_keys_never_reach_a_command(client_env, write_config, tmp_path):
    extra = f"PostUp = touch {tmp_path}/pwned\nTable = off\nMTU = 9000"
    system = FakeSystem()
    assert main(["connect", str(write_config(config_text(extra=extra)))], system) == 0
    flat = " ".join(changes(system))
    for word in ("touch", "pwned", "9000", "Table", "mtu"):
        assert word not in flat


def test_keepalive_off_is_left_out(client_env, write_config):
    system = FakeSystem()
    text = config_text().replace("PersistentKeepalive = 25", "PersistentKeepalive = off")
    assert main(["connect", str(write_config(text))], system) == 0
    assert not any("persistent-keepalive" in c for c in system.commands())


def test_dns_through_systemd_resolved(client_env, write_config, capsys):
    system = FakeSystem(resolved=True)
    assert main(["connect", str(write_config(config_text()))], system) == 0
    assert changes(system)[-2:] == [f"resolvectl dns {IF} fd00:faa5:0:100::1",
                                    f"resolvectl domain {IF} ~faas"]
    assert json.loads(state_file(client_env).read_text())["dns"] is True
    assert "*.faas is resolved by fd00:faa5:0:100::1" in capsys.readouterr().out
    assert main(["disconnect"], system) == 0
    assert changes(system)[-2:] == [f"resolvectl revert {IF}", f"ip link del dev {IF}"]


@pytest.mark.parametrize("system", [FakeSystem(resolved=False),
                                    FakeSystem(resolved=True, tools=("ip", "wg", "wireguard-go"))])
def test_without_resolved_dns_is_explained_not_changed(client_env, write_config, capsys,
                                                       system):
    assert main(["connect", str(write_config(config_text()))], system) == 0
    assert not any(c.startswith("resolvectl") for c in system.commands())
    out = capsys.readouterr().out
    assert "dig @fd00:faa5:0:100::1 fib.faas AAAA" in out
    assert "nameserver fd00:faa5:0:100::1" in out


def test_a_config_without_dns_changes_no_resolver(client_env, write_config):
    system = FakeSystem(resolved=True)
    text = config_text().replace("DNS = fd00:faa5:0:100::1, faas\n", "")
    assert main(["connect", str(write_config(text))], system) == 0
    assert not any(c.startswith("resolvectl") for c in system.commands())


def test_an_existing_interface_is_refused(client_env, write_config, capsys):
    system = FakeSystem()
    system.links.add(IF)
    assert main(["connect", str(write_config(config_text()))], system) == 1
    err = capsys.readouterr().err
    assert f"interface {IF} already exists" in err
    assert f"faasctl vpn disconnect --interface {IF}" in err
    assert changes(system) == [] and system.links == {IF}
    assert not state_file(client_env).exists()


def test_connect_needs_root(client_env, write_config, capsys):
    system = FakeSystem(root=False)
    assert main(["connect", str(write_config(config_text()))], system) == 1
    assert "sudo faasctl vpn connect" in capsys.readouterr().err
    assert system.calls == []


@pytest.mark.parametrize("failing", [
    ("wg", "set"), ("ip", "-6", "addr", "add"), ("ip", "link", "set"),
    ("ip", "-6", "route", "replace"), ("resolvectl", "dns"), ("resolvectl", "domain"),
])
def test_a_failure_half_way_undoes_everything(client_env, write_config, capsys, failing):
    system = FakeSystem(resolved=True, fail=failing)
    assert main(["connect", str(write_config(config_text()))], system) == 1
    err = capsys.readouterr().err
    assert f"`{' '.join(failing)}" in err and "RTNETLINK answers: Invalid argument" in err
    assert "nothing is left of this attempt" in err
    assert changes(system)[-1] == f"ip link del dev {IF}"
    if failing[0] == "resolvectl":
        assert changes(system)[-2] == f"resolvectl revert {IF}"
    assert system.links == set() and system.ended == [IF]  # wireguard-go made sure to end
    assert not state_file(client_env).exists()
    assert system.key_files == [] or not system.key_files[0]["path"].exists()


def test_an_interrupt_half_way_undoes_too(client_env, write_config):
    class Interrupted(FakeSystem):
        def run(self, argv, stdin=None):
            if argv[:2] == ["ip", "-6"]:
                raise KeyboardInterrupt
            return super().run(argv, stdin)

    system = Interrupted()
    assert main(["connect", str(write_config(config_text()))], system) == 1
    assert system.links == set() and not state_file(client_env).exists()


def test_when_undo_fails_the_state_is_kept_and_named(client_env, write_config, capsys):
    class Stuck(FakeSystem):
        def run(self, argv, stdin=None):
            if argv[:3] == ["ip", "link", "del"]:
                self.calls.append(argv)
                return Result(1, "", "RTNETLINK answers: Device or resource busy")
            return super().run(argv, stdin)

    system = Stuck(fail=("ip", "link", "set"))
    assert main(["connect", str(write_config(config_text()))], system) == 1
    err = capsys.readouterr().err
    assert "Device or resource busy" in err and "faasctl vpn disconnect --interface" in err
    assert state_file(client_env).exists()


def test_disconnect_undoes_connect(client_env, write_config, capsys):
    system = FakeSystem()
    assert main(["connect", str(write_config(config_text()))], system) == 0
    before = len(system.calls)
    assert main(["disconnect"], system) == 0
    assert system.commands()[before:] == [
        f"ip link show dev {IF}", f"ip link del dev {IF}"]
    assert system.ended == [IF] and system.links == set()
    assert not state_file(client_env).exists()
    assert f"disconnected {IF}" in capsys.readouterr().out


def test_disconnect_of_a_kernel_interface_waits_for_no_process(client_env, write_config):
    system = FakeSystem(kernel=True)
    assert main(["connect", str(write_config(config_text()))], system) == 0
    assert main(["disconnect"], system) == 0
    assert system.ended == [] and system.links == set()


def test_disconnect_when_not_connected(client_env, capsys):
    system = FakeSystem()
    system.links.add(IF)  # someone else's interface of that name: not ours to delete
    assert main(["disconnect"], system) == 1
    err = capsys.readouterr().err
    assert f"{IF} is not connected" in err
    assert changes(system) == [] and system.links == {IF}


def test_disconnect_when_the_interface_is_already_gone(client_env, write_config, capsys):
    system = FakeSystem()
    assert main(["connect", str(write_config(config_text()))], system) == 0
    system.links.clear()
    assert main(["disconnect"], system) == 0
    assert f"{IF} was already gone" in capsys.readouterr().err
    assert not state_file(client_env).exists()


def test_disconnect_failure_keeps_the_state_for_a_retry(client_env, write_config, capsys):
    system = FakeSystem()
    assert main(["connect", str(write_config(config_text()))], system) == 0
    system.fail = ("ip", "link", "del")
    assert main(["disconnect"], system) == 1
    err = capsys.readouterr().err
    assert "`ip link del dev wg-faas` failed" in err and "tried again" in err
    assert state_file(client_env).exists() and system.ended == []
    system.fail = None
    assert main(["disconnect"], system) == 0


def test_a_corrupt_state_file_is_named(client_env, capsys):
    state_file(client_env).parent.mkdir()
    state_file(client_env).write_text("{not json")
    assert main(["disconnect"], FakeSystem()) == 1
    assert str(state_file(client_env)) in capsys.readouterr().err


def test_disconnect_needs_root(client_env, capsys):
    assert main(["disconnect"], FakeSystem(root=False)) == 1
    assert "sudo faasctl vpn disconnect" in capsys.readouterr().err
