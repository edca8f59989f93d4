"""The runner's half of the handler protocol, played by the tests (no containers needed).

(A uniquely named module rather than conftest.py: several conftest modules share one
name in sys.modules, so importing helpers from "conftest" depends on collection order.)

``FakeRunner`` binds a SOCK_SEQPACKET listener, accepts the handler's control connection,
makes a TCP connection pair on 127.0.0.1 for each request, hands the accepted end over
with SCM_RIGHTS in a conn packet, closes its own copy and talks HTTP from the client end.
Every wait is a blocking call with a timeout: no sleeps.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SDK_DIR = REPO / "sdk"
EXAMPLES = REPO / "examples"
TIMEOUT = 10.0

sys.path.insert(0, str(SDK_DIR))  # the in-process tests import faas_handler itself


@dataclass
class Reply:
    """An HTTP response as the client saw it."""

    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes = b""
    interim: list[int] = field(default_factory=list)  # 1xx statuses before the final one


def parse_reply(raw: bytes) -> Reply:
    """Split a whole response (read to EOF) into status, headers (lower-case) and body."""
    interim = []
    rest = raw
    while True:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        assert sep, f"no end of headers in {raw[:300]!r}"
        lines = head.decode("latin-1").split("\r\n")
        version, status, *_ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1", lines[0]
        if not 100 <= int(status) < 200:
            break
        interim.append(int(status))
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        assert len(rest) == int(headers["content-length"]), (headers, rest[:200])
    return Reply(int(status), headers, rest, raw, interim)


def recv_all(sock: socket.socket) -> bytes:
    """Everything until the peer closes (the SDK always closes after one response)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def get(target: str, headers: str = "") -> bytes:
    """A raw GET request."""
    return f"GET {target} HTTP/1.1\r\nHost: fn.faas\r\n{headers}\r\n".encode()


class FakeRunner:
    """A control socket at ``path`` and the runner's moves on it."""

    def __init__(self, directory: Path, name: str = "control.sock") -> None:
        self.path = str(directory / name)
        self.log_path = directory / f"{name}.stderr"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.settimeout(TIMEOUT)
        self.ctl: socket.socket | None = None
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self.served = 0

    # -- the handler ---------------------------------------------------------------------

    def start(self, argv: Sequence[str], env: dict[str, str] | None = None,
              inherit: bool = True) -> subprocess.Popen:
        """Start a handler process that finds this control socket in its environment
        (``inherit``: on top of this process's environment, else ``env`` alone)."""
        if not inherit:
            full_env = dict(env or {})
        else:
            inherited = {k: v for k, v in os.environ.items() if not k.startswith("FAAS_")}
            full_env = {**inherited, "FAAS_CONTROL_SOCKET": self.path,
                        "PYTHONPATH": str(SDK_DIR), **(env or {})}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(list(argv), env=full_env, stderr=log,
                                         stdin=subprocess.DEVNULL)
        return self.proc

    def start_python(self, script: Path, reuse: bool = False) -> subprocess.Popen:
        """Start a Python handler script with the host's interpreter and sdk/ on its path."""
        return self.start([sys.executable, str(script)], {"FAAS_REUSE": "1" if reuse else "0"})

    def start_thread(self, target: Callable[..., None], **kwargs: object) -> None:
        """Run ``target(control=path, **kwargs)`` (faas_handler.serve) in this process."""
        self.thread = threading.Thread(target=target, kwargs={"control": self.path, **kwargs},
                                       daemon=True)
        self.thread.start()

    def accept(self) -> "FakeRunner":
        """Wait for the handler's control connection (it means: ready)."""
        self.ctl, _ = self.listener.accept()
        self.ctl.settimeout(TIMEOUT)
        return self

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- packets ---------------------------------------------------------------------------

    def send(self, message: object, fds: Sequence[int] = ()) -> None:
        """A control packet: JSON (or raw bytes) with ``fds`` attached."""
        assert self.ctl is not None
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        if fds:
            socket.send_fds(self.ctl, [data], list(fds))
        else:
            self.ctl.send(data)

    def packet(self) -> dict | None:
        """The next packet from the handler; None when it closed its end."""
        assert self.ctl is not None
        data = self.ctl.recv(65536)
        return json.loads(data) if data else None

    def connect(self, extra_fds: Sequence[int] = (), rid: str | None = None,
                deadline: float | None = None, blocking: bool = False) -> socket.socket:
        """Hand the handler a fresh TCP connection; returns the client's end. Like the
        runner's (asyncio), the handed socket is non-blocking unless ``blocking``."""
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
            server, _ = listener.accept()
        server.setblocking(blocking)
        self.served += 1
        message = {"type": "conn", "id": rid or f"req-{self.served}", "remote": "127.0.0.1",
                   "deadline": deadline if deadline is not None else time.time() + 30}
        try:
            self.send(message, [server.fileno(), *extra_fds])
        finally:
            server.close()  # the handler holds the only copy now
        return client

    def request(self, raw: bytes, extra_fds: Sequence[int] = (), rid: str | None = None,
                deadline: float | None = None, blocking: bool = False) -> Reply:
        """One whole HTTP exchange through the handler."""
        client = self.connect(extra_fds, rid, deadline, blocking)
        with client:
            client.sendall(raw)
            return parse_reply(recv_all(client))

    def expect_done(self, rid: str) -> None:
        assert self.packet() == {"type": "done", "id": rid}, self.stderr()

    # -- the end ---------------------------------------------------------------------------

    def stop(self) -> int | None:
        """Close the control socket (the protocol's stop); the handler's exit status."""
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None
        if self.thread is not None:
            self.thread.join(TIMEOUT)
            assert not self.thread.is_alive(), "serve() did not return after stop"
        if self.proc is not None:
            return self.proc.wait(TIMEOUT)
        return None

    def close(self) -> None:
        if self.ctl is not None:
            self.ctl.close()
        self.listener.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def closed_by_peer(read_end: int) -> bool:
    """True once every other copy of a pipe's write end is closed (EOF), waiting at most
    TIMEOUT; False if data or nothing arrives."""
    import select

    ready, _, _ = select.select([read_end], [], [], TIMEOUT)
    return bool(ready) and os.read(read_end, 1) == b""
