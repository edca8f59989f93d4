"""The controller's share of egress: netagent's list from the state, and may_call names
that must be functions."""

from __future__ import annotations

import pytest

from common.errors import Code, FaasError
from controller.state import State

DIGEST = "sha256:" + "a" * 64
CONFIG = {"cmd": ["/handler"]}


@pytest.fixture
def state(tmp_path):
    s = State(str(tmp_path / "state" / "state.db"), "fd00:faa5:1::/64", "fd00:faa5:0:100::/64")
    for name in ("fib", "echo", "caller"):
        s.add_version(name, DIGEST, CONFIG, 100)
    yield s
    s.close()


def test_netagent_gets_egress_functions_with_their_targets_ports(state):
    assert state.egress() == []  # network=none by default
    state.set("echo", {"ports": "80,8080"})
    state.set("caller", {"network": "egress", "may_call": "fib,echo",
                         "egress_allow": "192.168.1.0/24:5432"})
    caller = state.function("caller")["address"]
    assert state.egress() == [{
        "name": "caller", "address": caller, "egress_allow": ["192.168.1.0/24:5432"],
        "may_call": [{"address": state.function("fib")["address"], "ports": [80]},
                     {"address": state.function("echo")["address"], "ports": [80, 8080]}]}]
    state.remove("fib")  # a target removed since: left out, the rest stays
    assert [t["ports"] for t in state.egress()[0]["may_call"]] == [[80, 8080]]


def test_may_call_of_a_missing_function_is_refused_and_changes_nothing(state):
    generation = state.generation
    with pytest.raises(FaasError) as info:
        state.set("caller", {"may_call": "fib,nosuch", "network": "egress"})
    assert info.value.code == Code.NOT_FOUND and "nosuch" in info.value.message
    assert state.function("caller")["settings"]["may_call"] == []
    assert state.function("caller")["settings"]["network"] == "none"
    assert state.generation == generation


def test_egress_past_roots_caps_is_refused_at_set_and_lowering_always_passes(state):
    """Review 13: root caps the egress functions (a namespace, veth and rules each) and
    their may_call entries; netagent refuses a sync past them, the controller the set."""
    state.egress_caps = type("Caps", (), {"max_egress_functions": 1, "max_egress_calls": 1})
    state.set("caller", {"network": "egress", "may_call": "fib"})
    generation = state.generation
    with pytest.raises(FaasError) as info:
        state.set("echo", {"network": "egress"})
    assert info.value.code == Code.CONFLICT and "max_egress_functions (1)" in info.value.message
    with pytest.raises(FaasError) as info:
        state.set("caller", {"may_call": "fib,echo"})
    assert info.value.code == Code.CONFLICT and "max_egress_calls (1)" in info.value.message
    assert state.generation == generation and state.function("echo")["settings"][
        "network"] == "none"
    state.egress_caps.max_egress_functions = 0  # lowered by root: going down still works
    state.set("caller", {"may_call": ""})
    state.set("caller", {"network": "none"})
    assert state.egress() == []
