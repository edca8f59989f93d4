"""Fault injection under load: kill, restart and sabotage every part, lose nothing.

Three functions (one-shot, a warm pool, reuse) take a bounded load from inside the
platform's namespace while each fault happens. For every fault the test asserts: no
deployment lost, every function answering within 3 s of the agent being back, nothing
orphaned (container, bundle, control socket, address, ip6tables rule). A kill -9 or a
restart of any one program (named included, under a load of DNS queries) fails no
request; the whole supervisord killed, and `faasd down`/`up`, cost what they cost, and
the failures fall inside the outage. The figures are printed at the end (pytest -s).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import BIN, poll, run

from tests.imagebuild import Dir, File, build_image

HERE = Path(__file__).parent
RECOVERY = 3.0  # seconds from the agent being back to every function answering
FIGURES: list[tuple[str, int, int, float, float, float]] = []
PROGRAMS = ["netagent", "dnsagent", "runner", "controller", "keeper"]
NAMESERVER = "fd00:faa5:0:100::1"


def get(platform, address: str, timeout: float = 2) -> int:
    out = run(*platform.netns.argv("curl", "-s", "-g", "-m", timeout, "-o", "/dev/null",
                                   "-w", "%{http_code}", f"http://[{address}]/"), check=False)
    return int(out.stdout or 0)


def functions(platform) -> dict[str, tuple[str, int]]:
    rows = json.loads(platform.faasctl("--json", "list").stdout)["functions"]
    return {f["name"]: (f["address"], f["version"]) for f in rows}


@pytest.fixture(scope="module")
def deployed(platform, image_tar) -> dict[str, str]:
    for name, settings in (("one", ()), ("pool", ("min_warm=1",)), ("keep", ("reuse=true",))):
        platform.faasctl("new", name, "-f", image_tar)
        if settings:
            platform.faasctl("set", name, *settings)
    addresses = {n: a for n, (a, _) in functions(platform).items()}
    poll("every function answering", lambda: all(get(platform, a) == 200
                                                  for a in addresses.values()), 20)
    return addresses


class Load:
    """A bounded load in the background (faultload.py in the namespace)."""

    def __init__(self, platform, addresses: dict[str, str], count: int = 240,
                 concurrency: int = 3):
        self.proc = subprocess.Popen(
            platform.netns.argv(sys.executable, HERE / "faultload.py", count, concurrency,
                                *addresses.values()),
            stdout=subprocess.PIPE, text=True)

    def result(self) -> dict:
        out, _ = self.proc.communicate(timeout=180)
        return json.loads(out)

    def stop(self) -> None:
        """On a failed test: the load must not outlive it in the namespace."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def orphans(platform, deployed) -> dict[str, object]:
    """What must be back to normal after every fault."""
    listed = run("runc", "--root", platform.run_dir / "runc", "list", "-q", check=False)
    containers = set(listed.stdout.split())
    addrs = run(*platform.netns.argv("ip", "-6", "-j", "addr", "show", "dev",
                                     platform.interface), check=False)
    local = {a["local"] for link in json.loads(addrs.stdout or "[]") for a in link["addr_info"]
             if a.get("scope") == "global"}
    rules = [line for line in run(*platform.netns.argv("ip6tables-save")).stdout.splitlines()
             if platform.interface in line]
    return {
        # every container is one the runner knows: a control socket and a bundle each
        "stray containers": sorted(c for c in containers
                                   if not (platform.run_dir / "ctl" / f"{c}.sock").exists()),
        "stray bundles": sorted(b for b in os.listdir(platform.root / "bundles")
                                if b not in containers),
        "stray sockets": sorted(s for s in os.listdir(platform.run_dir / "ctl")
                                if s.removesuffix(".sock") not in containers),
        "addresses": sorted(local),
        "rules": len(rules),
    }


def agent_back(platform, name: str, after: str | None) -> float:
    """Poll until ``name`` is up and synced with a boot id other than ``after``;
    return the moment."""
    def ready():
        rows = platform.status()
        row = rows.get(name) or {}
        return row.get("state") == "up" and row.get("synced") and row.get("boot_id") != after
    poll(f"{name} back and synced", ready, 20, interval=0.05)
    return time.monotonic()


