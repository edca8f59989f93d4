"""Private keys: generated 0600 with O_EXCL, read from files or stdin, never in an argv."""

from __future__ import annotations

import os
import stat

import pytest
from vpnfakes import CLIENT_KEY, FakeSystem, config_text, fake_public

from cli.vpnclient import DEFAULT_KEY_FILE, ensure_key, key_file_path, main, write_new_key


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def no_argv_holds(system: FakeSystem, *secrets: str) -> bool:
    return not any(secret in arg for argv in system.calls for arg in argv for secret in secrets)


def test_pubkey_generates_a_0600_key_in_a_0700_directory(client_env, capsys):
    _, key_file = client_env
    old = os.umask(0)  # a careless umask must not widen the modes
    try:
        system = FakeSystem()
        assert main(["pubkey"], system) == 0
    finally:
        os.umask(old)
    key = key_file.read_text().strip()
    assert system.generated == [key]
    assert mode(key_file) == 0o600 and mode(key_file.parent) == 0o700
    out, err = capsys.readouterr()
    assert out == fake_public(key) + "\n"  # stdout is the key alone, for scripts
    assert f"Generated a new private key in {key_file}" in err
    assert f"faasctl vpn add NAME --public-key {fake_public(key)}" in err
    assert ["wg", "genkey"] in system.calls and ["wg", "pubkey"] in system.calls
    assert system.stdins[system.calls.index(["wg", "pubkey"])].strip() == key
    assert no_argv_holds(system, key)


def test_pubkey_reuses_the_key_it_finds(client_env, capsys):
    _, key_file = client_env
    key_file.parent.mkdir()
    write_new_key(key_file, CLIENT_KEY)
    system = FakeSystem()
    assert main(["pubkey"], system) == 0
    assert system.generated == [] and key_file.read_text() == CLIENT_KEY + "\n"
    assert capsys.readouterr().out == fake_public(CLIENT_KEY) + "\n"


def test_key_file_option_beats_the_environment_which_beats_the_default(client_env, tmp_path,
                                                                      monkeypatch):
    _, from_env = client_env
    assert key_file_path(None) == from_env
    assert key_file_path(str(tmp_path / "k")) == tmp_path / "k"
    monkeypatch.delenv("FAAS_CLIENT_KEY")
    assert str(key_file_path(None)) == DEFAULT_KEY_FILE
    system = FakeSystem()
    assert main(["pubkey", "--key-file", str(tmp_path / "given.key")], system) == 0
    assert (tmp_path / "given.key").exists() and not from_env.exists()


def test_an_existing_directory_keeps_its_mode(tmp_path):
    tmp_path.chmod(0o755)
    ensure_key(tmp_path / "private.key", FakeSystem())
    assert mode(tmp_path) == 0o755 and mode(tmp_path / "private.key") == 0o600


def test_write_new_key_never_overwrites_or_follows_a_symlink(tmp_path):
    existing = tmp_path / "existing.key"
    existing.write_text("precious\n")
    with pytest.raises(FileExistsError):
        write_new_key(existing, CLIENT_KEY)
    assert existing.read_text() == "precious\n"
    link = tmp_path / "link.key"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        write_new_key(link, CLIENT_KEY)
    assert not (tmp_path / "elsewhere").exists()


def test_a_key_made_meanwhile_by_another_process_is_used(tmp_path, monkeypatch):
    """exists() said no, then O_EXCL lost the race: the other process's key wins."""
    path = tmp_path / "private.key"

    class Racer(FakeSystem):
        def run(self, argv, stdin=None):
            result = super().run(argv, stdin)
            if argv == ["wg", "genkey"]:
                path.write_text(CLIENT_KEY + "\n")
            return result

    key, made = ensure_key(path, Racer())
    assert (key, made) == (CLIENT_KEY, False)


@pytest.mark.parametrize("content", ["", "not a key\n", CLIENT_KEY[:-2] + "\n"])
def test_a_key_file_without_a_key_is_a_usage_error(tmp_path, capsys, content):
    path = tmp_path / "private.key"
    path.write_text(content)
    assert main(["pubkey", "--key-file", str(path)], FakeSystem()) == 2
    err = capsys.readouterr().err
    assert f"{path} does not hold a WireGuard private key" in err and "move it away" in err
    assert path.read_text() == content  # never overwritten


def test_a_key_others_may_read_is_used_with_a_warning(tmp_path, capsys):
    path = tmp_path / "private.key"
    path.write_text(CLIENT_KEY + "\n")
    path.chmod(0o644)
    assert main(["pubkey", "--key-file", str(path)], FakeSystem()) == 0
    assert f"chmod 600 {path}" in capsys.readouterr().err


def test_an_unwritable_key_place_says_what_to_do(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["pubkey", "--key-file", str(blocker / "private.key")], FakeSystem()) == 1
    assert "--key-file or FAAS_CLIENT_KEY" in capsys.readouterr().err


def test_missing_wg_says_which_package(tmp_path, capsys):
    system = FakeSystem(tools=("ip",))
    assert main(["pubkey", "--key-file", str(tmp_path / "k")], system) == 1
    assert "apt-get install wireguard-tools" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


def test_connect_with_the_configs_key_uses_a_0600_temp_file_removed_after(
        client_env, write_config):
    system = FakeSystem()
    assert main(["connect", str(write_config(config_text()))], system) == 0
    [seen] = system.key_files
    assert seen["content"] == CLIENT_KEY
    assert seen["mode"] == 0o600 and seen["dir_mode"] == 0o700
    assert not seen["path"].exists() and not seen["path"].parent.exists()
    assert no_argv_holds(system, CLIENT_KEY)
    assert system.generated == []  # the config's key is used, no local key is made
    assert not client_env[1].exists()


def test_connect_without_a_key_in_the_config_uses_the_local_key(client_env, write_config,
                                                                capsys):
    _, key_file = client_env
    system = FakeSystem()
    assert main(["connect", str(write_config(config_text(private_key=None)))], system) == 0
    [key] = system.generated
    [seen] = system.key_files
    assert seen["path"] == key_file and seen["content"] == key
    assert key_file.exists()  # the local key stays
    assert no_argv_holds(system, key)
    out = capsys.readouterr().out
    assert f"its public key is {fake_public(key)}" in out
    assert f"faasctl vpn add NAME --public-key {fake_public(key)}" in out
