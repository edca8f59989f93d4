"""How faasctl shows results to people, and what exit status a result means."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable, TextIO

from common.errors import EXIT_STATUS, Code


def _age(ts: float | None) -> str:
    if ts is None:
        return "never"
    return f"{max(0.0, time.time() - ts):.1f}s ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{seconds:.0f}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1048576:.1f}MiB"


# C0 controls but tab, DEL and C1 controls: ESC and CSI start the sequences that retitle,
# clear or recolour a terminal; CR and BS let a line overwrite what came before it.
_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x09), *range(0x0a, 0x20), *range(0x7f, 0xa0)]}


def escape_controls(text: str) -> str:
    """``text`` with every terminal control character shown as ``\\xNN`` (tab kept), for
    text a function wrote that is printed on an operator's terminal."""
    return text.translate(_CONTROLS)


def _command(argv: list[str]) -> str:
    """An image's command as list, info and versions show it: its author wrote it, so
    its control characters are escaped like a function's log lines (--json keeps them)."""
    return escape_controls(" ".join(argv))


def render_log_line(line: dict[str, Any], terminal: bool) -> str:
    """One function log line as ``faasctl logs`` prints it: time, request id, text; on a
    terminal the function's control characters are escaped, never interpreted."""
    stamp = time.strftime("%H:%M:%S", time.localtime(line["ts"]))
    text = f"{stamp} {line.get('rid') or '-':14} {line['line']}"
    return escape_controls(text) if terminal else text


def table(rows: list[list[str]], out: TextIO) -> None:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")


def render_status(result: dict[str, Any], out: TextIO) -> None:
    """The process table of ``faasctl status``."""
    rows = [["PROCESS", "STATE", "PID", "BOOT ID", "UPTIME", "MEMORY", "LAST SEEN", "SYNCED"]]
    for p in result["processes"]:
        rows.append([
            p["name"], p["state"], str(p["pid"] or "-"), (p["boot_id"] or "-")[:12],
            _duration(p["uptime"]), _mib(p["rss"]), _age(p["last_seen"]),
            "yes" if p["synced"] else "no",
        ])
    table(rows, out)
    for p in result["processes"]:
        for flag in p.get("flags") or []:
            out.write(f"{p['name']}: {flag}\n")
        if p.get("error"):
            out.write(f"{p['name']}: {p['error']}\n")
    for f in result.get("functions") or []:
        out.write(f"function {f['name']}: {f['problem']}\n")


def render_generic(result: Any, out: TextIO) -> None:
    """Anything without its own renderer: indented JSON."""
    out.write(json.dumps(result, indent=2, sort_keys=True) + "\n")


def render_list(result: dict[str, Any], out: TextIO) -> None:
    """faasctl list."""
    rows = [["NAME", "ADDRESS", "VERSION", "IMAGE", "COMMAND"]]
    for f in result["functions"]:
        rows.append([f["name"], f["address"], str(f["version"]), f["digest"][7:19],
                     _command(f["command"])])
    table(rows, out) if len(rows) > 1 else out.write("no functions; deploy one with "
                                                     "faasctl new NAME\n")


def _versions(rows_in: list[dict[str, Any]], current: int, out: TextIO) -> None:
    rows = [["VERSION", "IMAGE", "SIZE", "DEPLOYED", "COMMAND"]]
    for v in rows_in:
        mark = "*" if v["version"] == current else " "
        rows.append([f"{mark}{v['version']}", v["digest"][7:19], _mib(v["size"]),
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["created"])),
                     _command(v["command"])])
    table(rows, out)


def render_info(result: dict[str, Any], out: TextIO) -> None:
    """faasctl info NAME."""
    for key in ("name", "address", "version", "digest"):
        out.write(f"{key + ':':9} {result[key]}\n")
    out.write(f"{'command:':9} {_command(result['command'])}\n")
    _settings(result["settings"], out)
    out.write("\n")
    _versions(result["versions"], result["version"], out)


def _settings(settings: dict[str, Any], out: TextIO) -> None:
    out.write("settings: " + " ".join(f"{k}={v}" for k, v in settings.items() if k != "env")
              + "\n")
    for k, v in sorted(settings["env"].items()):
        out.write(f"  env.{k}={v}\n")


def render_versions(result: dict[str, Any], out: TextIO) -> None:
    """faasctl versions NAME (the current one is starred)."""
    current = next((v["version"] for v in result["versions"] if v["current"]), 0)
    _versions(result["versions"], current, out)


def render_new(result: dict[str, Any], out: TextIO) -> None:
    """faasctl new."""
    how = "image already present" if result["reused"] else "extracted"
    out.write(f"{result['name']} version {result['version']} at {result['address']} "
              f"({result['digest'][:19]}, {_mib(result['size'])}, {how}, "
              f"{result['seconds']:.1f}s)\n")


