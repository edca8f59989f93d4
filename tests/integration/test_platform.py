"""The whole process tree under real supervisord, in a namespace of its own: it comes up
healthy, heals from restarts and kill -9 of any process, refuses second instances,
and lets only the right users in."""

from __future__ import annotations

import grp
import os
import pwd
import signal
import stat
import subprocess
import time

import psutil
import pytest
import zmq
from harness import AGENTS, BIN, PROCESSES, poll

from common import protocol
from common.errors import EXIT_STATUS, Code

HEAL_SECONDS = 3.0


def faas_ids() -> tuple[int, int]:
    return pwd.getpwnam("faas").pw_uid, grp.getgrnam("faas").gr_gid


def test_status_shows_every_process_up(platform):
    rows = platform.wait_healthy()
    assert set(rows) == set(PROCESSES)
    for name, row in rows.items():
        proc = psutil.Process(row["pid"])
        assert f"faas-{name}" in " ".join(proc.cmdline())
        assert row["rss"] > 0 and len(row["boot_id"]) == 16
    # the unprivileged ones really are unprivileged
    uid, _ = faas_ids()
    assert psutil.Process(rows["controller"]["pid"]).uids().effective == uid
    assert psutil.Process(rows["dnsagent"]["pid"]).uids().effective == uid
    assert psutil.Process(rows["netagent"]["pid"]).uids().effective == 0
    table = platform.faasctl("status").stdout
    assert table.splitlines()[0].split()[:2] == ["PROCESS", "STATE"]
    assert all(name in table for name in PROCESSES)


def heal_figures(platform, name: str, old: dict) -> tuple[dict, float]:
    """Wait for ``name`` to be back with a new boot id and synced; return its row and the
    seconds from its new process starting to the controller's sync of it."""
    def back():
        row = platform.status()[name]
        return row if row["boot_id"] != old["boot_id"] and row["synced"] else None
    row = poll(f"{name} back and synced", back, timeout=15)
    started = psutil.Process(row["pid"]).create_time()
    return row, row["last_sync"] - started


@pytest.mark.parametrize("agent", AGENTS)
def test_supervisorctl_restart_resyncs(platform, agent):
    old = platform.wait_healthy()[agent]
    t0 = time.monotonic()
    platform.ctl("restart", agent)
    row, sync_after_start = heal_figures(platform, agent, old)
    total = time.monotonic() - t0
    print(f"restart {agent}: synced {sync_after_start:.2f}s after its start, {total:.2f}s in all")
    assert row["pid"] != old["pid"] and row["restarts"] == old["restarts"] + 1
    assert sync_after_start < HEAL_SECONDS


@pytest.mark.parametrize("agent", AGENTS)
def test_kill_9_resyncs(platform, agent):
    old = platform.wait_healthy()[agent]
    t0 = time.time()
    os.kill(old["pid"], signal.SIGKILL)
    row, sync_after_start = heal_figures(platform, agent, old)
    print(f"kill -9 {agent}: synced {row['last_sync'] - t0:.2f}s after the kill")
    assert row["last_sync"] - t0 < HEAL_SECONDS
    assert sync_after_start < HEAL_SECONDS


@pytest.mark.parametrize("how", ["restart", "kill"])
def test_controller_comes_back_and_resyncs_everyone(platform, how):
    old = platform.wait_healthy()
    t0 = time.time()
    if how == "kill":
        os.kill(old["controller"]["pid"], signal.SIGKILL)
    else:
        platform.ctl("restart", "controller")
    rows = poll("a new controller with every agent synced",
                lambda: (r := platform.healthy()) and
                r["controller"]["boot_id"] != old["controller"]["boot_id"] and r, timeout=15)
    print(f"{how} controller: all synced {time.time() - t0:.2f}s later")
    assert time.time() - t0 < HEAL_SECONDS + (2 if how == "restart" else 0)
    for agent in AGENTS:  # the agents themselves did not restart
        assert rows[agent]["boot_id"] == old[agent]["boot_id"]
        assert rows[agent]["last_sync"] > t0