def keeper_back(platform, connected: int) -> float:
    """The keeper is back when the runner has given it its whole set again."""
    poll("the runner connected to a new keeper", lambda: len(
        [e for e in platform.log_lines("keeper") if e.get("event") == "runner_connected"])
        > connected, 20, interval=0.05)
    return time.monotonic()


def program_pid(platform, program: str) -> int:
    return int(platform.ctl("pid", program).stdout.strip())


def check_fault(platform, deployed, label: str, inject, back, lossless: bool = True,
                targets: dict[str, str] | None = None, count: int = 240) -> None:
    """Run ``inject`` under load, wait for ``back`` (returns the moment the broken part
    is back), then assert recovery, no deployment lost, no orphans, and no failed request
    (``lossless``) or failures only inside the outage."""
    before = functions(platform)
    expected = orphans(platform, deployed)
    load = Load(platform, targets or deployed, count)
    try:
        started, wall_started = time.monotonic(), time.time()
        inject()
        back_at = back()
        wall_back = time.time()
        poll(f"every function answering after {label}", lambda: all(
            get(platform, a) == 200 for a in deployed.values()), RECOVERY + 10, interval=0.05)
        recovered = time.monotonic() - back_at
        result = load.result()
    finally:
        load.stop()
    FIGURES.append((label, result["sent"], result["failed"], result["slowest"],
                    back_at - started, recovered))
    print(f"{label}: outage {back_at - started:.2f}s, recovery {recovered:.2f}s, "
          f"{result['failed']}/{result['sent']} failed, slowest {result['slowest']}s")
    assert recovered <= RECOVERY, f"{label}: {recovered:.2f}s to recover"
    assert functions(platform) == before, "a deployment changed"
    assert result["ok"] + result["failed"] == result["sent"]
    if lossless:
        assert result["failed"] == 0, f"{label}: {result['failures'][:5]}"
    # Failures only while the part was away: a request that began after the fault and
    # ended by the time every function answered again (bounded by the outage, not luck).
    late = [f for f in result["failures"]
            if f[1] < wall_started or f[0] > wall_back + recovered + 0.1]
    assert not late, f"{label}: requests failed outside the outage: {late[:5]}"
    poll(f"nothing orphaned after {label}",
         lambda: orphans(platform, deployed) == expected or None, 15)


def back_of(platform, program: str):
    """How to tell ``program`` is back, read before the fault."""
    if program == "keeper":
        connected = len([e for e in platform.log_lines("keeper")
                         if e.get("event") == "runner_connected"])
        return lambda: keeper_back(platform, connected)
    boot = platform.status()[program]["boot_id"]
    return lambda: agent_back(platform, program, boot)


@pytest.mark.parametrize("agent", PROGRAMS)
def test_kill_9(platform, deployed, agent):
    check_fault(platform, deployed, f"kill -9 {agent}",
                lambda: os.kill(program_pid(platform, agent), signal.SIGKILL),
                back_of(platform, agent))


@pytest.mark.parametrize("agent", PROGRAMS)
def test_supervisorctl_restart(platform, deployed, agent):
    check_fault(platform, deployed, f"restart {agent}",
                lambda: platform.ctl("restart", agent), back_of(platform, agent))


def test_kill_9_named_under_dns_load(platform, deployed):
    """Queries retried as a stub resolver retries them all get their answer."""
    targets = {**deployed, "dns": f"dns:one.faas@{NAMESERVER}"}

    def back():
        poll("named answering", lambda: dig(platform, "one.faas") == deployed["one"], 10,
             interval=0.05)
        return time.monotonic()
    check_fault(platform, deployed, "kill -9 named",
                lambda: os.kill(program_pid(platform, "dns"), signal.SIGKILL), back,
                targets=targets)


def test_whole_supervisord_killed(platform, deployed):
    """supervisord dies (kill -9): its programs stop with it (parent-death signal),
    nothing is left holding a lock or port 53, and `faasd up` brings everything back."""
    def inject():
        os.kill(int((platform.run_dir / "supervisord.pid").read_text()), signal.SIGKILL)
        platform.proc.wait(timeout=10)
        poll("every program gone", lambda: not run("pgrep", "-f", str(platform.run_dir),
                                                   check=False).stdout.strip(), 40)
        platform.start()

    def back():
        platform.wait_healthy(30)
        return time.monotonic()
    check_fault(platform, deployed, "supervisord killed", inject, back, lossless=False)


