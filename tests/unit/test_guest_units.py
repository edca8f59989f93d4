"""The Debian guest stage's pure logic (tests/guest/): the image cache key and what goes
into it, and the agent's line framing in both directions, with fakes in place of QEMU."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from tests.guest import guestagent as agent
from tests.guest import guestimage as gi
from tests.guest.guestvm import Guest

REPO = Path(__file__).resolve().parents[2]

POLICY = """runc:
  Installed: (none)
  Candidate: 1.1.5+ds1-1+deb12u1
  Version table:
     1.1.5+ds1-1+deb12u1 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
linux-image-amd64:
  Installed: 6.1.192-3
  Candidate: 6.1.192-3
  Version table:
"""


def test_packages_are_read_out_of_install_sh():
    text = (REPO / "install.sh").read_text()
    listed = gi.install_packages(text)
    assert {"runc", "crun", "bind9", "wireguard-tools", "python3-venv"} <= set(listed)
    assert "qemu-system-x86" not in listed  # test tools are not a normal install's
    assert set(listed) <= set(gi.packages())
    assert {"systemd-sysv", "apparmor", "linux-image-amd64", "sudo"} <= set(gi.packages())


def test_install_packages_handles_comments_and_refuses_a_missing_array():
    text = "x=1\npackages=(a b  # the first two\n          c)\nmore=(d)\n"
    assert gi.install_packages(text) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="no packages"):
        gi.install_packages("apt-get install foo\n")


def test_parse_policy_takes_each_candidate():
    assert gi.parse_policy(POLICY) == {"runc": "1.1.5+ds1-1+deb12u1",
                                       "linux-image-amd64": "6.1.192-3"}


def test_cache_key_changes_with_every_input_and_not_with_order():
    versions = {"runc": "1.1", "crun": "1.8"}
    key = gi.cache_key(versions, ["a.whl", "b.whl"], "h1")
    assert key == gi.cache_key(dict(reversed(versions.items())), ["b.whl", "a.whl"], "h1")
    assert key != gi.cache_key({**versions, "runc": "1.2"}, ["a.whl", "b.whl"], "h1")
    assert key != gi.cache_key(versions, ["a.whl", "c.whl"], "h1")
    assert key != gi.cache_key(versions, ["a.whl", "b.whl"], "h2")
    assert len(key) == 24 and int(key, 16) >= 0


def test_cache_key_refuses_a_package_without_a_candidate():
    with pytest.raises(ValueError, match="crun.*apt-get update"):
        gi.cache_key({"runc": "1.1", "crun": "(none)"}, [], "h")


def test_builder_hash_covers_the_agent(tmp_path):
    a, b = tmp_path / "guestimage.py", tmp_path / "guestagent.py"
    a.write_text("x")
    b.write_text("y")
    first = gi.builder_hash([a, b])
    b.write_text("z")
    assert gi.builder_hash([a, b]) != first


def test_line_reader_splits_joins_and_drops_an_overlong_line(monkeypatch):
    r = agent.LineReader()
    assert r.feed(b'{"a":') == []
    assert r.feed(b'1}\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']
    monkeypatch.setattr(agent, "MAX_LINE", 8)
    r = agent.LineReader()
    assert r.feed(b"x" * 20) == []
    assert r.feed(b"tail\nok\n") == [b"ok"]


def test_decode_rejects_garbage_and_handle_answers_it_without_an_id():
    assert agent.decode(b"\xff\xfe") is None
    assert agent.decode(b"[1,2]") is None
    assert agent.handle(agent.decode(b"not json")) == {"id": None, "error": "not a request"}
    assert agent.handle({"cmd": "true"})["error"] == "not a request"


def test_handle_runs_bash_and_reports_rc_stdout_stderr():
    reply = agent.handle({"id": "7", "cmd": "echo out; echo err >&2; exit 3"})
    assert reply == {"id": "7", "rc": 3, "stdout": "out\n", "stderr": "err\n"}
    slow = agent.handle({"id": "8", "cmd": "sleep 5", "timeout": 0.2})
    assert slow["rc"] == 124 and "timed out" in slow["stderr"]


def _fake_agent(sock: socket.socket, stale: bytes) -> None:
    """Answers like the guest's agent, after bytes left from an earlier boot."""
    sock.sendall(stale)
    reader = agent.LineReader()
    while data := sock.recv(65536):
        for line in reader.feed(data):
            sock.sendall(agent.encode(agent.handle(agent.decode(line))))


def test_client_skips_stale_and_foreign_answers(tmp_path):
    host, guest_end = socket.socketpair()
    stale = b'{"id":"old","rc":0}\ngarbage\n{"id":null,"error":"x"}\n'
    thread = threading.Thread(target=_fake_agent, args=(guest_end, stale), daemon=True)
    thread.start()
    g = Guest(tmp_path, tmp_path / "d", tmp_path)
    g.sock = host
    g.sync(5)
    assert g.sh("printf 'a\\nb'") == "a\nb"
    with pytest.raises(AssertionError, match="exit 4.*boom"):
        g.sh("echo boom >&2; exit 4")
    host.close()  # the fake agent reads EOF and returns
    thread.join(5)
    guest_end.close()


def test_missing_tools_fail_with_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(gi.shutil, "which", lambda tool: None)
    with pytest.raises(RuntimeError, match="debootstrap is missing.*install.sh --no-start"):
        gi.ensure_image(lambda s: None)
    with pytest.raises(AssertionError, match="qemu-system-x86_64 is missing"):
        Guest(tmp_path, tmp_path / "d", tmp_path).start()
