"""Backup and restore part by part: each daemon answers for its own files.

``faasctl backup`` and ``restore`` own the archive: the tar, the manifest, the member
names and their caps (cli/archive.py). What a member holds and how it is copied
consistently, checked and put back belongs to the daemon whose file it is:
``controller/backup.py`` (state.db), ``netagent/backup.py`` (the WireGuard key and
the peers' endpoints), ``dnsagent/backup.py`` (the zone and its serial),
``runner/backup.py`` (the secrets' values, with ``--with-secrets`` only, and the
volumes' files, with ``--with-volumes`` only). A change of a
file's format stays inside its owner.

faasctl reaches a part by running the owner's module as a one-shot program, as root,
with a JSON request on stdin and a JSON answer on stdout::

    python -I -m <service>.backup ACTION

Not an op of the running daemon: restore runs while every daemon is stopped, and
backup works whether they run or not; and ``cli/`` imports no daemon package. ``-I``
keeps the current directory and ``PYTHON*`` variables out of root's import path. A
part writes and reads files only in the work directory the caller names and in its
own part of ``$FAAS_ROOT``; secrets (the private key) travel as files there, never on
stdout.

A part module defines, each taking the caller's Settings first:

    export(settings, work)            {"files": {member: path in work}, ...facts}
    ready(settings, force)            a conflict (FaasError) if a restore now would be wrong
    check(settings, files)            facts; bad_request for anything its owner refuses
    install(settings, files, owners)  each file into place (owners: {"faas"|"root": [uid, gid]})

and ends with ``serve(globals())``. Stdlib and ``common`` only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

from common.errors import Code, FaasError
from common.settings import Settings

# In the order restore installs them: the controller's state.db last, so its presence
# means "restored" (docs/backup.md).
PARTS = ("netagent", "dnsagent", "runner", "controller")
OPTIONAL = ("runner",)  # its member (the secrets' values) only with --with-secrets
ACTIONS = ("export", "ready", "check", "install")
TIMEOUT = 600.0  # a 256 MiB database copied and checked on a slow disk


def call(service: str, action: str, settings: Settings, **args: Any) -> dict[str, Any]:
    """Run ``service``'s part for ``action``; its result, or its error raised here
    (FaasError with the part's code, OSError with the part's errno)."""
    argv = [sys.executable, "-I", "-m", f"{service}.backup", action]
    request = json.dumps({"settings": settings.as_dict(), **args}).encode()
    try:
        out = subprocess.run(argv, input=request, capture_output=True, timeout=TIMEOUT,
                             check=False)
    except subprocess.TimeoutExpired:
        raise FaasError(Code.TIMEOUT, f"{service}'s backup part ({action}) took more than "
                        f"{TIMEOUT:.0f}s") from None
    try:
        reply = json.loads(out.stdout)
    except ValueError:
        reply = None
    if not isinstance(reply, dict) or not ("result" in reply or "error" in reply):
        tail = out.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise FaasError(Code.INTERNAL, f"{service}'s backup part ({action}) failed with exit "
                        f"status {out.returncode}: {tail[0][:300]}")
    if "error" in reply:
        error = reply["error"]
        if isinstance(error, dict) and isinstance(error.get("errno"), int):
            raise OSError(error["errno"], str(error.get("message")), error.get("filename"))
        raise FaasError.from_wire(error)
    result = reply["result"]
    return result if isinstance(result, dict) else {}


def serve(actions: Mapping[str, Any]) -> None:
    """The part program: ``ACTION`` from argv, the request from stdin, the answer (a
    result or an error, never a traceback) to stdout; exit 2 on bad usage."""
    action = sys.argv[1] if len(sys.argv) == 2 else ""
    handler: Callable[..., Any] | None = actions.get(action) if action in ACTIONS else None
    if handler is None:
        print(f"usage: python -m <service>.backup {'|'.join(ACTIONS)} < request.json "
              "(run by faasctl backup and restore)", file=sys.stderr)
        sys.exit(2)
    try:
        request = json.loads(sys.stdin.buffer.read())
        settings = Settings(request.pop("settings"), {})
        reply: dict[str, Any] = {"result": handler(settings, **request) or {}}
    except FaasError as exc:
        reply = {"error": exc.to_wire()}
    except OSError as exc:
        reply = {"error": {"errno": exc.errno, "message": exc.strerror, "filename": exc.filename}
                 if exc.errno else FaasError(Code.INTERNAL, str(exc)).to_wire()}
    sys.stdout.write(json.dumps(reply))
    sys.stdout.flush()


def real_dir_or_none(path: str) -> None:
    """A restore writes into ``path``: it must be a real directory, or not exist yet (a
    symlink or a file there is a conflict that says what is wrong)."""
    if os.path.lexists(path) and (os.path.islink(path) or not os.path.isdir(path)):
        raise FaasError(Code.CONFLICT, f"{path} is not a directory; faasd wants a real "
                        "directory there")
