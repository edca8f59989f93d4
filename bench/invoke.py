"""Invocation benchmark: faasd's time to first byte against a container started per request.

Starts the whole platform (supervisord, the four daemons) in a network namespace of its
own, as the integration tests do, deploys the static C test handler and sends HTTP
requests from inside that namespace only. Measured in the same run, on the same image:

    floor      a plain server process answering the handler's bytes (no container)
    process    a fork+exec of the handler binary per connection (no container)
    baseline   a container per connection, `runc run` / `crun run` after accept()
    cold       faasd, one-shot, no warm pool (the default settings)
    warm       faasd, one-shot, min_warm=4
    reuse      faasd, reuse=true min_warm=1

Prints p50/p90/p99 of time to first byte and of the whole request, sequential and
concurrent, and the ratios of each faasd mode to the baseline and to the floor. What
the baseline is, exactly: docs/bench-invoke.md. Run as root:
`/opt/faasd/venv/bin/python bench/invoke.py [--requests N] [--runtime runc|crun|both]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SELF = Path(__file__).resolve()
REPO = SELF.parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration")]

from harness import BIN, Netns, Platform, poll, run  # noqa: E402

from runner.bundle import FunctionSettings, build_config, write_bundle  # noqa: E402
from runner.images.extract import extract  # noqa: E402
from runner.runtime import Runtime  # noqa: E402
from runner.store import make_mountpoints  # noqa: E402
from tests.imagebuild import Dir, File, build_image  # noqa: E402

HANDLER_C = REPO / "tests" / "integration" / "handlers" / "testhandler.c"
FLOOR_PORT, PROCESS_PORT, BASELINE_PORT = 8001, 8002, 8003
BODY = b"ok 1 pid 1"  # what a one-shot test handler answers, pid 1 of its pid namespace
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(BODY), BODY))
MODES = {  # faasd function name -> `faasctl set` arguments
    "cold": (),
    "warm": ("min_warm=4",),
    "reuse": ("reuse=true", "min_warm=1"),
}
WARMUP = 3  # requests per target before measuring: page cache, first-use paths


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


def client(host: str, port: int, count: int, concurrency: int, gap: float) -> None:
    """Send ``count`` requests from ``concurrency`` threads, each sequential with ``gap``
    seconds between its requests; print every sample as JSON."""
    samples: list[tuple[float, float, str, bytes]] = []
    left = iter(range(count))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if next(left, None) is None:
                    return
            sample = one_request(host, port)
            with lock:
                samples.append(sample)
            if gap:
                time.sleep(gap)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses: dict[str, int] = {}
    for s in samples:
        statuses[s[2]] = statuses.get(s[2], 0) + 1
    print(json.dumps({
        "ttfb": [s[0] for s in samples if s[2] == "200"],
        "total": [s[1] for s in samples if s[2] == "200"],
        "statuses": statuses,
        "bodies": sorted({s[3].decode(errors="replace") for s in samples})[:3],
        "wall": time.perf_counter() - started,
    }))


# --- inside the namespace: the servers that are not faasd ----------------------------


def listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::1", port))
    sock.listen(1024)
    return sock


def serve_floor(port: int) -> None:
    """The floor: one process, accept, read the request, write the handler's bytes."""
    sock = listener(port)
    print("ready", flush=True)
    while True:
        conn, _ = sock.accept()
        with conn:
            conn.recv(2048)  # as the handler: one read
            conn.sendall(RESPONSE)


class PerConnection:
    """What a naive platform does: for every accepted connection, start the handler (in
    a fresh container, or as a bare process), wait for it on its control socket, hand
    the connection over (SCM_RIGHTS, the handler protocol), wait for its exit, clean up.
    One thread per connection, blocking calls; nothing is started before accept()."""

    def __init__(self, spec: dict[str, Any], runtime: str | None):
        self.spec = spec
        self.work = Path(spec["work"]) / (runtime or "process")
        (self.work / "ctl").mkdir(parents=True, exist_ok=True)
        (self.work / "bundles").mkdir(mode=0o700, exist_ok=True)
        self.runtime = Runtime(runtime, root=str(self.work / "state")) if runtime else None
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

    def handle(self, conn: socket.socket, remote: str) -> None:
        cid = f"bench-{secrets.token_hex(6)}"
        ctl_path = str(self.work / "ctl" / f"{cid}.sock")
        bundle = self.work / "bundles" / cid
        ctl = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        proc = None
        try:
            ctl.bind(ctl_path)
            os.chmod(ctl_path, 0o666)  # the handler runs as 65534
            ctl.listen(1)
            proc = self.start(cid, bundle, ctl_path)
            ctl.settimeout(10)
            handler, _ = ctl.accept()
            with handler:
                packet = json.dumps({"type": "conn", "id": cid, "remote": remote,
                                     "deadline": time.time() + 30}).encode()
                socket.send_fds(handler, [packet], [conn.fileno()])
                conn.close()
                proc.wait(30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"{cid}: {exc}", file=sys.stderr, flush=True)
        finally:
            conn.close()
            ctl.close()
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            if self.runtime is not None:
                self.runtime.delete(cid, force=True)  # as faasd: runc run removed it already
                shutil.rmtree(bundle, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ctl_path)
            self.threads.discard(threading.current_thread())

    def start(self, cid: str, bundle: Path, ctl_path: str) -> subprocess.Popen[bytes]:
        if self.runtime is None:
            return subprocess.Popen(
                [self.spec["handler"]], env={"FAAS_CONTROL_SOCKET": ctl_path, "FAAS_REUSE": "0"},
                stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                user=65534, group=65534, extra_groups=[])
        bundle.mkdir(mode=0o700)
        write_bundle(str(bundle), build_config(
            self.spec["rootfs"], self.spec["config"], container_id=cid, hostname="bench",
            control_socket=ctl_path, settings=self.settings))
        return subprocess.Popen(
            self.runtime.command("run", "--bundle", str(bundle), cid),
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            preexec_fn=self.runtime.preexec_fn)  # noqa: PLW1509 (three syscalls, fork-safe)


