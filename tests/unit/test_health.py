"""The controller's monitor against fake agents: when does it resync?"""

from __future__ import annotations

import asyncio
import io

from common import protocol
from common.errors import Code, FaasError
from common.log import EventLog
from controller.health import Monitor


class FakeAgent:
    def __init__(self):
        self.boot_id = "aaaa0000"
        self.synced = False
        self.down = False
        self.fail_sync = False
        self.syncs: list[dict] = []
        self.generation = 0
        self.digest = ""  # of the state it last converged to, as a real agent reports

    async def call(self, op, args=None, timeout=None, retries=None, checked=False):
        if self.down:
            raise FaasError(Code.TIMEOUT, "no answer")
        if op == "ping":
            return {"service": "runner", "version": "0.1.0", "protocol": 1,
                    "boot_id": self.boot_id, "pid": 42, "uptime": 1.0, "rss": 1 << 20,
                    "synced": self.synced, "generation": self.generation,
                    "digest": self.digest}
        if self.fail_sync:
            raise FaasError(Code.INTERNAL, "broken")
        self.syncs.append(args)
        self.synced, self.generation = True, args["generation"]
        self.digest = protocol.state_digest("runner", args["state"])
        return {"generation": args["generation"], "digest": self.digest}


GENERATION = [5]
DIGEST = "sha256:" + "d" * 64
WANTED = {"images": [DIGEST], "functions": []}  # a runner state its schema accepts
# what a sync carries: the state as the schema reads it, checked once per generation
SENT = protocol.state_schema("runner").check(WANTED, "state")


def make():
    GENERATION[0] = 5
    agent = FakeAgent()
    mon = Monitor({"runner": agent}, lambda name: WANTED, lambda: GENERATION[0], 1.0,
                  EventLog("controller", stream=io.StringIO()))
    return agent, mon


def check(mon):
    asyncio.run(mon.check("runner"))
    return mon.agents["runner"]


def test_first_sight_syncs_once():
    agent, mon = make()
    health = check(mon)
    assert health.state == "up" and health.synced and health.generation == 5
    assert agent.syncs == [{"generation": 5, "state": SENT}]
    check(mon)
    assert len(agent.syncs) == 1


def test_new_boot_id_resyncs_and_counts_a_restart():
    agent, mon = make()
    check(mon)
    agent.boot_id, agent.synced = "bbbb1111", False
    health = check(mon)
    assert len(agent.syncs) == 2 and health.restarts == 1 and health.synced


def test_agent_that_forgot_its_sync_is_resynced():
    agent, mon = make()
    check(mon)
    agent.synced = False  # same boot id, but it says it has no state
    check(mon)
    assert len(agent.syncs) == 2


def test_down_then_up_again():
    agent, mon = make()
    check(mon)
    agent.down = True
    health = check(mon)
    assert health.state == "down" and health.failures == 1 and "no answer" in health.error
    agent.down = False
    health = check(mon)
    assert health.state == "up" and health.failures == 0 and health.error is None


def test_failed_sync_is_retried_on_the_next_ping():
    agent, mon = make()
    agent.fail_sync = True
    health = check(mon)
    assert not health.synced and "sync failed" in health.error
    agent.fail_sync = False
    health = check(mon)
    assert health.synced and len(agent.syncs) == 1


def test_protocol_mismatch_is_flagged_and_not_synced():
    agent, mon = make()

    async def old_ping(op, args=None, timeout=None, retries=None):
        reply = await FakeAgent.call(agent, op, args)
        return {**reply, "protocol": 0} if op == "ping" else reply

    agent.call = old_ping
    health = check(mon)
    assert "protocol 0" in health.error and agent.syncs == []


def test_agent_behind_on_generation_is_resynced():
    agent, mon = make()
    check(mon)
    GENERATION[0] = 6  # the desired state changed and a push missed this agent
    check(mon)
    assert [s["generation"] for s in agent.syncs] == [5, 6]
    check(mon)
    assert len(agent.syncs) == 2


def test_push_syncs_every_agent_that_is_up():
    agent, mon = make()
    check(mon)
    GENERATION[0] = 7
    asyncio.run(mon.push())
    assert agent.syncs[-1]["generation"] == 7


def test_flags_down_flapping_and_behind():
    from controller.health import FLAP_WINDOW, AgentHealth
    a = AgentHealth("runner", state="up", boot_id="b", synced_boot="b", generation=3)
    assert a.flags(3) == []
    assert a.flags(5) == ["behind: has generation 3 of 5"]
    for _ in range(3):
        a.restarted()
    assert any(f.startswith("flapping: 3 restarts") for f in a.flags(3))
    later = a.restart_times[-1] + FLAP_WINDOW + 1
    assert a.flags(3, now=later) == []  # old restarts age out
    a.state = "down"
    assert a.flags(3, now=later) == ["down"]
    row = a.row(3)
    assert "restart_times" not in row and row["flags"][0] == "down"


def test_agent_holding_another_state_at_the_same_generation_is_resynced():
    """A rogue sync (the faas user, not the controller) left the agent with fewer
    functions and the current generation: the digest it reports shows it."""
    agent, mon = make()
    check(mon)
    agent.digest = protocol.state_digest("runner", {"images": [], "functions": []})
    check(mon)
    assert len(agent.syncs) == 2 and agent.syncs[-1]["state"] == SENT
    assert agent.digest == protocol.state_digest("runner", WANTED)
    check(mon)
    assert len(agent.syncs) == 2  # back to ours: nothing more to do


def test_agent_without_a_digest_is_judged_by_generation():
    agent, mon = make()
    check(mon)
    agent.digest = ""  # an agent from before digests
    check(mon)
    assert len(agent.syncs) == 1


def test_state_digest_is_of_the_normalized_state():
    a = protocol.state_digest("netagent", {"addresses": ["fd00:faa5:1:0::a"], "peers": []})
    b = protocol.state_digest("netagent", {"addresses": ["fd00:faa5:1::a"]})
    assert a == b and len(a) == 64
    assert a != protocol.state_digest("netagent", {"addresses": [], "peers": []})
