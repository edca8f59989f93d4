"""faasctl: the operator's command line. Talks ZeroMQ to the controller.

Commands, their help text and their arguments come from ``common.protocol.OPS``: a
controller op with ``cli=True`` is a command. ``--json`` prints the raw result. The exit
status says what went wrong (see ``common.errors.EXIT_STATUS``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from common import protocol
from common.errors import EXIT_STATUS, Code, FaasError
from common.rpc import Client
from common.settings import SettingsError, load
from cli.render import RENDERERS, render_generic, verdict


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
    for op in protocol.OPS["controller"].values():
        if not op.cli:
            continue
        cmd = sub.add_parser(op.name, help=op.doc, description=op.doc)
        cmd.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="print the raw result as JSON")
        for name, field in op.args.fields.items():
            cmd.add_argument(f"--{name.replace('_', '-')}", dest=name, required=field.required,
                             help=f"{field.help} ({field.describe()})")
    return parser


async def _call(op: str, args: dict[str, Any], timeout: float | None) -> Any:
    settings = load()
    client = Client("controller", settings.run, retries=0)
    client.preflight()
    try:
        return await client.call(op, args, timeout=timeout)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> None:
    """Console script faasctl."""
    ns = build_parser().parse_args(argv)
    op = protocol.OPS["controller"][ns.command]
    args = {name: getattr(ns, name) for name in op.args.fields if getattr(ns, name) is not None}
    try:
        result = asyncio.run(_call(op.name, args, ns.timeout))
    except SettingsError as exc:
        print(f"faasctl: {exc}", file=sys.stderr)
        sys.exit(EXIT_STATUS[Code.BAD_REQUEST])
    except FaasError as exc:
        if ns.json:
            print(json.dumps({"ok": False, "error": exc.to_wire()}))
        print(f"faasctl: {exc.code.value}: {exc.message}", file=sys.stderr)
        sys.exit(EXIT_STATUS[exc.code])
    if ns.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        RENDERERS.get(op.name, render_generic)(result, sys.stdout)
    sys.exit(verdict(op.name, result))
