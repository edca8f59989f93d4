"""faasctl vpn: join this machine to a faasd host's WireGuard VPN as a client.

The server prints a wg-quick style file (``faasctl vpn add``). ``connect`` reads it strictly,
creates a WireGuard interface (the kernel module, else wireguard-go), routes the server's
prefixes into it and, where systemd-resolved runs, sends ``*.faas`` lookups to the server;
``disconnect`` undoes what ``connect`` recorded in its state file. wg-quick is not used: it
would run the PostUp lines of a file that came from elsewhere, and it insists on a private
key in the file, while a client may keep its key local and hand the server only the public
half (``pubkey``).

Every external command goes through :class:`System` (argv lists, never a shell), so tests
fake it. Private keys never appear in an argv, where ``ps`` would show them: ``wg`` reads
them from a 0600 file or from stdin.

Why one module of this length: it is a small program of its own, run on machines that
are not the server, whose steps (check, create, configure, record, undo) share one
state record; the config format is :mod:`common.wgconf`'s, files and processes are
:mod:`common.files`' and :mod:`common.proc`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import wgconf
from common.errors import EXIT_STATUS, Code
from common.files import atomic_write
from common.proc import alive
from common.wgconf import ClientConfig, check_key

# faasctl's exit statuses: a failed step is 1 (as an internal error), a bad argument or
# file 2 (as bad_request).
OK, FAIL, USAGE = 0, EXIT_STATUS[Code.INTERNAL], EXIT_STATUS[Code.BAD_REQUEST]

DEFAULT_INTERFACE = "wg-faas"
DEFAULT_KEY_FILE = "/etc/faasd/client/private.key"
DEFAULT_RUN_DIR = "/run/faasd-client"
DEFAULT_DNS_DOMAIN = wgconf.DNS_DOMAIN
WIREGUARD_SOCKETS = Path("/var/run/wireguard")
RESOLVED_RUN_DIR = Path("/run/systemd/resolve")
COMMAND_TIMEOUT = 30.0
WIREGUARD_GO_EXIT_SECONDS = 5.0  # it notices its link is gone in about 1.5 s
MAX_FILE_BYTES = 64 << 10  # a config or key file is a few hundred bytes
# Set in a parent's environment, these would make wireguard-go stay in the foreground
# (and block us) or adopt file descriptors it was never given.
_WIREGUARD_GO_ENV = ("WG_PROCESS_FOREGROUND", "WG_TUN_FD", "WG_UAPI_FD")

_IFNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]{0,14}")


class VpnError(Exception):
    """What went wrong and what to do about it, with the exit status that says which kind."""

    def __init__(self, message: str, status: int = FAIL):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------- the config


def parse_config(text: str, source: str = "CONFIG") -> tuple[ClientConfig, list[str]]:
    """Parse the server's file (:mod:`common.wgconf`); a bad line is a usage error
    (status 2) naming ``source:line``."""
    try:
        return wgconf.parse(text, source)
    except wgconf.ConfigError as exc:
        raise VpnError(str(exc), USAGE) from None


def load_config(path: Path) -> ClientConfig:
    """Read and parse CONFIG; warns on stderr about ignored keys and a readable secret."""
    text = _read_small(path, "the config file")
    config, ignored = parse_config(text, str(path))
    for note in ignored:
        print(f"note: {note}", file=sys.stderr)
    if config.private_key and path.stat().st_mode & 0o077:
        print(f"warning: {path} holds a private key and others may read it: chmod 600 {path}",
              file=sys.stderr)
    return config


def _read_small(path: Path, what: str) -> str:
    """A small text file, or a usage error that says why it could not be read."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise VpnError(f"cannot read {what} {path}: {exc.strerror}", USAGE) from None
    if len(data) > MAX_FILE_BYTES:
        raise VpnError(f"{path} is larger than {MAX_FILE_BYTES} bytes; is it {what}?", USAGE)
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise VpnError(f"{path} is not UTF-8 text; is it {what}?", USAGE) from None


