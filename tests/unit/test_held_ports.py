"""Peers reach only the ports the runner holds (docs/network.md, "Ports and callers"):
the runner's report of its listeners (runner/fleet.py ``held``, in its ping reply), the
controller's computation of what netagent opens (controller/vpn.py ``peer_ports``) and
the monitor's handling of the report (controller/health.py): only the synced runner's,
forgotten when it goes down or restarts, a change resyncing netagent at once."""

from __future__ import annotations

import asyncio
import io
import time
from types import SimpleNamespace

import psutil
from test_serve import Harness, run, until

from common import protocol
from common.errors import Code, FaasError
from common.log import EventLog
from controller.health import Monitor
from controller.vpn import egress_targets, peer_ports
from runner.fleet import Fleet
from runner.main import Runner

A, B = "fd00:faa5:1::a", "fd00:faa5:1::b"


def spec(address: str, *ports: int) -> dict:
    return {"address": address, "settings": {"ports": list(ports)}}


# --- the controller's computation -------------------------------------------------------

def test_without_a_report_only_ports_below_1024_are_open():
    assert peer_ports([spec(A, 80, 5432), spec(B, 443, 8080)], None) == [
        {"address": A, "ports": [80]}, {"address": B, "ports": [443]}]


def test_with_a_report_exactly_the_held_ports_of_the_setting_are_open():
    held = {A: {80, 5432}, B: {8080}}
    assert peer_ports([spec(A, 5432, 80), spec(B, 80, 8080)], held) == [
        {"address": A, "ports": [5432, 80]},  # the setting's order, as netagent checks it
        {"address": B, "ports": [8080]}]  # 80 not held (a host service on [::]:80): closed


def test_a_held_port_the_setting_no_longer_lists_is_closed():
    assert peer_ports([spec(A, 80)], {A: {80, 5432}}) == [{"address": A, "ports": [80]}]


def test_an_address_the_runner_does_not_report_yet_gets_its_ports_below_1024():
    """A function deployed since the runner's last ping: 80 at once, 5432 once held."""
    assert peer_ports([spec(A, 80, 5432), spec(B, 80, 5432)], {A: {80, 5432}}) == [
        {"address": A, "ports": [80, 5432]}, {"address": B, "ports": [80]}]


def test_a_function_holding_none_of_its_ports_gets_an_empty_list():
    state = {"addresses": [A], "peers": [], "ports": peer_ports([spec(A, 5432)], {A: set()})}
    assert state["ports"] == [{"address": A, "ports": []}]
    protocol.state_digest("netagent", state)  # the sync's schema takes it


def test_an_egress_caller_reaches_only_the_ports_its_target_holds():
    """may_call targets are cut like peers' ports: a squatter on [target]:5432 is not
    reachable from the caller's namespace either; a target holding nothing is left out."""
    egress = [{"name": "c", "address": "fd00:faa5:1::c", "egress_allow": [],
               "may_call": [{"address": A, "ports": [80, 5432]},
                            {"address": B, "ports": [8080]}]}]
    assert egress_targets(egress, {A: {80}, B: set()})[0]["may_call"] == [
        {"address": A, "ports": [80]}]
    assert egress_targets(egress, None)[0]["may_call"] == [{"address": A, "ports": [80]}]
    assert egress_targets(egress, {A: {80, 5432}, B: {8080}}) == egress


# --- the runner's report --------------------------------------------------------------

def test_the_runner_reports_the_ports_it_holds_and_not_one_another_program_holds():
    async def main() -> None:
        busy = {"5432": True}

        def bind(port: int) -> int:
            if port == 5432 and busy["5432"]:
                raise OSError(98, "Address already in use")
            return 0
        h = Harness(ports=[80, 5432], bind=bind)
        fleet = SimpleNamespace(functions={"fake": h.fn})
        assert Fleet.held(fleet) == [{"address": "::1", "ports": [80]}]
        busy["5432"] = False  # the squatter is gone: the janitor binds within a second
        await until("5432 bound", lambda: 5432 in h.fn.listeners, timeout=10)
        assert Fleet.held(fleet) == [{"address": "::1", "ports": [80, 5432]}]
        h.fn.stop_accepting()  # dropped: its listeners are closed, nothing is held
        assert Fleet.held(fleet) == []
        await h.fn.close()
    run(main())


def test_the_runner_ping_reply_carries_the_report_and_passes_the_controllers_check():
    runner = Runner.__new__(Runner)  # op_ping reads only these
    runner.boot_id, runner.started, runner._proc = "abcd0123", time.monotonic(), \
        psutil.Process()
    runner.synced, runner.generation, runner.digest = True, 3, ""
    runner.fleet = None  # before setup: nothing held
    assert protocol.PING_RESULT.check(asyncio.run(runner.op_ping({})), "ping")["held"] == []
    runner.fleet = SimpleNamespace(held=lambda: [{"address": A, "ports": [80, 5432]}])
    reply = protocol.PING_RESULT.check(asyncio.run(runner.op_ping({})), "ping")
    assert reply["held"] == [{"address": A, "ports": [80, 5432]}]