def serve_per_connection(port: int, spec_path: str, runtime: str | None) -> None:
    server = PerConnection(json.loads(Path(spec_path).read_text()), runtime)

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


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


class Bench:
    """One runtime's measurements in one namespace with one platform."""

    def __init__(self, ns: Netns, platform: BenchPlatform, work: Path, args: argparse.Namespace):
        self.ns = ns
        self.platform = platform
        self.work = work
        self.args = args

    def measure(self, host: str, port: int, concurrency: int, count: int,
                gap: float) -> dict[str, Any]:
        out = run(*self.ns.argv(sys.executable, SELF, "client", host, port, count, concurrency,
                                gap), timeout=600)
        result = json.loads(out.stdout)
        bad = {k: v for k, v in result["statuses"].items() if k != "200"}
        if bad:
            print(f"  warning: {host} port {port}: non-200 answers {bad}", file=sys.stderr)
        return result

    def target(self, host: str, port: int, function: str | None = None) -> dict[str, Any]:
        """Warm-up, the sequential run, then the concurrent run; for a faasd
        ``function``, how the runner served each run's requests."""
        self.measure(host, port, 1, WARMUP, self.args.gap)
        runs = {"seq": (1, self.args.gap)}
        if self.args.concurrency > 1:
            runs["conc"] = (self.args.concurrency, 0)
        result: dict[str, Any] = {"conc": None}
        for kind, (concurrency, gap) in runs.items():
            mark = len(self.platform.log_lines("runner")) if function else 0
            result[kind] = self.measure(host, port, concurrency, self.args.requests, gap)
            if function:
                result[kind]["outcomes"] = self.served(function, mark)
        return result

    def served(self, function: str, mark: int) -> dict[str, int]:
        """How the runner served the requests it logged after line ``mark``: cold, warm,
        reused. It logs a request when its container is gone, a moment after the answer."""
        def counts() -> dict[str, int] | None:
            c = outcomes(self.platform.log_lines("runner")[mark:], function)
            return c if sum(c.values()) >= self.args.requests else None
        return poll("the runner's request log", counts, 10)

    def helper(self, *argv: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen(self.ns.argv(sys.executable, SELF, *argv),
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            proc.kill()
            raise RuntimeError(f"{argv[0]} did not start")
        return proc

    def not_faasd(self, what: str, port: int, *extra: str) -> dict[str, Any]:
        proc = self.helper(what, port, *extra)
        try:
            return self.target("::1", port)
        finally:
            proc.terminate()
            proc.wait(60)

    def faasd(self, name: str, settings: tuple[str, ...]) -> dict[str, Any]:
        p = self.platform
        out = p.faasctl("--json", "new", name, "-f", self.work / "handler.tar")
        address = json.loads(out.stdout)["address"]
        if settings:
            p.faasctl("set", name, *settings)
        poll(f"{name} answering", lambda: self.measure(address, 80, 1, 1, 0)["statuses"]
             .get("200"), 30)
        warm = next((int(s.split("=")[1]) for s in settings if s.startswith("min_warm=")), 0)
        poll(f"{name}: {warm} warm containers", lambda: len(
            [c for c in os.listdir(p.run_dir / "ctl") if c.startswith(f"{name}-")]) >= warm, 30)
        time.sleep(0.5)  # the last ones connect to their control sockets
        result = self.target(address, 80, name)
        p.faasctl("rm", name)
        return result


def outcomes(lines: list[dict[str, Any]], name: str) -> dict[str, int]:
    """How the runner served the function's requests: cold, warm, reused."""
    counts: dict[str, int] = {}
    for line in lines:
        if line.get("function") == name and line.get("event") == "request":
            how = str(line.get("outcome", "?")).split(":")[0]
            counts[how] = counts.get(how, 0) + 1
    return counts


def prepare(work: Path) -> dict[str, Any]:
    """The handler binary, its image and, for the baseline, its extracted rootfs."""
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


def bench_runtime(runtime: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Everything measured on one runtime, in its own namespace, cleaned up after."""
    ns = Netns("faas-bench")
    platform = None
    try:
        platform = BenchPlatform(ns, f'runtime = "{runtime}"\n')
        platform.start()
        platform.wait_healthy(60)
        b = Bench(ns, platform, work, args)
        results = {
            "floor": b.not_faasd("serve-floor", FLOOR_PORT),
            "process": b.not_faasd("serve-spawn", PROCESS_PORT, work / "spec.json", "none"),
            "baseline": b.not_faasd("serve-spawn", BASELINE_PORT, work / "spec.json", runtime),
        }
        for name, settings in MODES.items():
            results[name] = b.faasd(name, settings)
        return results
    finally:
        if platform is not None:
            platform.stop()
            platform.remove()
        left = ns.delete()
        if left:
            print(f"  killed processes left in {ns.name}: {left}", file=sys.stderr)
        for state in (work / runtime / "state",):  # baseline containers, if any survived
            if state.is_dir():
                rt = Runtime(runtime, root=str(state))
                for cid in rt.list():
                    rt.delete(cid, force=True)


LABELS = {
    "floor": "floor: plain server, no container",
    "process": "fork+exec per request, no container",
    "baseline": "baseline: {rt} run per request",
    "cold": "faasd cold (one-shot, default)",
    "warm": "faasd warm (min_warm=4)",
    "reuse": "faasd reuse (reuse=true min_warm=1)",
}


def row(label: str, m: dict[str, Any], kind: str) -> str:
    t, tot = m["ttfb"], m["total"]
    served = " ".join(f"{k} {v}" for k, v in sorted(m.get("outcomes", {}).items()))
    rate = f"{len(t) / m['wall']:6.0f}" if kind == "conc" else f"{'':6}"
    return (f"{label:38} {percentile(t, 50):8.2f} {percentile(t, 90):7.2f} "
            f"{percentile(t, 99):7.2f}  {percentile(tot, 50):9.2f} {percentile(tot, 90):7.2f} "
            f"{percentile(tot, 99):7.2f} {rate}  {served:18}")


def ratios(m: dict[str, Any], base: dict[str, Any], floor: dict[str, Any]) -> str:
    def r(a: dict[str, Any], b: dict[str, Any], p: float) -> float:
        return percentile(a["ttfb"], p) / percentile(b["ttfb"], p)
    return f"{r(m, base, 50):10.3f}x {r(m, base, 99):10.3f}x {r(m, floor, 50):11.1f}x"


def report(all_results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    """The tables: one per run kind, a row per runtime and target."""
    titles = {"seq": f"sequential: {args.requests} requests, one client, {args.gap * 1e3:.0f} ms "
                     "between requests",
              "conc": f"concurrent: {args.requests} requests from {args.concurrency} clients, "
                      "back to back"}
    for kind, title in titles.items():
        if kind == "conc" and args.concurrency <= 1:
            continue
        print(f"\n{title}; milliseconds (TTFB: connect() to the first response byte)")
        print(f"{'runtime':7} {'target':38} {'TTFB p50':>8} {'p90':>7} {'p99':>7}  "
              f"{'total p50':>9} {'p90':>7} {'p99':>7} {'req/s':>6}  {'served as':18} "
              f"{'p50/base':>10} {'p99/base':>10}  {'p50/floor':>10}")
        for rt, results in all_results.items():
            base, floor = results["baseline"][kind], results["floor"][kind]
            for name, r in results.items():
                extra = ratios(r[kind], base, floor) if name in MODES else ""
                print(f"{rt:7} {row(LABELS[name].format(rt=rt), r[kind], kind)} {extra}")
    print("\np50/base, p99/base: faasd's TTFB over the container-per-request baseline's on the "
          "same runtime (below 1: faasd is faster); p50/floor: over the plain server's.\n"
          "served as: the runner's own account of the measured requests (warm-up excluded).")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        host, port, count, conc, gap = sys.argv[2:7]
        return client(host, int(port), int(count), int(conc), float(gap))
    if len(sys.argv) > 1 and sys.argv[1] == "serve-floor":
        return serve_floor(int(sys.argv[2]))
    if len(sys.argv) > 1 and sys.argv[1] == "serve-spawn":
        port, spec, rt = sys.argv[2:5]
        return serve_per_connection(int(port), spec, None if rt == "none" else rt)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100, help="per target and run (100)")
    ap.add_argument("--runtime", choices=("runc", "crun", "both"), default="both")
    ap.add_argument("--concurrency", type=int, default=4,
                    help="clients of the concurrent run; 1 skips it (4)")
    ap.add_argument("--gap", type=float, default=0.05,
                    help="seconds between sequential requests (0.05)")
    ap.add_argument("--json", metavar="FILE", help="also write every sample here")
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
        results = {}
        for rt in runtimes:
            print(f"{rt}: measuring...", file=sys.stderr, flush=True)
            results[rt] = bench_runtime(rt, work, args)
        report(results, args)
        if args.json:
            Path(args.json).write_text(json.dumps(results))
        print(f"\n{time.monotonic() - started:.0f} s in all")
    except KeyboardInterrupt:
        print("interrupted: namespace, platform and containers removed", file=sys.stderr)
        sys.exit(130)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
