"""netagent's one seam to the OS: ``ip``, ``wg``, ``wireguard-go``, argv lists only.

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

from common import wgconf
from common.errors import Code, FaasError
from common.files import atomic_write

COMMAND_TIMEOUT = 15.0  # seconds; ip6tables waits at most 5 s for the xtables lock
PACKAGES = {"ip": "iproute2", "wg": "wireguard-tools", "ip6tables": "iptables",
            "ip6tables-restore": "iptables", "wireguard-go": "wireguard-go"}


WG_RUN_DIR = "/var/run/wireguard"  # wireguard-go's control sockets, one per interface


class Net:
    """Runs ip and wireguard-go for one interface."""

    def __init__(self, interface: str):
        self.interface = interface
        self.wireguard_go: asyncio.subprocess.Process | None = None

    async def run(self, *argv: str, stdin: bytes | None = None) -> str:
        """Run a command; a failure is ``unavailable`` with its stderr."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else
                asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
        except FileNotFoundError:
            raise FaasError(Code.UNAVAILABLE, f"{argv[0]} is not installed: apt-get install "
                            f"{PACKAGES.get(argv[0], argv[0])}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), COMMAND_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise FaasError(Code.UNAVAILABLE, f"{' '.join(argv)} gave no answer within "
                            f"{COMMAND_TIMEOUT:.0f}s") from None
        if proc.returncode != 0:
            raise FaasError(Code.UNAVAILABLE, f"{' '.join(argv)} failed: "
                            f"{err.decode(errors='replace').strip()}")
        return out.decode()

    async def check(self, *argv: str) -> bool:
        """Run a command that answers by its exit status."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL)
        except FileNotFoundError:
            raise FaasError(Code.UNAVAILABLE, f"{argv[0]} is not installed: apt-get install "
                            f"{PACKAGES.get(argv[0], argv[0])}") from None
        try:
            return await asyncio.wait_for(proc.wait(), COMMAND_TIMEOUT) == 0
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise FaasError(Code.UNAVAILABLE, f"{' '.join(argv)} gave no answer within "
                            f"{COMMAND_TIMEOUT:.0f}s") from None

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
        # In a session of its own, it outlives us, as the kernel's interface would: a
        # netagent restart or kill must not take the function addresses (on this
        # interface) away for a second, failing every connection to them. The next
        # netagent finds the interface and configures it through wireguard-go's own
        # socket; `faasd down` (``--remove``) deletes the interface, and wireguard-go
        # ends when its tun device goes.
        self.wireguard_go = await asyncio.create_subprocess_exec(
            binary, "-f", self.interface, env=env, start_new_session=True,
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

    async def delete_link(self) -> None:
        """Remove the interface (wireguard-go ends when its tun device goes)."""
        if await self.link_exists():
            await self.run("ip", "link", "del", "dev", self.interface)
        if self.wireguard_go is not None and self.wireguard_go.returncode is None:
            self.wireguard_go.terminate()
            await self.wireguard_go.wait()
        # A wireguard-go another netagent started ends with its tun device; its socket
        # goes last. Waited for (briefly), so `faasd down` leaves no process behind.
        uapi = os.path.join(WG_RUN_DIR, f"{self.interface}.sock")
        for _ in range(100):
            if not os.path.exists(uapi):
                break
            await asyncio.sleep(0.05)

    async def route(self, prefix: ipaddress.IPv6Network) -> None:
        await self.run("ip", "-6", "route", "replace", str(prefix), "dev", self.interface)

    # --- WireGuard ----------------------------------------------------------------------

    async def ensure_key(self, path: str) -> None:
        """The server's private key: generated once into ``path`` (0600, its directory
        0700), read from ``wg genkey``'s stdout, never on a command line."""
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        os.chmod(os.path.dirname(path), 0o700)
        if os.path.exists(path):
            os.chmod(path, 0o600)
            return
        try:
            key = wgconf.key_from(await self.run(*wgconf.GENKEY), wgconf.GENKEY).encode()
        except ValueError as exc:
            raise FaasError(Code.INTERNAL, str(exc)) from None
        atomic_write(path, key + b"\n")

    async def configure(self, key_path: str, port: int) -> None:
        """Private key (by path) and listen port."""
        await self.run("wg", "set", self.interface, "listen-port", str(port),
                       "private-key", key_path)

    async def public_key(self) -> str:
        return (await self.run("wg", "show", self.interface, "public-key")).strip()

    async def listen_port(self) -> int:
        return int((await self.run("wg", "show", self.interface, "listen-port")).strip() or 0)

    async def peers(self) -> dict[str, dict[str, Any]]:
        """Every peer by public key: allowed ips, endpoint, last handshake, bytes."""
        out = await self.run("wg", "show", self.interface, "dump")
        peers = {}
        for line in out.splitlines()[1:]:  # the first line is the interface itself
            f = line.split("\t")
            if len(f) < 8:
                continue
            peers[f[0]] = {
                "allowed_ips": sorted(a for a in f[3].split(",") if a and a != "(none)"),
                "endpoint": None if f[2] == "(none)" else f[2],
                "latest_handshake": int(f[4]), "rx_bytes": int(f[5]), "tx_bytes": int(f[6]),
            }
        return peers

    async def set_peer(self, public_key: str, allowed: ipaddress.IPv6Network,
                       endpoint: str | None = None, keepalive: int = 0) -> None:
        """A peer with exactly ``allowed``; with a remembered ``endpoint`` and a
        keepalive, the server sends first, so the tunnel comes back without waiting
        for the client to notice it is gone."""
        extra = ["endpoint", endpoint, "persistent-keepalive", str(keepalive)] \
            if endpoint else []
        await self.run("wg", "set", self.interface, "peer", public_key,
                       "allowed-ips", str(allowed), *extra)

    async def remove_peer(self, public_key: str) -> None:
        await self.run("wg", "set", self.interface, "peer", public_key, "remove")
