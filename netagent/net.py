"""netagent's one seam to the OS: ``ip`` and ``wireguard-go``, argv lists only.

Every argument that reaches a command here was checked by the caller against the
configured interface and prefixes; this module only runs what it is told, so tests can
put a fake in its place and the root tests exercise the real thing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
from typing import Any

from common.errors import Code, FaasError
from common.proc import die_with_parent


class Net:
    """Runs ip and wireguard-go for one interface."""

    def __init__(self, interface: str):
        self.interface = interface
        self.wireguard_go: asyncio.subprocess.Process | None = None

    async def run(self, *argv: str) -> str:
        """Run a command; a failure is ``unavailable`` with its stderr."""
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise FaasError(Code.UNAVAILABLE, f"{' '.join(argv)} failed: "
                            f"{err.decode(errors='replace').strip()}")
        return out.decode()

    async def link_exists(self) -> bool:
        # Asked over netlink: /sys shows the namespace that mounted it, not ours.
        proc = await asyncio.create_subprocess_exec(
            "ip", "link", "show", "dev", self.interface,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        return await proc.wait() == 0

    async def create_link(self) -> str:
        """Create the WireGuard interface: the kernel module where present, else
        wireguard-go in the foreground as our child. Returns which one."""
        try:
            await self.run("ip", "link", "add", "dev", self.interface, "type", "wireguard")
            return "kernel"
        except FaasError:
            pass
        binary = shutil.which("wireguard-go")
        if binary is None:
            raise FaasError(Code.UNAVAILABLE, "no wireguard kernel module and no wireguard-go: "
                            "apt-get install wireguard-go")
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
        # It dies with us (even on kill -9): the next netagent recreates the interface
        # from the controller's sync instead of finding an orphan it cannot stop.
        self.wireguard_go = await asyncio.create_subprocess_exec(
            binary, "-f", self.interface, env=env, preexec_fn=lambda: die_with_parent(15),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        for _ in range(100):  # it creates the tun device within milliseconds
            if await self.link_exists():
                return "wireguard-go"
            if self.wireguard_go.returncode is not None:
                break
            await asyncio.sleep(0.02)
        raise FaasError(Code.UNAVAILABLE, f"wireguard-go did not create {self.interface}")

    async def set_up(self) -> None:
        await self.run("ip", "link", "set", "dev", self.interface, "up")

    async def addresses(self) -> list[ipaddress.IPv6Interface]:
        """The global IPv6 addresses on the interface."""
        out = await self.run("ip", "-6", "-j", "addr", "show", "dev", self.interface)
        data: list[dict[str, Any]] = json.loads(out or "[]")
        return [ipaddress.IPv6Interface(f"{a['local']}/{a['prefixlen']}")
                for link in data for a in link.get("addr_info", [])
                if a.get("family") == "inet6" and a.get("scope") == "global"]

    async def add_address(self, iface: ipaddress.IPv6Interface) -> None:
        await self.run("ip", "-6", "addr", "replace", str(iface), "dev", self.interface, "nodad")

    async def del_address(self, iface: ipaddress.IPv6Interface) -> None:
        await self.run("ip", "-6", "addr", "del", str(iface), "dev", self.interface)
