"""faasctl: the operator's command line. Talks ZeroMQ to the controller.

Commands, their help text and their arguments come from ``common.protocol.OPS``: a
controller op with ``cli=True`` is a command, its ``positional`` args are positional
arguments and the rest are options. ``new`` (stream an image) is the one command built
by hand. ``--json`` prints the raw result. The exit status says what went wrong (see
``common.errors.EXIT_STATUS``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import textwrap
import time
from typing import Any

from cli.render import RENDERERS, render_generic, render_log_line, verdict
from cli.top import top
from cli.upload import ProgressLine, source, upload
from common import protocol
from common.errors import EXIT_STATUS, Code, FaasError
from common.rpc import Client
from common.schema import Bytes, Int, MapOf
from common.settings import SettingsError, load

NEW_HELP = ("Deploy a docker save tarball (stdin or -f FILE) as a new version of function "
            "NAME; " + protocol.UPLOAD_BEGIN.args.fields["name"].help)


def build_parser() -> argparse.ArgumentParser:
    """The parser: one subcommand per CLI op, help from the protocol table."""
    parser = argparse.ArgumentParser(
        prog="faasctl",
        description="Operate a faasd host: deploy functions, watch the daemons.",
        epilog="Exit status: 0 ok; " + "; ".join(
            f"{n} {c.value}" for c, n in sorted(EXIT_STATUS.items(), key=lambda kv: kv[1])),
    )
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="seconds to wait for the controller (default: per command)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    new = sub.add_parser("new", help=NEW_HELP, description=NEW_HELP)
    new.add_argument("name", help=protocol.UPLOAD_BEGIN.args.fields["name"].help)
    new.add_argument("-f", "--file", help="image tarball (default: stdin)")
    new.add_argument("--tag", help=protocol.UPLOAD_BEGIN.args.fields["tag"].help)
    new.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                     help="print the raw result as JSON")
    logs = sub.add_parser("logs", help=protocol.LOGS.doc, description=protocol.LOGS.doc)
    logs.add_argument("name", help=protocol.LOGS.args.fields["name"].help)
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("--since", type=float, metavar="SECONDS",
                      help="only lines from the last SECONDS")
    logs.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                      help="print JSON lines")
    top_help = ("Live figures of every function (requests/s, latency, pool, queue, "
                "hand-overs, 503s, timeouts) and agent, refreshed every second")
    top = sub.add_parser("top", help=top_help, description=top_help)
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                     help="print the raw figures as JSON (implies --once)")
    vpn = sub.add_parser("vpn", help="WireGuard peers: add, list, rm, disable, enable on the "
                         "server; connect, disconnect, pubkey on a client",
                         description="VPN peers reach functions by name: "
                         "curl http://NAME.faas/ once connected.")
    token = sub.add_parser("token", help="HTTP API tokens for automation: create, list, rm",
                           description="A token lets a CI job or a VPN peer use the HTTP "
                           "API (Authorization: Bearer TOKEN) with the rights of its role.")
    volume = sub.add_parser("volume", help="Volumes, storage that survives redeploys: create, "
                            "list, rm; mount with set NAME mounts=VOL:/path[:ro]",
                            description="A volume is a filesystem of a fixed size, kept "
                            "across redeploys, restarts and reboots (docs/volumes.md).")
    secret = sub.add_parser("secret", help="secrets for functions: create, list, rm",
                            description="A function with secrets=NAME,... reads each at "
                            "/run/secrets/NAME; values are kept by root and never printed.")
    groups = {"vpn": vpn.add_subparsers(dest="group_command", required=True,
                                        metavar="COMMAND"),
              "token": token.add_subparsers(dest="group_command", required=True,
                                            metavar="COMMAND"),
              "volume": volume.add_subparsers(dest="group_command", required=True,
                                              metavar="COMMAND"),
              "secret": secret.add_subparsers(dest="group_command", required=True,
                                              metavar="COMMAND")}
    for op in protocol.OPS["controller"].values():
        if op.cli:
            _add_op(groups[op.group] if op.group else sub, op)
    groups["vpn"].choices["add"].add_argument(
        "--qr", action="store_true", help="also print the config as a QR code (phones)")
    client_help = {
        "connect": "On a client: bring up the tunnel from CONFIG (a `vpn add` output) "
                   "and send .faas names to the server's DNS",
        "disconnect": "On a client: take the tunnel and its DNS setting down",
        "pubkey": "On a client: print the public key of the key kept here (made if "
                  "missing), for `faasctl vpn add NAME --public-key KEY` on the server",
    }
    for name, text in client_help.items():
        cmd = groups["vpn"].add_parser(name, help=text, description=text)
        cmd.add_argument("rest", nargs=argparse.REMAINDER,
                         help="arguments for the client (see faasctl vpn %s -- --help)" % name)
    from cli import backup  # run by main() before this parser; listed here for --help
    backup.add_commands(sub)
    return parser


async def _logs(client: Client, ns: argparse.Namespace) -> None:
    since = time.time() - ns.since if ns.since is not None else None
    offset = 0
    terminal = sys.stdout.isatty()  # --json and pipes get the text as the function wrote it
    while True:
        got = await client.call("logs", {"name": ns.name, "since": since, "offset": offset})
        for line in got["lines"]:
            if ns.json:
                print(json.dumps(line))
            else:
                print(render_log_line(line, terminal))
        sys.stdout.flush()
        moved = got["offset"] != offset
        offset = got["offset"]
        if not ns.follow and not moved:
            return
        if not moved:
            await asyncio.sleep(0.5)


def _add_op(sub: Any, op: protocol.Op) -> None:
    # An epilog (set's table of keys) keeps its lines; the description is filled here,
    # as argparse would, since the raw formatter leaves both as written.
    cmd = sub.add_parser(op.command, help=op.doc, epilog=op.epilog or None,
                         description=textwrap.fill(op.doc, 79) if op.epilog else op.doc,
                         formatter_class=argparse.RawDescriptionHelpFormatter if op.epilog
                         else argparse.HelpFormatter)
    cmd.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                     help="print the raw result as JSON")
    for name, field in op.args.fields.items():
        kind: Any = int if isinstance(field, Int) else str
        text = f"{field.help} ({field.describe()})"
        if isinstance(field, Bytes):  # read from a file or stdin, never an argument (ps)
            cmd.add_argument("-f", "--file", dest=name, metavar="FILE", default="-",
                             help=f"{field.help}: read from FILE (default: stdin)")
        elif isinstance(field, MapOf):
            cmd.add_argument(name, type=_key_value, nargs="+", metavar="KEY=VALUE", help=text)
        elif name in op.positional:
            cmd.add_argument(name, type=kind, help=text,
                             nargs=None if field.required else "?")
        else:
            cmd.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind,
                             required=field.required, help=text)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


async def _run(ns: argparse.Namespace) -> Any:
    settings = load()
    client = Client("controller", settings.run, retries=0)
    client.preflight()
    try:
        if ns.command == "logs":
            return await _logs(client, ns)
        if ns.command == "top":
            if ns.json:
                return await client.call("stats", {})
            return await top(client, ns.once)
        if ns.command == "new":
            src = source(ns.file)
            progress = None if ns.json else ProgressLine(sys.stderr)
            return await upload(client, ns.name, ns.tag, src, progress)
        op = protocol.OPS["controller"][ns.command]
        args = {name: getattr(ns, name) for name in op.args.fields
                if getattr(ns, name, None) is not None}
        args.update({name: dict(args[name]) for name, field in op.args.fields.items()
                     if isinstance(field, MapOf) and name in args})
        args.update({name: _read_bytes(args[name], field.max_len + 1)
                     for name, field in op.args.fields.items()
                     if isinstance(field, Bytes) and name in args})
        return await client.call(op.name, args, timeout=ns.timeout)
    finally:
        client.close()


def _read_bytes(path: str, cap: int) -> bytes:
    """At most ``cap`` bytes of a file, or of stdin for "-" (the schema refuses more than
    its field takes); an error names the file, never its content."""
    if path == "-":
        return sys.stdin.buffer.read(cap)
    try:
        with open(path, "rb") as f:
            return f.read(cap)
    except OSError as exc:
        raise FaasError(Code.BAD_REQUEST, f"cannot read {path}: {exc.strerror}") from None


CLIENT_COMMANDS = ("connect", "disconnect", "pubkey")


def main(argv: list[str] | None = None) -> None:
    """Console script faasctl."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["vpn"] and args[1:2] and args[1] in CLIENT_COMMANDS:
        from cli import vpnclient  # the client side: no controller, its own options
        sys.exit(vpnclient.main(args[1:]))
    if args[:1] in (["backup"], ["restore"]):
        from cli import backup  # root on the server, without the controller
        sys.exit(backup.main(args))
    ns = build_parser().parse_args(args)
    if ns.command in ("vpn", "token", "secret", "volume"):
        ns.command = f"{ns.command}_{ns.group_command}"
    try:
        result = asyncio.run(_run(ns))
    except SettingsError as exc:
        print(f"faasctl: {exc}", file=sys.stderr)
        sys.exit(EXIT_STATUS[Code.BAD_REQUEST])
    except FaasError as exc:
        if ns.json:
            print(json.dumps({"ok": False, "error": exc.to_wire()}))
        print(f"faasctl: {exc.code.value}: {exc.message}", file=sys.stderr)
        sys.exit(EXIT_STATUS[exc.code])
    except KeyboardInterrupt:
        sys.exit(130)
    if ns.command == "logs" or (ns.command == "top" and not ns.json):
        sys.exit(0)
    if ns.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        RENDERERS.get(ns.command, render_generic)(result, sys.stdout)
        if getattr(ns, "qr", False):
            print_qr(result["config"], sys.stdout)
    sys.exit(verdict(ns.command, result))


def print_qr(text: str, out: Any) -> None:
    """A QR code of ``text`` in the terminal, for the WireGuard phone apps to scan."""
    import segno
    segno.make(text, error="l").terminal(out=out, compact=True)
