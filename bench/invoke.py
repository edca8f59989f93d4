"""Invocation benchmark: faasd against the least code that does the same, in one run.

Starts the whole platform (supervisord, the four daemons) in a network namespace of its
own, as the integration tests do, deploys the static C test handler and sends HTTP
requests from inside that namespace only. Measured in the same run, on the same image,
per OCI runtime (runc and crun side by side):

    plain       a plain server process answering the handler's bytes (no handler)
    process     a fork+exec of the handler binary per connection (no container)
    direct      the handler binary, 4 processes kept serving (no container, no daemon)
    floor-cold  the cold floor: `runc run` / `crun run` after accept(), one hand-over
    floor-pre   the pre-started floor: the same, containers started ahead (pool of 4)
    cold        faasd, one-shot, no warm pool (the default settings)
    egress      the same with network=egress: containers join the function's namespace
    warm        faasd, one-shot, min_warm=4
    reuse       faasd, reuse=true min_warm=1

Prints p50/p90/p99 of time to first byte and of the whole request, sequential and with
32 concurrent clients (requests/s, CPU per request), the ratios of each faasd mode to
what it is held against, and the targets with PASS/MISS (issue 4's four, and issue
13's: egress cold start within 1.1x of cold, same run; the throughput
one from ``--rounds`` alternating runs of direct and reuse). ``--leak-check N`` instead
sends N requests to a one-shot function and compares what exists before and after.
What each target is, exactly: docs/bench-invoke.md. Run as root:
`/opt/faasd/venv/bin/python bench/invoke.py [--requests N] [--runtime runc|crun|both]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SELF = Path(__file__).resolve()
REPO = SELF.parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration")]

from harness import BIN, Netns, Platform, poll, run  # noqa: E402

from runner import handler_protocol  # noqa: E402
from runner.bundle import CGROUP_PARENT, FunctionSettings, build_config, write_bundle  # noqa: E402
from runner.images.extract import extract  # noqa: E402
from runner.runtime import CGROUP_ROOT, runtime_for  # noqa: E402
from runner.store import make_mountpoints  # noqa: E402
from tests.imagebuild import Dir, File, build_image  # noqa: E402

HANDLER_C = REPO / "tests" / "integration" / "handlers" / "testhandler.c"
PORTS = {"plain": 8001, "process": 8002, "floor-cold": 8003, "floor-pre": 8004, "direct": 8005}
POOL = 4  # containers started ahead: faasd's warm mode and the pre-started floor alike
BODY = b"ok 1 pid 1"  # what a one-shot test handler answers, pid 1 of its pid namespace
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(BODY), BODY))
# Every client is one address: a per-address cap it never reaches, but one that is counted
# (per_client=off would skip the counting and flatter the figures).
PER_CLIENT = "per_client=4096"
MODES = {  # faasd function name -> `faasctl set` arguments
    "cold": (PER_CLIENT,),
    # the same cold start, the containers joining the function's egress namespace
    "egress": ("network=egress", PER_CLIENT),
    "warm": (f"min_warm={POOL}", PER_CLIENT),
    "reuse": ("reuse=true", "min_warm=1", PER_CLIENT),
}
FAST = {"plain", "direct", "reuse"}  # no process start per request: longer concurrent runs
HZ = os.sysconf("SC_CLK_TCK")
# One Python process of 32 client threads tops out near 4,000-5,000 requests/s (its
# GIL, not the servers); four processes of 8 threads reach 15,000 on the plain server.
CLIENT_PROCESSES = 4
WARMUP = 3  # requests per target before measuring: page cache, first-use paths
LEAK_FUNCTION = "benchleak"
SETTLE_TIMEOUT = 60.0  # seconds for the leak check's counts to come back


# --- inside the namespace: the client ------------------------------------------------


def one_request(host: str, port: int) -> tuple[float, float, str, bytes]:
    """(ms to first byte, ms to the end, status, body), timed from before connect()."""
    started = time.perf_counter()
    first = None
    data = b""
    try:
        with socket.create_connection((host, port), timeout=30) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: fn\r\nConnection: close\r\n\r\n")
            while chunk := s.recv(65536):
                if first is None:
                    first = time.perf_counter()
                data += chunk
    except OSError as exc:
        return math.nan, math.nan, type(exc).__name__, b""
    end = time.perf_counter()
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b" ")[1].decode() if head.startswith(b"HTTP/1.1 ") else "empty"
    ttfb = (first or end) - started
    return ttfb * 1e3, (end - started) * 1e3, status, body


def busy_seconds() -> float:
    """CPU time the whole machine has spent busy (every core, idle and iowait excluded)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / HZ