def test_faasd_reload_restarts_everything_and_loses_nothing(platform, deployed):
    """What install.sh runs on a running host (an upgrade): every program restarted, one
    at a time, under load."""
    boots = {name: row["boot_id"] for name, row in platform.status().items()}
    keeper = program_pid(platform, "keeper")

    def inject():
        out = run(*platform.netns.argv(BIN / "faasd", "reload"), env=platform.env,
                  timeout=300)
        assert "runner restarted on the new code" in out.stdout, out.stdout

    def back():
        return time.monotonic()
    check_fault(platform, deployed, "faasd reload", inject, back, count=720)
    assert all(platform.status()[name]["boot_id"] != boot for name, boot in boots.items())
    assert program_pid(platform, "keeper") != keeper


def test_faasd_down_and_up(platform, deployed):
    def inject():
        platform.stop()
        platform.start()

    def back():
        platform.wait_healthy(30)
        return time.monotonic()
    check_fault(platform, deployed, "faasd down/up", inject, back, lossless=False)


def dig(platform, name: str) -> str:
    return run(*platform.netns.argv("dig", "+short", "+time=1", "+tries=1", "AAAA", name,
                                    "@fd00:faa5:0:100::1"), check=False).stdout.strip()


def test_dns_server_stop_and_start(platform, deployed):
    def inject():
        platform.ctl("stop", "dns")
        assert deployed["one"] not in dig(platform, "one.faas")
        platform.ctl("start", "dns")

    def back():
        poll("named answering", lambda: dig(platform, "one.faas") == deployed["one"], 10,
             interval=0.05)
        return time.monotonic()
    check_fault(platform, deployed, "dns stop/start", inject, back)


def test_addresses_deleted_behind_netagents_back(platform, deployed):
    def inject():
        for address in deployed.values():
            run(*platform.netns.argv("ip", "-6", "addr", "del", f"{address}/128", "dev",
                                     platform.interface))

    def back():
        return time.monotonic()  # netagent never went away: recovery counts from now
    check_fault(platform, deployed, "addresses deleted", inject, back)


def test_zone_file_corrupted_by_hand(platform, deployed):
    zone = platform.root / "dns" / "faas.db"

    def inject():
        zone.write_text("this is not a zone $INCLUDE /etc/shadow\n")

    def back():
        t0 = time.monotonic()
        poll("the zone rewritten and served", lambda: dig(platform, "pool.faas") ==
             deployed["pool"] and "pool IN AAAA" in zone.read_text(), RECOVERY, interval=0.05)
        print(f"zone repaired and answering {time.monotonic() - t0:.2f}s after the damage")
        return time.monotonic()
    check_fault(platform, deployed, "zone corrupted", inject, back)


def test_spool_full_during_upload(platform, deployed, tmp_path, handler_binary):
    big = tmp_path / "big.tar"
    build_image(big, [[Dir("tmp", mode=0o1777), File("handler", handler_binary, mode=0o755),
                       File("ballast", os.urandom(3 << 20))]], {"config": {"Cmd": ["/handler"]}})
    spool = platform.root / "spool"
    st = spool.stat()
    run("mount", "-t", "tmpfs", "-o", f"size=1m,mode=0700,uid={st.st_uid},gid={st.st_gid}",
        "faas-spool-test", spool)
    try:
        def inject():
            out = platform.faasctl("new", "toobig", "-f", big, check=False)
            assert out.returncode != 0 and "spool" in out.stderr, out.stderr
            assert os.listdir(spool) == [], "a partial upload was left in the spool"

        check_fault(platform, deployed, "spool full", inject, time.monotonic)
        assert "toobig" not in functions(platform)
    finally:
        run("umount", spool)
    platform.faasctl("new", "small", "-f", big)  # the same image deploys once there is room
    assert "small" in functions(platform)
    platform.faasctl("rm", "small")


def test_print_figures():
    """The summary: requests sent, failed, recovery per fault."""
    print("\nfault                     sent  failed  slowest  outage  recovery")
    for label, sent, failed, slowest, outage, recovered in FIGURES:
        print(f"{label:24} {sent:5}  {failed:6}  {slowest:6.2f}s  {outage:5.2f}s  "
              f"{recovered:7.2f}s")
    assert len(FIGURES) == 18