# ------------------------------------------------------------------------------ the seam


@dataclass(frozen=True)
class Result:
    """How a command ended."""

    status: int
    stdout: str
    stderr: str


class System:
    """The one seam to the OS: commands (argv lists, never a shell) and the few process
    facts ``connect``/``disconnect`` need. Tests replace it with a fake."""

    def run(self, argv: list[str], stdin: str | None = None) -> Result:
        """Run a command to its end. Output goes to temporary files, not pipes: a child
        that daemonizes (wireguard-go) may keep inherited pipes open for its lifetime."""
        env = {k: v for k, v in os.environ.items() if k not in _WIREGUARD_GO_ENV}
        feed: dict[str, Any] = ({"input": stdin.encode()} if stdin is not None
                                else {"stdin": subprocess.DEVNULL})
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.run(argv, stdout=out, stderr=err, env=env, check=False,
                                      timeout=COMMAND_TIMEOUT, **feed)
            except FileNotFoundError:
                return Result(127, "", f"{argv[0]}: command not found")
            except subprocess.TimeoutExpired:
                raise VpnError(f"`{' '.join(argv)}` did not finish within "
                               f"{COMMAND_TIMEOUT:g} s and was killed") from None
            out.seek(0)
            err.seek(0)
            return Result(proc.returncode, out.read().decode(errors="replace"),
                          err.read().decode(errors="replace"))

    def which(self, name: str) -> bool:
        """Whether a command is installed."""
        return shutil.which(name) is not None

    def is_root(self) -> bool:
        """Whether we may create interfaces, routes and files under /run."""
        return os.geteuid() == 0

    def resolved_running(self) -> bool:
        """systemd-resolved keeps this directory while it runs."""
        return RESOLVED_RUN_DIR.is_dir()

    def end_wireguard_go(self, interface: str) -> list[str]:
        """Make sure the wireguard-go serving ``interface`` in this network namespace has
        ended (it exits by itself once its link is deleted) and that its socket is gone.
        Returns what had to be forced, for the user to know."""
        forced = []
        pids = _wait_gone(_wireguard_go_pids(interface), WIREGUARD_GO_EXIT_SECONDS)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                forced.append(f"sent {sig.name} to wireguard-go (pid {pid})")
                _signal(pid, sig)
            pids = _wait_gone(pids, 2.0)
        sock = WIREGUARD_SOCKETS / f"{interface}.sock"
        if sock.is_socket():
            sock.unlink(missing_ok=True)
            forced.append(f"removed the leftover {sock}")
        return forced


def _wireguard_go_pids(interface: str) -> list[int]:
    """wireguard-go daemons for ``interface`` in our network namespace. The daemon re-execs
    itself with the same argv, so its command line names the interface."""
    ours = os.stat("/proc/self/ns/net")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")[:-1]
            net = os.stat(entry / "ns" / "net")
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        if (argv and os.path.basename(argv[0]) == b"wireguard-go"
                and argv[-1] == interface.encode()
                and (net.st_dev, net.st_ino) == (ours.st_dev, ours.st_ino)):
            found.append(int(entry.name))
    return found


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = [p for p in pids if alive(p)]
    return pids


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _check(system: System, argv: list[str], stdin: str | None = None) -> str:
    """Run a command that must succeed; its failure names the command and its stderr
    (safe to show: no argv here ever holds a secret)."""
    result = system.run(argv, stdin)
    if result.status != 0:
        why = result.stderr.strip() or f"exit status {result.status}"
        raise VpnError(f"`{' '.join(argv)}` failed: {why}")
    return result.stdout


def _require(system: System, *tools: str) -> None:
    packages = {"ip": "iproute2", "wg": "wireguard-tools"}
    missing = [t for t in tools if not system.which(t)]
    if missing:
        raise VpnError(f"{', '.join(missing)} not found: apt-get install "
                       + " ".join(packages.get(t, t) for t in missing))