def process_seconds(pid: int) -> float:
    """CPU time (user and system) one process has used, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def client_threads(host: str, port: int, count: int, threads: int, gap: float
                   ) -> list[tuple[float, float, str, str]]:
    """Send ``count`` requests from ``threads`` threads, each sequential with ``gap``
    seconds between its requests; the samples."""
    samples: list[tuple[float, float, str, str]] = []
    left = iter(range(count))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if next(left, None) is None:
                    return
            ttfb, total, status, body = one_request(host, port)
            with lock:
                samples.append((ttfb, total, status, body.decode(errors="replace")))
            if gap:
                time.sleep(gap)

    running = [threading.Thread(target=worker) for _ in range(threads)]
    for t in running:
        t.start()
    for t in running:
        t.join()
    return samples


def client(host: str, port: int, count: int, concurrency: int, gap: float,
           watch: int | None) -> None:
    """``concurrency`` clients, as threads spread over up to CLIENT_PROCESSES processes
    that start together; print every sample as JSON, with the run's wall time and the
    CPU time the machine (and the process ``watch``, if any) spent meanwhile."""
    procs = min(concurrency, CLIENT_PROCESSES)
    go_read, go_write = os.pipe()
    children = []
    for i in range(procs):
        threads = concurrency // procs + (i < concurrency % procs)
        share = count * threads // concurrency + (i < count * threads % concurrency)
        out_read, out_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # a client process: wait for the start, run, send the samples up
            try:
                os.close(go_write)
                os.read(go_read, 1)
                began = time.perf_counter()
                samples = client_threads(host, port, share, threads, gap)
                with os.fdopen(out_write, "w") as out:
                    json.dump({"began": began, "ended": time.perf_counter(),
                               "samples": samples}, out)
            finally:
                os._exit(0)  # never back into the parent's code
        os.close(out_write)
        children.append((pid, out_read))
    os.close(go_read)
    cpu = (busy_seconds(), process_seconds(watch) if watch else 0.0)
    go = time.perf_counter()
    os.write(go_write, b"go" * procs)
    parts = []
    for pid, out_read in children:
        with os.fdopen(out_read) as f:
            parts.append(json.load(f))
        os.waitpid(pid, 0)
    cpu = (busy_seconds() - cpu[0], process_seconds(watch) - cpu[1] if watch else math.nan)
    cpu_wall = time.perf_counter() - go  # the wall time the CPU times were taken over
    samples = [s for part in parts for s in part["samples"]]
    statuses: dict[str, int] = {}
    for s in samples:
        statuses[s[2]] = statuses.get(s[2], 0) + 1
    print(json.dumps({
        "ttfb": [s[0] for s in samples if s[2] == "200"],
        "total": [s[1] for s in samples if s[2] == "200"],
        "statuses": statuses,
        "bodies": sorted({s[3] for s in samples})[:3],
        "wall": max(p["ended"] for p in parts) - min(p["began"] for p in parts),
        "cpu": cpu[0],  # seconds, every core: clients, servers, containers, the rest
        "cpu_watched": cpu[1],
        "cpu_wall": cpu_wall,
    }))


# --- inside the namespace: the servers that are not faasd ----------------------------


def listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::1", port))
    sock.listen(1024)
    return sock


def serve_plain(port: int) -> None:
    """plain: one process, accept, read the request, write the handler's bytes."""
    sock = listener(port)
    print("ready", flush=True)
    while True:
        conn, _ = sock.accept()
        with conn:
            conn.recv(2048)  # as the handler: one read
            conn.sendall(RESPONSE)


def conn_packet(rid: str, remote: str) -> bytes:
    """The handler protocol's ``conn`` packet, as faasd's runner sends it."""
    return handler_protocol.conn_packet(rid, remote, time.time() + 30)


def start_handler(spec: dict[str, Any], ctl_path: str, reuse: bool, log: Any
                  ) -> subprocess.Popen[bytes]:
    """The handler binary as a bare process (as 65534, as in a container), no container."""
    return subprocess.Popen(
        [spec["handler"]], env={"FAAS_CONTROL_SOCKET": ctl_path, "FAAS_REUSE": str(int(reuse))},
        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        user=65534, group=65534, extra_groups=[])


def control_socket(path: str) -> socket.socket:
    """A listening SOCK_SEQPACKET control socket the handler (uid 65534) may connect to."""
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        ctl.bind(path)
        os.chmod(path, 0o666)
        ctl.listen(1)
    except OSError:
        ctl.close()
        raise
    return ctl


def serve_direct(port: int, spec_path: str, workers: int) -> None:
    """direct: the handler binary run as ``workers`` long-lived processes (FAAS_REUSE=1),
    no container, no daemon. Each is fed by a thread running the least loop that speaks
    the protocol: accept on the shared listener, hand the connection over, wait for
    ``done``, accept the next."""
    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["work"]) / "direct"
    work.mkdir(parents=True, exist_ok=True)
    sock = listener(port)
    handlers = []
    with open(work / "handler.log", "ab") as log:
        for worker in range(workers):
            ctl_path = str(work / f"ctl-{worker}.sock")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ctl_path)
            with control_socket(ctl_path) as ctl:
                start_handler(spec, ctl_path, True, log)
                ctl.settimeout(10)
                handler, _ = ctl.accept()
            handler.settimeout(None)
            handlers.append(handler)
    threads = [threading.Thread(target=feed, args=(sock, h, f"direct-{i}"), daemon=True)
               for i, h in enumerate(handlers)]
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:  # SIGTERM ends us; each handler then reads EOF and exits
        t.join()


