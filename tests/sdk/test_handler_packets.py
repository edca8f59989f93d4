"""The handler protocol's packets, both sides against one fixture: what the runner writes
(runner/handler_protocol.py) the SDK reads as meant, and what the SDK writes the runner
takes as the ``done`` of that request and nothing else. The examples are in
tests/fixtures/handler_packets.json: odd addresses and ids, unicode, escapes, members
neither side knows (ignored), packets to ignore."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faas_handler as fh
import pytest

from runner import handler_protocol as hp

FIXTURE = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "handler_packets.json")
                     .read_text(encoding="utf-8"))


def ids(examples: list[Any]) -> list[str]:
    return [repr(e)[:40] for e in examples]


@pytest.mark.parametrize("conn", FIXTURE["conn"], ids=ids(FIXTURE["conn"]))
def test_the_runners_conn_is_what_the_sdk_reads(conn: dict[str, Any]) -> None:
    packet = hp.conn_packet(conn["id"], conn["remote"], conn["deadline"], conn["port"],
                            conn["peer"])
    assert len(packet) < hp.CONTROL_PACKET
    assert json.loads(packet) == {"type": "conn", **conn}  # JSON, whatever the SDK does
    assert fh.parse_conn(packet) == conn
    assert fh.conn_fields(fh.parse_packet(packet)) == conn


@pytest.mark.parametrize("conn", FIXTURE["conn"], ids=ids(FIXTURE["conn"]))
def test_a_handler_written_from_version_1_0_reads_the_1_1_conn(conn: dict[str, Any]) -> None:
    """1.1 only adds members, after 1.0's, in the same spelling: a handler that parses
    JSON gets 1.0's packet plus members it ignores; one that looks for the text
    ``"type": "conn"`` (as tests/integration/handlers/testhandler.c and
    examples/c-hello do) and ``"id": "`` still finds them where they were."""
    new = hp.conn_packet(conn["id"], conn["remote"], conn["deadline"], conn["port"],
                         conn["peer"])
    msg = json.loads(new)
    assert list(msg)[:4] == ["type", "id", "remote", "deadline"]
    assert {k: msg[k] for k in ("type", "id", "remote", "deadline")} == {
        "type": "conn", "id": conn["id"], "remote": conn["remote"],
        "deadline": conn["deadline"]}
    assert new.startswith(b'{"type": "conn", "id": ')
    old_prefix = hp.conn_packet(conn["id"], conn["remote"], conn["deadline"])[:-1]
    assert new.startswith(old_prefix.replace(b', "port": 80, "peer": null', b""))


@pytest.mark.parametrize("example", FIXTURE["conn_from_others"],
                         ids=ids(FIXTURE["conn_from_others"]))
def test_the_sdk_reads_conn_from_any_writer(example: dict[str, Any]) -> None:
    # a later runner's members are ignored; missing ones have their defaults
    assert fh.parse_conn(example["packet"].encode()) == example["fields"]


@pytest.mark.parametrize("rid", FIXTURE["done"], ids=ids(FIXTURE["done"]))
def test_the_sdks_done_is_the_runners_done_of_that_request(rid: str) -> None:
    sent = fh.done_packet(rid)
    assert json.loads(sent) == {"type": "done", "id": rid}
    expected = hp.done_packet(rid)
    assert json.loads(expected) == {"type": "done", "id": rid}
    assert hp.is_done(sent, rid, expected)
    assert hp.is_done(sent, rid)
    assert not hp.is_done(sent, rid + "x", hp.done_packet(rid + "x"))
    assert not hp.is_done(sent, None)
    if rid.isascii() and rid.isalnum():  # the runner's ids: one comparison, no JSON
        assert sent == expected


@pytest.mark.parametrize("example", FIXTURE["done_from_others"],
                         ids=ids(FIXTURE["done_from_others"]))
def test_the_runner_reads_done_from_any_writer(example: dict[str, Any]) -> None:
    rid = example["id"]
    assert hp.is_done(example["packet"].encode(), rid, hp.done_packet(rid))
    assert not hp.is_done(example["packet"].encode(), "other", hp.done_packet("other"))


@pytest.mark.parametrize("packet", FIXTURE["ignored"], ids=ids(FIXTURE["ignored"]))
def test_packets_both_sides_ignore(packet: str) -> None:
    rid = FIXTURE["ignored_for_id"]
    assert fh.parse_conn(packet.encode()) is None
    assert not hp.is_done(packet.encode(), rid, hp.done_packet(rid))