def _require_root(system: System, command: str) -> None:
    if not system.is_root():
        raise VpnError(f"{command} changes network interfaces and needs root: "
                       f"sudo faasctl vpn {command} ...")


def check_interface(name: str) -> str:
    """An interface name Linux accepts that no command can read as an option; it also
    names the state file and wireguard-go's socket, so no '/' either."""
    if not _IFNAME.fullmatch(name):
        raise VpnError(f"{name!r} is not an interface name: 1-15 of A-Z a-z 0-9 _ . = + -, "
                       "not starting with '-'", USAGE)
    return name


def _interface_name(value: str) -> str:
    try:
        return check_interface(value)
    except VpnError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def link_exists(system: System, interface: str) -> bool:
    """Asked over netlink by ``ip``: /sys may show another network namespace."""
    return system.run(["ip", "link", "show", "dev", interface]).status == 0


# ------------------------------------------------------------------------------- the keys


def key_file_path(given: str | None) -> Path:
    """--key-file, else $FAAS_CLIENT_KEY, else the default."""
    return Path(given or os.environ.get("FAAS_CLIENT_KEY") or DEFAULT_KEY_FILE)


def write_new_key(path: Path, key: str) -> None:
    """Write a private key to a file that did not exist (O_EXCL: never overwrite a key,
    never follow a planted symlink), mode 0600 from its first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only narrow the mode; make it exact
        with os.fdopen(fd, "w", closefd=False) as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def _make_key_dir(directory: Path) -> None:
    """Create the key's directory 0700 if it is missing; an existing one is left as it is
    (it may be /tmp or a home directory)."""
    if directory.is_dir():
        return
    directory.mkdir(parents=True, mode=0o700)
    directory.chmod(0o700)  # mkdir's mode passes through the umask


def read_key(path: Path) -> str:
    """The private key in ``path``; a file that holds none is a usage error."""
    key = _read_small(path, "a WireGuard private key").strip()
    try:
        check_key(key)
    except ValueError as exc:
        raise VpnError(f"{path} does not hold a WireGuard private key (its content {exc}); "
                       "move it away and run `faasctl vpn pubkey` to generate a new one",
                       USAGE) from None
    if path.stat().st_mode & 0o077:
        print(f"warning: others may read the private key {path}: chmod 600 {path}",
              file=sys.stderr)
    return key


def ensure_key(path: Path, system: System) -> tuple[str, bool]:
    """The local private key, generated with ``wg genkey`` when ``path`` does not exist.
    Returns the key and whether it was generated now."""
    if path.exists():
        return read_key(path), False
    _require(system, "wg")
    try:
        key = wgconf.key_from(_check(system, list(wgconf.GENKEY)), wgconf.GENKEY)
    except ValueError as exc:
        raise VpnError(str(exc)) from None
    try:
        _make_key_dir(path.parent)
    except OSError as exc:
        raise VpnError(f"cannot create the directory of the private key {path}: "
                       f"{exc.strerror}; choose another place with --key-file or "
                       "FAAS_CLIENT_KEY") from None
    try:
        write_new_key(path, key)
    except FileExistsError:
        return read_key(path), False  # another process made one meanwhile: use it
    except OSError as exc:
        raise VpnError(f"cannot write the private key {path}: {exc.strerror}; choose "
                       "another place with --key-file or FAAS_CLIENT_KEY") from None
    return key, True


def public_key(private: str, system: System) -> str:
    """``wg pubkey``, fed the private key on stdin (never on its command line)."""
    _require(system, "wg")
    try:
        return wgconf.key_from(_check(system, list(wgconf.PUBKEY), stdin=private + "\n"),
                               wgconf.PUBKEY)
    except ValueError as exc:
        raise VpnError(str(exc)) from None


def _remind(public: str) -> str:
    return (f"The server must know this public key: on the server, run "
            f"`faasctl vpn add NAME --public-key {public}`")


@contextmanager
def _private_key_file(config: ClientConfig, key_file: Path, system: System) -> Iterator[Path]:
    """A file ``wg set ... private-key FILE`` can read: the local key file, or a 0600 file
    in a fresh 0700 directory holding the config's key, removed afterwards."""
    if config.private_key is None:
        key, made = ensure_key(key_file, system)
        public = public_key(key, system)
        print(f"{'Generated' if made else 'Using'} the private key in {key_file}; "
              f"its public key is {public}\n{_remind(public)}")
        yield key_file
        return
    with tempfile.TemporaryDirectory(prefix="faasd-vpn-") as directory:  # mkdtemp: 0700
        path = Path(directory) / "private.key"
        write_new_key(path, config.private_key)
        yield path


