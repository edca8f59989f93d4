"""Per-function settings: parsed once, refused whole on any bad value."""

from __future__ import annotations

import pytest

from common import fnsettings
from common.errors import Code, FaasError


def test_defaults_match_the_design():
    d = fnsettings.defaults()
    assert (d["memory"], d["cpu"], d["pids"], d["timeout"]) == (512 << 20, 1.0, 128, 30.0)
    assert d["reuse"] is False and d["env"] == {}


def test_apply_parses_sizes_bools_and_env():
    out = fnsettings.apply({}, {"memory": "256M", "reuse": "true", "min_warm": "2",
                                "env.GREETING": "hi", "timeout": "2.5"})
    assert (out["memory"], out["reuse"], out["min_warm"], out["timeout"]) == (
        256 << 20, True, 2, 2.5)
    assert out["env"] == {"GREETING": "hi"}
    out = fnsettings.apply(out, {"env.GREETING": "", "memory": "1G"})
    assert out["env"] == {} and out["memory"] == 1 << 30 and out["reuse"] is True


@pytest.mark.parametrize("changes", [
    {"memory": "lots"}, {"memory": "1K"}, {"cpu": "0"}, {"pids": "-1"}, {"reuse": "maybe"},
    {"colour": "blue"}, {"env.FAAS_CONTROL_SOCKET": "/x"}, {"env.1X": "y"},
    {"env.A": "a\x00b"}, {"timeout": "nan"}, {"env.LD_PRELOAD": "/tmp/x.so"},
    {"env.LD_LIBRARY_PATH": "/tmp"}, {"per_client": "some"}, {"per_client": "-1"},
    {"per_client": "65537"}, {"first_byte_timeout": "-1"},
])
def test_bad_values_are_refused_whole(changes):
    with pytest.raises(FaasError) as info:
        fnsettings.apply({}, {"min_warm": "3", **changes})
    assert info.value.code is Code.BAD_REQUEST


def _host(**over):
    from common.settings import load
    return load({"FAAS_CONFIG": "/dev/null", **{f"FAAS_{k.upper()}": str(v)
                                                 for k, v in over.items()}})


def test_host_maxima_default_to_this_machine():
    import os
    maxima = fnsettings.host_maxima(_host())
    assert maxima["cpu"] == min(64, os.cpu_count())
    assert maxima["memory"] == min(64 << 30, os.sysconf("SC_PAGE_SIZE") *
                                   os.sysconf("SC_PHYS_PAGES"))
    assert (maxima["pids"], maxima["concurrency"], maxima["min_warm"]) == (4096, 1024, 64)
    assert fnsettings.host_maxima(_host(max_cpus=0.5, max_pids=100))["cpu"] == 0.5


def test_set_above_a_host_maximum_names_the_maximum():
    maxima = fnsettings.host_maxima(_host(max_pids=100))
    with pytest.raises(FaasError) as info:
        fnsettings.apply({}, {"pids": "101"}, maxima)
    assert info.value.code is Code.BAD_REQUEST
    assert "maximum 100 (max_pids" in info.value.message
    assert fnsettings.apply({}, {"pids": "100"}, maxima)["pids"] == 100
    # a stored value above a lowered maximum does not block changing something else
    assert fnsettings.apply({"pids": 500}, {"timeout": "3"}, maxima)["timeout"] == 3.0


@pytest.mark.parametrize("key,value,code", [
    ("memory", 32 << 40, Code.FORBIDDEN), ("cpu", 1000.0, Code.FORBIDDEN),
    ("pids", 1 << 20, Code.FORBIDDEN), ("timeout", 86400.0, Code.FORBIDDEN),
    ("concurrency", 4096, Code.FORBIDDEN), ("queue", 65536, Code.FORBIDDEN),
    ("min_warm", 256, Code.FORBIDDEN), ("memory", 1, Code.BAD_REQUEST),
    ("idle_timeout", 1e9, Code.BAD_REQUEST),
])
def test_check_values_against_host_maxima(key, value, code):
    maxima = fnsettings.host_maxima(_host(max_memory=1 << 30, max_cpus=1))
    values = {**fnsettings.defaults(), key: value}
    fnsettings.check_values(fnsettings.defaults(), maxima, "fn")
    with pytest.raises(FaasError) as info:
        fnsettings.check_values(values, maxima, "fn")
    assert info.value.code is code and info.value.details["field"] == f"fn.{key}"


