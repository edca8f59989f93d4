"""The runner's sync against root's bounds (issue 11): one test per field, each a sync the
faas user could send, refused with its code before anything changes; and what a
container runs comes from the runner's own record of the image, not from the sync."""

from __future__ import annotations

import asyncio
import io
import json
import os

import pytest

from common import fnsettings, protocol
from common.errors import Code, FaasError
from common.log import EventLog
from common.settings import load
from runner.fleet import Fleet
from runner.main import Runner

DIGEST = "sha256:" + "a" * 64


class FakeFleet:
    """Records what the runner would have served."""

    def __init__(self):
        self.converged: list[list[dict]] = []

    async def converge(self, specs):
        self.converged.append(specs)


@pytest.fixture
def runner(tmp_path):
    settings = load({"FAAS_ROOT": str(tmp_path), "FAAS_RUN": str(tmp_path / "run"),
                     "FAAS_CONFIG": "/dev/null", "FAAS_MAX_MEMORY": str(1 << 30),
                     "FAAS_MAX_CPUS": "2"})
    log = io.StringIO()
    r = Runner(settings, EventLog("runner", stream=log))
    r.fleet = FakeFleet()
    r.kept = []
    r.store.keep = lambda wanted: r.kept.append(wanted) or []
    r.logtext = log
    return r


def spec(**over):
    settings = {**fnsettings.defaults(), "env": {"GREETING": "hi"}}
    settings.update(over.pop("settings", {}))
    return {"name": "fib", "address": "fd00:faa5:1::a", "digest": DIGEST,
            "settings": settings, **over}


def sync(runner, functions, generation=5):
    """A sync as it arrives on the wire: the schema first, then the op."""
    req = protocol.parse_request(protocol.make_request(
        "sync", {"generation": generation, "state": {"images": [DIGEST],
                                                     "functions": functions}}, "rogue1"),
        "runner")
    return asyncio.run(runner.op_sync(req.args))


def refused(runner, functions) -> FaasError:
    """Sync a good state, then the bad one; the bad one must change nothing."""
    sync(runner, [spec()])
    before = (len(runner.fleet.converged), len(runner.kept), runner.generation, runner.digest)
    with pytest.raises(FaasError) as info:
        sync(runner, functions, generation=6)
    assert (len(runner.fleet.converged), len(runner.kept), runner.generation,
            runner.digest) == before
    return info.value


