"""Throwaway network namespaces and whole faasd instances for integration tests.

Everything a test starts lives in a namespace the test made and in a directory under
/tmp that it removes: never the host's interfaces, never the host's /run/faasd.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
AGENTS = ("netagent", "dnsagent", "runner")
PROCESSES = ("controller", *AGENTS)


def run(*argv: Any, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; fail loudly with its stderr."""
    kw.setdefault("timeout", 60)
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def poll(what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Call ``probe`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
            if last:
                return last
        except Exception as exc:  # a probe that fails now may pass later
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def http_get(platform: Any, address: str, path: str = "/",
             timeout: float = 10) -> tuple[int, str]:
    """One request to a function from inside the platform's namespace: (status, or 0 for
    no answer, and the body)."""
    out = run(*platform.netns.argv("curl", "-s", "-g", "-m", str(timeout), "-o", "-", "-w",
                                   "\n%{http_code}", f"http://[{address}]{path}"), check=False)
    body, _, code = out.stdout.rpartition("\n")
    return int(code or 0), body


def deploy(platform: Any, image: Any, name: str, *settings: str, timeout: float = 20) -> str:
    """``faasctl new NAME -f IMAGE``, then ``set NAME SETTINGS...``; the function's address
    once it answers 200 on /."""
    out = platform.faasctl("--json", "new", name, "-f", image)
    address = json.loads(out.stdout)["address"]
    if settings:
        platform.faasctl("set", name, *settings)
    poll(f"{name} answering", lambda: http_get(platform, address, "/", 5)[0] == 200, timeout)
    return address


class Netns:
    """A network namespace with only ``lo``, removed with everything in it."""

    def __init__(self, prefix: str = "faas-it"):
        self.name = f"{prefix}-{secrets.token_hex(3)}"
        run("ip", "netns", "add", self.name)
        run("ip", "-n", self.name, "link", "set", "lo", "up")

    def argv(self, *cmd: Any) -> list[str]:
        # nsenter --net, not `ip netns exec`: that one also remounts /sys, which hides
        # the cgroup mounts runc needs.
        return ["nsenter", f"--net=/var/run/netns/{self.name}", *map(str, cmd)]

    def pids(self) -> list[int]:
        out = run("ip", "netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]

    def delete(self) -> list[int]:
        """Kill what is left inside, remove the namespace; return the pids that were left."""
        left = self.pids()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        run("ip", "netns", "del", self.name, check=False)
        return left


class Platform:
    """One faasd instance under supervisord, inside ``netns``, in a private directory."""

    def __init__(self, netns: Netns, config: str = ""):
        self.netns = netns
        self.base = Path(tempfile.mkdtemp(prefix="faas-it-", dir="/tmp"))
        self.base.chmod(0o755)  # the faas user must reach its directories below
        self.root, self.run_dir = self.base / "root", self.base / "run"
        conf = self.base / "faasd.toml"
        conf.write_text(config)
        self.config = config
        conf.chmod(0o644)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FAAS_")}
        # A WireGuard interface name of its own: wireguard-go's control socket lives in
        # /var/run/wireguard, which network namespaces share.
        self.interface = f"wgt{secrets.token_hex(3)}"
        self.env.update(FAAS_ROOT=str(self.root), FAAS_RUN=str(self.run_dir),
                        FAAS_WG_INTERFACE=self.interface,
                        FAAS_CONFIG=str(conf), FAAS_SUPERVISORD_CONF=str(REPO / "supervisord.conf"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.base / "faasd-up.log", "wb")
        self.proc = subprocess.Popen(self.netns.argv(BIN / "faasd", "up", "--foreground"),
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def faasctl(self, *args: Any, as_user: tuple[int, int, list[int]] | None = None,
                check: bool = True, input: str | None = None
                ) -> subprocess.CompletedProcess[str]:
        argv = [BIN / "faasctl", *args]
        if as_user is not None:
            uid, gid, groups = as_user
            grp_arg = ("--groups=" + ",".join(map(str, groups))) if groups else "--clear-groups"
            argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", grp_arg, *argv]
        return run(*argv, env=self.env, check=check, input=input)

    def status(self) -> dict[str, dict[str, Any]]:
        """faasctl --json status, by process name (exit status ignored: 9 while unhealthy)."""
        out = self.faasctl("--json", "status", check=False)
        return {p["name"]: p for p in json.loads(out.stdout)["processes"]}

    def healthy(self) -> dict[str, dict[str, Any]] | None:
        rows = self.status()
        ok = all(rows[n]["state"] == "up" and rows[n]["synced"] for n in PROCESSES)
        return rows if ok else None

    def wait_healthy(self, timeout: float = 20) -> dict[str, dict[str, Any]]:
        return poll("every process up and synced", self.healthy, timeout, interval=0.1)

    def ctl(self, *args: Any, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(BIN / "faasd", "ctl", *args, env=self.env, check=check)

    def daemon(self, program: str, as_faas: bool) -> subprocess.CompletedProcess[str]:
        """Start another copy of a daemon in the namespace, as supervisord would."""
        argv: list[object] = [BIN / f"faas-{program}"]
        if as_faas:
            argv = ["setpriv", "--reuid=faas", "--regid=faas", "--init-groups", *argv]
        return run(*self.netns.argv(*argv), env=self.env, check=False, timeout=30)

    def log_lines(self, program: str) -> list[dict[str, Any]]:
        text = (self.root / "logs" / f"{program}.log").read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def stop(self) -> None:
        """`faasd down`: supervisord and its programs stopped, then the interface (and
        wireguard-go with it, which outlives netagent) and the chains removed."""
        if self.proc is not None and self.proc.poll() is None:
            run(*self.netns.argv(BIN / "faasd", "down"), env=self.env, check=False,
                timeout=120)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def mounts(self) -> list[str]:
        """Mount points under this instance's directory, deepest first."""
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        return sorted((p for p in points if p.startswith(f"{self.base}/")), reverse=True)

    def remove(self) -> None:
        # The runner mounts a tmpfs for secrets' copies where FAAS_RUN is not one (/tmp)
        for point in self.mounts():
            run("umount", "-l", point, check=False)
        shutil.rmtree(self.base, ignore_errors=True)