def feed(sock: socket.socket, handler: socket.socket, name: str) -> None:
    """One direct worker: a connection at a time to one handler process."""
    served = 0
    while True:
        conn, addr = sock.accept()
        served += 1
        with conn:
            socket.send_fds(handler, [conn_packet(f"{name}-{served}", addr[0])], [conn.fileno()])
        if not handler.recv(4096):  # its `done`: free for the next connection
            print(f"{name}: the handler exited", file=sys.stderr, flush=True)
            return


@dataclass
class Started:
    """A handler started for one connection, connected to its control socket."""

    cid: str
    ctl_path: str
    bundle: Path
    ctl: socket.socket
    proc: subprocess.Popen[bytes] | None = None
    handler: socket.socket | None = None


class PerConnection:
    """The cold floor, the least code that serves a connection with a fresh container:
    for every accepted connection, start the handler (in a container, or as a bare
    process), wait for it on its control socket, hand the connection over (SCM_RIGHTS,
    the handler protocol), wait for its exit, clean up. One thread per connection,
    blocking calls, no daemon, no messaging; nothing is started before accept()."""

    def __init__(self, spec: dict[str, Any], runtime: str | None):
        self.spec = spec
        self.work = Path(spec["work"]) / (runtime or "process")
        (self.work / "ctl").mkdir(parents=True, exist_ok=True)
        (self.work / "bundles").mkdir(mode=0o700, exist_ok=True)
        self.runtime = runtime_for(runtime, root=str(self.work / "state")) if runtime else None
        if self.runtime is not None:
            self.runtime.check()
        self.settings = FunctionSettings(env={"FAAS_REUSE": "0"})  # faasd's defaults
        self.log: Any = None  # the containers' stdout and stderr, kept as faasd keeps them
        self.stopping = False
        self.threads: set[threading.Thread] = set()

    def serve(self, port: int) -> None:
        """Accept until SIGTERM, then let the connections in flight finish."""
        sock = listener(port)
        sock.settimeout(0.2)  # to notice SIGTERM
        with sock, open(self.work / "containers.log", "ab") as self.log:
            self.before_ready()
            print("ready", flush=True)
            while not self.stopping:
                try:
                    conn, addr = sock.accept()
                except TimeoutError:
                    continue
                t = threading.Thread(target=self.handle, args=(conn, addr[0]))
                self.threads.add(t)
                t.start()
            sock.close()
            for t in list(self.threads):
                t.join(35)
            self.after_stop()

    def before_ready(self) -> None:
        """Nothing is started ahead here."""

    def after_stop(self) -> None:
        """Nothing is left to stop here."""

    def take(self) -> Started:
        """The handler for a connection just accepted: started now."""
        return self.launch()

    def handle(self, conn: socket.socket, remote: str) -> None:
        started = None
        try:
            started = self.take()
            assert started.handler is not None and started.proc is not None
            socket.send_fds(started.handler, [conn_packet(started.cid, remote)], [conn.fileno()])
            conn.close()
            started.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"{started.cid if started else 'start'}: {exc}", file=sys.stderr, flush=True)
        finally:
            conn.close()
            self.finished()
            if started is not None:
                self.clean(started)
            self.threads.discard(threading.current_thread())

    def finished(self) -> None:
        """A connection is over (its handler has exited): nothing to do here."""

    def launch(self) -> Started:
        """Bind a control socket, start the handler, wait until it has connected."""
        cid = f"bench-{secrets.token_hex(6)}"
        ctl_path = str(self.work / "ctl" / f"{cid}.sock")
        started = Started(cid, ctl_path, self.work / "bundles" / cid, control_socket(ctl_path))
        try:
            started.proc = self.start(cid, started.bundle, ctl_path)
            started.ctl.settimeout(10)
            started.handler, _ = started.ctl.accept()
            started.handler.settimeout(None)
        except BaseException:
            self.clean(started)
            raise
        return started

    def clean(self, started: Started) -> None:
        """Stop what is left of it, remove its container, bundle and control socket."""
        if started.handler is not None:
            started.handler.close()  # a handler still waiting reads EOF and exits
        started.ctl.close()
        proc = started.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.runtime is not None:
            # as faasd (the runner's own delete): `run` removed it already
            asyncio.run(self.runtime.delete(started.cid))
            shutil.rmtree(started.bundle, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(started.ctl_path)

    def start(self, cid: str, bundle: Path, ctl_path: str) -> subprocess.Popen[bytes]:
        if self.runtime is None:
            return start_handler(self.spec, ctl_path, False, self.log)
        bundle.mkdir(mode=0o700)
        write_bundle(str(bundle), build_config(
            self.spec["rootfs"], self.spec["config"], container_id=cid, hostname="bench",
            control_socket=ctl_path, settings=self.settings))
        # The least code: `run` in the foreground, our blocking child, on either runtime.
        return subprocess.Popen(
            self.runtime.run_argv(str(bundle), cid),
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            preexec_fn=self.runtime.preexec_fn)


class PreStarted(PerConnection):
    """The pre-started floor: the cold floor with ``pool`` containers started ahead,
    their handlers already connected. A connection takes a ready one (or, when none is,
    starts one as the cold floor does); once it is over, threads start containers until
    ``pool`` are ready or on their way again, as faasd refills its pool. Each container
    still serves one connection and exits."""

    def __init__(self, spec: dict[str, Any], runtime: str | None, pool: int):
        super().__init__(spec, runtime)
        self.pool = pool
        self.ready: queue.SimpleQueue[Started] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.starting = 0
        self.starters: set[threading.Thread] = set()

    def before_ready(self) -> None:
        self.finished()
        for t in list(self.starters):
            t.join(30)

    def after_stop(self) -> None:
        for t in list(self.starters):
            t.join(30)
        while True:
            try:
                self.clean(self.ready.get_nowait())
            except queue.Empty:
                return

    def take(self) -> Started:
        try:
            return self.ready.get_nowait()
        except queue.Empty:
            return self.launch()  # drained faster than refilled: a cold start

    def finished(self) -> None:
        """Top the pool up: start the containers it lacks, each in a thread of its own."""
        with self.lock:
            missing = 0 if self.stopping else self.pool - self.ready.qsize() - self.starting
            self.starting += max(missing, 0)
        for _ in range(missing):
            t = threading.Thread(target=self._start_one)
            self.starters.add(t)
            t.start()

    def _start_one(self) -> None:
        try:
            self.ready.put(self.launch())
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"pre-start: {exc}", file=sys.stderr, flush=True)
        finally:
            with self.lock:
                self.starting -= 1
            self.starters.discard(threading.current_thread())