@pytest.mark.parametrize("name,code", [("LD_PRELOAD", Code.FORBIDDEN),
                                       ("LD_AUDIT", Code.FORBIDDEN),
                                       ("FAAS_CONTROL_SOCKET", Code.FORBIDDEN),
                                       ("1X", Code.BAD_REQUEST), ("A=B", Code.BAD_REQUEST)])
def test_check_values_refuses_env_names_not_values(name, code):
    values = {**fnsettings.defaults(), "env": {name: "s3cret-value"}}
    with pytest.raises(FaasError) as info:
        fnsettings.check_values(values, fnsettings.host_maxima(_host()), "fn")
    assert info.value.code is code and "s3cret" not in str(info.value)


def test_defaults_fit_the_host():
    """A function nobody set gets no value the runner would refuse on this host."""
    maxima = fnsettings.host_maxima(_host(max_pids=64, max_cpus=0.5))
    out = fnsettings.apply({}, {}, maxima)
    assert (out["pids"], out["cpu"], out["timeout"]) == (64, 0.5, 30.0)
    fnsettings.check_values(out, maxima, "fn")
    assert fnsettings.apply({"pids": 100}, {}, maxima)["pids"] == 100  # a set value stays


def test_admission_settings_parse_and_per_client_auto_and_off():
    d = fnsettings.defaults()
    assert (d["first_byte_timeout"], d["per_client"]) == (5.0, 0)
    out = fnsettings.apply({}, {"first_byte_timeout": "0", "per_client": "8"})
    assert (out["first_byte_timeout"], out["per_client"]) == (0.0, 8)
    assert fnsettings.apply(out, {"per_client": "off"})["per_client"] == 65536
    assert fnsettings.apply(out, {"per_client": "auto"})["per_client"] == 0
    # auto: half the slots, at least one, so one address never holds them all
    assert fnsettings.per_client_limit(0, 16) == 8 and fnsettings.per_client_limit(0, 1) == 1
    assert fnsettings.per_client_limit(3, 16) == 3
    assert fnsettings.per_client_limit(fnsettings.PER_CLIENT_OFF, 16) == 0  # no cap


def _section(doc: str, title: str) -> str:
    start = doc.index(f"\n## {title}\n")
    end = doc.find("\n## ", start + 1)
    return doc[start:end if end != -1 else len(doc)]


def test_the_doc_table_is_generated_from_the_table():
    """docs/settings.md's per-function table is exactly markdown_table(), nothing more."""
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[2] / "docs" / "settings.md").read_text()
    rows = [line for line in _section(doc, "Per-function settings").splitlines()
            if line.startswith("|")]
    assert rows == fnsettings.markdown_table().splitlines(), \
        "regenerate: python -m common.fnsettings"


def test_every_setting_is_in_the_generated_docs_and_help():
    table, help_text = fnsettings.markdown_table(), fnsettings.cli_help()
    for s in fnsettings.FN_SETTINGS:
        shown = f"`{s.show(s.default)}`" if s.show(s.default) else "(none)"
        assert f"| `{s.key}` | {shown} | {s.range()} |".replace("|  |", "| |") in table
        assert f"  {s.key} " in help_text and s.help.split()[0] in help_text
    assert "| `env.NAME` |" in table and "  env.NAME " in help_text
    assert "16M – 64G" in table and "0.05 – 64" in table and "8 – 32768" in table
    assert "auto" in table and "off (stored as 65536)" in table


def test_each_setting_parses_to_its_type_and_shows_as_it_parses():
    for s in fnsettings.FN_SETTINGS:
        assert type(s.default) is s.type
        for value in (s.default, *(() if s.type in (bool, str, list) else (s.lo, s.hi))):
            assert s.value(s.show(value)) == value, (s.key, value)


