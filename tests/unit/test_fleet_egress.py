"""The runner's side of network=egress: it joins only the namespace its own layout names,
refuses until netagent has made it, and writes resolv.conf and hosts per container."""

from __future__ import annotations

import os

import pytest

from runner.bundle import BundleError, FunctionSettings
from runner.fleet import Fleet, is_netns


def fleet(tmp_path) -> Fleet:
    f = Fleet(str(tmp_path / "root"), str(tmp_path / "run"), None, None, None,  # type: ignore
              lambda digest: None, nameserver="fd00:faa5:0:100::1")
    f.specs = {"fib": {"address": "fd00:faa5:1::a"}, "echo": {"address": "fd00:faa5:1::b"}}
    os.makedirs(os.path.join(f.bundles, "c1"))
    return f


def test_no_namespace_yet_is_a_clear_refusal(tmp_path):
    f = fleet(tmp_path)
    with pytest.raises(BundleError, match="network namespace of caller is not made yet"):
        f.egress_net("caller", FunctionSettings(network="egress"), "c1")
    os.makedirs(os.path.dirname(f.paths.netns_path("caller")))
    open(f.paths.netns_path("caller"), "w").close()  # a plain file is no namespace
    with pytest.raises(BundleError, match="not made yet"):
        f.egress_net("caller", FunctionSettings(network="egress"), "c1")


def test_the_namespace_is_a_real_one():
    assert is_netns("/proc/self/ns/net")  # what a bind mount of one looks like
    assert not is_netns("/proc/self/status") and not is_netns("/nonexistent")


def test_a_namespace_is_joined_with_its_files(tmp_path, monkeypatch):
    f = fleet(tmp_path)
    path = f.paths.netns_path("caller")
    monkeypatch.setattr("runner.fleet.is_netns", lambda p: p == path)
    net = f.egress_net("caller", FunctionSettings(network="egress", may_call=["fib", "gone"]),
                       "c1")
    assert net.netns == path
    assert open(net.resolv_conf).read() == "nameserver fd00:faa5:0:100::1\n"
    hosts = open(net.hosts).read()
    assert "fd00:faa5:1::a\tfib.faas fib" in hosts and "echo" not in hosts and "gone" not in hosts
    assert os.stat(net.hosts).st_mode & 0o777 == 0o644
