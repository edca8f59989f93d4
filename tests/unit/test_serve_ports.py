"""A function's ports and its callers (runner/serve.py, runner/callers.py), with the fake
containers of test_serve: one listener per port, opened and closed as ``ports`` changes;
each hand-over says which port and which peer; a peer ``allow`` does not name is refused
at accept (403 on port 80, closed on another) and starts nothing. Every client here is
::1, which the tests name as a peer directly (the sync's checks are test_runner_sync's)."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import replace

from test_serve import Harness, run, until

from runner.callers import Callers

VPN = ipaddress.IPv6Network("fd00:faa5:0:100::/64")


def callers(**names: str) -> Callers:
    """Callers whose peers are ``address=name`` (written as given: the tests' ::1)."""
    c = Callers(VPN)
    c.update({address: name for name, address in names.items()})
    return c


async def exchange(port: int, data: bytes = b"PING\r\n") -> bytes:
    """A raw TCP client: send ``data``, return everything until the server closes."""
    reader, writer = await asyncio.open_connection("::1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def test_each_port_has_a_listener_and_the_handler_is_told_which():
    async def main() -> None:
        h = Harness(ports=[80, 5432])
        assert set(h.fn.listeners) == {80, 5432}
        other = h.fn.listeners[5432].getsockname()[1]
        first = await h.send()
        c = await h.serving()
        c.answer("exited")
        await first
        raw = asyncio.ensure_future(exchange(other))
        c2 = await until("the 5432 connection handed over",
                         lambda: next((x for x in h.containers if x.waiting), None))
        c2.answer("exited")
        await raw
        assert [c.callers[0], c2.callers[0]] == [(80, None), (5432, None)]  # local: no peer
        await h.fn.close()
    run(main())


def test_a_peer_is_named_in_the_hand_over():
    async def main() -> None:
        h = Harness(callers=callers(laptop="::1"), allow=["laptop"])
        reply = await h.send()
        c = await h.serving()
        c.answer()
        assert (await reply).endswith(b"ok")
        assert c.callers == [(80, "laptop")]
        await h.fn.close()
    run(main())


def test_a_peer_not_in_allow_gets_403_on_port_80_and_no_container():
    async def main() -> None:
        h = Harness(callers=callers(laptop="::1"), allow=["ci"], ports=[80, 5432])
        answer = await (await h.send())
        assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n"), answer
        assert b"does not allow laptop" in answer
        raw = await exchange(h.fn.listeners[5432].getsockname()[1])
        assert raw == b""  # another port's protocol is unknown: closed, nothing written
        snap = h.fn.snapshot()
        assert (snap["forbidden"], snap["cold"], snap["rejected"]) == (2, 0, 0)
        assert h.containers == []  # none started, none even made
        await until("both accounted", lambda: snap["outcomes"].get("forbidden") == 2)
        await h.fn.close()
    run(main())


def test_allow_any_lets_every_peer_in_and_a_local_caller_is_always_let_in():
    async def main() -> None:
        h = Harness(callers=callers(), allow=["ci"])  # ::1: outside vpn_prefix, local
        reply = await h.send()
        (await h.serving()).answer()
        assert (await reply).endswith(b"ok")
        h.fn.callers = callers(laptop="::1")
        h.fn.update(replace(h.fn.settings, allow=["*"]), h.new)
        reply = await h.send()
        c = await until("the peer's hand-over", lambda: next(
            (x for x in h.containers if x.waiting), None))
        c.answer()
        assert (await reply).endswith(b"ok") and c.callers == [(80, "laptop")]
        assert h.fn.stats.forbidden == 0
        await h.fn.close()
    run(main())


def test_an_unknown_address_of_the_vpn_passes_only_allow_any():
    c = callers()
    peer, local = c.identify("fd00:faa5:0:100::77")
    assert (peer, local) == (None, False)
    assert not c.allowed(["laptop"], peer, local) and c.allowed(["*"], peer, local)
    assert c.identify("fd00:faa5:0:100::1") == (None, True)  # the server's own address
    assert c.identify("fd00:faa5:1::a") == (None, True)  # this host, not the tunnel


def test_changing_ports_opens_the_new_and_closes_the_removed_without_dropping_anything():
    async def main() -> None:
        h = Harness(ports=[80, 5432])
        old = h.fn.listeners[5432]
        in_flight = await h.send()
        c = await h.serving("a request in flight on 80")
        h.fn.update(replace(h.fn.settings, ports=[5432, 8080]), h.new)
        assert set(h.fn.listeners) == {5432, 8080}
        assert h.fn.listeners[5432] is old  # kept, not reopened
        c.answer()
        assert (await in_flight).endswith(b"ok")  # the connection of a closed port goes on
        try:  # port 80's listener is gone
            await exchange(h.port)
            refused = False
        except ConnectionRefusedError:
            refused = True
        assert refused
        raw = asyncio.ensure_future(exchange(h.fn.listeners[8080].getsockname()[1]))
        c2 = await until("served on the new port", lambda: next(
            (x for x in h.containers if x.waiting), None))
        c2.answer("exited")
        await raw
        assert c2.callers == [(8080, None)]
        events = [(e["event"], e.get("port")) for e in h.log_lines()
                  if e["event"].startswith("port_")]
        assert events == [("port_closed", 80), ("port_opened", 8080)]
        await h.fn.close()
        assert all(s.fileno() == -1 for s in (old,))
    run(main())