def test_the_runner_schema_is_built_from_the_table():
    """Types and ranges on the wire are the table's: the top of a host-capped setting is
    the runner's check (forbidden above root's maximum), every other bound the schema's."""
    from common import protocol
    from common.schema import Bool, Float, Int, List, MapOf, Str
    fields = protocol.FUNCTION_SETTINGS.fields
    assert list(fields) == [*fnsettings.BY_KEY, "env"]
    kinds = {bool: Bool, int: Int, float: Float, str: Str, list: List}
    for s in fnsettings.FN_SETTINGS:
        f = fields[s.key]
        assert type(f) is kinds[s.type] and f.required, s.key
        if s.type is list:
            assert f.max_items == s.hi, s.key
        elif s.type not in (bool, str):
            assert f.min == s.lo, s.key
            if s.key in fnsettings.HOST_MAXIMA:
                assert f.max > s.hi, s.key  # runner/bounds.py: forbidden above root's max
            else:
                assert f.max == s.hi, s.key
    env = fields["env"]
    assert isinstance(env, MapOf) and env.max_items == fnsettings.MAX_ENV
    assert (env.key.max_len, env.value.max_len) == (fnsettings.ENV_NAME_MAX,
                                                    fnsettings.VALUE_MAX)
    protocol.FUNCTION_SETTINGS.check(fnsettings.defaults(), "s")
    with pytest.raises(FaasError):  # cpu 0.01 passed the old schema's own minimum
        protocol.FUNCTION_SETTINGS.check({**fnsettings.defaults(), "cpu": 0.01}, "s")


def test_the_set_op_names_every_key():
    from common import protocol
    doc = " ".join(protocol.SET.doc.split())
    assert fnsettings.keys_text() in doc and protocol.SET.epilog == fnsettings.cli_help()


def test_the_runner_takes_its_defaults_names_and_ranges_from_the_table():
    """Every setting reaches the runner under its own name and default: serving
    (runner/serve.py) or the container's config (runner/bundle.py), whose last check
    refuses exactly what the table refuses."""
    from dataclasses import fields

    from runner.bundle import BundleError, FunctionSettings
    from runner.serve import ServeSettings, settings_from
    serve, bundle = ServeSettings(), FunctionSettings()
    for s in fnsettings.FN_SETTINGS:
        if s.reader != "runner":
            continue
        where = [o for o in (serve, bundle) if s.key in {f.name for f in fields(o)}]
        assert where, f"{s.key}: read by neither runner/serve.py nor runner/bundle.py"
        assert all(getattr(o, s.key) == s.default for o in where), s.key
    for key in ("memory", "cpu", "pids"):
        s = fnsettings.BY_KEY[key]
        FunctionSettings(**{key: s.lo}).validate()
        FunctionSettings(**{key: s.hi}).validate()
        for bad in (s.lo - (1 if s.type is int else 0.01), s.hi + 1):
            with pytest.raises(BundleError, match=key):
                FunctionSettings(**{key: s.type(bad)}).validate()
    values = fnsettings.apply({}, {"memory": "64M", "cpu": "0.5", "pids": "32",
                                   "reuse": "true", "timeout": "3", "env.A": "b"})
    limits = FunctionSettings.of(values)
    assert (limits.memory, limits.cpu, limits.pids) == (64 << 20, 0.5, 32)
    assert limits.env == {"A": "b", "FAAS_REUSE": "1"}
    assert (settings_from(values).timeout, settings_from(values).memory) == (3.0, 64 << 20)


