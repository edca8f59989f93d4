"""Function logs: one JSON line per output line with its request id, rotated by size."""

from __future__ import annotations

import json
import os

from runner import fnlogs
from runner.fnlogs import FunctionLogs


def test_lines_carry_the_request_and_rotation_caps_the_size(tmp_path, monkeypatch):
    monkeypatch.setattr(fnlogs, "MAX_BYTES", 2000)
    logs = FunctionLogs(str(tmp_path / "functions"), os.getgid())
    for i in range(200):
        logs.write("fib", "fib-abc", "stderr", f"r{i}", [f"line {i}"])
    names = sorted(os.listdir(tmp_path / "functions"))
    assert names[0] == "fib.log" and len(names) == fnlogs.KEEP + 1  # fib.log, .1 .. .KEEP
    sizes = [os.path.getsize(tmp_path / "functions" / n) for n in names]
    assert max(sizes) < 2000 + 200  # each file ends at the first line past the cap
    last = json.loads((tmp_path / "functions" / "fib.log").read_text().splitlines()[-1])
    assert (last["rid"], last["line"], last["stream"]) == ("r199", "line 199", "stderr")


def test_a_runaway_line_is_cut(tmp_path):
    logs = FunctionLogs(str(tmp_path / "functions"), os.getgid())
    logs.write("fib", "c", "stdout", None, ["x" * (fnlogs.MAX_LINE * 3)])
    entry = json.loads((tmp_path / "functions" / "fib.log").read_text())
    assert len(entry["line"]) == fnlogs.MAX_LINE and entry["rid"] is None


def test_a_file_that_cannot_be_written_drops_the_lines_and_counts_them(tmp_path, monkeypatch):
    logs = FunctionLogs(str(tmp_path / "functions"), os.getgid())

    def full(function):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(logs, "_open", full)
    logs.write("fib", "c", "stderr", "r1", ["a", "b"])  # does not raise
    assert logs.dropped == 2


def test_remove_deletes_the_log_and_every_rotated_file(tmp_path, monkeypatch):
    monkeypatch.setattr(fnlogs, "MAX_BYTES", 500)
    directory = tmp_path / "functions"
    logs = FunctionLogs(str(directory), os.getgid())
    for i in range(60):
        logs.write("fib", "c", "stdout", None, [f"secret {i}"])
        logs.write("other", "c", "stdout", None, [f"kept {i}"])
    assert "fib.log.2" in os.listdir(directory)
    assert logs.remove("fib") == fnlogs.KEEP + 1
    assert sorted(os.listdir(directory)) == sorted(
        ["other.log"] + [f"other.log.{i}" for i in range(1, fnlogs.KEEP + 1)])
    logs.write("fib", "c2", "stdout", None, ["new"])  # a new function of the same name
    assert [json.loads(line)["line"] for line in
            (directory / "fib.log").read_text().splitlines()] == ["new"]


def test_prune_deletes_the_logs_of_functions_no_longer_served(tmp_path):
    directory = tmp_path / "functions"
    logs = FunctionLogs(str(directory), os.getgid())
    for name in ("gone", "kept"):
        logs.write(name, "c", "stdout", None, ["x"])
    (directory / "gone.log.1").write_text("{}\n")
    assert logs.prune({"kept"}) == ["gone"]
    assert os.listdir(directory) == ["kept.log"]
    assert logs.prune({"kept"}) == []