# --- the monitor ----------------------------------------------------------------------

class Agent:
    """A fake agent: answers ping with its boot id and report, records syncs."""

    def __init__(self, service: str):
        self.service, self.boot_id, self.down = service, "aaaa0000", False
        self.synced, self.generation, self.digest = False, 0, ""
        self.held: list[dict] | None = None
        self.syncs: list[dict] = []

    async def call(self, op, args=None, timeout=None, retries=None, checked=False):
        if self.down:
            raise FaasError(Code.TIMEOUT, "no answer")
        if op == "ping":
            return {"service": self.service, "version": "0.1.0", "protocol": protocol.VERSION,
                    "boot_id": self.boot_id, "pid": 42, "uptime": 1.0, "rss": 1,
                    "synced": self.synced, "generation": self.generation,
                    "digest": self.digest, "held": self.held}
        self.syncs.append(args["state"])
        self.synced, self.generation = True, args["generation"]
        self.digest = protocol.state_digest(self.service, args["state"])
        return {"generation": self.generation, "digest": self.digest}


def monitor() -> tuple[Agent, Agent, Monitor]:
    runner, netagent = Agent("runner"), Agent("netagent")
    specs = [spec(A, 80, 5432)]

    def desired(name: str) -> dict:
        if name == "netagent":
            return {"addresses": [A], "peers": [], "ports": peer_ports(specs, mon.held)}
        return {"images": [], "functions": []}
    mon = Monitor({"runner": runner, "netagent": netagent}, desired, lambda: 5, 1.0,
                  EventLog("controller", stream=io.StringIO()))
    return runner, netagent, mon


def check(mon: Monitor, *names: str) -> None:
    for name in names:
        asyncio.run(mon.check(name))


def opened(netagent: Agent) -> list[int]:
    return netagent.syncs[-1]["ports"][0]["ports"]


def test_netagent_opens_5432_only_once_the_synced_runner_reports_it_held():
    runner, netagent, mon = monitor()
    runner.held = [{"address": A, "ports": [80, 5432]}]  # not ours yet: not trusted
    check(mon, "netagent", "runner")
    assert mon.held is None and opened(netagent) == [80]
    check(mon, "runner")  # now synced by us: its report counts, netagent is resynced now
    assert mon.held == {A: frozenset({80, 5432})} and opened(netagent) == [80, 5432]
    syncs = len(netagent.syncs)
    check(mon, "runner", "netagent")  # the same report: nothing more to do
    assert len(netagent.syncs) == syncs


def test_a_runner_down_or_restarted_closes_5432_until_the_new_one_holds_it():
    runner, netagent, mon = monitor()
    runner.held = [{"address": A, "ports": [80, 5432]}]
    check(mon, "netagent", "runner", "runner")
    assert opened(netagent) == [80, 5432]
    runner.down = True
    check(mon, "runner")
    assert mon.held is None and opened(netagent) == [80]  # a local user may race for 5432
    runner.down, runner.boot_id, runner.synced = False, "bbbb1111", False  # a new runner
    runner.held = []
    check(mon, "runner")  # synced now; what it said before our sync does not count
    assert mon.held is None and opened(netagent) == [80]
    runner.held = [{"address": A, "ports": [80]}]  # another program holds 5432
    check(mon, "runner")
    assert opened(netagent) == [80]
    runner.held = [{"address": A, "ports": [80, 5432]}]  # gone: the runner's bind won
    check(mon, "runner")
    assert opened(netagent) == [80, 5432]


def test_a_restarted_controller_trusts_at_once_a_runner_holding_its_state():
    """No second of 5432 closed at a controller restart: the runner's digest is that of
    the state this controller wants, so its report counts before any sync of ours."""
    runner, netagent, mon = monitor()
    runner.synced, runner.generation = True, 5
    runner.digest = protocol.state_digest("runner", {"images": [], "functions": []})
    runner.held = [{"address": A, "ports": [80, 5432]}]
    check(mon, "netagent", "runner")
    assert mon.held == {A: frozenset({80, 5432})} and opened(netagent) == [80, 5432]
    runner, netagent, mon = monitor()  # the same, holding another state: not trusted
    runner.synced, runner.generation, runner.digest = True, 5, "e" * 64
    runner.held = [{"address": A, "ports": [80, 5432]}]
    check(mon, "netagent", "runner")
    assert mon.held is None and opened(netagent) == [80]


def test_netagent_holding_an_older_report_is_resynced_by_digest():
    """Level-triggered: a netagent the push missed is found by its next ping."""
    runner, netagent, mon = monitor()
    check(mon, "netagent", "runner")
    netagent.down = True
    runner.held = [{"address": A, "ports": [80, 5432]}]
    check(mon, "runner")  # the push finds netagent down (its state: still "up" here)
    netagent.down = False
    before = len(netagent.syncs)
    check(mon, "netagent")
    assert len(netagent.syncs) == before + 1 and opened(netagent) == [80, 5432]
