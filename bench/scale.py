"""Scale benchmark: one host, function after function of one small image, in one run.

Starts the whole platform (supervisord, the four daemons, named) in a network namespace
of its own, as the integration tests do, and deploys the static C test handler N times
under different names (`faasctl new fnNNNN -f image.tar`: the image is extracted once,
by the first deploy, and reused by digest after). At 1, 100, 500 and 1,000 functions
(those up to N) it measures:

    deploy       wall time of `faasctl new` (what an operator waits) and the controller's
                 own figure, median of the last 10 deploys (at 1: deploys 2-11; the
                 first one, which extracts the image, is printed apart)
    CPU          each daemon's CPU time per deploy over those same deploys: unlike the
                 times, not moved by what else runs on the machine
    daemons      RSS, open fds and idle CPU (5 s with nothing happening) of each daemon,
                 supervisord and named
    list         wall time of `faasctl list` and `faasctl --json list`
    zone         reload: dnsagent's last zone change, from written to reloaded (its log's
                 timestamps: `rndc reload faas`); check: `named-checkzone` on the zone
                 now, which dnsagent runs before every write
    first req    time to first byte of the first request to function 1 and to the one
                 just deployed (a cold start: one-shot container)

then, at N, the time for a restarted runner, and for a restarted netagent, to serve
all N again (every listener bound, every address on the interface, synced, the last
function answering). The targets are same-run ratios, printed with PASS/MISS:

    deploy time at N <= 2x deploy time at 1 (server side and wall), and so the
    daemons' CPU time per deploy
    each agent's RSS grows by <= 40 KiB per function, and its fds by <= 1.1 per function
    (the runner's listening sockets, one per port, are the expected one per function)

Run as root: `/opt/faasd/venv/bin/python bench/scale.py [--functions 1000]`; the
quick mode `--functions 100` takes about two minutes. Figures and what they mean:
docs/operations.md#scale.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SELF = Path(__file__).resolve()
REPO = SELF.parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration")]

from harness import BIN, Netns, Platform, poll, run  # noqa: E402

from tests.imagebuild import Dir, File, build_image  # noqa: E402

HANDLER_C = REPO / "tests" / "integration" / "handlers" / "testhandler.c"
CHECKPOINTS = (1, 100, 500, 1000)
WINDOW = 10  # deploys whose median is the deploy time at a checkpoint
DAEMONS = ("controller", "netagent", "dnsagent", "runner", "keeper", "dns")
AGENT_RSS_PER_FN = 40 << 10  # bytes per function an agent's RSS may grow by
FDS_PER_FN = 1.1  # fds per function a daemon may grow by (the runner's listeners: 1)
DEPLOY_RATIO = 2.0
AGENTS_CPU = ("controller", "netagent", "dnsagent", "runner", "keeper", "dns")
IDLE_SECONDS = 5.0
SERVICE_NOFILE = "1024:"  # soft, as systemd's DefaultLimitNOFILE; the hard one kept
HZ = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) one process has used, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def name_of(i: int) -> str:
    return f"fn{i:04d}"


# --- inside the namespace: one request ---------------------------------------------------


def probe(host: str, port: int) -> None:
    """One HTTP request; print JSON {ttfb ms, status}, timed from before connect()."""
    started = time.perf_counter()
    first = None
    data = b""
    try:
        with socket.create_connection((host, port), timeout=30) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: fn\r\nConnection: close\r\n\r\n")
            while chunk := s.recv(65536):
                first = first or time.perf_counter()
                data += chunk
    except OSError as exc:
        print(json.dumps({"ttfb": math.nan, "status": type(exc).__name__}))
        return
    head = data.split(b"\r\n", 1)[0].split(b" ")
    status = head[1].decode() if len(head) > 1 else "empty"
    print(json.dumps({"ttfb": ((first or time.perf_counter()) - started) * 1e3,
                      "status": status}))


# --- outside: the run ----------------------------------------------------------------------


class ScalePlatform(Platform):
    """The test harness's platform in a session of its own (a Ctrl-C reaches the bench,
    which then shuts the platform down in order)."""

    def start(self) -> None:
        # the soft open-file limit a systemd service gets by default, not this shell's:
        # what the daemons raise it to is then what they run with
        argv = ["prlimit", f"--nofile={SERVICE_NOFILE}", *self.netns.argv(
            BIN / "faasd", "up", "--foreground")]
        with open(self.base / "faasd-up.log", "wb") as log:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)


@contextlib.contextmanager
def platform_in_namespace() -> Iterator[ScalePlatform]:
    ns = Netns("faas-scale")
    platform = None
    try:
        platform = ScalePlatform(ns)
        platform.start()
        platform.wait_healthy(60)
        yield platform
    finally:
        if platform is not None:
            platform.stop()
            run(*ns.argv(BIN / "faas-netagent", "--remove"), env=platform.env, check=False)
            platform.remove()
        left = ns.delete()
        if left:
            print(f"  killed processes left in {ns.name}: {left}", file=sys.stderr)


class Scale:
    """One platform, deployed into, measured."""

    def __init__(self, platform: ScalePlatform, image: Path):
        self.p = platform
        self.image = image
        self.walls: list[float] = []  # seconds per deploy, as faasctl's caller sees it
        self.server: list[float] = []  # the controller's own figure
        self.addresses: list[str] = []
        self.cpu: list[dict[str, float]] = []  # each daemon's CPU seconds after each deploy
        self.pid_of: dict[str, int] = {}

    def deploy(self, i: int) -> None:
        started = time.perf_counter()
        out = self.p.faasctl("--json", "new", name_of(i), "-f", self.image)
        self.walls.append(time.perf_counter() - started)
        reply = json.loads(out.stdout)
        self.server.append(reply["seconds"])
        self.addresses.append(reply["address"])
        if not self.pid_of:
            self.pid_of = {n: p for n, p in self.pids().items() if n in AGENTS_CPU}
        self.cpu.append({n: cpu_seconds(p) for n, p in self.pid_of.items()})

    def request(self, address: str) -> dict[str, Any]:
        out = run(*self.p.netns.argv(sys.executable, SELF, "probe", address, 80),
                  env=self.p.env)
        return json.loads(out.stdout)

    def first_request(self, address: str) -> float:
        """ttfb (ms) of a request once the function answers at all: the listener may
        come a moment after the deploy returns."""
        got = poll(f"{address} answering", lambda: (r := self.request(address))["status"]
                   == "200" and r, 30)
        return got["ttfb"]

    def pids(self) -> dict[str, int]:
        out = self.p.ctl("pid", *DAEMONS, check=False).stdout.split()
        got = dict(zip(DAEMONS, (int(x) for x in out)))
        got["supervisord"] = int((self.p.run_dir / "supervisord.pid").read_text())
        return got

    def daemons(self) -> dict[str, dict[str, Any]]:
        """RSS (bytes), open fds and idle CPU (share of one core over IDLE_SECONDS with
        nothing deployed or called meanwhile) of each process."""
        pids = self.pids()
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        time.sleep(IDLE_SECONDS)  # a measuring window, not a wait for something to happen
        rows = {}
        for name, pid in pids.items():
            status = dict(line.split(":", 1) for line in
                          Path(f"/proc/{pid}/status").read_text().splitlines())
            limit = next(line.split()[3] for line in
                         Path(f"/proc/{pid}/limits").read_text().splitlines()
                         if line.startswith("Max open files"))
            rows[name] = {"rss": int(status["VmRSS"].split()[0]) << 10, "nofile": limit,
                          "fds": len(os.listdir(f"/proc/{pid}/fd")),
                          "cpu": (cpu_seconds(pid) - before[name]) / IDLE_SECONDS}
        return rows

    def timed(self, *args: str) -> float:
        started = time.perf_counter()
        self.p.faasctl(*args)
        return time.perf_counter() - started

    def zone_seconds(self) -> tuple[float, float]:
        """(seconds dnsagent's last zone change took from written to reloaded, by its
        log's timestamps: `rndc reload`; seconds `named-checkzone` takes on the zone as
        it is now, which dnsagent runs before every write)."""
        lines = self.p.log_lines("dnsagent")
        end = next((i for i in range(len(lines) - 1, -1, -1)
                    if lines[i].get("event") == "reloaded"), None)
        start = next((i for i in range(end, -1, -1)
                      if lines[i].get("event") == "zone_written"), None) \
            if end is not None else None
        reload = math.nan if start is None or end is None \
            else lines[end]["ts"] - lines[start]["ts"]
        started = time.perf_counter()
        run("named-checkzone", "-i", "full", "-k", "fail", "-n", "fail", "faas",
            self.p.root / "dns" / "faas.db")
        return reload, time.perf_counter() - started

    def cpu_per_deploy(self, first: int, last: int) -> dict[str, float]:
        """Each daemon's CPU seconds per deploy over deploys first+1..last (1-based):
        what the deploys cost, whatever else the machine was doing meanwhile."""
        a, b = self.cpu[first - 1], self.cpu[last - 1]
        return {n: (b[n] - a[n]) / (last - first) for n in b}

    def checkpoint(self, n: int) -> dict[str, Any]:
        window = self.server[1:WINDOW + 1] if n == 1 else self.server[n - WINDOW:n]
        walls = self.walls[1:WINDOW + 1] if n == 1 else self.walls[n - WINDOW:n]
        first, last = (1, WINDOW + 1) if n == 1 else (n - WINDOW, n)
        return {
            "n": n, "deploy": statistics.median(window), "deploy_wall": statistics.median(walls),
            "cpu_per_deploy": self.cpu_per_deploy(first, last),
            "daemons": self.daemons(),
            "list": self.timed("list"), "list_json": self.timed("--json", "list"),
            "zone": self.zone_seconds(),
            "first_fn": self.first_request(self.addresses[0]),
            "last_fn": self.first_request(self.addresses[n - 1]),
        }

    def serving_all(self, n: int, program: str, boot: str | None) -> bool:
        """Every function back after ``program`` restarted: a new boot id, synced, every
        listener (runner) and address (netagent) there, the last function answering."""
        rows = self.p.status()
        row = rows[program]
        if row["boot_id"] == boot or row["state"] != "up" or not row["synced"]:
            return False
        held = run(*self.p.netns.argv("ss", "-Hltn", "sport", "=", ":80")).stdout
        if sum(1 for a in self.addresses[:n] if f"[{a}]:80" in held) < n:
            return False
        addrs = run(*self.p.netns.argv("ip", "-6", "-br", "addr", "show", "dev",
                                       self.p.interface)).stdout.split()
        if sum(1 for a in self.addresses[:n] if f"{a}/128" in addrs) < n:
            return False
        return self.request(self.addresses[n - 1])["status"] == "200"

    def restart(self, n: int, program: str) -> float:
        boot = self.p.status()[program]["boot_id"]
        started = time.perf_counter()
        self.p.ctl("restart", program)
        poll(f"{program} serving all {n} again", lambda: self.serving_all(n, program, boot),
             600, interval=0.2)
        return time.perf_counter() - started


def prepare(work: Path) -> Path:
    handler = work / "handler"
    run("gcc", "-static", "-O2", "-o", handler, HANDLER_C)
    image = work / "handler.tar"
    build_image(image, [[Dir("tmp", mode=0o1777), File("handler", handler.read_bytes(),
                                                      mode=0o755)]],
                {"config": {"Cmd": ["/handler"]}})
    return image


def progress(i: int, total: int, s: Scale, started: float) -> None:
    if sys.stderr.isatty() or i % 50 == 0 or i == total:
        line = (f"  deployed {i}/{total}  last {s.walls[-1]:.2f}s  "
                f"elapsed {time.perf_counter() - started:.0f}s")
        end = "\r" if sys.stderr.isatty() and i != total else "\n"
        print(line, end=end, file=sys.stderr, flush=True)


def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    image = prepare(work)
    marks = sorted({c for c in CHECKPOINTS if c <= args.functions} | {args.functions})
    results: dict[str, Any] = {"checkpoints": []}
    with platform_in_namespace() as platform:
        s = Scale(platform, image)
        results["idle"] = s.daemons()
        started = time.perf_counter()
        for i in range(1, args.functions + 1):
            s.deploy(i)
            progress(i, args.functions, s, started)
            if i == WINDOW + 1 and marks[0] == 1:  # the "1" row waits for its window
                results["checkpoints"].append(s.checkpoint(1))
            if i in marks and i != 1:
                results["checkpoints"].append(s.checkpoint(i))
                print(f"  checkpoint {i} measured", file=sys.stderr, flush=True)
        results["first_deploy"] = s.server[0]
        results["deploy_total"] = time.perf_counter() - started
        n = args.functions
        results["restart_runner"] = s.restart(n, "runner")
        results["restart_netagent"] = s.restart(n, "netagent")
        results["after"] = s.daemons()
    return results


def mib(b: float) -> str:
    return f"{b / (1 << 20):.1f}"


def report(r: dict[str, Any], args: argparse.Namespace) -> bool:
    cps = r["checkpoints"]
    print(f"\nfunctions {args.functions}; first deploy (extracts the image) "
          f"{r['first_deploy']:.3f}s; all deploys {r['deploy_total']:.0f}s")
    print(f"{'n':>5} {'deploy':>8} {'wall':>7} {'list':>6} {'--json':>7} {'reload':>6} "
          f"{'check':>6} "
          f"{'1st fn':>7} {'last fn':>8}")
    for c in cps:
        print(f"{c['n']:>5} {c['deploy'] * 1e3:>6.0f}ms {c['deploy_wall']:>6.2f}s "
              f"{c['list']:>5.2f}s {c['list_json']:>6.2f}s {c['zone'][0] * 1e3:>4.0f}ms "
              f"{c['zone'][1] * 1e3:>4.0f}ms "
              f"{c['first_fn']:>5.1f}ms {c['last_fn']:>6.1f}ms")
    names = list(r["idle"])
    print("\nCPU ms per deploy (each daemon, over the same deploys)")
    print(f"{'n':>5} " + " ".join(f"{n:>11}" for n in AGENTS_CPU) + f" {'sum':>7}")
    for c in cps:
        d = c["cpu_per_deploy"]
        print(f"{c['n']:>5} " + " ".join(f"{d[n] * 1e3:>11.0f}" for n in AGENTS_CPU)
              + f" {sum(d.values()) * 1e3:>7.0f}")
    print("\nRSS MiB / fds / idle CPU % of a core")
    print(f"{'n':>7} " + " ".join(f"{n:>18}" for n in names))
    for label, d in [("0", r["idle"])] + [(str(c["n"]), c["daemons"]) for c in cps] \
            + [("restart", r["after"])]:
        print(f"{label:>7} " + " ".join(
            f"{mib(d[n]['rss'])} / {d[n]['fds']} / {d[n]['cpu'] * 100:.1f}".rjust(18)
            for n in names))
    print("open files limit (soft): " + ", ".join(f"{n} {d['nofile']}"
                                                  for n, d in r["after"].items()))
    print(f"\nrestarted runner serves all {args.functions} again in "
          f"{r['restart_runner']:.1f}s, netagent in {r['restart_netagent']:.1f}s")
    first, last = cps[0], cps[-1]
    grown = last["n"] - first["n"] or 1
    checks = [
        (f"deploy at {last['n']} / at 1 (controller)", last["deploy"] / first["deploy"],
         DEPLOY_RATIO, f"<= {DEPLOY_RATIO}x"),
        (f"daemons' CPU per deploy at {last['n']} / at 1",
         sum(last["cpu_per_deploy"].values()) / sum(first["cpu_per_deploy"].values()),
         DEPLOY_RATIO, f"<= {DEPLOY_RATIO}x"),
        (f"deploy at {last['n']} / at 1 (faasctl wall)",
         last["deploy_wall"] / first["deploy_wall"], DEPLOY_RATIO, f"<= {DEPLOY_RATIO}x"),
    ]
    for name in ("controller", "netagent", "dnsagent", "runner", "keeper"):
        rss = (last["daemons"][name]["rss"] - first["daemons"][name]["rss"]) / grown
        fds = (last["daemons"][name]["fds"] - first["daemons"][name]["fds"]) / grown
        checks.append((f"{name} RSS growth per function, KiB", rss / 1024,
                       AGENT_RSS_PER_FN / 1024, f"<= {AGENT_RSS_PER_FN >> 10}"))
        checks.append((f"{name} fds per function", fds, FDS_PER_FN, f"<= {FDS_PER_FN}"))
    ok = True
    print()
    for label, value, limit, target in checks:
        good = value <= limit
        ok &= good
        print(f"{label:<45} {value:>7.2f}  target {target:<8} {'PASS' if good else 'MISS'}")
    return ok


def main() -> None:
    if sys.argv[1:2] == ["probe"]:
        probe(sys.argv[2], int(sys.argv[3]))
        return
    # Started in the background, a shell leaves SIGINT ignored; and a kill must not leave
    # the platform behind: both end the run through its clean-up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--functions", type=int, default=1000)
    ap.add_argument("--json", help="also write the raw figures to this file")
    args = ap.parse_args()
    if args.functions < WINDOW + 1:
        ap.error(f"--functions must be at least {WINDOW + 1}")
    with tempfile.TemporaryDirectory(prefix="faas-scale-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        results = bench(args, work)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    sys.exit(0 if report(results, args) else 1)


if __name__ == "__main__":
    main()
