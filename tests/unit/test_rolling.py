"""faasd reload's order and its reading of supervisorctl and /proc/net/unix
(cli/rolling.py); the live run under load is in tests/integration/test_faults.py."""

from __future__ import annotations

import subprocess

from cli import rolling
from common.settings import load


def settings(tmp_path):
    return load({"FAAS_ROOT": str(tmp_path / "root"), "FAAS_RUN": str(tmp_path / "run"),
                 "FAAS_CONFIG": "/dev/null"})


class FakeCtl:
    def __init__(self, reread: str, programs: list[str]):
        self.reread, self.programs, self.calls = reread, programs, []

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        self.calls.append(args)
        if args == ("reread",):
            out = self.reread
        elif args == ("status",):
            out = "".join(f"{p}  RUNNING   pid 1, uptime 0:00:01\n" for p in self.programs)
        elif args[0] == "status":
            out = f"{args[1]}  RUNNING   pid 2, uptime 0:00:01\n"
        else:
            out = f"{args[-1]}: started\n"
        return subprocess.CompletedProcess(args, 0, out, "")


def test_reread_changes_are_read_by_program():
    out = "keeper: available\nrunner: changed\nold: disappeared\nNo config updates\n"
    assert rolling.reread_changes(out) == {"keeper": "available", "runner": "changed",
                                           "old": "disappeared"}


def test_the_keeper_goes_first_and_the_runner_last(tmp_path, monkeypatch):
    monkeypatch.setattr(rolling, "keeper_has_runner", lambda path: True)
    ctl = FakeCtl("keeper: available\nrunner: changed\nold: disappeared\n",
                  ["controller", "dns", "dnsagent", "netagent", "old", "runner"])
    assert rolling.reload(settings(tmp_path), ctl, lambda: True, say=lambda m: None) == 0
    cycled = [c for c in ctl.calls if c[0] in ("update", "restart")]
    assert cycled == [("update", "keeper"), ("restart", "netagent"), ("restart", "dnsagent"),
                      ("restart", "dns"), ("restart", "controller"), ("update", "runner")]
    assert ("remove", "old") in ctl.calls


def test_an_agent_that_never_gets_healthy_stops_the_reload(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rolling, "BACK_TIMEOUT", 0.2)
    monkeypatch.setattr(rolling, "keeper_has_runner", lambda path: True)
    ctl = FakeCtl("", ["keeper", "netagent", "runner"])
    assert rolling.reload(settings(tmp_path), ctl, lambda: False, say=lambda m: None) == 1
    assert ("restart", "runner") not in ctl.calls  # the rest were left as they were
    assert "faasctl status healthy did not happen" in capsys.readouterr().err


def test_a_connected_keeper_socket_is_found_in_the_kernels_table(tmp_path):
    table = tmp_path / "unix"
    table.write_text(
        "Num       RefCount Protocol Flags    Type St Inode Path\n"
        "0000: 00000002 00000000 00010000 0005 01 100 /run/faasd/keeper/keeper.sock\n"
        "0000: 00000003 00000000 00000000 0005 03 101 /run/faasd/keeper/keeper.sock\n")
    assert rolling.keeper_has_runner("/run/faasd/keeper/keeper.sock", str(table))
    table.write_text(table.read_text().splitlines()[0] + "\n"
                     "0000: 00000002 00000000 00010000 0005 01 100 /run/faasd/keeper/keeper.sock\n")
    assert not rolling.keeper_has_runner("/run/faasd/keeper/keeper.sock", str(table))