ROGUE = [
    # field, the bad function, code
    ("address: loopback", spec(address="::1"), Code.FORBIDDEN),
    ("address: another prefix", spec(address="fd00:faa5:2::a"), Code.FORBIDDEN),
    ("address: the VPN server", spec(address="fd00:faa5:0:100::1"), Code.FORBIDDEN),
    ("address: the prefix itself", spec(address="fd00:faa5:1::"), Code.FORBIDDEN),
    ("address: not one", spec(address="localhost"), Code.BAD_REQUEST),
    ("port", spec(port=8080), Code.BAD_REQUEST),
    ("memory: 32 TiB", spec(settings={"memory": 32 << 40}), Code.FORBIDDEN),
    ("memory: above max_memory", spec(settings={"memory": (1 << 30) + 1}), Code.FORBIDDEN),
    ("memory: below the table", spec(settings={"memory": 4096}), Code.BAD_REQUEST),
    ("cpu: 1000", spec(settings={"cpu": 1000.0}), Code.FORBIDDEN),
    ("cpu: above max_cpus", spec(settings={"cpu": 2.5}), Code.FORBIDDEN),
    ("pids", spec(settings={"pids": 1 << 20}), Code.FORBIDDEN),
    ("timeout", spec(settings={"timeout": 1e6}), Code.FORBIDDEN),
    ("concurrency", spec(settings={"concurrency": 100000}), Code.FORBIDDEN),
    ("queue", spec(settings={"queue": 10 ** 7}), Code.FORBIDDEN),
    ("min_warm", spec(settings={"min_warm": 1000}), Code.FORBIDDEN),
    ("idle_timeout", spec(settings={"idle_timeout": 1e9}), Code.BAD_REQUEST),
    ("ports: 53", spec(settings={"ports": [80, 53]}), Code.BAD_REQUEST),
    ("ports: 0", spec(settings={"ports": [0]}), Code.BAD_REQUEST),
    ("ports: twice", spec(settings={"ports": [80, 80]}), Code.BAD_REQUEST),
    ("ports: 17", spec(settings={"ports": list(range(1000, 1017))}), Code.BAD_REQUEST),
    ("ports: none", spec(settings={"ports": []}), Code.BAD_REQUEST),
    ("allow: not a name", spec(settings={"allow": ["Laptop"]}), Code.BAD_REQUEST),
    ("env: LD_PRELOAD", spec(settings={"env": {"LD_PRELOAD": "/tmp/evil.so"}}),
     Code.FORBIDDEN),
    ("env: LD_LIBRARY_PATH", spec(settings={"env": {"LD_LIBRARY_PATH": "/tmp"}}),
     Code.FORBIDDEN),
    ("env: FAAS_*", spec(settings={"env": {"FAAS_CONTROL_SOCKET": "/x"}}), Code.FORBIDDEN),
    ("env: bad name", spec(settings={"env": {"A=B": "c"}}), Code.BAD_REQUEST),
    ("env: NUL in value", spec(settings={"env": {"A": "b\x00c"}}), Code.BAD_REQUEST),
    ("env: too many", spec(settings={"env": {f"V{i}": "x" for i in range(129)}}),
     Code.BAD_REQUEST),
    ("env: value too long", spec(settings={"env": {"A": "x" * 5000}}), Code.BAD_REQUEST),
    ("user, command, env, workdir: an image config", spec(config={
        "entrypoint": [], "cmd": ["/bin/sh"], "env": ["LD_PRELOAD=/x.so"], "workdir": "/",
        "user": "0", "os": "linux", "architecture": "amd64"}), Code.BAD_REQUEST),
    ("user alone", spec(user="0"), Code.BAD_REQUEST),
    ("command alone", spec(command=["/bin/sh"]), Code.BAD_REQUEST),
]


@pytest.mark.parametrize("what,bad,code", ROGUE, ids=[r[0] for r in ROGUE])
def test_rogue_sync_is_refused_with_nothing_changed(runner, what, bad, code):
    err = refused(runner, [spec(name="other", address="fd00:faa5:1::b"), {**bad,
                                                                          "name": "fib"}])
    assert err.code is code, err
    assert "evil" not in str(err) and "/tmp" not in str(err)  # no env value in the error


def test_two_functions_on_one_address_are_refused(runner):
    err = refused(runner, [spec(), spec(name="other")])
    assert err.code is Code.BAD_REQUEST


def test_refusal_is_logged_without_env_values(runner):
    refused(runner, [spec(settings={"env": {"LD_PRELOAD": "/tmp/s3cret.so"}})])
    lines = [json.loads(line) for line in runner.logtext.getvalue().splitlines()]
    refusals = [e for e in lines if e.get("event") == "sync_refused"]
    assert refusals and refusals[0]["code"] == "forbidden"
    assert "s3cret" not in runner.logtext.getvalue()


def test_a_sync_within_bounds_is_served_and_digested(runner):
    reply = sync(runner, [spec(settings={"memory": 1 << 30, "cpu": 2.0})])
    assert runner.fleet.converged[-1][0]["settings"]["memory"] == 1 << 30
    assert reply["digest"] == runner.digest == protocol.state_digest(
        "runner", {"images": [DIGEST], "functions": [spec(settings={"memory": 1 << 30,
                                                                    "cpu": 2.0})]})


def write_image(root, config):
    image = os.path.join(root, "images", DIGEST.removeprefix("sha256:"))
    os.makedirs(os.path.join(image, "rootfs"))
    with open(os.path.join(image, "config.json"), "w") as f:
        json.dump({"digest": DIGEST, "tags": [], "os": "linux", "architecture": "amd64",
                   **config}, f)


