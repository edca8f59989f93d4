"""Settings: defaults, file, environment; a bad value names its key and stops a daemon."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.settings import EX_CONFIG, SETTINGS, SettingsError, load, markdown_table

BIN = Path(sys.executable).parent


def write(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "faasd.toml"
    path.write_text(text)
    return {"FAAS_CONFIG": str(path)}


def test_defaults_without_a_file(tmp_path):
    s = load({"FAAS_CONFIG": "/dev/null"})
    for setting in SETTINGS:
        assert getattr(s, setting.key) == setting.default
        assert s.sources[setting.key] == "default"


def test_missing_default_file_is_fine_but_a_named_one_is_not(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load({"FAAS_CONFIG": str(tmp_path / "nope.toml")})


def test_file_then_environment(tmp_path):
    env = write(tmp_path, 'root = "/srv/faas"\nping_interval = 2\nwg_port = 5000\n')
    s = load(env)
    assert (s.root, s.ping_interval, s.wg_port) == ("/srv/faas", 2.0, 5000)
    s = load({**env, "FAAS_ROOT": "/tmp/x", "FAAS_PING_INTERVAL": "0.5",
              "FAAS_DNS_UPSTREAMS": "fd00::53, 192.0.2.1"})
    assert (s.root, s.ping_interval) == ("/tmp/x", 0.5)
    assert s.dns_upstreams == ["fd00::53", "192.0.2.1"]
    assert s.sources["root"].startswith("FAAS_ROOT=")


@pytest.mark.parametrize("text,key", [
    ("ping_interval = 'fast'\n", "ping_interval"),
    ("ping_interval = 0\n", "ping_interval"),
    ("wg_port = 70000\n", "wg_port"),
    ("wg_port = true\n", "wg_port"),
    ("root = 'relative/path'\n", "root"),
    ("wg_interface = '-x'\n", "wg_interface"),
    ("wg_interface = 'a-very-long-interface'\n", "wg_interface"),
    ("function_prefix = '10.0.0.0/24'\n", "function_prefix"),
    ("runtime = 'docker'\n", "runtime"),
    ("dns_upstreams = ['not-an-ip']\n", "dns_upstreams"),
    ("vpn_endpoint = 'no port'\n", "vpn_endpoint"),
])
def test_bad_value_in_file_names_the_key(tmp_path, text, key):
    with pytest.raises(SettingsError) as info:
        load(write(tmp_path, text))
    assert f"bad setting {key} " in str(info.value)
    assert "faasd.toml" in str(info.value)


@pytest.mark.parametrize("var,value", [
    ("FAAS_PING_INTERVAL", "soon"),
    ("FAAS_WG_PORT", "0"),
    ("FAAS_RUN", "run"),
    ("FAAS_LOG_LEVEL", "loud"),
])
def test_bad_value_in_environment_names_the_key(var, value):
    with pytest.raises(SettingsError) as info:
        load({"FAAS_CONFIG": "/dev/null", var: value})
    key = var[len("FAAS_"):].lower()
    assert f"bad setting {key} ({var}=" in str(info.value)


def test_function_and_vpn_prefixes_may_not_overlap(tmp_path):
    """The runner and netagent hold function addresses to function_prefix; one that
    contains the VPN would let a sync as faas serve on the server's VPN address or take
    a peer's address."""
    with pytest.raises(SettingsError, match="function_prefix fd00:faa5::/48 and vpn_prefix "
                       "fd00:faa5:0:100::/64 overlap"):
        load(write(tmp_path, "function_prefix = 'fd00:faa5::/48'\n"))
    load(write(tmp_path, "function_prefix = 'fd00:faa5:2::/64'\n"))


def test_egress_prefix_may_not_overlap_functions_or_vpn(tmp_path):
    """An egress namespace's addresses come from egress_prefix: inside the function or
    VPN prefix, a function could hold a function's or a peer's address."""
    with pytest.raises(SettingsError, match="egress_prefix fd00:faa5:1::/56 overlaps "
                       "function_prefix"):
        load(write(tmp_path, "egress_prefix = 'fd00:faa5:1::/56'\n"))
    with pytest.raises(SettingsError, match="must be /24 or wider"):
        load(write(tmp_path, "egress_prefix4 = '10.0.0.0/28'\n"))
    assert load(write(tmp_path, "egress_prefix4 = '172.31.0.0/16'\n")).egress_prefix4 \
        == "172.31.0.0/16"


def test_unknown_key_and_bad_toml(tmp_path):
    with pytest.raises(SettingsError, match="unknown key.*ping_intervall"):
        load(write(tmp_path, "ping_intervall = 1\n"))
    with pytest.raises(SettingsError, match="cannot read"):
        load(write(tmp_path, "this is = = not toml"))


@pytest.mark.parametrize("program", ["faas-controller", "faas-netagent", "faas-dnsagent",
                                     "faas-runner"])
@pytest.mark.parametrize("source", ["file", "env"])
def test_daemon_stops_at_start_on_a_bad_value(tmp_path, program, source):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAAS_")}
    env["FAAS_RUN"] = str(tmp_path / "run")  # never reached: the check comes first
    if source == "file":
        env.update(write(tmp_path, "wg_port = 'x'\n"))
    else:
        env.update(FAAS_CONFIG="/dev/null", FAAS_WG_PORT="x")
    proc = subprocess.run([BIN / program], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == EX_CONFIG
    assert "bad setting wg_port" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_every_setting_is_documented():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "settings.md").read_text()
    assert markdown_table() in doc, "regenerate: python -m common.settings"
