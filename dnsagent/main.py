"""dnsagent (unprivileged): owns the faas. zone file and asks the DNS server to reload.

It converges to the whole desired state the controller sends with ``sync``:
``{"records": [{"name": "fib", "address": "fd00:faa5:1::a"}, ...]}``. Its endpoint
is mode 0600: only the controller's user may talk to it.

A sync is checked whole before anything is written (one bad name or address refuses
it with bad_request and changes nothing); an unchanged record set writes nothing and
keeps the serial; a changed one is rendered to a temporary file, checked with
``named-checkzone``, and renamed over ``$FAAS_ROOT/dns/faas.db``. Then ``rndc reload
faas``: if the DNS server cannot be reached the sync still succeeds (named loads the
file when it starts) and the reload is retried, by the next sync and in the background.
The layout of the files and named's side are in :mod:`dnsagent.named` and docs/dns.md.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

from common.daemon import AgentDaemon, run_main
from common.errors import Code, FaasError
from common.files import atomic_write, commit, stage
from common.layout import Layout
from common.settings import vpn_server
from dnsagent import zone
from dnsagent.named import find_tool

CHECKZONE_TIMEOUT = 10.0
RNDC_TIMEOUT = 3.0  # rndc's own default is a minute; a sync's deadline is 10 s
RETRY_FIRST, RETRY_MAX = 2.0, 60.0  # background reload retries, doubling
CHECK_SECONDS = 1.0  # how often the zone file on disk is compared with the records


def utc_today() -> date:
    """Today's date in UTC: serials must not depend on the host's time zone."""
    return datetime.now(UTC).date()


def read_file(path: str) -> bytes | None:
    """A file's bytes, or None if it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


async def run_tool(argv: list[str], timeout: float) -> tuple[int, str]:
    """Run a tool (argv, no shell), return its status and combined output; on timeout
    kill it and report status -1."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"{os.path.basename(argv[0])} gave no answer within {timeout:g} s"
    return proc.returncode or 0, out.decode("utf-8", "replace").strip()


async def check_zone(path: str) -> None:
    """``named-checkzone`` on a rendered file; FaasError(internal) if it fails, since
    every input was checked before rendering and a refused file means a bug here."""
    tool = find_tool("named-checkzone")
    if tool is None:
        raise FaasError(Code.INTERNAL, "named-checkzone not found: install bind9-utils")
    origin = zone.ORIGIN.rstrip(".")
    status, out = await run_tool([tool, "-i", "full", "-k", "fail", "-n", "fail", origin, path],
                                 CHECKZONE_TIMEOUT)
    if status != 0:
        raise FaasError(Code.INTERNAL, "the rendered zone failed named-checkzone; the old "
                        "zone stays", {"output": out[-2000:]})


class DnsAgent(AgentDaemon):
    """The zone-file agent."""

    service = "dnsagent"
    socket_mode = 0o600

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.layout = Layout(self.settings.root, self.settings.run)
        self.function_prefix = ipaddress.IPv6Network(self.settings.function_prefix)
        self.ns = vpn_server(self.settings.vpn_prefix).ip
        self.today: Callable[[], date] = utc_today  # tests move the clock
        # True at start: named may be serving an older file than the one on disk (it
        # was written while named was down, or named started before this agent).
        self.reload_pending = True
        self._lock = asyncio.Lock()  # syncs and background retries, one at a time
        self.records: list[zone.Record] | None = None  # the last set converged to

    async def converge(self, state: dict[str, Any]) -> None:
        """Make faas.db hold exactly ``state["records"]``, then have named reload it."""
        records = zone.check_records(state.get("records", []), self.function_prefix)
        async with self._lock:
            serial = await self.publish(records)
            self.records = records
            if serial is not None:
                self.reload_pending = True
                self.log.info("zone_written", serial=serial, records=len(records))
            if self.reload_pending:
                await self.reload()

    def current(self) -> tuple[bytes | None, int | None]:
        """The zone file's bytes and the latest serial handed out (file or zone)."""
        text = read_file(self.layout.zone_file)
        stored = read_file(self.layout.serial_file)
        from_file = zone.parse_serial(stored.decode("ascii", "replace")) if stored else None
        return text, zone.latest(from_file, zone.serial_of(text))

    async def publish(self, records: list[zone.Record]) -> int | None:
        """Write the zone if its content changed; return the new serial, else None."""
        os.makedirs(self.layout.dns_dir, mode=0o755, exist_ok=True)
        text, previous = self.current()
        on_file = zone.serial_of(text)
        if on_file is not None and text == zone.render(records, on_file, self.ns).encode():
            return None
        serial = zone.next_serial(previous, self.today())
        self.warn_truncated(records)
        data = zone.render(records, serial, self.ns).encode()
        tmp = stage(self.layout.zone_file, data, 0o644)  # bind reads it
        try:
            await check_zone(tmp)
            # The serial first: a crash between the two renames costs a number, never
            # hands the same one out twice.
            atomic_write(self.layout.serial_file, f"{serial}\n".encode(), 0o644)
            # named skips a reload when the file is not newer than its last load; the
            # kernel's coarse file clock can lag its own, so stamp the precise time.
            now = time.time_ns()
            os.utime(tmp, ns=(now, now))
            commit(tmp, self.layout.zone_file)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return serial

    def warn_truncated(self, records: list[zone.Record]) -> None:
        """Log when the _functions TXT record cannot hold every name."""
        _, omitted = zone.txt_strings(r.name for r in records)
        if omitted:
            self.log.warning("txt_truncated", omitted=omitted, records=len(records))

    async def reload(self) -> bool:
        """``rndc reload faas``; a failure is logged and left pending, never raised.

        Without rndc.conf there is no BIND of ours to tell: faas-named writes it before
        named starts (and named reads the zone as it starts), and another server such
        as CoreDNS watches the file itself.
        """
        if not os.path.exists(self.layout.rndc_conf):
            self.reload_pending = False
            self.log.debug("reload_skipped", reason=f"no {self.layout.rndc_conf}")
            return True
        tool = find_tool("rndc")
        if tool is None:
            status, out = -1, "rndc not found: install bind9-utils"
        else:
            argv = [tool, "-c", self.layout.rndc_conf, "reload", zone.ORIGIN.rstrip(".")]
            status, out = await run_tool(argv, RNDC_TIMEOUT)
        if status != 0:
            self.log.warning("reload_failed", status=status, output=out[-500:])
            return False
        self.reload_pending = False
        self.log.info("reloaded", output=out)
        return True

    async def background(self) -> None:
        """Every second, put back a zone file changed behind our back (edited or
        corrupted by hand: it is rewritten with a new serial); retry a failed reload,
        backing off from 2 s up to a minute."""
        delay, next_reload = RETRY_FIRST, 0.0
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), CHECK_SECONDS)
                return
            except TimeoutError:
                pass
            if not self.synced or self.records is None:
                continue
            async with self._lock:
                try:
                    serial = await self.publish(self.records)
                except (FaasError, OSError) as exc:
                    self.log.warning("zone_check_failed", error=str(exc))
                    continue
                if serial is not None:
                    self.log.warning("zone_repaired", serial=serial)
                    self.reload_pending, next_reload = True, 0.0
                now = time.monotonic()
                if self.reload_pending and now >= next_reload:
                    ok = await self.reload()
                    delay = RETRY_FIRST if ok else min(delay * 2, RETRY_MAX)
                    next_reload = now + delay


def main() -> None:
    """Console script faas-dnsagent."""
    run_main(DnsAgent)
