"""What one more function costs: work per deploy that must not grow with the number of
functions already deployed (docs/operations.md, "Scale"). Counted with fakes, never
timed: ip6tables runs and lines, desired-state builds, state reads."""

from __future__ import annotations

import asyncio
import io
import ipaddress
from typing import Any

import pytest

from common import protocol, schema
from common.errors import Code, FaasError
from common.log import EventLog
from controller.health import Monitor
from controller.state import State
from netagent import firewall

PREFIX = ipaddress.IPv6Network("fd00:faa5:1::/64")
SERVER = ipaddress.IPv6Address("fd00:faa5:0:100::1")


class Tables:
    """ip6tables as the firewall sees it: every run recorded, -D of a missing rule fails."""

    def __init__(self) -> None:
        self.runs: list[tuple[tuple[str, ...], str]] = []
        self.rules: set[str] = set()  # the port rules, "CHAIN SPEC"

    async def run(self, *argv: str, stdin: bytes | None = None) -> str:
        text = (stdin or b"").decode()
        self.runs.append((argv, text))
        lines = text.splitlines()
        if any(line.startswith(":") for line in lines):  # a whole write: chains flushed
            self.rules = {line[3:] for line in lines if line.startswith("-A ")}
            return ""
        for line in lines:
            if line.startswith("-D ") and line[3:] not in self.rules:
                raise FaasError(Code.UNAVAILABLE, "ip6tables-restore: rule not found")
        for line in lines:
            if line.startswith("-D "):
                self.rules.discard(line[3:])
            elif line.startswith("-I "):
                chain, _, spec = line[3:].split(" ", 2)
                self.rules.add(f"{chain} {spec}")
        return ""

    async def check(self, *argv: str) -> bool:
        self.runs.append((argv, ""))
        return True


def ports_of(n: int) -> dict[ipaddress.IPv6Address, list[int]]:
    return {PREFIX.network_address + 10 + i: [80] for i in range(n)}


@pytest.mark.parametrize("existing", [1, 100, 1000])
def test_a_deploy_writes_one_rule_whatever_the_number_of_functions(existing):
    tables = Tables()
    fw = firewall.Firewall("wg0", tables.run, tables.check)
    asyncio.run(fw.apply(PREFIX, SERVER, ports_of(existing)))  # the first: written whole
    tables.runs.clear()
    asyncio.run(fw.apply(PREFIX, SERVER, ports_of(existing + 1)))  # one more function
    assert len(tables.runs) == 1
    argv, batch = tables.runs[0]
    assert argv[0] == "ip6tables-restore" and "--noflush" in argv
    assert batch.splitlines()[1:-1] == [
        f"-I FAAS-wg0-IN 1 -d {PREFIX.network_address + 10 + existing}/128 -p tcp "
        "-m multiport --dports 80 -j ACCEPT"]
    want = {r[3:] for r in firewall.port_rules("FAAS-wg0-IN", ports_of(existing + 1))}
    assert {r for r in tables.rules if "multiport" in r} == want
    tables.runs.clear()
    asyncio.run(fw.apply(PREFIX, SERVER, ports_of(existing + 1)))  # the held-ports resync
    assert tables.runs == []


def test_a_removed_function_deletes_its_rule_and_a_changed_chain_is_written_whole():
    tables = Tables()
    fw = firewall.Firewall("wg0", tables.run, tables.check)
    asyncio.run(fw.apply(PREFIX, SERVER, ports_of(3)))
    tables.runs.clear()
    asyncio.run(fw.apply(PREFIX, SERVER, ports_of(2)))
    assert [line for line in tables.runs[0][1].splitlines() if line[:2] == "-D"] == [
        f"-D FAAS-wg0-IN -d {PREFIX.network_address + 12}/128 -p tcp -m multiport "
        "--dports 80 -j ACCEPT"]
    tables.rules.clear()  # someone flushed the chain: the difference fails, a whole write
    tables.runs.clear()
    asyncio.run(fw.apply(PREFIX, SERVER, ports_of(1)))
    assert any(line.startswith(":FAAS-wg0-IN") for line in tables.runs[-5][1].splitlines())
    assert len(tables.rules) > 1  # the whole chain again, not only the port rule
    fw.forget()  # the repair loop found drift: whole, even with nothing changed
    tables.runs.clear()
    asyncio.run(fw.apply(PREFIX, SERVER, ports_of(1)))
    assert any(":FAAS-wg0-IN" in batch for _, batch in tables.runs)


def test_another_prefix_or_server_address_writes_the_chains_whole():
    tables = Tables()
    fw = firewall.Firewall("wg0", tables.run, tables.check)
    asyncio.run(fw.apply(PREFIX, SERVER, ports_of(2)))
    tables.runs.clear()
    asyncio.run(fw.apply(PREFIX, SERVER + 1, ports_of(2)))
    assert any(":FAAS-wg0-IN" in batch for _, batch in tables.runs)


# --- the controller: the desired state is built and checked once per generation ------


