"""Fault injection under load: kill, restart and sabotage every part, lose nothing.

Three functions (one-shot, a warm pool, reuse) take a bounded load from inside the
platform's namespace while each fault happens. For every fault the test asserts: no
deployment lost, every function answering within 3 s of the agent being back, nothing
orphaned (container, bundle, control socket, address, ip6tables rule), and the failed
requests counted and bounded. The figures are printed at the end (pytest -s).
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
from harness import poll, run

from tests.imagebuild import Dir, File, build_image

HERE = Path(__file__).parent
RECOVERY = 3.0  # seconds from the agent being back to every function answering
FIGURES: list[tuple[str, int, int, float]] = []


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


def check_fault(platform, deployed, label: str, inject, back) -> None:
    """Run ``inject`` under load, wait for ``back`` (returns the moment the broken part
    is back), then assert recovery, no loss, no orphans, bounded failures."""
    before = functions(platform)
    expected = orphans(platform, deployed)
    load = Load(platform, deployed)
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
    FIGURES.append((label, result["sent"], result["failed"], recovered))
    print(f"{label}: outage {back_at - started:.2f}s, recovery {recovered:.2f}s, "
          f"{result['failed']}/{result['sent']} failed")
    assert recovered <= RECOVERY, f"{label}: {recovered:.2f}s to recover"
    assert functions(platform) == before, "a deployment changed"
    assert result["ok"] + result["failed"] == result["sent"]
    # Failures only while the part was away: a request that began after the fault and
    # ended by the time every function answered again (bounded by the outage, not luck).
    late = [f for f in result["failures"]
            if f[1] < wall_started or f[0] > wall_back + recovered + 0.1]
    assert not late, f"{label}: requests failed outside the outage: {late[:5]}"
    poll(f"nothing orphaned after {label}",
         lambda: orphans(platform, deployed) == expected or None, 15)


@pytest.mark.parametrize("agent", ["netagent", "dnsagent", "runner", "controller"])
def test_kill_9(platform, deployed, agent):
    boot = platform.status()[agent]["boot_id"]
    check_fault(platform, deployed, f"kill -9 {agent}",
                lambda: os.kill(platform.status()[agent]["pid"], signal.SIGKILL),
                lambda: agent_back(platform, agent, boot))


@pytest.mark.parametrize("agent", ["netagent", "dnsagent", "runner", "controller"])
def test_supervisorctl_restart(platform, deployed, agent):
    boot = platform.status()[agent]["boot_id"]
    check_fault(platform, deployed, f"restart {agent}",
                lambda: platform.ctl("restart", agent),
                lambda: agent_back(platform, agent, boot))


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
    print("\nfault                     sent  failed  recovery")
    for label, sent, failed, recovered in FIGURES:
        print(f"{label:24} {sent:5}  {failed:6}  {recovered:7.2f}s")
    assert len(FIGURES) == 12
