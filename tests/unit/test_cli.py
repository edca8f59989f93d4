"""faasctl's commands, help and exit statuses come from the protocol table."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from cli.main import build_parser
from cli.render import render_status, verdict
from common import protocol
from common.errors import EXIT_STATUS, Code

BIN = Path(sys.executable).parent


def _help(*path: str) -> str:
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = sub.choices[name]
    return " ".join(parser.format_help().split())


def test_every_cli_op_is_a_command_with_its_doc_as_help():
    for op in protocol.OPS["controller"].values():
        if op.cli:
            help_text = _help(*([op.group] if op.group else []))
            assert op.command in help_text
            assert " ".join(op.doc.split())[:40] in help_text


def test_status_help_comes_from_the_table():
    out = subprocess.run([BIN / "faasctl", "status", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert protocol.STATUS.doc.split(":")[0] in " ".join(out.stdout.split())


ROW = {"name": "runner", "state": "up", "pid": 7, "boot_id": "0123456789abcdef",
       "uptime": 3725.0, "rss": 3 << 20, "last_seen": None, "synced": True, "error": None}


def test_status_table_and_verdict():
    out = io.StringIO()
    result = {"processes": [ROW, {**ROW, "name": "dnsagent", "state": "down",
                                  "error": "no answer"}]}
    render_status(result, out)
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:3] == ["PROCESS", "STATE", "PID"]
    assert "0123456789ab" in lines[1] and "1h02m" in lines[1] and "3.0MiB" in lines[1]
    assert lines[-1] == "dnsagent: no answer"
    assert verdict("status", result) == EXIT_STATUS[Code.UNAVAILABLE]
    assert verdict("status", {"processes": [ROW]}) == 0


def test_unreachable_controller_exit_status(tmp_path):
    env = {"FAAS_CONFIG": "/dev/null", "FAAS_RUN": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([BIN / "faasctl", "status"], env=env, capture_output=True, text=True)
    assert out.returncode == EXIT_STATUS[Code.UNAVAILABLE]
    assert "is faasd running" in out.stderr


class FakeStream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_on_a_terminal_redraws_one_line_per_phase():
    from cli.upload import ProgressLine
    out = FakeStream(tty=True)
    p = ProgressLine(out)
    p.update("upload", 1 << 20, 4 << 20)
    p.update("extract", 2 << 20, 4 << 20)
    p.close()
    text = out.getvalue()
    assert text.startswith("\rupload   1.0 MiB / 4.0 MiB") and "\n\rextract  2.0 MiB" in text
    assert text.endswith("\n") and "MiB/s" in text


def test_progress_elsewhere_is_plain_lines_per_tenth():
    from cli.upload import ProgressLine
    out = FakeStream(tty=False)
    p = ProgressLine(out)
    for done in range(0, 101):
        p.update("upload", done, 100)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 11 and "\r" not in out.getvalue()
    assert lines[0].startswith("upload") and "/ " in lines[0]


def test_new_refuses_a_terminal_as_image(monkeypatch):
    from cli.upload import source
    from common.errors import FaasError
    monkeypatch.setattr("sys.stdin", FakeStream(tty=True))
    try:
        source(None)
    except FaasError as exc:
        assert exc.code is Code.BAD_REQUEST and "docker save" in exc.message
    else:
        raise AssertionError("a terminal was accepted as an image")


def test_vpn_client_commands_go_to_the_client_without_a_controller(monkeypatch):
    from cli import main as cli_main
    from cli import vpnclient
    seen = []
    monkeypatch.setattr(vpnclient, "main", lambda argv: seen.append(argv) or 0)
    try:
        cli_main.main(["vpn", "connect", "laptop.conf", "--interface", "wgx"])
    except SystemExit as exc:
        assert exc.code == 0
    assert seen == [["connect", "laptop.conf", "--interface", "wgx"]]



def test_top_frame_rates_and_percentiles():
    import io

    from cli.top import frame, quantile
    buckets = [0.01, 0.1, 1.0]
    assert quantile(0.5, buckets, [0, 0, 0, 0]) is None
    assert quantile(0.5, buckets, [1, 3, 0, 0]) == 0.1
    assert quantile(0.99, buckets, [1, 3, 0, 1]) == float("inf")
    fn = {"name": "fib", "idle": 1, "busy": 0, "starting": 0, "waiting": 0, "served": 10,
          "cold": 10, "warm": 0, "reused": 0, "rejected": 0, "failed": 0, "timeouts": 0,
          "latency_counts": [0, 10, 0, 0]}
    before = {"agents": [], "runner": {"buckets": buckets, "functions": [fn]}}
    now = {"agents": [{"name": "runner", "state": "up", "synced": True}],
           "runner": {"buckets": buckets, "functions": [
               {**fn, "served": 30, "latency_counts": [20, 10, 0, 0]}]}}
    out = io.StringIO()
    frame(now, before, 2.0, out)
    row = out.getvalue().splitlines()[-1].split()
    assert row[:4] == ["fib", "10.0", "<10ms", "<10ms"]  # 20 new requests in 2 s, all fast


def test_qr_code_of_a_config_prints_on_a_terminal():
    import io

    from cli.main import print_qr
    out = io.StringIO()
    print_qr("[Interface]\nAddress = fd00:faa5:0:100::2/128\n", out)
    lines = out.getvalue().splitlines()
    assert len(lines) > 10 and len({len(line) for line in lines if line.strip()}) == 1


HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x1b[31mERROR\x1b[0m\rfake\x9b1m\ttab"
LOG_LINE = {"ts": 1700000000.0, "container": "c", "stream": "stdout", "rid": "r1",
            "line": HOSTILE}


def test_a_log_line_escapes_terminal_controls_on_a_terminal_only():
    from cli.render import render_log_line
    shown = render_log_line(LOG_LINE, terminal=True)
    assert not any(ord(c) < 0x20 and c != "\t" or 0x7f <= ord(c) < 0xa0 for c in shown)
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\x1b[31mERROR" in shown
    assert "\\x0dfake\\x9b1m\ttab" in shown
    assert render_log_line(LOG_LINE, terminal=False).endswith(HOSTILE)


def _faasctl_logs_against(tmp_path, *args: str, terminal: bool) -> bytes:
    """What a real faasctl logs prints (on a pseudo-terminal or a pipe) when the
    controller answers one line that a function wrote full of escape sequences."""
    import asyncio
    import os
    import pty

    from common.log import EventLog
    from common.rpc import Access, Server

    async def logs(req):
        return {"lines": [LOG_LINE] if req["offset"] == 0 else [], "offset": 1}

    async def other(req):
        raise AssertionError("only logs is called")

    async def main() -> bytes:
        handlers = {name: other for name in protocol.OPS["controller"]}
        handlers["logs"] = logs
        server = Server("controller", handlers, str(tmp_path),
                        EventLog("controller", stream=io.StringIO()), Access(0o600))
        server.bind()
        stop = asyncio.Event()
        task = asyncio.ensure_future(server.serve(stop))
        (tmp_path / "empty.toml").write_text("")
        env = {**os.environ, "FAAS_RUN": str(tmp_path),
               "FAAS_CONFIG": str(tmp_path / "empty.toml")}
        master, slave = pty.openpty() if terminal else os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                BIN / "faasctl", *args, "logs", "fn", stdout=slave, env=env)
            os.close(slave)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            out = b""
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: a pty whose other side is closed
                    break
                if not chunk:
                    break
                out += chunk
            return out
        finally:
            os.close(master)
            stop.set()
            await task
            server.close()
    return asyncio.run(main())


def test_faasctl_logs_escapes_on_a_terminal_keeps_json_and_pipes_raw(tmp_path):
    import json
    shown = _faasctl_logs_against(tmp_path, terminal=True).decode()
    assert "\x1b" not in shown and "\x07" not in shown and "\x9b" not in shown
    assert "\\x1b]0;pwned\\x07" in shown and "ERROR" in shown
    as_json = _faasctl_logs_against(tmp_path, "--json", terminal=True).decode()
    assert json.loads(as_json)["line"] == HOSTILE  # JSON escapes them its own way
    piped = _faasctl_logs_against(tmp_path, terminal=False).decode()
    assert piped.rstrip("\n").endswith(HOSTILE)


def test_an_images_command_is_shown_with_its_controls_escaped():
    """The command comes from the image's config, written by the image's author: in
    list, info and versions it must not retitle or clear the operator's terminal."""
    from cli.render import render_info, render_list
    hostile = ["/app", "\x1b]0;pwned\x07\x1b[2J\r\x9b31m"]
    version = {"version": 1, "digest": "sha256:" + "a" * 64, "size": 1, "created": 0.0,
               "command": hostile, "current": True}
    out = io.StringIO()
    render_list({"functions": [{"name": "f", "address": "fd00::a", "version": 1,
                                "digest": version["digest"], "command": hostile}]}, out)
    render_info({"name": "f", "address": "fd00::a", "version": 1, "digest": version["digest"],
                 "command": hostile, "settings": {"memory": 1, "env": {}},
                 "versions": [version]}, out)
    text = out.getvalue()
    assert not any(c in text for c in "\x1b\x07\r\x9b"), repr(text)
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\x0d\\x9b31m" in text


def test_set_help_lists_every_setting_from_the_table():
    from common import fnsettings
    out = subprocess.run([BIN / "faasctl", "set", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert fnsettings.cli_help() in out.stdout
    for s in fnsettings.FN_SETTINGS:
        assert f"\n  {s.key} " in out.stdout