# ------------------------------------------------------------------------------ the state


def _state_path(interface: str) -> Path:
    return Path(os.environ.get("FAAS_CLIENT_RUN") or DEFAULT_RUN_DIR) / f"{interface}.json"


def _save_state(path: Path, state: dict[str, Any]) -> None:
    """Atomically: a crash leaves the old record or the new one."""
    path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    atomic_write(str(path), (json.dumps(state, indent=1) + "\n").encode())


def _load_state(path: Path, interface: str) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise VpnError(f"{interface} is not connected (no {path}); nothing to do. If an "
                       f"interface {interface} is left from elsewhere, it is not ours to "
                       f"remove: see `ip link show dev {interface}`") from None
    except (OSError, ValueError) as exc:
        raise VpnError(f"cannot read {path} ({exc}); remove the interface by hand "
                       f"(`ip link del dev {interface}`), then remove {path}") from None
    if not isinstance(state, dict) or state.get("interface") != interface:
        raise VpnError(f"{path} is not a faasctl vpn record for {interface}; remove it")
    return state


# ------------------------------------------------------------------------ connect, undo


def _create_link(system: System, interface: str) -> str:
    """The kernel's WireGuard where present, else wireguard-go (which daemonizes and
    outlives us, as a client's tunnel should). Returns which one."""
    kernel = system.run(["ip", "link", "add", "dev", interface, "type", "wireguard"])
    if kernel.status == 0:
        return "kernel"
    if not system.which("wireguard-go"):
        raise VpnError(f"cannot create {interface}: the kernel has no WireGuard "
                       f"({kernel.stderr.strip()}) and wireguard-go is not installed: "
                       "apt-get install wireguard-go")
    _check(system, ["wireguard-go", interface])
    if not link_exists(system, interface):
        raise VpnError(f"wireguard-go exited without creating {interface}")
    return "wireguard-go"


def _configure(system: System, interface: str, config: ClientConfig, key: Path) -> None:
    """Key and peer, address, link up, routes: the only values used are parsed ones."""
    wg = ["wg", "set", interface, "private-key", str(key), "peer", config.peer_key,
          "endpoint", config.endpoint,
          "allowed-ips", ",".join(str(n) for n in config.allowed_ips)]
    if config.keepalive:
        wg += ["persistent-keepalive", str(config.keepalive)]
    _check(system, wg)
    _check(system, ["ip", "-6", "addr", "add", str(config.address), "dev", interface])
    _check(system, ["ip", "link", "set", "dev", interface, "up"])
    for net in config.allowed_ips:
        _check(system, ["ip", "-6", "route", "replace", str(net), "dev", interface])