def test_container_runs_what_the_runners_own_record_of_the_image_says(runner, tmp_path):
    """User, command, env and workdir: the image's as the runner extracted it; the
    function's env on top."""
    write_image(str(tmp_path), {"entrypoint": ["/bin/app"], "cmd": ["--serve"],
                                "env": ["PATH=/bin", "LANG=C"], "workdir": "/srv",
                                "user": "1000:1000"})
    fleet = Fleet(str(tmp_path), str(tmp_path / "run"), runner.runtime, None,
                  runner.log, runner.store.config_of)
    container = fleet._factory(spec(), object())()
    config = container.make_config("fib-1", str(tmp_path / "run" / "c.sock"))
    process = config["process"]
    assert (process["user"]["uid"], process["user"]["gid"]) == (1000, 1000)
    assert process["args"] == ["/bin/app", "--serve"] and process["cwd"] == "/srv"
    assert "GREETING=hi" in process["env"] and "LANG=C" in process["env"]
    assert config["linux"]["resources"]["memory"]["limit"] == 512 << 20


def test_an_image_the_runner_has_not_extracted_starts_no_container(runner, tmp_path):
    fleet = Fleet(str(tmp_path), str(tmp_path / "run"), runner.runtime, None,
                  runner.log, runner.store.config_of)
    container = fleet._factory(spec(), object())()
    from runner.bundle import BundleError
    with pytest.raises(BundleError, match="not on this host"):
        container.make_config("fib-1", str(tmp_path / "run" / "c.sock"))


LAPTOP = {"name": "laptop", "address": "fd00:faa5:0:100::2"}


def sync_peers(runner, peers, generation=5):
    req = protocol.parse_request(protocol.make_request(
        "sync", {"generation": generation, "state": {"images": [DIGEST], "functions": [spec()],
                                                     "peers": peers}}, "p1"), "runner")
    return asyncio.run(runner.op_sync(req.args))


def test_the_runner_knows_each_peer_by_its_address(runner):
    sync_peers(runner, [LAPTOP, {"name": "ci", "address": "fd00:faa5:0:100::3"}])
    assert runner.callers.identify("fd00:faa5:0:100::2") == ("laptop", False)
    assert runner.callers.identify("fd00:faa5:0:100::3") == ("ci", False)
    assert runner.callers.identify("fd00:faa5:0:100::9") == (None, False)  # not a peer now
    assert runner.callers.identify("fd00:faa5:0:100::1") == (None, True)  # the server
    assert runner.callers.identify("::1") == (None, True)
    sync_peers(runner, [], 6)  # a peer removed is nobody at once
    assert runner.callers.identify("fd00:faa5:0:100::2") == (None, False)


ROGUE_PEERS = [
    ("outside vpn_prefix", [{"name": "laptop", "address": "::1"}], Code.FORBIDDEN),
    ("a function's address", [{"name": "laptop", "address": "fd00:faa5:1::a"}],
     Code.FORBIDDEN),
    ("the server's", [{"name": "laptop", "address": "fd00:faa5:0:100::1"}], Code.FORBIDDEN),
    ("the prefix itself", [{"name": "laptop", "address": "fd00:faa5:0:100::"}],
     Code.FORBIDDEN),
    ("address twice", [LAPTOP, {**LAPTOP, "name": "ci"}], Code.BAD_REQUEST),
    ("name twice", [LAPTOP, {**LAPTOP, "address": "fd00:faa5:0:100::3"}], Code.BAD_REQUEST),
    ("not a name", [{**LAPTOP, "name": "*"}], Code.BAD_REQUEST),
]


@pytest.mark.parametrize("what,peers,code", ROGUE_PEERS, ids=[r[0] for r in ROGUE_PEERS])
def test_rogue_peers_are_refused_with_nothing_changed(runner, what, peers, code):
    sync_peers(runner, [LAPTOP])
    before = (dict(runner.callers.names), len(runner.fleet.converged), runner.digest)
    with pytest.raises(FaasError) as info:
        sync_peers(runner, peers, 6)
    assert info.value.code is code
    assert (dict(runner.callers.names), len(runner.fleet.converged), runner.digest) == before