class Agent:
    def __init__(self) -> None:
        self.boot_id, self.synced, self.generation, self.digest = "b0b0b0b0", False, 0, ""
        self.syncs = 0

    async def call(self, op: str, args: Any = None, timeout: Any = None, retries: Any = None,
                   checked: bool = False) -> Any:
        if op == "ping":
            return {"service": "dnsagent", "version": "0.1.0", "protocol": 1,
                    "boot_id": self.boot_id, "pid": 1, "uptime": 1.0, "rss": 1,
                    "synced": self.synced, "generation": self.generation,
                    "digest": self.digest}
        self.syncs += 1
        self.synced, self.generation = True, args["generation"]
        self.digest = protocol.state_digest("dnsagent", args["state"])
        return {"generation": self.generation, "digest": self.digest}


def test_pings_and_pushes_build_the_desired_state_once_per_generation():
    generation = [1]
    built: list[int] = []

    def desired(name: str) -> dict[str, Any]:
        built.append(generation[0])
        return {"records": [{"name": f"fn{i}", "address": str(PREFIX.network_address + 10 + i)}
                            for i in range(generation[0])]}
    agent = Agent()
    mon = Monitor({"dnsagent": agent}, desired, lambda: generation[0], 1.0,
                  EventLog("controller", stream=io.StringIO()))
    for _ in range(5):  # a deploy: a new generation, its push, then pings
        generation[0] += 1
        asyncio.run(mon.push())
        for _ in range(3):
            asyncio.run(mon.check("dnsagent"))
    # one per generation (the first push found no agent up yet: its first ping synced it)
    assert built == [2, 3, 4, 5, 6]
    assert agent.syncs == 5 and agent.digest == mon.wanted_digest("dnsagent")


def test_state_reads_every_function_once_per_generation(tmp_path, monkeypatch):
    state = State(str(tmp_path / "state.db"), str(PREFIX))
    for i in range(3):
        state.add_version(f"fn{i}", "sha256:" + "a" * 64, {"Cmd": ["/h"]}, 1)
    reads = []
    real = state._read_specs
    monkeypatch.setattr(state, "_read_specs", lambda: reads.append(1) or real())
    first = state.specs()
    assert state.specs() is first and len(reads) == 1
    state.add_version("fn3", "sha256:" + "a" * 64, {"Cmd": ["/h"]}, 1)
    assert [s["name"] for s in state.specs()] == ["fn0", "fn1", "fn2", "fn3"]
    assert len(reads) == 2
    assert state.function("fn1")["address"] == first[1]["address"]
    with pytest.raises(FaasError) as exc:
        state.function("nope")
    assert exc.value.code is Code.NOT_FOUND


# --- the agents: a sync checks only the items it has not seen pass -------------------


class Counted(schema.Field):
    """Str's check, counted."""

    def check(self, value: Any, path: str) -> Any:
        CHECKED.append(value)
        return schema.Str(pattern="[a-z0-9]+").check(value, path)


CHECKED: list[Any] = []


def test_a_memo_list_checks_only_new_items_and_refuses_what_the_plain_one_refuses():
    memo, plain = schema.List(item=Counted(), memo=True), schema.List(item=Counted())
    CHECKED.clear()
    items = [f"fn{i}" for i in range(1000)]
    assert memo.check(items, "x") == plain.check(items, "x") == items
    CHECKED.clear()
    assert memo.check([*items, "fn1000"], "x")[-1] == "fn1000"
    assert CHECKED == ["fn1000"]  # one new item, one check, whatever the list's length
    for bad in (["fn1", "NOT A NAME"], ["fn1", 1], ["fn1", b"fn2"]):
        with pytest.raises(FaasError) as exc:
            memo.check(bad, "x")
        assert exc.value.details == {"field": "x[1]"}
    CHECKED.clear()
    memo.check(["fn2"], "x")  # only the last list that passed is remembered
    memo.check(["fn1"], "x")
    assert CHECKED == ["fn1"]


def test_the_agents_state_lists_that_grow_with_functions_are_memos():
    assert protocol.state_schema("runner").fields["functions"].memo
    assert protocol.state_schema("dnsagent").fields["records"].memo
    netagent = protocol.state_schema("netagent").fields
    assert netagent["addresses"].memo and netagent["ports"].memo and netagent["peers"].memo


# --- open files: the daemons raise their soft limit --------------------------------------


def test_a_daemon_raises_its_soft_open_files_limit_to_the_hard_one(monkeypatch, tmp_path):
    import resource

    from common import daemon
    limits = {"now": (1024, 524288)}
    monkeypatch.setattr(resource, "getrlimit", lambda what: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda what, value: limits.update(now=value))
    nr_open = tmp_path / "nr_open"
    nr_open.write_text("1048576\n")
    assert daemon.raise_open_files(str(nr_open)) == (1024, 524288)
    assert limits["now"] == (524288, 524288)
    assert daemon.raise_open_files(str(nr_open)) == (524288, 524288)  # nothing to do
    limits["now"] = (1024, resource.RLIM_INFINITY)  # no hard limit: the kernel's ceiling
    assert daemon.raise_open_files(str(nr_open)) == (1024, 1048576)