def render_vpn_add(result: dict[str, Any], out: TextIO) -> None:
    """faasctl vpn add: the client config, ready for `faasctl vpn connect` or wg-quick."""
    out.write(result["config"])
    if result["private_key_included"]:
        sys.stderr.write("faasctl: this config holds the peer's private key; the server "
                         "did not keep it: store the config now, it cannot be shown again\n")


def render_vpn_list(result: dict[str, Any], out: TextIO) -> None:
    """faasctl vpn list."""
    rows = [["NAME", "ADDRESS", "STATE", "HANDSHAKE", "RECEIVED", "SENT", "EXPIRES"]]
    for p in result["peers"]:
        expires = "-" if p["expires"] is None else time.strftime(
            "%Y-%m-%d %H:%M", time.localtime(p["expires"]))
        rows.append([p["name"], p["address"], p["state"],
                     _age(p["latest_handshake"] or None), _mib(p["rx_bytes"]),
                     _mib(p["tx_bytes"]), expires])
    table(rows, out)


def render_token_create(result: dict[str, Any], out: TextIO) -> None:
    """faasctl token create: the token alone on stdout (for a CI secret), once."""
    out.write(result["token"] + "\n")
    sys.stderr.write(f"faasctl: token {result['name']} ({result['role']}"
                     + ("" if result["expires"] is None else ", expires " + time.strftime(
                         "%Y-%m-%d %H:%M", time.localtime(result["expires"])))
                     + "): store it now, it cannot be shown again; use it as "
                     "Authorization: Bearer TOKEN\n")


def render_token_list(result: dict[str, Any], out: TextIO) -> None:
    """faasctl token list."""
    rows = [["NAME", "ROLE", "CREATED", "EXPIRES", "LAST USED"]]
    for t in result["tokens"]:
        rows.append([t["name"], t["role"], _age(t["created"]),
                     "never" if t["expires"] is None else time.strftime(
                         "%Y-%m-%d %H:%M", time.localtime(t["expires"])),
                     _age(t["last_used"]) if t["last_used"] else "never"])
    table(rows, out)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def render_volume_list(result: dict[str, Any], out: TextIO) -> None:
    """faasctl volume list."""
    rows = [["NAME", "SIZE", "USED", "FUNCTIONS"]]
    for v in result["volumes"]:
        rows.append([v["name"], _bytes(v["size"]),
                     _bytes(v["used"]) if v["mounted"] else "(not mounted)",
                     ",".join(v["functions"]) or "-"])
    table(rows, out)


def render_secret_list(result: dict[str, Any], out: TextIO) -> None:
    """faasctl secret list: names, sizes and dates (the controller has no values)."""
    rows = [["NAME", "SIZE", "UPDATED", "USED BY"]]
    for s in result["secrets"]:
        rows.append([s["name"], str(s["size"]), _age(s["updated"]),
                     ",".join(s["functions"]) or "-"])
    table(rows, out)


RENDERERS: dict[str, Callable[[Any, TextIO], None]] = {
    "status": render_status, "list": render_list, "info": render_info,
    "versions": render_versions, "new": render_new,
    "vpn_add": render_vpn_add, "vpn_list": render_vpn_list,
    "token_create": render_token_create, "token_list": render_token_list,
    "token_rm": lambda r, out: out.write(f"removed token {r['name']}\n"),
    "ip": lambda r, out: out.write(r["address"] + "\n"),
    "rollback": lambda r, out: out.write(f"{r['name']} now serves version {r['version']}\n"),
    "rm": lambda r, out: out.write(f"removed {r['name']} ({r['address']})\n"),
    "set": lambda r, out: _settings(r["settings"], out),
    "volume_list": render_volume_list,
    "volume_create": lambda r, out: out.write(f"created volume {r['name']} "
                                              f"({_bytes(r['size'])})\n"),
    "volume_rm": lambda r, out: out.write(f"removed volume {r['name']}\n"),
    "secret_list": render_secret_list,
    "secret_create": lambda r, out: out.write(f"secret {r['name']}: {r['size']} bytes stored\n"),
    "secret_rm": lambda r, out: out.write(f"removed secret {r['name']}\n"),
}


def verdict(op: str, result: Any) -> int:
    """Exit status for a successful call: ``status`` fails while any process is not up,
    so scripts can wait on it."""
    if op == "status" and (any(p["state"] != "up" or not p["synced"]
                               for p in result["processes"])
                           or any(f["serious"] for f in result.get("functions") or [])):
        return EXIT_STATUS[Code.UNAVAILABLE]
    return 0
