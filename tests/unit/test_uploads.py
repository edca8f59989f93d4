"""Uploads in progress: slots per caller, and a minimum rate that trickling cannot cheat."""

from __future__ import annotations

import os
import types

import pytest

from common.errors import Code, FaasError
from controller import uploads as uploads_mod
from controller.uploads import Uploads


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(uploads_mod, "time", types.SimpleNamespace(monotonic=c.monotonic))
    return c


def make(tmp_path, **kw) -> Uploads:
    kw = {"idle_seconds": 60.0, "min_rate": 1000, "rate_window": 10.0, **kw}
    u = Uploads(str(tmp_path / "spool"), 1 << 30, **kw)
    u.clear()
    return u


def test_a_trickle_is_dropped_by_the_rate_rule_while_a_normal_upload_goes_on(tmp_path, clock):
    u = make(tmp_path)
    slow, fast = u.begin("slow", None, "uid 1"), u.begin("fast", None, "uid 2")
    for second in range(1, 25):  # one byte a second resets the idle timer every time
        clock.now += 1
        if slow.id in u.active:
            u.write(slow.id, slow.received, b"x")
        u.write(fast.id, fast.received, b"y" * 2000)
        u.expire()
    assert slow.id not in u.active and not os.path.exists(slow.path)
    assert fast.id in u.active and fast.received == 24 * 2000
    with pytest.raises(FaasError) as info:
        u.write(slow.id, slow.received, b"x")
    assert info.value.code is Code.NOT_FOUND and "upload_min_rate" in info.value.message


def test_the_first_window_is_a_grace_period_and_zero_turns_the_rule_off(tmp_path, clock):
    u = make(tmp_path)
    up = u.begin("late", None)
    clock.now += 9.5  # nothing yet (a client still reading its file): inside the grace
    u.expire()
    assert up.id in u.active
    off = make(tmp_path / "off", min_rate=0)
    idle = off.begin("idle", None)
    clock.now += 50
    off.write(idle.id, 0, b"x")
    clock.now += 50
    assert off.expire() == [] and idle.id in off.active
    clock.now += 61  # the idle timer still holds
    assert off.expire() == [idle.id]


def test_uploads_being_deployed_are_not_timed(tmp_path, clock):
    u = make(tmp_path)
    up = u.begin("done", None)
    u.write(up.id, 0, b"x" * 100)
    u.finish(up.id)
    clock.now += 1000
    assert u.expire() == [] and up.id in u.active


def test_slots_per_caller_and_in_all(tmp_path, clock):
    u = make(tmp_path, slots=5, slots_per_caller=2)
    mine = [u.begin(f"m{i}", None, "uid 1000") for i in range(2)]
    with pytest.raises(FaasError) as info:
        u.begin("m2", None, "uid 1000")
    assert info.value.code is Code.UNAVAILABLE
    assert "too many uploads in progress for you: 2" in info.value.message
    assert "upload_slots_per_user" in info.value.message
    theirs = u.begin("t0", None, "uid 1001")  # another caller still can
    u.drop(mine[0].id)
    u.begin("m3", None, "uid 1000")  # a freed slot is free again
    u.begin("t1", None, "uid 1001")
    u.begin("x0", None)
    with pytest.raises(FaasError) as info:
        u.begin("x1", None)
    assert info.value.code is Code.CONFLICT and "upload_slots" in info.value.message
    assert theirs.id in u.active
