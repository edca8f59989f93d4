"""The README's install path on a stock Debian 12 server: a QEMU guest with systemd as
PID 1, cgroup v2, AppArmor and the kernel WireGuard module (docs/guest.md).

The guest is built from Debian's packages and cached (guestimage.py), booted from a
throwaway overlay with no network (guestvm.py), and driven through its agent. In it,
as a user would: copy the checkout, ``sudo ./install.sh``; then each test checks one
promise, and the last reboots the guest and checks that everything comes back by itself.
QEMU or the image missing is a failure, never a skip. ``pytest -s`` shows the progress.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.guest.guestimage import checkout_disk, ensure_image
from tests.guest.guestvm import Guest
from tests.imagebuild import Dir, File, build_image
from tests.integration.harness import poll

HERE = Path(__file__).resolve().parent
HANDLER_C = HERE.parent / "integration" / "handlers" / "testhandler.c"
DNS = "fd00:faa5:0:100::1"  # the server's VPN address (vpn_prefix ::1), where named answers
MEMORY, MEMORY_BYTES, PIDS = "96M", 96 * 1024 * 1024, 37
T0 = time.monotonic()
ADDRESSES: dict[str, str] = {}  # each function's address after the install: kept forever


def say(what: str) -> None:
    print(f"[guest {time.monotonic() - T0:6.1f}s] {what}", flush=True)


# A WireGuard peer in a network namespace of the guest, joined to the guest's root
# namespace by a veth pair; its resolver is faasd's named over the tunnel. Idempotent:
# run again after the reboot, which took the namespace away.
PEER = f"""
set -e
ip netns list | grep -qw peer || ip netns add peer
if ! ip link show vpeer0 >/dev/null 2>&1; then
  ip link add vpeer0 type veth peer name vpeer1 netns peer
  ip addr add fdff:1::1/64 dev vpeer0 nodad
  ip link set vpeer0 up
  ip -n peer addr add fdff:1::2/64 dev vpeer1 nodad
  ip -n peer link set vpeer1 up
  ip -n peer link set lo up
