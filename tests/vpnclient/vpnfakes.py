"""A fake of cli.vpnclient's OS seam that records every argv, and a sample config."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import textwrap
from pathlib import Path

from cli.vpnclient import Result

SERVER_KEY = base64.b64encode(bytes(range(32))).decode()
CLIENT_KEY = base64.b64encode(bytes(range(100, 132))).decode()


def config_text(private_key: str | None = CLIENT_KEY, extra: str = "") -> str:
    """The file `faasctl vpn add` prints, with or without the client's private key."""
    key = f"PrivateKey = {private_key}\n" if private_key else ""
    return textwrap.dedent("""\
        [Interface]
        {key}Address = fd00:faa5:0:100::2/128
        DNS = fd00:faa5:0:100::1, faas
        {extra}
        [Peer]
        PublicKey = {server}
        Endpoint = [fdff:1::1]:51820
        AllowedIPs = fd00:faa5::/32
        PersistentKeepalive = 25
        """).format(key=key, extra=extra, server=SERVER_KEY)


def fake_public(private: str) -> str:
    return base64.b64encode(hashlib.sha256(private.strip().encode()).digest()).decode()


class FakeSystem:
    """Plays the commands connect/disconnect/pubkey run, and remembers each argv.

    ``fail`` is an argv prefix whose command fails; ``kernel`` says whether
    ``ip link add ... type wireguard`` works; ``links`` are the interfaces that exist.
    """

    def __init__(self, *, kernel: bool = False, resolved: bool = False, root: bool = True,
                 tools: tuple[str, ...] = ("ip", "wg", "wireguard-go", "resolvectl"),
                 fail: tuple[str, ...] | None = None):
        self.kernel, self.resolved, self.root, self.tools = kernel, resolved, root, tools
        self.fail = fail
        self.links: set[str] = set()
        self.calls: list[list[str]] = []
        self.stdins: list[str | None] = []
        self.generated: list[str] = []
        self.key_files: list[dict[str, object]] = []  # what `wg set` saw at its private-key
        self.ended: list[str] = []

    def run(self, argv: list[str], stdin: str | None = None) -> Result:
        assert all(isinstance(a, str) for a in argv), argv  # an argv list, never a shell line
        self.calls.append(list(argv))
        self.stdins.append(stdin)
        if self.fail and tuple(argv[:len(self.fail)]) == self.fail:
            return Result(2, "", "RTNETLINK answers: Invalid argument")
        return self._play(argv, stdin)

    def _play(self, argv: list[str], stdin: str | None) -> Result:
        match argv:
            case ["ip", "link", "show", "dev", name]:
                return Result(0 if name in self.links else 1, "", "")
            case ["ip", "link", "add", "dev", name, "type", "wireguard"]:
                if not self.kernel:
                    return Result(2, "", "Error: Unknown device type.")
                self.links.add(name)
            case ["wireguard-go", name]:
                self.links.add(name)
            case ["ip", "link", "del", "dev", name]:
                self.links.discard(name)
            case ["wg", "genkey"]:
                key = base64.b64encode(os.urandom(32)).decode()
                self.generated.append(key)
                return Result(0, key + "\n", "")
            case ["wg", "pubkey"]:
                return Result(0, fake_public(stdin or "") + "\n", "")
            case ["wg", "set", _, "private-key", path, *_]:
                self._saw_key_file(Path(path))
        return Result(0, "", "")

    def _saw_key_file(self, path: Path) -> None:
        self.key_files.append({"path": path, "mode": stat.S_IMODE(path.stat().st_mode),
                               "dir_mode": stat.S_IMODE(path.parent.stat().st_mode),
                               "content": path.read_text().strip()})

    def which(self, name: str) -> bool:
        return name in self.tools

    def is_root(self) -> bool:
        return self.root

    def resolved_running(self) -> bool:
        return self.resolved

    def end_wireguard_go(self, interface: str) -> list[str]:
        self.ended.append(interface)
        return []

    def commands(self) -> list[str]:
        """Every argv as one line, for asserting on order."""
        return [" ".join(c) for c in self.calls]