def _set_dns(system: System, state: dict[str, Any], config: ClientConfig) -> str:
    """Per-link DNS through systemd-resolved, for the config's domains only. Without
    resolved, say how to ask the server: /etc/resolv.conf belongs to someone else."""
    if not config.dns_servers:
        return "DNS: the config names no DNS server; reach functions by address"
    servers = [str(s) for s in config.dns_servers]
    domains = config.dns_domains or (DEFAULT_DNS_DOMAIN,)
    if not (system.which("resolvectl") and system.resolved_running()):
        return (f"DNS: systemd-resolved is not running, so no resolver was changed. Ask the "
                f"server directly:\n    dig @{servers[0]} fib.{domains[0]} AAAA\nor put "
                f"`nameserver {servers[0]}` first in /etc/resolv.conf yourself (names "
                f"outside {domains[0]}. resolve there only if the server forwards them)")
    state["dns"] = True  # from here on, disconnect must revert it
    interface = state["interface"]
    _check(system, ["resolvectl", "dns", interface, *servers])
    _check(system, ["resolvectl", "domain", interface, *(f"~{d}" for d in domains)])
    return f"DNS: *.{', *.'.join(domains)} is resolved by {', '.join(servers)}"


def _tear_down(system: System, state: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Undo, newest first, what ``state`` says was done. Best effort: one failure does not
    stop the rest. Returns (problems, notes)."""
    interface, problems, notes = state["interface"], [], []
    if state.get("dns"):
        result = system.run(["resolvectl", "revert", interface])
        if result.status != 0:
            notes.append(f"`resolvectl revert {interface}` failed: {result.stderr.strip()}")
    if not state.get("kind"):
        return problems, notes
    if link_exists(system, interface):
        result = system.run(["ip", "link", "del", "dev", interface])
        if result.status != 0:
            problems.append(f"`ip link del dev {interface}` failed: {result.stderr.strip()}")
    else:
        notes.append(f"{interface} was already gone")
    if state["kind"] == "wireguard-go" and not problems:
        notes += system.end_wireguard_go(interface)
    return problems, notes


def _undo(system: System, state: dict[str, Any], state_path: Path) -> None:
    """After a failure half-way: leave nothing behind, or say exactly what is left."""
    problems, notes = _tear_down(system, state)
    for note in notes:
        print(f"undo: {note}", file=sys.stderr)
    if problems:
        for problem in problems:
            print(f"undo: {problem}", file=sys.stderr)
        print(f"undo: {state_path} is kept; run `faasctl vpn disconnect --interface "
              f"{state['interface']}` once the cause is fixed", file=sys.stderr)
        return
    state_path.unlink(missing_ok=True)
    if state.get("kind"):
        print(f"undo: removed {state['interface']}; nothing is left of this attempt",
              file=sys.stderr)


def connect(config_path: Path, interface: str, key_file: Path, system: System) -> int:
    """Bring up the tunnel described by ``config_path``; undo everything on a failure."""
    check_interface(interface)
    config = load_config(config_path)
    _require_root(system, "connect")
    _require(system, "ip", "wg")
    if link_exists(system, interface):
        raise VpnError(f"interface {interface} already exists (connected already?): run "
                       f"`faasctl vpn disconnect --interface {interface}` first, or choose "
                       "another name with --interface")
    state_path = _state_path(interface)
    state: dict[str, Any] = {"v": 1, "interface": interface, "kind": None, "dns": False,
                             "config": str(config_path), "address": str(config.address),
                             "routes": [str(n) for n in config.allowed_ips]}
    with _private_key_file(config, key_file, system) as key:
        _save_state(state_path, state)  # before any change, so a failure here changes nothing
        try:
            state["kind"] = _create_link(system, interface)
            _save_state(state_path, state)
            _configure(system, interface, config, key)
            dns = _set_dns(system, state, config)
            _save_state(state_path, state)
        except BaseException:
            _undo(system, state, state_path)
            raise
    print(f"connected {interface} ({state['kind']}): {config.address} to the server at "
          f"{config.endpoint}, routing {', '.join(state['routes'])}\n{dns}\n"
          f"Check with `wg show {interface} latest-handshakes`; undo with "
          f"`faasctl vpn disconnect --interface {interface}`")
    return OK


def disconnect(interface: str, system: System) -> int:
    """Undo what ``connect`` recorded for ``interface``; only an interface it made."""
    check_interface(interface)
    _require_root(system, "disconnect")
    state_path = _state_path(interface)
    state = _load_state(state_path, interface)
    problems, notes = _tear_down(system, state)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if problems:
        raise VpnError("; ".join(problems) + f"; {state_path} is kept so that disconnect "
                       "can be tried again")
    state_path.unlink(missing_ok=True)
    print(f"disconnected {interface}")
    return OK


def pubkey(key_file: Path, system: System) -> int:
    """Print the local public key (stdout, alone), generating the private key if needed."""
    key, made = ensure_key(key_file, system)
    public = public_key(key, system)
    print(public)
    if made:
        print(f"Generated a new private key in {key_file}", file=sys.stderr)
    print(_remind(public), file=sys.stderr)
    return OK


# ---------------------------------------------------------------------------------- CLI




CONNECT_HELP = ("Bring up the WireGuard tunnel that CONFIG (the file `faasctl vpn add` "
                "printed on the server) describes, route the server's prefixes into it and, "
                "where systemd-resolved runs, resolve *.faas through the server. A failure "
                "half-way undoes everything.")
DISCONNECT_HELP = "Take down the tunnel `connect` brought up, and only that."
PUBKEY_HELP = ("Print this machine's public key (generating its private key if needed), for "
               "`faasctl vpn add NAME --public-key PUB` on the server.")


def build_parser() -> argparse.ArgumentParser:
    """``faasctl vpn connect|disconnect|pubkey``."""
    parser = argparse.ArgumentParser(
        prog="faasctl vpn", description="Join this machine to a faasd host's WireGuard VPN.",
        epilog="Exit status: 0 ok; 1 failure; 2 bad usage, config file or key file.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    key_help = (f"the local private key, generated if missing (default: $FAAS_CLIENT_KEY, "
                f"else {DEFAULT_KEY_FILE})")
    iface_help = f"WireGuard interface name (default: {DEFAULT_INTERFACE})"
    con = sub.add_parser("connect", help="bring up the tunnel a server's config describes",
                         description=CONNECT_HELP)
    con.add_argument("config", metavar="CONFIG", type=Path,
                     help="the file `faasctl vpn add` printed on the server")
    con.add_argument("--interface", metavar="NAME", type=_interface_name,
                     default=DEFAULT_INTERFACE, help=iface_help)
    con.add_argument("--key-file", metavar="PATH",
                     help=key_help + "; used when CONFIG has no PrivateKey")
    dis = sub.add_parser("disconnect", help="take the tunnel down again",
                         description=DISCONNECT_HELP)
    dis.add_argument("--interface", metavar="NAME", type=_interface_name,
                     default=DEFAULT_INTERFACE, help=iface_help)
    pub = sub.add_parser("pubkey", help="print this machine's public key for the server",
                         description=PUBKEY_HELP)
    pub.add_argument("--key-file", metavar="PATH", help=key_help)
    return parser


def _dispatch(ns: argparse.Namespace, system: System) -> int:
    if ns.command == "connect":
        return connect(ns.config, ns.interface, key_file_path(ns.key_file), system)
    if ns.command == "disconnect":
        return disconnect(ns.interface, system)
    return pubkey(key_file_path(ns.key_file), system)


def main(argv: list[str], system: System | None = None) -> int:
    """``faasctl vpn ARGS``: returns the exit status (0 ok, 1 failure, 2 bad usage or a bad
    config or key file); messages go to stderr."""
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error or the help
        return exc.code if isinstance(exc.code, int) else USAGE
    try:
        return _dispatch(ns, system or System())
    except VpnError as exc:
        print(f"faasctl vpn {ns.command}: {exc}", file=sys.stderr)
        return exc.status
    except OSError as exc:  # e.g. /run not writable: say which file and why
        print(f"faasctl vpn {ns.command}: {exc}", file=sys.stderr)
        return FAIL
    except KeyboardInterrupt:
        print(f"faasctl vpn {ns.command}: interrupted", file=sys.stderr)
        return FAIL


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