def test_the_openapi_settings_schema_agrees_with_the_table():
    """docs/openapi.json's Settings (what GET and PATCH .../settings answer) has every
    setting with the table's type and range, and its SettingsChanges names every key."""
    from tests import openapi_check as oc
    spec = oc.load()
    schema = spec["components"]["schemas"]["Settings"]
    props = schema["properties"]
    assert list(props) == schema["required"] == [*fnsettings.BY_KEY, "env"]
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}
    for s in fnsettings.FN_SETTINGS:
        p = props[s.key]
        assert p["type"] == kinds[s.type], s.key
        if s.type is list:
            assert (p["minItems"], p["maxItems"]) == (s.lo, s.hi), s.key
        elif s.type is str:
            assert s.default in p["enum"], s.key
        elif s.type is not bool:
            assert (p["minimum"], p["maximum"]) == (s.lo, s.hi), s.key
    assert props["env"]["additionalProperties"]["maxLength"] == fnsettings.VALUE_MAX
    oc.validate(spec, schema, fnsettings.defaults())
    with pytest.raises(oc.SchemaError):
        oc.validate(spec, schema, {**fnsettings.defaults(), "cpu": 0.01})
    changes = " ".join(spec["components"]["schemas"]["SettingsChanges"]["description"].split())
    assert fnsettings.keys_text() in changes


@pytest.mark.parametrize("key,text,want", [
    ("network", "egress", "egress"),
    ("ports", "80, 5432", [80, 5432]),
    ("ports", "443", [443]),
    ("allow", "laptop,ci", ["laptop", "ci"]),
    ("allow", "*", ["*"]),
    ("secrets", "db,api", ["db", "api"]),
    ("secrets", "", []),
    ("may_call", "fib,echo", ["fib", "echo"]),
    ("mounts", "data:/data/./x/", ["data:/data/x"]),
    ("mounts", "data:/data:ro,logs:/var/log/app", ["data:/data:ro", "logs:/var/log/app"]),
    ("egress_allow", "10.0.0.7,192.168.1.0/24:5432,fd12::/48:443",
     ["10.0.0.7/32", "192.168.1.0/24:5432", "fd12::/48:443"]),
])
def test_list_and_choice_settings_parse_to_a_canonical_form(key, text, want):
    s = fnsettings.BY_KEY[key]
    assert s.value(text) == want
    assert s.canonical(want) and s.value(s.show(want)) == want


@pytest.mark.parametrize("key,text", [
    ("network", "host"), ("ports", "0"), ("ports", "53"), ("ports", "80,80"),
    ("ports", ""), ("ports", "http"), ("ports", ",".join(str(p) for p in range(1, 18))),
    ("allow", ""), ("allow", "Laptop"), ("secrets", "../x"), ("secrets", "a,a"),
    ("mounts", "data:/"), ("mounts", "data:/proc"), ("mounts", "data:/proc/x"),
    ("mounts", "data:/run"), ("mounts", "data:relative"), ("mounts", "data:/x:rw:ro"),
    ("mounts", "data:/x:exec"), ("mounts", "Data:/x"), ("mounts", "data:/run/secrets/db"),
    ("mounts", "a:/data,b:/data/sub"), ("mounts", "a:/data,b:/data"), ("mounts", "a:/d/,b:/d/x"),
    ("egress_allow", "10.0.0.0/8:99999"), ("egress_allow", "example.com"),
    ("egress_allow", "10.0.0.0/33"), ("may_call", "a.b"),
])
def test_bad_list_and_choice_values_are_refused(key, text):
    with pytest.raises(FaasError) as err:
        fnsettings.apply({}, {key: text})
    assert err.value.code == Code.BAD_REQUEST and key in str(err.value)


def test_a_root_daemon_refuses_a_list_value_set_could_not_make():
    values = {**fnsettings.defaults(), "mounts": ["data:/proc"]}
    with pytest.raises(FaasError) as err:
        fnsettings.check_values(values, {}, "fn")
    assert err.value.code == Code.BAD_REQUEST and "fn.mounts" in str(err.value)
    for bad in ({"ports": [80, 80]}, {"ports": [53]}, {"network": "host"},
                {"mounts": ["a:/data", "b:/data/sub"]},
                {"egress_allow": ["10.0.0.1"]}, {"allow": []}):
        with pytest.raises(FaasError):
            fnsettings.check_values({**fnsettings.defaults(), **bad}, {}, "fn")
    fnsettings.check_values(fnsettings.defaults(), {}, "fn")
