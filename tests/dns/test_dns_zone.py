"""The faas. zone: rendering checked by named-checkzone, serial rules, refusal of hostile
input with nothing changed, idempotent syncs, atomic replacement. No root needed."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import os
import subprocess
from datetime import date
from pathlib import Path

import pytest

from common.errors import Code, FaasError
from common.log import EventLog
from common.settings import load
from dnsagent import zone
from dnsagent.main import DnsAgent
from dnsagent.named import find_tool, new_secret, render_rndc_conf

PREFIX = ipaddress.IPv6Network("fd00:faa5:1::/64")
NS = ipaddress.IPv6Address("fd00:faa5:0:100::1")
DAY = date(2024, 1, 5)


def checkzone(path: Path) -> subprocess.CompletedProcess[str]:
    """named-checkzone as the agent runs it; the tool must be installed."""
    tool = find_tool("named-checkzone")
    assert tool, "named-checkzone is missing: install bind9-utils"
    return subprocess.run([tool, "-i", "full", "-k", "fail", "-n", "fail", "faas", str(path)],
                          check=False, capture_output=True, text=True, timeout=30)


def recs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"name": n, "address": a} for n, a in pairs]


FNS = recs(("fib", "fd00:faa5:1::a"), ("hello", "fd00:faa5:1::b"), ("a-1", "fd00:faa5:1::c"),
           ("9x", "fd00:faa5:1::ffff"))


# --- rendering -----------------------------------------------------------------------


def test_rendered_zone_passes_named_checkzone(tmp_path):
    text = zone.render(zone.check_records(FNS, PREFIX), 2024010500, NS)
    path = tmp_path / "faas.db"
    path.write_text(text)
    result = checkzone(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "loaded serial 2024010500" in result.stdout
    lines = text.splitlines()
    assert "$ORIGIN faas." in lines and f"$TTL {zone.TTL}" in lines
    assert "@ IN SOA ns.faas. hostmaster.faas. ( 2024010500 3600 600 86400 5 )" in lines
    assert "@ IN NS ns.faas." in lines
    assert "ns IN AAAA fd00:faa5:0:100::1" in lines
    assert "fib IN AAAA fd00:faa5:1::a" in lines
    assert "9x IN AAAA fd00:faa5:1::ffff" in lines
    assert '_functions IN TXT "9x,a-1,fib,hello"' in lines


def test_render_is_deterministic_whatever_the_order():
    a = zone.render(zone.check_records(FNS, PREFIX), 7, NS)
    b = zone.render(zone.check_records(list(reversed(FNS)), PREFIX), 7, NS)
    assert a == b


def test_empty_zone_is_valid(tmp_path):
    path = tmp_path / "faas.db"
    path.write_text(zone.render([], 1, NS))
    assert checkzone(path).returncode == 0
    assert '_functions IN TXT ""' in path.read_text()


def test_txt_is_split_into_strings_of_at_most_255_bytes(tmp_path):
    names = sorted(f"{i:03d}-" + "x" * 58 for i in range(40))  # 40 names of 62 bytes
    strings, omitted = zone.txt_strings(names)
    assert omitted == 0 and len(strings) > 1
    assert all(len(s) <= 255 for s in strings)
    assert "".join(strings) == ",".join(names)  # joined, as SPF readers do
    per_string = [n for s in strings for n in s.split(",") if n]
    assert per_string == names  # or each string read on its own
    records = [{"name": n, "address": f"fd00:faa5:1::{i + 10:x}"} for i, n in enumerate(names)]
    path = tmp_path / "faas.db"
    path.write_text(zone.render(zone.check_records(records, PREFIX), 1, NS))
    result = checkzone(path)
    assert result.returncode == 0, result.stdout


def test_txt_too_long_for_one_record_is_cut_and_the_zone_stays_valid(tmp_path):
    names = sorted(f"{i:04d}-" + "y" * 58 for i in range(1200))  # ~76 KB of names
    strings, omitted = zone.txt_strings(names)
    assert omitted > 0
    assert sum(len(s) + 1 for s in strings) <= zone.TXT_RDATA_MAX
    kept = [n for s in strings for n in s.split(",") if n]
    assert kept == names[: len(names) - omitted]
    records = [{"name": n, "address": str(PREFIX.network_address + 10 + i)}
               for i, n in enumerate(names)]
    path = tmp_path / "faas.db"
    path.write_text(zone.render(zone.check_records(records, PREFIX), 1, NS))
    assert checkzone(path).returncode == 0


# --- serials -------------------------------------------------------------------------


def test_first_serial_of_a_day():
    assert zone.date_serial(DAY) == 2024010500
    assert zone.next_serial(None, DAY) == 2024010500


def test_same_day_increments_and_next_day_resets():
    assert zone.next_serial(2024010500, DAY) == 2024010501
    assert zone.next_serial(2024010541, DAY) == 2024010542
    assert zone.next_serial(2024010542, date(2024, 1, 6)) == 2024010600
    assert zone.next_serial(2024010542, date(2025, 3, 1)) == 2025030100


def test_nn_overflow_keeps_increasing():
    s = zone.next_serial(2024010599, DAY)
    assert s == 2024010600 and zone.serial_gt(s, 2024010599)
    # the next day's first serial is taken already: keep counting
    assert zone.next_serial(s, date(2024, 1, 6)) == 2024010601


def test_clock_going_back_never_decreases():
    prev = 2030010107
    for day in (date(2024, 1, 5), date(2030, 1, 1), date(1999, 12, 31)):
        nxt = zone.next_serial(prev, day)
        assert zone.serial_gt(nxt, prev), (prev, nxt)
        prev = nxt
    assert prev == 2030010110


def test_serial_past_the_top_wraps_as_rfc1982_allows():
    top = zone.SERIAL_MOD - 1
    # 2024010500 is "after" 4294967295 in RFC 1982 terms: back to the date form
    assert zone.next_serial(top, DAY) == 2024010500 and zone.serial_gt(2024010500, top)
    # a serial ahead of the date form (within 2**31) just keeps counting
    assert zone.next_serial(3000000000, DAY) == 3000000001


def test_rfc1982_comparison():
    half = zone.SERIAL_HALF
    assert zone.serial_gt(2, 1) and not zone.serial_gt(1, 2)
    assert not zone.serial_gt(5, 5)
    assert zone.serial_gt(0, zone.SERIAL_MOD - 1)  # wrapped
    assert zone.serial_gt(half - 1, 0) and not zone.serial_gt(0, half - 1)
    # exactly 2**31 apart: undefined, so neither is greater
    assert not zone.serial_gt(half, 0) and not zone.serial_gt(0, half)
    assert zone.latest(None, 3, zone.SERIAL_MOD - 1, None) == 3
    assert zone.latest(None, None) is None


def test_serial_parsing():
    assert zone.serial_of(zone.render([], 2024010500, NS)) == 2024010500
    assert zone.serial_of("garbage") is None and zone.serial_of(None) is None
    assert zone.parse_serial("2024010500\n") == 2024010500
    for bad in ("", "-1", "1e3", "4294967296", "12 3", "0x10"):
        assert zone.parse_serial(bad) is None


# --- the agent: converge, refusals, idempotence ----------------------------------------


def make_agent(root: Path) -> tuple[DnsAgent, io.StringIO]:
    settings = load({"FAAS_CONFIG": "/dev/null", "FAAS_ROOT": str(root),
                     "FAAS_RUN": str(root / "run")})
    stream = io.StringIO()
    agent = DnsAgent(settings, EventLog("dnsagent", stream=stream))
    agent.today = lambda: DAY
    return agent, stream


def converge(agent: DnsAgent, records: list[dict]) -> None:
    asyncio.run(agent.converge({"records": records}))


def events(stream: io.StringIO, name: str) -> list[dict]:
    return [e for e in map(json.loads, stream.getvalue().splitlines()) if e["event"] == name]


def snapshot(dns: Path) -> dict[str, bytes]:
    """Every file in the zone directory, by name: temp files would show up here."""
    return {p.name: p.read_bytes() for p in sorted(dns.iterdir())}


@pytest.fixture
def agent(tmp_path):
    agent, _ = make_agent(tmp_path)
    converge(agent, FNS)
    return agent


def test_converge_writes_a_checked_zone_and_the_serial(agent, tmp_path):
    dns = tmp_path / "dns"
    assert sorted(os.listdir(dns)) == ["faas.db", "serial"]  # no temp file left
    assert (dns / "serial").read_text() == "2024010500\n"
    assert zone.serial_of((dns / "faas.db").read_text()) == 2024010500
    assert (dns / "faas.db").stat().st_mode & 0o777 == 0o644  # named (user bind) reads it
    assert checkzone(dns / "faas.db").returncode == 0


def test_unchanged_records_change_nothing(agent, tmp_path):
    zf = tmp_path / "dns" / "faas.db"
    before, st = snapshot(tmp_path / "dns"), zf.stat()
    converge(agent, list(reversed(FNS)))
    assert snapshot(tmp_path / "dns") == before
    assert (zf.stat().st_ino, zf.stat().st_mtime_ns) == (st.st_ino, st.st_mtime_ns)


def test_changed_records_bump_the_serial(agent, tmp_path):
    dns = tmp_path / "dns"
    converge(agent, FNS[:2])
    assert zone.serial_of((dns / "faas.db").read_text()) == 2024010501
    agent.today = lambda: date(2024, 1, 4)  # the clock goes back
    converge(agent, FNS)
    assert zone.serial_of((dns / "faas.db").read_text()) == 2024010502
    assert (dns / "serial").read_text() == "2024010502\n"
    assert sorted(os.listdir(dns)) == ["faas.db", "serial"]


def test_a_lost_serial_file_still_never_repeats_a_serial(agent, tmp_path):
    dns = tmp_path / "dns"
    (dns / "serial").unlink()
    converge(agent, FNS[:1])
    assert zone.serial_of((dns / "faas.db").read_text()) == 2024010501
    (dns / "serial").write_text("rubbish")
    converge(agent, FNS[:2])
    assert zone.serial_of((dns / "faas.db").read_text()) == 2024010502


HOSTILE = [
    ("newline in name", recs(("a\nb", "fd00:faa5:1::d"))),
    ("trailing newline", recs(("evil\n", "fd00:faa5:1::d"))),
    ("$INCLUDE", recs(("$INCLUDE /etc/passwd", "fd00:faa5:1::d"))),
    ("space", recs(("a b", "fd00:faa5:1::d"))),
    ("semicolon", recs(("a;b", "fd00:faa5:1::d"))),
    ("quote", recs(('x"y', "fd00:faa5:1::d"))),
    ("parenthesis", recs(("a(b", "fd00:faa5:1::d"))),
    ("at", recs(("@", "fd00:faa5:1::d"))),
    ("dot", recs(("a.b", "fd00:faa5:1::d"))),
    ("upper case", recs(("Fib", "fd00:faa5:1::d"))),
    ("leading hyphen", recs(("-a", "fd00:faa5:1::d"))),
    ("too long", recs(("a" * 64, "fd00:faa5:1::d"))),
    ("empty", recs(("", "fd00:faa5:1::d"))),
    ("reserved ns", recs(("ns", "fd00:faa5:1::d"))),
    ("not a string", [{"name": 5, "address": "fd00:faa5:1::d"}]),
    ("outside the prefix", recs(("ok", "2001:db8::1"))),
    ("vpn address", recs(("ok", "fd00:faa5:0:100::1"))),
    ("IPv4", recs(("ok", "10.0.0.1"))),
    ("not an address", recs(("ok", "fd00:faa5:1::zz"))),
    ("scope id", recs(("ok", 'fd00:faa5:1::a%0\n$INCLUDE /etc/passwd ; "'))),
    ("address with newline", recs(("ok", "fd00:faa5:1::a\n"))),
    ("duplicate name", recs(("dup", "fd00:faa5:1::d"), ("dup", "fd00:faa5:1::e"))),
    ("extra field", [{"name": "ok", "address": "fd00:faa5:1::d", "ttl": 1}]),
    ("not a map", ["ok"]),
]


@pytest.mark.parametrize("records", [r for _, r in HOSTILE], ids=[i for i, _ in HOSTILE])
def test_hostile_records_are_refused_and_change_nothing(agent, tmp_path, records):
    before = snapshot(tmp_path / "dns")
    good = recs(("fine", "fd00:faa5:1::99"))
    with pytest.raises(FaasError) as err:
        converge(agent, good + records)  # one bad record refuses the whole set
    assert err.value.code is Code.BAD_REQUEST
    assert snapshot(tmp_path / "dns") == before


def test_a_zone_named_checkzone_refuses_is_never_published(agent, tmp_path, monkeypatch):
    before = snapshot(tmp_path / "dns")
    real = zone.render
    monkeypatch.setattr(zone, "render", lambda *a: real(*a) + "broken IN AAAA 10.0.0.1\n")
    with pytest.raises(FaasError) as err:
        converge(agent, FNS[:1])
    assert err.value.code is Code.INTERNAL and "checkzone" in err.value.message
    assert snapshot(tmp_path / "dns") == before  # old zone, old serial, no temp file


def test_sync_succeeds_when_named_is_down_and_retries_the_reload(tmp_path):
    agent, stream = make_agent(tmp_path)
    (tmp_path / "dns").mkdir()
    # rndc.conf as faas-named writes it, but nothing listens on the port: named is down
    (tmp_path / "dns" / "rndc.conf").write_text(render_rndc_conf(new_secret(), rndc_port=1))
    result = asyncio.run(agent.op_sync({"generation": 3, "state": {"records": FNS}}))
    assert result["generation"] == 3  # and the digest of the state it holds
    assert agent.reload_pending and len(events(stream, "reload_failed")) == 1
    asyncio.run(agent.op_sync({"generation": 4, "state": {"records": FNS}}))  # unchanged
    assert len(events(stream, "reload_failed")) == 2  # but the reload was tried again
    assert len(events(stream, "zone_written")) == 1


def test_without_rndc_conf_there_is_nothing_to_reload(agent):
    # no faas-named here (another server, or named not prepared yet: it reads the file
    # when it starts), so nothing stays pending and nothing is retried
    assert not agent.reload_pending
