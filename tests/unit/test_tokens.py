"""HTTP API tokens in the controller: stored as digests, listed without them, removed at
once; the controller ops that make them print the value once and log it never."""

from __future__ import annotations

import asyncio
import io
import re
import sqlite3

import pytest

from common.errors import Code, FaasError
from common.log import EventLog
from common.settings import load
from controller import access
from controller.main import Controller
from controller.state import State


@pytest.fixture
def state(tmp_path):
    s = State(str(tmp_path / "state" / "state.db"), "fd00:faa5:1::/64", "fd00:faa5:0:100::/64")
    yield s
    s.close()


def test_only_the_digest_is_stored(state, tmp_path):
    token = access.new_token()
    assert re.fullmatch(r"faas_[A-Za-z0-9_-]{43}", token)
    row = state.add_token("ci", "deploy", access.token_digest(token), None)
    assert row == {"name": "ci", "role": "deploy", "created": row["created"], "expires": None,
                   "last_used": None}
    raw = sqlite3.connect(str(tmp_path / "state" / "state.db")).execute(
        "SELECT * FROM tokens").fetchall()
    assert token not in repr(raw) and access.token_digest(token) in repr(raw)
    assert state.token_by_digest(access.token_digest(token))["name"] == "ci"
    assert state.token_by_digest(access.token_digest(token + "x")) is None


def test_names_are_unique_and_removal_is_at_once(state):
    state.add_token("ci", "read", "a" * 64, None)
    with pytest.raises(FaasError) as info:
        state.add_token("ci", "admin", "b" * 64, None)
    assert info.value.code is Code.CONFLICT and state.token("ci")["role"] == "read"
    state.remove_token("ci")
    assert state.token_by_digest("a" * 64) is None and state.tokens() == []
    with pytest.raises(FaasError) as info:
        state.remove_token("ci")
    assert info.value.code is Code.NOT_FOUND


def test_last_use_is_written_at_most_once_a_minute(state):
    state.add_token("ci", "read", "a" * 64, None)
    state.token_used("ci", 1000.0)
    state.token_used("ci", 1030.0)
    assert state.token("ci")["last_used"] == 1000.0
    state.token_used("ci", 1061.0)
    assert state.token("ci")["last_used"] == 1061.0


def test_expired_tokens_are_refused():
    row = {"name": "old", "role": "admin", "created": 1.0, "expires": 10.0, "last_used": None}
    token = access.new_token()
    assert access.check_token(token, lambda digest: row, now=9.0) == row
    with pytest.raises(FaasError) as info:
        access.check_token(token, lambda digest: row, now=10.0)
    assert info.value.code is Code.UNAUTHORIZED and token not in info.value.message


def test_the_controller_ops_show_the_value_once_and_never_log_it(tmp_path):
    out = io.StringIO()
    settings = load({"FAAS_ROOT": str(tmp_path / "root"), "FAAS_RUN": str(tmp_path / "run"),
                     "FAAS_CONFIG": "/dev/null"})
    controller = Controller(settings, EventLog("controller", stream=out))

    async def go() -> None:
        made = await controller.op_token_create({"name": "ci", "role": "deploy",
                                                 "expires": "30d"})
        assert made["token"].startswith("faas_") and made["expires"] > made["created"]
        listed = await controller.op_token_list({})
        assert listed == {"tokens": [{k: v for k, v in made.items() if k != "token"}]}
        assert made["token"] not in repr(listed) and made["token"] not in out.getvalue()
        assert (await controller.op_token_rm({"name": "ci"}))["name"] == "ci"
        assert (await controller.op_token_list({})) == {"tokens": []}
    asyncio.run(go())
    controller.state.close()