@pytest.mark.parametrize("program", PROCESSES)
def test_second_instance_refuses_to_start(platform, program):
    old = platform.wait_healthy()[program]
    proc = platform.daemon(program, as_faas=program in ("controller", "dnsagent"))
    assert proc.returncode == 75, proc.stderr
    assert "another instance" in proc.stderr and str(old["pid"]) in proc.stderr
    row = platform.wait_healthy()[program]
    assert (row["pid"], row["boot_id"]) == (old["pid"], old["boot_id"])


def test_socket_owners_and_modes(platform):
    platform.wait_healthy()
    uid, gid = faas_ids()
    run_dir = platform.run_dir
    st = os.stat(run_dir)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, gid, 0o1770)
    expected = {"controller": (uid, gid, 0o660), "netagent": (uid, gid, 0o600),
                "runner": (uid, gid, 0o600), "dnsagent": (uid, gid, 0o600)}
    for name, want in expected.items():
        st = os.stat(run_dir / f"{name}.sock")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == want, name
    st = os.stat(run_dir / "supervisord.sock")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)


def test_user_outside_the_group_cannot_connect(platform):
    platform.wait_healthy()
    out = platform.faasctl("status", as_user=(65534, 65534, []), check=False)
    assert out.returncode == EXIT_STATUS[Code.FORBIDDEN]
    assert "faas group" in out.stderr


def test_operator_in_the_group_can_but_not_to_agents(platform):
    platform.wait_healthy()
    _, gid = faas_ids()
    out = platform.faasctl("status", as_user=(65534, 65534, [gid]), check=False)
    assert out.returncode == 0 and "controller" in out.stdout
    probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
             "try:\n s.connect(sys.argv[1])\nexcept PermissionError:\n sys.exit(13)\n")
    for agent in AGENTS:
        res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", f"--groups={gid}",
                              BIN / "python", "-c", probe, platform.run_dir / f"{agent}.sock"],
                             capture_output=True, timeout=30)
        assert res.returncode == 13, (agent, res.stderr)


def raw_request(path, frames: list[bytes]) -> protocol.Reply:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(f"ipc://{path}")
    try:
        sock.send_multipart(frames)
        return protocol.parse_reply(sock.recv_multipart()[-1])
    finally:
        sock.close(0)
        ctx.term()


@pytest.mark.parametrize("service", PROCESSES)
def test_running_daemons_refuse_bad_requests_and_stay_up(platform, service):
    old = platform.wait_healthy()[service]
    path = platform.run_dir / f"{service}.sock"
    bad = [
        ([b"\xc1\xc1"], Code.BAD_REQUEST),
        ([protocol.pack({"v": 1, "id": "t1", "op": "run_ip", "args": {"argv": ["ip"]}})],
         Code.BAD_REQUEST),
        ([protocol.pack({"v": 3, "id": "t2", "op": "ping", "args": {}})], Code.VERSION_MISMATCH),
        ([b"\x00" * (protocol.MAX_FRAME + 1)], Code.TOO_LARGE),
    ]
    for frames, code in bad:
        reply = raw_request(path, frames)
        assert not reply.ok and reply.error.code is code
    ok = raw_request(path, [protocol.make_request("ping", {}, "t3")])
    assert ok.ok and ok.result["boot_id"] == old["boot_id"] and ok.result["pid"] == old["pid"]


def test_logs_are_json_lines_with_request_ids_across_processes(platform):
    platform.wait_healthy()
    for program in PROCESSES:
        lines = platform.log_lines(program)  # every line parses as JSON
        assert lines and all(line["proc"] == program for line in lines)
    synced = [line for line in platform.log_lines("runner") if line["event"] == "synced"]
    assert synced and "." in synced[-1]["rid"]
    parent = synced[-1]["rid"].split(".")[0]
    controller = [line for line in platform.log_lines("controller")
                  if line.get("rid") == parent and line["event"] == "agent_synced"]
    assert controller and controller[-1]["agent"] == "runner"