def serve_per_connection(port: int, spec_path: str, runtime: str | None, pool: int) -> None:
    spec = json.loads(Path(spec_path).read_text())
    server = PreStarted(spec, runtime, pool) if pool else PerConnection(spec, runtime)

    def stop(*_: Any) -> None:
        server.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve(port)


# --- outside: the run ------------------------------------------------------------------


class BenchPlatform(Platform):
    """The test harness's platform, in a session of its own: a Ctrl-C on the terminal
    reaches the benchmark only, which then shuts the platform down in order."""

    def start(self) -> None:
        with open(self.base / "faasd-up.log", "wb") as log:
            self.proc = subprocess.Popen(self.netns.argv(BIN / "faasd", "up", "--foreground"),
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def pool(self, name: str) -> dict[str, Any] | None:
        """The runner's figures for one function: idle, busy, starting, counters."""
        stats = json.loads(self.faasctl("--json", "top").stdout)["runner"] or {}
        return next((f for f in stats.get("functions", []) if f["name"] == name), None)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def rate(m: dict[str, Any] | None) -> float:
    """Answered requests per second of wall time."""
    return len(m["ttfb"]) / m["wall"] if m else math.nan


class Bench:
    """One runtime's measurements in one namespace with one platform."""

    def __init__(self, ns: Netns, platform: BenchPlatform, work: Path, args: argparse.Namespace):
        self.ns = ns
        self.platform = platform
        self.work = work
        self.args = args
        self.runner: int = platform.status()["runner"]["pid"]

    def measure(self, host: str, port: int, concurrency: int, count: int,
                gap: float, watch: int = 0) -> dict[str, Any]:
        """One client run; ``watch``: a pid whose CPU time to count meanwhile."""
        out = run(*self.ns.argv(sys.executable, SELF, "client", host, port, count, concurrency,
                                gap, watch), timeout=600 + count)
        result = json.loads(out.stdout)
        bad = {k: v for k, v in result["statuses"].items() if k != "200"}
        if bad:
            print(f"  warning: {host} port {port}: non-200 answers {bad}", file=sys.stderr)
        return result

    def target(self, host: str, port: int, fast: bool, function: str | None = None
               ) -> dict[str, Any]:
        """Warm-up, the sequential run, then the concurrent run; for a faasd
        ``function``, how the runner served each run's requests."""
        a = self.args
        self.measure(host, port, 1, WARMUP, a.gap)
        runs = {"seq": (1, a.gap, a.requests)}
        if a.concurrency > 1:
            runs["conc"] = (a.concurrency, 0, a.conc_requests if fast else a.requests)
        result: dict[str, Any] = {"conc": None}
        for kind, (concurrency, gap, count) in runs.items():
            if kind == "conc" and fast:  # a reused pool grows to the load first
                self.measure(host, port, concurrency, 2 * concurrency, 0)
            mark = self.counters(function) if function else {}
            result[kind] = self.measure(host, port, concurrency, count, gap,
                                        self.runner if function else 0)
            if function:
                result[kind]["outcomes"] = self.served(function, mark, count)
        return result

    def counters(self, function: str) -> dict[str, int]:
        """The runner's hand-over counters of the function (faasctl --json top)."""
        stats = json.loads(self.platform.faasctl("--json", "top").stdout)["runner"]
        f = next(f for f in stats["functions"] if f["name"] == function)
        return {"cold": f["cold"], "warm": f["warm"], "reused": f["reused"],
                "refused": f["rejected"] + f["failed"]}

    def served(self, function: str, mark: dict[str, int], count: int) -> dict[str, int]:
        """How the runner served the requests since ``mark``: cold, warm, reused (its
        counters move at the hand-over, so they are there when the answers are)."""
        def counts() -> dict[str, int] | None:
            now = self.counters(function)
            c = {k: now[k] - mark[k] for k in now if now[k] > mark[k]}
            return c if sum(c.values()) >= count else None
        return poll("the runner's counters", counts, 10)

    def helper(self, *argv: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen(self.ns.argv(sys.executable, SELF, *argv),
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            proc.kill()
            raise RuntimeError(f"{argv[0]} did not start")
        return proc

    def not_faasd(self, name: str, *argv: Any) -> dict[str, Any]:
        proc = self.helper(*argv)
        try:
            return self.target("::1", PORTS[name], name in FAST)
        finally:
            proc.terminate()
            proc.wait(60)

    def deploy(self, name: str, settings: tuple[str, ...]) -> str:
        """Deploy the handler as ``name``, wait until it answers and its pool is full;
        its address."""
        p = self.platform
        out = p.faasctl("--json", "new", name, "-f", self.work / "handler.tar")
        address = json.loads(out.stdout)["address"]
        if settings:
            p.faasctl("set", name, *settings)
        poll(f"{name} answering", lambda: self.measure(address, 80, 1, 1, 0)["statuses"]
             .get("200"), 30)
        warm = next((int(s.split("=")[1]) for s in settings if s.startswith("min_warm=")), 0)

        def full() -> bool:  # every warm handler connected, nothing else on its way
            f = p.pool(name)
            return f is not None and f["idle"] >= warm and f["starting"] == 0
        poll(f"{name}: {warm} warm containers", full, 30)
        return address

    def alternate(self, spec: Path, rounds: int) -> list[dict[str, float]]:
        """direct and faasd reuse both up, their concurrent runs one after the other,
        ``rounds`` times: whatever drifts on the machine meanwhile hits both alike."""
        a = self.args
        proc = self.helper("serve-direct", PORTS["direct"], spec, a.direct_workers)
        try:
            address = self.deploy("alternate", MODES["reuse"])
            sides = {"direct": ("::1", PORTS["direct"]), "reuse": (address, 80)}
            for host, port in sides.values():  # warm-up; the reused pool grows to the load
                self.measure(host, port, a.concurrency, 2 * a.concurrency, 0)
            return [{side: rate(self.measure(host, port, a.concurrency, a.conc_requests, 0))
                     for side, (host, port) in sides.items()} for _ in range(rounds)]
        finally:
            proc.terminate()
            proc.wait(60)

    def faasd(self, name: str, settings: tuple[str, ...]) -> dict[str, Any]:
        address = self.deploy(name, settings)
        result = self.target(address, 80, name in FAST, name)
        self.platform.faasctl("rm", name)
        return result


def prepare(work: Path) -> dict[str, Any]:
    """The handler binary, its image and, for the floors, its extracted rootfs."""
    handler = work / "handler"
    run("gcc", "-static", "-O2", "-o", handler, HANDLER_C)
    build_image(work / "handler.tar",
                [[Dir("tmp", mode=0o1777), File("handler", handler.read_bytes(), mode=0o755)]],
                {"config": {"Cmd": ["/handler"]}})
    image = extract(work / "handler.tar", work / "images", sync=False)
    make_mountpoints(str(image.rootfs))
    spec = {"work": str(work), "handler": str(handler), "rootfs": str(image.rootfs),
            "config": image.config.to_dict()}
    (work / "spec.json").write_text(json.dumps(spec))
    return spec


@contextlib.contextmanager
def platform_in_namespace(runtime: str, work: Path
                          ) -> Iterator[tuple[Netns, BenchPlatform]]:
    """A namespace with the whole platform on ``runtime``; everything removed after."""
    ns = Netns("faas-bench")
    platform = None
    try:
        platform = BenchPlatform(ns, f'runtime = "{runtime}"\n')
        platform.start()
        platform.wait_healthy(60)
        yield ns, platform
    finally:
        if platform is not None:
            platform.stop()
            # what `faasd down` does after supervisord: egress namespaces, veths, chains
            run(*ns.argv(BIN / "faas-netagent", "--remove"), env=platform.env, check=False)
            platform.remove()
        left = ns.delete()
        if left:
            print(f"  killed processes left in {ns.name}: {left}", file=sys.stderr)
        state = work / runtime / "state"  # the floors' containers, if any survived
        if state.is_dir():
            rt = runtime_for(runtime, root=str(state))
            for cid in rt.list():
                asyncio.run(rt.delete(cid))


def bench_runtime(runtime: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Everything measured on one runtime, in its own namespace."""
    with platform_in_namespace(runtime, work) as (ns, platform):
        b = Bench(ns, platform, work, args)
        spec = work / "spec.json"
        results = {
            "plain": b.not_faasd("plain", "serve-plain", PORTS["plain"]),
            "process": b.not_faasd("process", "serve-spawn", PORTS["process"], spec, "none", 0),
            "direct": b.not_faasd("direct", "serve-direct", PORTS["direct"], spec,
                                  args.direct_workers),
            "floor-cold": b.not_faasd("floor-cold", "serve-spawn", PORTS["floor-cold"], spec,
                                      runtime, 0),
            "floor-pre": b.not_faasd("floor-pre", "serve-spawn", PORTS["floor-pre"], spec,
                                     runtime, POOL),
        }
        for name, settings in MODES.items():
            results[name] = b.faasd(name, settings)
        if args.concurrency > 1 and args.rounds:
            results["rounds"] = b.alternate(spec, args.rounds)
        return results


# --- the leak check --------------------------------------------------------------------

CHECKED = ("containers", "bundles", "control sockets", "cgroups", "runner fds",
           "runner children", "mounts")  # must come back; the rest is printed for the record


def leak_counts(platform: BenchPlatform, runtime: str, pid: int) -> dict[str, int]:
    """What one-shot requests create and must remove, and the runner's own resources."""
    proc = Path(f"/proc/{pid}")
    status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines())
    cgroup_dir = CGROUP_PARENT.strip("/")
    return {
        "containers": len(runtime_for(runtime, root=str(platform.run_dir / runtime)).list()),
        "bundles": len(os.listdir(platform.root / "bundles")),
        "control sockets": len(os.listdir(platform.run_dir / "ctl")),
        "cgroups": len(list(Path(CGROUP_ROOT).glob(f"*/{cgroup_dir}/{LEAK_FUNCTION}-*"))),
        "runner fds": len(os.listdir(proc / "fd")),
        "runner children": sum(len((t / "children").read_text().split())
                               for t in (proc / "task").iterdir()),
        "mounts": len((proc / "mountinfo").read_text().splitlines()),
        "runner threads": int(status["Threads"]),
        "runner RSS KiB": int(status["VmRSS"].split()[0]),
    }


def poll_until(probe: Callable[[], dict[str, int]], done: Callable[[dict[str, int]], bool],
               timeout: float) -> tuple[dict[str, int], float | None]:
    """Take ``probe`` until ``done`` says so or ``timeout`` passes: the last reading and
    the seconds it took (None: it never settled)."""
    started = time.monotonic()
    while True:
        counts = probe()
        if done(counts):
            return counts, time.monotonic() - started
        if time.monotonic() - started > timeout:
            return counts, None
        time.sleep(0.1)


def leak_check(runtime: str, work: Path, args: argparse.Namespace) -> bool:
    """N sequential requests to a one-shot function: does everything they made go away?"""
    with platform_in_namespace(runtime, work) as (ns, platform):
        b = Bench(ns, platform, work, args)
        address = b.deploy(LEAK_FUNCTION, ())
        b.measure(address, 80, 1, WARMUP, 0)
        pid = b.runner

        def probe() -> dict[str, int]:
            return leak_counts(platform, runtime, pid)

        def idle(c: dict[str, int]) -> bool:
            f = platform.pool(LEAK_FUNCTION) or {}
            return (f.get("busy") == 0 and f.get("starting") == 0 and
                    not any(c[k] for k in ("containers", "bundles", "control sockets", "cgroups")))
        before, took = poll_until(probe, idle, SETTLE_TIMEOUT)
        if took is None:
            print(f"  warning: not idle before the check: {before}", file=sys.stderr)
        started = time.monotonic()
        m = b.measure(address, 80, 1, args.leak_check, 0)
        elapsed = time.monotonic() - started
        after, settled = poll_until(
            probe, lambda c: all(c[k] <= before[k] for k in CHECKED), SETTLE_TIMEOUT)
        same_runner = platform.status()["runner"]["pid"] == pid
    ok = settled is not None and same_runner and m["statuses"] == {"200": args.leak_check}
    print(f"\nleak check, {runtime}: {args.leak_check} sequential requests to a one-shot "
          f"function (default settings) in {elapsed:.0f} s; answers {m['statuses']}; "
          f"TTFB p50 {percentile(m['ttfb'], 50):.1f} ms, p99 {percentile(m['ttfb'], 99):.1f} ms")
    print(f"{'':26} {'before':>8} {'after':>8}")
    for k in before:
        verdict = ("PASS" if after[k] <= before[k] else "MISS") if k in CHECKED else "(info)"
        print(f"{k:26} {before[k]:8} {after[k]:8}  {verdict}")
    print(f"runner pid {pid}: {'the same' if same_runner else 'CHANGED (it restarted)'}; "
          + (f"settled {settled:.1f} s after the last answer" if settled is not None
             else f"not settled within {SETTLE_TIMEOUT:.0f} s"))
    print(f"LEAK CHECK {runtime}: {'PASS' if ok else 'MISS'}")
    return ok


# --- the report ------------------------------------------------------------------------


LABELS = {
    "plain": "plain server, no handler",
    "process": "fork+exec per request, no container",
    "direct": "direct: handler x{workers}, no container",
    "floor-cold": "cold floor: {rt} run per request",
    "floor-pre": f"pre-started floor: {{rt}}, {POOL} ahead",
    "cold": "faasd cold (one-shot, default)",
    "egress": "faasd cold, network=egress",
    "warm": f"faasd warm (min_warm={POOL})",
    "reuse": "faasd reuse (reuse=true min_warm=1)",
}
AGAINST = {"cold": "floor-cold", "egress": "cold", "warm": "floor-pre", "reuse": "direct"}


def row(label: str, m: dict[str, Any], kind: str) -> str:
    t, tot = m["ttfb"], m["total"]
    served = " ".join(f"{k} {v}" for k, v in sorted(m.get("outcomes", {}).items()))
    load = ""
    if kind == "conc":  # CPU per answered request: the whole machine, and faasd's runner
        runner = f"{m['cpu_watched'] / len(t) * 1e3:6.2f}" if "outcomes" in m else ""
        load = (f"{rate(m):6.0f} {m['cpu'] / m['cpu_wall'] / (os.cpu_count() or 1):5.0%} "
                f"{m['cpu'] / len(t) * 1e3:6.2f} {runner:>6}")
    return (f"{label:42} {len(t):5} {percentile(t, 50):8.2f} {percentile(t, 90):7.2f} "
            f"{percentile(t, 99):7.2f}  {percentile(tot, 50):9.2f} {percentile(tot, 99):7.2f} "
            f"{load:27} {served}")


def ratio(m: dict[str, Any] | None, base: dict[str, Any] | None, p: float) -> float:
    """The p-th percentile of ``m``'s TTFB over ``base``'s."""
    if m is None or base is None:
        return math.nan
    return percentile(m["ttfb"], p) / percentile(base["ttfb"], p)


def shares(r: dict[str, Any]) -> list[float]:
    """faasd reuse's req/s over direct's, per alternating round."""
    return [x["reuse"] / x["direct"] for x in r.get("rounds", [])]


def targets(r: dict[str, Any], clients: int) -> list[tuple[str, str, str, bool]]:
    """The issue's targets (issue 4's four, issue 13's egress cold start): (what,
    measured, target, met). The throughput target
    is the median of the alternating rounds (the single concurrent run without them)."""
    def p50(name: str) -> float:
        return percentile(r[name]["seq"]["ttfb"], 50)
    cold = p50("cold") / p50("floor-cold")
    egress = p50("egress") / p50("cold")
    warm = p50("warm") / p50("floor-pre")
    diff = p50("reuse") - p50("direct")
    each = shares(r)
    share = percentile(each, 50) if each else rate(r["reuse"]["conc"]) / rate(r["direct"]["conc"])
    return [
        ("faasd cold / cold floor, TTFB p50", f"{cold:.2f}x", "<= 1.20x", cold <= 1.2),
        ("faasd cold egress / cold none, TTFB p50", f"{egress:.2f}x", "<= 1.10x",
         egress <= 1.1),
        ("faasd warm / pre-started floor, TTFB p50", f"{warm:.2f}x", "<= 1.50x", warm <= 1.5),
        ("faasd reuse - direct, TTFB p50", f"{diff:+.2f} ms", "<= +0.50 ms", diff <= 0.5),
        (f"faasd reuse / direct, req/s, {clients} clients", f"{share:.0%}", ">= 70%",
         share >= 0.7),
    ]


def report(all_results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    """The tables (one per run kind, a row per runtime and target), the ratios, the
    targets."""
    titles = {"seq": f"sequential: {args.requests} requests, one client, "
                     f"{args.gap * 1e3:.0f} ms between requests",
              "conc": f"concurrent: {args.concurrency} clients back to back, {args.requests} "
                      f"requests ({args.conc_requests} for {', '.join(sorted(FAST))})"}
    for kind, title in titles.items():
        if kind == "conc" and args.concurrency <= 1:
            continue
        print(f"\n{title}; milliseconds (TTFB: connect() to the first response byte)")
        print(f"{'runtime':7} {'target':42} {'n':>5} {'TTFB p50':>8} {'p90':>7} {'p99':>7}  "
              f"{'total p50':>9} {'p99':>7} "
              + (f"{'req/s':>6} {'busy':>5} {'cpu/rq':>6} {'runner':>6} " if kind == "conc"
                 else f"{'':27} ") + "served as")
        for rt, results in all_results.items():
            for name, r in results.items():
                if name == "rounds":
                    continue
                label = LABELS[name].format(rt=rt, workers=args.direct_workers)
                print(f"{rt:7} {row(label, r[kind], kind)}")
    print("\nratios: faasd's TTFB over what it is held against, same runtime and run "
          "(below 1: faasd is faster)")
    print(f"{'runtime':7} {'faasd':6} {'against':18} {'seq p50':>8} {'seq p99':>8} "
          f"{'conc p50':>9} {'conc p99':>9} {'req/s':>7}")
    for rt, results in all_results.items():
        for name, base in AGAINST.items():
            m, b = results[name], results[base]
            r = [ratio(m[kind], b[kind], p) for kind, p in
                 (("seq", 50), ("seq", 99), ("conc", 50), ("conc", 99))]
            against = LABELS[base].split(":")[0].split(" (")[0]
            print(f"{rt:7} {name:6} {against:18} {r[0]:7.2f}x {r[1]:7.2f}x "
                  f"{r[2]:8.2f}x {r[3]:8.2f}x {rate(m['conc']) / rate(b['conc']):6.2f}x")
    if args.concurrency > 1 and args.rounds:
        print(f"\nalternating: direct and faasd reuse both up, {args.concurrency} clients, "
              f"{args.conc_requests} requests each, one after the other, {args.rounds} times; "
              "req/s")
        for rt, results in all_results.items():
            for i, x in enumerate(results["rounds"], 1):
                print(f"{rt:7} round {i}  direct {x['direct']:6.0f}  reuse {x['reuse']:6.0f}  "
                      f"{x['reuse'] / x['direct']:4.0%}")
            print(f"{rt:7} median   {percentile(shares(results), 50):.0%}")
    if args.concurrency > 1:
        note = "" if args.concurrency == 32 else "; the issue says 32"
        print(f"\nTARGETS (issue 4; TTFB p50 of the sequential run; req/s with "
              f"{args.concurrency} concurrent clients{note})")
        for rt, results in all_results.items():
            for what, measured, goal, met in targets(results, args.concurrency):
                print(f"{rt:7} {what:44} {measured:>10}  target {goal:11} "
                      f"{'PASS' if met else 'MISS'}")
    print("\nbusy: the machine's CPU use during the run (every core); cpu/rq: CPU ms per answered "
          "request, every process (client included);\nrunner: of which faasd's runner daemon. "
          "served as: the runner's own account of the measured requests (warm-up excluded).")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        host, port, count, conc, gap, watch = sys.argv[2:8]
        return client(host, int(port), int(count), int(conc), float(gap), int(watch) or None)
    if len(sys.argv) > 1 and sys.argv[1] == "serve-plain":
        return serve_plain(int(sys.argv[2]))
    if len(sys.argv) > 1 and sys.argv[1] == "serve-direct":
        return serve_direct(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    if len(sys.argv) > 1 and sys.argv[1] == "serve-spawn":
        port, spec, rt, pool = sys.argv[2:6]
        return serve_per_connection(int(port), spec, None if rt == "none" else rt, int(pool))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100,
                    help="per target and run; also of the concurrent run of the targets "
                         "that start a process per request (100)")
    ap.add_argument("--conc-requests", type=int, default=10000,
                    help="of the concurrent run of plain, direct and reuse (10000)")
    ap.add_argument("--direct-workers", type=int, default=4,
                    help="handler processes of the direct target (4)")
    ap.add_argument("--runtime", choices=("runc", "crun", "both"), default="both")
    ap.add_argument("--concurrency", type=int, default=32,
                    help="clients of the concurrent run; 1 skips it (32)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="alternating concurrent runs of direct and reuse, whose median "
                         "ratio is the throughput target; 0: the single run's (5)")
    ap.add_argument("--gap", type=float, default=0.05,
                    help="seconds between sequential requests (0.05)")
    ap.add_argument("--json", metavar="FILE", help="also write every sample here")
    ap.add_argument("--leak-check", type=int, metavar="N", default=0,
                    help="instead of measuring: N sequential requests to a one-shot "
                         "function, then compare containers, bundles, sockets, cgroups, "
                         "mounts and the runner's fds with before")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: it creates a network namespace and containers")
    # Ctrl-C and SIGTERM alike unwind through the finally blocks that clean up (also
    # when started from a shell that ignores SIGINT in background jobs).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="faas-bench-", dir="/tmp"))
    work.chmod(0o755)
    try:
        prepare(work)
        runtimes = ("runc", "crun") if args.runtime == "both" else (args.runtime,)
        if args.leak_check:
            verdicts = [leak_check(rt, work, args) for rt in runtimes]
            print(f"\n{time.monotonic() - started:.0f} s in all")
            sys.exit(0 if all(verdicts) else 1)
        results = {}
        for rt in runtimes:
            print(f"{rt}: measuring...", file=sys.stderr, flush=True)
            results[rt] = bench_runtime(rt, work, args)
        report(results, args)
        if args.json:
            Path(args.json).write_text(json.dumps({"results": results, "targets": {
                rt: targets(r, args.concurrency) for rt, r in results.items()}
                if args.concurrency > 1 else {}}))
        print(f"\n{time.monotonic() - started:.0f} s in all")
    except KeyboardInterrupt:
        print("interrupted: namespace, platform and containers removed", file=sys.stderr)
        sys.exit(130)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