fi
mkdir -p /etc/netns/peer
echo 'nameserver {DNS}' > /etc/netns/peer/resolv.conf
ip netns exec peer faasctl vpn connect /root/peer.conf
"""


def _handler_image(out: Path) -> Path:
    """The suite's static C test handler (``/get/PATH`` returns a file's contents)."""
    binary = out / "handler"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(HANDLER_C)], check=True)
    tar = out / "probe.tar"
    build_image(tar, [[Dir("tmp", mode=0o1777), File("handler", binary.read_bytes(),
                                                     mode=0o755)]],
                {"config": {"Cmd": ["/handler"]}})
    return tar


def _install(g: Guest, timeout: float = 1500) -> None:
    """``sudo ./install.sh`` in the background of the guest, its output shown as it comes
    (the agent answers only when a command ends), then its exit status checked."""
    g.sh("rm -f /root/install.rc /root/install.log")
    g.sh("(cd /root/faasd && sudo ./install.sh > /root/install.log 2>&1; "
         "echo $? > /root/install.rc) </dev/null >/dev/null 2>&1 &")
    shown = 0
    deadline = time.monotonic() + timeout
    while True:
        rc = g.run("cat /root/install.rc 2>/dev/null", 20)["stdout"].strip()
        new = g.sh(f"tail -c +{shown + 1} /root/install.log")
        shown += len(new.encode())
        for line in new.splitlines():
            line = re.sub(r"\x1b\[[0-9;]*m", "", line)
            if not re.match(r"(upload|verify|extract) ", line):  # faasctl new's progress
                say(f"  install.sh: {line}")
        if rc:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"install.sh still running after {timeout:.0f}s")
        time.sleep(2)  # poll interval for its output, not synchronisation
    assert rc == "0", f"install.sh exited {rc}; its output is above"


@pytest.fixture(scope="module")
def guest():
    """A booted guest with faasd installed by ``sudo ./install.sh``, the probe function
    deployed with its limits, and a VPN peer; killed and removed at the end."""
    say("guest image: checking the cache (building it takes ~3 min on 2 cores)")
    image = ensure_image(say)
    work = Path(tempfile.mkdtemp(prefix="faasd-guest-"))
    g = Guest(image, work / "src.img", work, say)
    try:
        say("data disk: the checkout (git ls-files) and the probe image")
        checkout_disk(work / "src.img", {"probe.tar": _handler_image(work)})
        say("booting (TCG: ~35 s)")
        say(f"the agent answered {g.start():.0f}s after QEMU started")
        t = time.monotonic()
        g.sh("mkdir -p /mnt/src && mount -o ro /dev/vdb /mnt/src && "
             "cp -a /mnt/src/faasd /root/faasd")
        say("running `sudo ./install.sh` in /root/faasd (the README's command)")
        _install(g)
        say(f"install.sh done in {time.monotonic() - t:.0f}s")
        say("deploying the probe function with memory and pids limits")
        g.sh(f"faasctl new probe -f /mnt/src/extra/probe.tar && "
             f"faasctl set probe memory={MEMORY} pids={PIDS}", timeout=300)
        say("adding a VPN peer in a network namespace")
        g.sh("grep -q '^vpn_endpoint' /etc/faasd/faasd.toml || "
             "echo 'vpn_endpoint = \"[fdff:1::1]:51820\"' >> /etc/faasd/faasd.toml; "
             "faasd ctl restart controller", timeout=120)
        poll("faasctl status after the controller's restart",
             lambda: g.run("faasctl status", 20)["rc"] == 0, 120, 1)
        g.sh("faasctl vpn add peer > /root/peer.conf && chmod 600 /root/peer.conf")
        g.sh(PEER, timeout=60)
        ADDRESSES.update({name: g.sh(f"faasctl ip {name}").strip()
                          for name in ("fibonacci", "probe")})
        yield g
    finally:
        say("the guest's console, last lines:\n" + g.console_tail(25))
        say("stopping QEMU, removing the overlay and temp files")
        g.stop()
        shutil.rmtree(work, ignore_errors=True)


def _call(g: Guest, name: str, path: str) -> str:
    """The body of GET PATH at the function's address, from the guest's root namespace."""
    address = g.sh(f"faasctl ip {name}").strip()
    return g.sh(f"curl -sS -f -m 20 'http://[{address}]{path}'", timeout=60)


def test_install_path_serves_the_example(guest):
    say("check: fibonacci answers at its address")
    assert "0, 1, 1, 2, 3, 5, 8, 13, 21, 34" in _call(guest, "fibonacci", "/?n=10")


def test_unified_cgroup_hierarchy(guest):
    say("check: /sys/fs/cgroup is cgroup2fs")
    assert guest.sh("stat -f -c %T /sys/fs/cgroup").strip() == "cgroup2fs"


def test_memory_and_pids_limits_seen_inside_the_container(guest):
    say(f"check: memory.max and pids.max inside the probe's container ({MEMORY}, {PIDS})")
    assert _call(guest, "probe", "/get/sys/fs/cgroup/memory.max").strip() == str(MEMORY_BYTES)
    assert _call(guest, "probe", "/get/sys/fs/cgroup/pids.max").strip() == str(PIDS)


def test_peer_reaches_fibonacci_by_name_over_kernel_wireguard(guest):
    say("check: the peer namespace curls http://fibonacci.faas/?n=10 over the tunnel")
    body = guest.sh("ip netns exec peer curl -sS -f -m 20 'http://fibonacci.faas/?n=10'",
                    timeout=60)
    assert "0, 1, 1, 2, 3, 5, 8, 13, 21, 34" in body
    say("check: wg0 is the kernel module's interface, no wireguard-go runs")
    assert "wireguard" in guest.sh("ip -d link show wg0").split("\n")[2]
    assert guest.run("pgrep -x wireguard-go")["rc"] == 1


def test_named_is_confined_by_apparmor(guest):
    say("check: named runs under its AppArmor profile")
    attr = guest.sh("cat /proc/$(pgrep -x named | head -1)/attr/current").strip()
    assert attr == "named (enforce)", attr


def test_crun_without_the_hybrid_host_workaround(guest):
    say("check: cgroup_mode() is unified and crun needs no private mount namespace")
    py = ("from runner.runtime import cgroup_mode, runtime_for; "
          "print(cgroup_mode(), runtime_for('crun').needs_private_mounts())")
    assert guest.sh(f"/opt/faasd/venv/bin/python -c {shlex.quote(py)}").split() == [
        "unified", "False"]
    say("check: with runtime = crun, the probe serves and crun lists its warm container")
    guest.sh("sed -i '/^runtime *=/d' /etc/faasd/faasd.toml && "
             "echo 'runtime = \"crun\"' >> /etc/faasd/faasd.toml && "
             "faasd ctl restart runner && faasctl set probe min_warm=1", timeout=120)
    poll("the probe answering under crun",
         lambda: _call(guest, "probe", "/get/sys/fs/cgroup/pids.max").strip() == str(PIDS),
         120, 1)
    listing = poll("a running crun container",
                   lambda: guest.run("crun --root /run/faasd/crun list")["stdout"]
                   .count("running"), 60, 1)
    assert listing >= 1


def test_status_is_healthy(guest):
    say("check: faasctl status is healthy")
    out = guest.sh("faasctl status")
    lines = [line.split() for line in out.splitlines()[1:] if line.strip()]
    assert {line[0] for line in lines} >= {"controller", "netagent", "dnsagent", "runner"}
    assert all(line[1] == "up" and line[-1] == "yes" for line in lines), out


def test_install_again_under_load_loses_no_request(guest):
    """An upgrade: `sudo ./install.sh` on the running platform (it runs `faasd reload`,
    every program restarted one at a time), while a client calls fibonacci all along."""
    address = ADDRESSES["fibonacci"]
    say("check: ./install.sh again (an upgrade) while a client calls fibonacci")
    guest.sh("rm -f /root/load.stop /root/load.txt; (while [ ! -e /root/load.stop ]; do "
             f"curl -s -m 60 -o /dev/null -w '%{{http_code}}\\n' 'http://[{address}]/?n=10' "
             ">> /root/load.txt; done) </dev/null >/dev/null 2>&1 & echo $! > /root/load.pid")
    poll("the load running", lambda: guest.sh("cat /root/load.txt 2>/dev/null").strip(),
         60, 1)
    t = time.monotonic()
    try:
        _install(guest)
    except AssertionError:
        say("the keeper's log, the runner's keeper lines, the kernel's table:\n" + guest.run(
            "tail -20 /var/lib/faasd/logs/keeper.log; grep keeper "
            "/var/lib/faasd/logs/runner.log | tail -20; grep keeper /proc/net/unix; "
            "faasd ctl status")["stdout"])
        raise
    took = time.monotonic() - t
    guest.sh("touch /root/load.stop; while kill -0 $(cat /root/load.pid) 2>/dev/null; do "
             "sleep 0.2; done", timeout=120)
    codes = guest.sh("cat /root/load.txt").split()
    say(f"upgrade: install.sh took {took:.0f}s; {len(codes)} requests during it, "
        f"{sum(c != '200' for c in codes)} failed")
    assert codes and all(c == "200" for c in codes), sorted(set(codes))
    assert "restarting it on the new code, one program at a time" in guest.sh(
        "cat /root/install.log")
    assert guest.run("faasctl status")["rc"] == 0


def test_systemctl_stop_takes_containers_and_the_interface_away(guest):
    """The containers live in /faasd/<id> cgroups outside faasd.service's: systemd's own
    killing would miss them, so the unit's stop must be faasd down's (docs/operations.md)."""
    procs = "cat /sys/fs/cgroup/faasd/*/cgroup.procs 2>/dev/null | wc -l"
    assert int(poll("a warm container's processes", lambda: int(guest.sh(procs)), 60, 1)) > 0
    say("check: systemctl stop faasd stops every container and removes wg0")
    guest.sh("systemctl stop faasd", timeout=180)
    assert guest.run("systemctl is-active faasd")["stdout"].strip() == "inactive"
    assert int(guest.sh(procs)) == 0
    assert guest.run("ip link show wg0")["rc"] != 0
    assert guest.run("pgrep -x named")["rc"] == 1


def test_reboot_brings_everything_back(guest):
    before = dict(ADDRESSES)
    assert set(before) == {"fibonacci", "probe"}
    say("rebooting the guest (systemctl reboot)")
    say(f"the guest's agent answered {guest.reboot():.0f}s after the reboot")
    assert guest.sh("systemctl is-enabled faasd").strip() == "enabled"
    poll("faasctl status after the reboot", lambda: guest.run("faasctl status", 20)["rc"] == 0,
         300, 1)
    say("check: every function at its old address")
    for name, address in before.items():
        assert guest.sh(f"faasctl ip {name}").strip() == address
    assert "0, 1, 1, 2, 3, 5, 8, 13, 21, 34" in poll(
        "fibonacci at its address", lambda: _call(guest, "fibonacci", "/?n=10"), 120, 1)
    assert poll("probe at its address",
                lambda: _call(guest, "probe", "/get/sys/fs/cgroup/pids.max"), 120, 1
                ).strip() == str(PIDS)
    say("check: and by name from the peer, over the tunnel")
    guest.sh(PEER, timeout=60)
    for name, path in (("fibonacci", "/?n=10"), ("probe", "/get/sys/fs/cgroup/pids.max")):
        assert poll(f"{name}.faas from the peer", lambda: guest.run(
            f"ip netns exec peer curl -sS -f -m 20 'http://{name}.faas{path}'", 60
        )["stdout"], 120, 1)
