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


    {"env.A": "a\x00b"}, {"timeout": "nan"}, {"env.LD_PRELOAD": "/tmp/x.so"},
    {"env.LD_LIBRARY_PATH": "/tmp"}, {"per_client": "some"}, {"per_client": "-1"},
    {"per_client": "65537"}, {"first_byte_timeout": "-1"},
