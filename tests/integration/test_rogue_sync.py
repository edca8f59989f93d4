"""The root daemons against a compromised controller (issue 11, part 2): syncs sent as the
faas user straight to the runner and netagent, on a real platform in a namespace.

The runner refuses what is outside root's bounds with its stable code and changes
nothing; netagent accepts a smaller (in-bounds) state, and the controller notices by the
state digest (the generation is the current one) and puts the addresses back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from harness import http_get as get
from harness import poll, run

HERE = Path(__file__).parent
MAX_PIDS = 64  # from the platform's settings file: the runner must use root's file


@pytest.fixture(scope="module")
def platform_config() -> str:
    return f"max_pids = {MAX_PIDS}\n"


def as_faas(platform, service: str, op: str, args: dict) -> dict:
    """One request to an agent's socket as the faas user."""
    out = run("setpriv", "--reuid=faas", "--regid=faas", "--init-groups", sys.executable,
              HERE / "rogue.py", platform.run_dir, service, op, json.dumps(args),
              env={**platform.env, "PYTHONPATH": str(HERE.parents[1])})
    return json.loads(out.stdout)


def listeners(platform) -> set[str]:
    """Local addresses of TCP listeners in the platform's namespace."""
    out = run(*platform.netns.argv("ss", "-ltnH")).stdout
    return {line.split()[3] for line in out.splitlines() if line.strip()}


def deploy(platform, image_tar, name: str) -> dict:
    platform.faasctl("new", name, "-f", image_tar)
    info = json.loads(platform.faasctl("--json", "info", name).stdout)
    poll(f"{name} answering", lambda: get(platform, info["address"])[0] == 200, 20)
    return info


def generation(platform) -> int:
    return json.loads(platform.faasctl("--json", "status", check=False).stdout)["generation"]


@pytest.fixture(scope="module")
def fn(platform, image_tar) -> dict:
    return deploy(platform, image_tar, "fn")


def rogue_spec(fn: dict, **settings) -> dict:
    return {"name": fn["name"], "address": fn["address"], "digest": fn["digest"],
            "settings": {**fn["settings"], **settings}}


def rogue_runner_sync(platform, functions: list[dict]) -> dict:
    return as_faas(platform, "runner", "sync", {"generation": generation(platform), "state": {
        "images": [functions[0]["digest"]], "functions": functions}})


def test_the_issues_rogue_sync_is_refused_and_changes_nothing(platform, fn):
    """Listen on [::1]:80, a container as uid 0 with LD_PRELOAD, 32 TiB and 1000 CPUs."""
    before = listeners(platform)
    assert f"[{fn['address']}]:80" in before and "[::1]:80" not in before
    issue = {**rogue_spec(fn, memory=32 << 40, cpu=1000.0,
                          env={"LD_PRELOAD": "/tmp/evil.so"}),
             "address": "::1",
             "config": {"entrypoint": [], "cmd": ["/bin/sh"], "env": ["LD_PRELOAD=/x.so"],
                        "workdir": "/", "user": "0", "os": "linux", "architecture": "amd64"}}
    cases = [
        (issue, "bad_request"),  # image config in a spec: an unknown field now
        ({k: v for k, v in issue.items() if k != "config"}, "forbidden"),  # [::1]:80
        (rogue_spec(fn, memory=32 << 40), "forbidden"),
        (rogue_spec(fn, cpu=1000.0), "forbidden"),
        (rogue_spec(fn, pids=MAX_PIDS + 1), "forbidden"),  # root's file, not the default
        (rogue_spec(fn, env={"LD_PRELOAD": "/tmp/evil.so"}), "forbidden"),
        (rogue_spec(fn, env={"FAAS_CONTROL_SOCKET": "/tmp/x"}), "forbidden"),
        ({**rogue_spec(fn), "user": "0"}, "bad_request"),
    ]
    for spec, code in cases:
        reply = as_faas(platform, "runner", "sync", {"generation": generation(platform),
                                                     "state": {"images": [fn["digest"]],
                                                               "functions": [spec]}})
        assert not reply["ok"] and reply["code"] == code, (spec, reply)
        assert "evil" not in reply["message"]
        assert listeners(platform) == before
    assert get(platform, fn["address"], "/id") == (200, "65534 65534")  # the image's user
    refusals = [e for e in platform.log_lines("runner") if e.get("event") == "sync_refused"]
    assert len(refusals) >= 5 and all("evil" not in json.dumps(e) for e in refusals)
    assert platform.healthy()
    # Refused syncs left every digest as it was, and agent and controller compute the
    # same digest of the same state: no resync was ever needed (nor looped).
    assert not [e for e in platform.log_lines("controller")
                if e.get("event") == "agent_state_differs"]


def test_set_above_a_host_maximum_is_refused_at_set_time(platform, fn):
    out = platform.faasctl("set", "fn", f"pids={MAX_PIDS + 1}", check=False)
    assert out.returncode == 2 and f"maximum {MAX_PIDS} (max_pids" in out.stderr
    out = platform.faasctl("set", "fn", "env.LD_PRELOAD=/tmp/x.so", check=False)
    assert out.returncode == 2
    platform.faasctl("set", "fn", f"pids={MAX_PIDS}")
    poll("fn served with the new setting", lambda: get(platform, fn["address"])[0] == 200, 15)


def test_netagent_drift_at_the_current_generation_is_put_back(platform, fn, image_tar):
    other = deploy(platform, image_tar, "fn-b")
    platform.wait_healthy()
    dev = ["ip", "-n", platform.netns.name, "-6", "addr", "show", "dev", platform.interface]
    assert f"{other['address']}/128" in run(*dev).stdout

    def both_held():  # else the runner's report of fn-b's ports resyncs netagent itself
        held = [e for e in platform.log_lines("controller") if e.get("event") == "ports_held"]
        deployed = len(json.loads(platform.faasctl("--json", "list").stdout)["functions"])
        return held and held[-1].get("functions") == deployed

    poll("the runner's report of both functions' ports", both_held, 15)
    reply = as_faas(platform, "netagent", "sync", {"generation": generation(platform),
                                                   "state": {"addresses": [fn["address"]],
                                                             "peers": []}})
    assert reply["ok"], reply  # in bounds: netagent may not judge what the controller wants

    def restored():
        events = platform.log_lines("netagent")
        removed = [i for i, e in enumerate(events) if e.get("event") == "address_removed"
                   and e.get("address") == f"{other['address']}/128"]
        added = [i for i, e in enumerate(events) if e.get("event") == "address_added"
                 and e.get("address") == f"{other['address']}/128"]
        return removed and added and added[-1] > removed[-1] and \
            f"{other['address']}/128" in run(*dev).stdout

    poll("the dropped address back", restored, 5)
    differs = [e for e in platform.log_lines("controller")
               if e.get("event") == "agent_state_differs"]
    assert {e["agent"] for e in differs} == {"netagent"}  # the set in between: no resync
    assert get(platform, other["address"])[0] == 200
