"""Boot the cached Debian 12 guest under QEMU and drive it through its agent.

Each run boots from a throwaway qcow2 overlay over the cached raw image (``qemu-img create
-b``), so the cache is never written. The guest has no network device at all; the agent
(guestagent.py) answers on a virtio-serial port whose host end is a unix socket. QEMU's
TCG is used unless /dev/kvm can really run a guest (here it is a nested PVM hypervisor
that cannot run a stock Debian kernel): ``-accel kvm`` is tried only when
FAAS_GUEST_ACCEL=kvm asks for it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from tests.guest.guestagent import LineReader, decode, encode

Say = Callable[[str], None]


class GuestError(AssertionError):
    """The guest did not do what was asked; the message says what and shows its output."""


class Guest:
    """One QEMU process: ``start()``, ``sh(cmd)``, ``reboot()``, ``stop()``."""

    def __init__(self, image_dir: Path, data_disk: Path, work: Path, say: Say = print,
                 memory_mb: int = 3072, cpus: int = 2) -> None:
        self.image_dir = image_dir
        self.data_disk = data_disk
        self.work = work
        self.say = say
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.overlay = work / "overlay.qcow2"
        self.agent_path = work / "agent.sock"
        self.console = work / "console.log"
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.reader = LineReader()

    def argv(self) -> list[str]:
        accel = os.environ.get("FAAS_GUEST_ACCEL", "tcg")
        accel_arg = "tcg,thread=multi" if accel == "tcg" else accel
        return [
            "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
            "-accel", accel_arg, "-cpu", "max" if accel == "tcg" else "host",
            "-smp", str(self.cpus), "-m", str(self.memory_mb),
            "-kernel", str(self.image_dir / "vmlinuz"),
            "-initrd", str(self.image_dir / "initrd.img"),
            "-append", "root=/dev/vda rw console=ttyS0 net.ifnames=0 panic=-1",
            "-drive", f"file={self.overlay},if=virtio,format=qcow2,cache=unsafe",
            "-drive", f"file={self.data_disk},if=virtio,format=raw,readonly=on",
            "-nic", "none",
            "-serial", f"file:{self.console}",
            "-device", "virtio-serial",
            "-chardev", f"socket,id=agent,path={self.agent_path},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=org.faasd.agent",
            "-device", "virtio-rng-pci",
        ]

    def start(self, boot_timeout: float = 300) -> float:
        """Create the overlay, start QEMU, wait for the agent; the boot's seconds."""
        for tool in ("qemu-system-x86_64", "qemu-img"):
            if shutil.which(tool) is None:
                raise GuestError(f"{tool} is missing: run ./install.sh --no-start, which "
                                 "installs the test tools (qemu-system-x86, qemu-utils)")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                        str(self.image_dir / "rootfs.img"), str(self.overlay)], check=True)
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._connect(t0 + 30)
        self.sync(boot_timeout)
        return time.monotonic() - t0

    def _connect(self, deadline: float) -> None:
        while True:
            self._check_alive()
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(self.agent_path))
                self.sock = s
                return
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise GuestError(f"QEMU's agent socket {self.agent_path} never came up")
                time.sleep(0.1)

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
            raise GuestError(f"QEMU exited {self.proc.returncode}: {out[-2000:]}\n"
                             f"console tail:\n{self.console_tail()}")

    def console_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no console output)"

    def _send(self, msg: dict) -> None:
        assert self.sock is not None
        self.sock.settimeout(30)
        self.sock.sendall(encode(msg))

    def _receive(self, want: str, deadline: float) -> dict | None:
        """The answer with id ``want``, or None at the deadline; others are dropped."""
        assert self.sock is not None
        while time.monotonic() < deadline:
            self._check_alive()
            self.sock.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise GuestError("QEMU closed the agent socket")
            for line in self.reader.feed(data):
                msg = decode(line)
                if msg and msg.get("id") == want:
                    return msg
        return None

    def sync(self, timeout: float) -> None:
        """Wait until the agent answers a ping with a fresh id. While the guest's port is
        closed QEMU leaves what we send in the socket, so the first ping is read at the
        next boot; one more every 10 s covers a ping an agent read and died with. Not
        more often: each fills the socket's buffer until the guest reads."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ping = uuid.uuid4().hex
            try:
                self._send({"id": ping, "cmd": "true", "timeout": 10})
            except TimeoutError:  # nobody reads and the buffer is full: wait for a reader
                pass
            if self._receive(ping, min(deadline, time.monotonic() + 10)):
                return
        raise GuestError(f"the guest's agent did not answer within {timeout:.0f}s; "
                         f"console tail:\n{self.console_tail()}")

    def run(self, cmd: str, timeout: float = 120) -> dict:
        """Run bash text in the guest as root: {"rc", "stdout", "stderr"}."""
        rid = uuid.uuid4().hex
        self._send({"id": rid, "cmd": cmd, "timeout": timeout})
        reply = self._receive(rid, time.monotonic() + timeout + 30)
        if reply is None:
            raise GuestError(f"no answer within {timeout + 30:.0f}s to: {cmd[:200]}")
        return reply

    def sh(self, cmd: str, timeout: float = 120) -> str:
        """Run bash text; its stdout, or GuestError naming the command and its output."""
        r = self.run(cmd, timeout)
        if r["rc"] != 0:
            raise GuestError(f"in the guest, exit {r['rc']}: {cmd[:300]}\n"
                             f"stdout: {r['stdout'][-3000:]}\nstderr: {r['stderr'][-3000:]}")
        return r["stdout"]

    def boot_id(self) -> str:
        return self.sh("cat /proc/sys/kernel/random/boot_id").strip()

    def reboot(self, timeout: float = 300) -> float:
        """``systemctl reboot`` (QEMU restarts the machine); seconds until the agent of the
        new boot answers."""
        before = self.boot_id()
        t0 = time.monotonic()
        self.sh("systemd-run --on-active=1 --timer-property=AccuracySec=100ms "
                "systemctl reboot")
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            self.sync(deadline - time.monotonic())
            # The agent of the old boot may answer the ping and die before this one.
            rid = uuid.uuid4().hex
            self._send({"id": rid, "cmd": "cat /proc/sys/kernel/random/boot_id",
                        "timeout": 10})
            r = self._receive(rid, min(deadline, time.monotonic() + 15))
            if r and r["rc"] == 0 and r["stdout"].strip() not in ("", before):
                return time.monotonic() - t0
            time.sleep(1)  # the old boot is still shutting down; ask again
        raise GuestError(f"the guest did not come back within {timeout:.0f}s of a reboot; "
                         f"console tail:\n{self.console_tail()}")

    def stop(self) -> None:
        """Kill QEMU and remove the overlay and sockets, whatever state it is in."""
        if self.sock is not None:
            self.sock.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        for path in (self.overlay, self.agent_path):
            path.unlink(missing_ok=True)
