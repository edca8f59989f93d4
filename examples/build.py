#!/usr/bin/env python3
"""Build an example's image as a ``docker save`` archive, without Docker.

    python3 examples/build.py fibonacci fibonacci.tar   # or echo, or c-hello
    faasctl new fibonacci -f fibonacci.tar

Python examples (fibonacci, echo) get one layer holding this machine's Debian CPython and
just enough of it:

* ``/usr/bin/python3.11`` (and a ``python3`` link), the shared libraries ``ldd`` lists for
  it and for the extension modules shipped, the dynamic loader; every symlink on the way
  is kept, so the merged-/usr layout (``/lib -> usr/lib``) is the host's own;
* from ``/usr/lib/python3.11``: the modules that ``MODULES`` (a generous list: json,
  http, email, urllib, wsgiref, logging, asyncio, datetime, decimal, sqlite3, xml...)
  import, whole packages at a time, without tests; each with a bytecode file compiled
  here (unchecked-hash .pyc: the rootfs is read-only, so Python could not cache them and
  would compile on every cold start). Not shipped: ``ssl`` and ``_hashlib`` (OpenSSL:
  the container has no network; hashlib keeps the interpreter's built-in md5, sha1, sha2,
  sha3 and blake2), the CJK codecs, curses, readline, tkinter, test suites;
* ``/app/handler.py`` (the example) and ``/app/faas_handler.py`` (the SDK) with its .pyc;
* ``/etc/passwd`` and ``/etc/group`` with root and nobody (65534), and the mount points
  ``/proc /dev /sys /tmp``.

Config: ``Cmd ["/usr/bin/python3.11", "-S", "/app/handler.py"]`` (``-S``: no site
module, a faster start; not ``-I``, which would drop /app from the import path),
``WorkingDir /app``, ``User 65534:65534``, ``Env`` PATH, PYTHONUNBUFFERED=1 (logs leave
at once) and PYTHONDONTWRITEBYTECODE=1.

c-hello: ``examples/c-hello/handler.c`` compiled with ``gcc -static -O2 -s``; the layer
holds ``/handler`` only.

The archive is the classic ``docker save`` format (``manifest.json``, the config as
``<sha256>.json``, ``<sha256>/layer.tar``, ``repositories``), tagged ``<name>:latest``.
Output is deterministic: fixed mtimes, owners root, sorted entries, and the same bytes
for the same host files. Standard library only: a fresh Debian 12's ``/usr/bin/python3``
runs this.
"""

import argparse
import hashlib
import io
import json
import os
import platform
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SDK = HERE.parent / "sdk" / "faas_handler.py"
PYTHON = "/usr/bin/python3.11"
STDLIB = "/usr/lib/python3.11"
MTIME = 1_700_000_000  # every entry's mtime, and the config's "created"
PYTHON_EXAMPLES = ("fibonacci", "echo")
EXAMPLES = (*PYTHON_EXAMPLES, "c-hello")

# What a handler may import. Their closure is computed by importing them with the
# image's interpreter; a package is shipped whole once any module of it is needed.
MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "binascii", "bisect", "bz2", "calendar",
    "codecs", "collections", "concurrent.futures", "configparser", "contextlib", "copy",
    "copyreg", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "email.parser", "email.policy", "email.utils", "enum", "fnmatch", "fractions", "functools",
    "getopt", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser",
    "http.client", "http.cookies", "http.server", "importlib.metadata", "importlib.resources",
    "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "logging.handlers",
    "lzma", "math", "mimetypes", "numbers", "operator", "pathlib", "pickle", "platform",
    "pprint", "queue", "quopri", "random", "re", "runpy", "secrets", "select", "selectors",
    "shlex", "shutil", "signal", "site", "socket", "sqlite3", "statistics", "string", "struct",
    "subprocess", "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "time",
    "tomllib", "traceback", "typing", "unicodedata", "urllib.parse", "urllib.request", "uuid",
    "warnings", "weakref", "wsgiref.handlers", "wsgiref.simple_server", "wsgiref.util",
    "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zlib", "zoneinfo",
)
NOT_SHIPPED = ("_ssl", "_hashlib")  # OpenSSL: ~5 MB for a container without a network
SKIP_DIRS = frozenset(("__pycache__", "test", "tests", "idle_test"))
PASSWD = (b"root:x:0:0:root:/root:/usr/sbin/nologin\n"
          b"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
GROUP = b"root:x:0:\nnogroup:x:65534:\n"
ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
        "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}

# Run by the image's own interpreter: prints the file of every module MODULES pulls in.
CLOSURE_SCRIPT = """
import importlib, sys
for name in sys.argv[2:]:
    sys.modules[name] = None  # not shipped: imported as ImportError, as in the image
for name in sys.argv[1].split():
    importlib.import_module(name)
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None)
    if path:
        print(path)
"""

# Run by the image's own interpreter (same magic number): compiles [source, path in
# image] pairs from stdin into a directory, printing each bytecode file's path in image.
COMPILE_SCRIPT = """
import importlib.util, json, os, py_compile, sys
out = sys.argv[1]
for source, target in json.load(sys.stdin):
    cached = importlib.util.cache_from_source(target)
    py_compile.compile(source, cfile=out + cached, dfile=target, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    print(cached)
"""


@dataclass
class Entry:
    """One member of the layer: kind is "dir", "file" or "symlink"."""

    kind: str
    mode: int = 0o755
    data: bytes = b""
    target: str = ""


class Tree:
    """A root filesystem being assembled in memory, keyed by path without leading "/"."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def dir(self, path: str, mode: int = 0o755) -> None:
        """A directory, with its parents."""
        path = path.strip("/")
        parent = os.path.dirname(path)
        if parent and parent not in self.entries:
            self.dir(parent)
        self.entries.setdefault(path, Entry("dir", mode))

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """A regular file, with its parent directories."""
        path = self._parent(path)
        self.entries[path] = Entry("file", mode, data)

    def symlink(self, path: str, target: str) -> None:
        """A symbolic link, with its parent directories."""
        path = self._parent(path)
        self.entries[path] = Entry("symlink", 0o777, target=target)

    def _parent(self, path: str) -> str:
        path = path.strip("/")
        if os.path.dirname(path):
            self.dir(os.path.dirname(path))
        return path

    def copy(self, host_path: str) -> None:
        """The host file at the same path, with every symlink met on the way (merged
        /usr: /lib -> usr/lib), so the loader and libraries sit where binaries expect."""
        parts = host_path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            current = "/" + "/".join(parts[:i])
            if os.path.islink(current):
                target = os.readlink(current)
                self.symlink(current, target)
                resolved = os.path.normpath(os.path.join(os.path.dirname(current), target))
                self.copy("/".join([resolved, *parts[i:]]))
                return
        info = os.stat(host_path)
        self.file(host_path, Path(host_path).read_bytes(), stat.S_IMODE(info.st_mode) & 0o755)

    def tar(self) -> bytes:
        """The layer: sorted (parents first), root-owned, fixed mtimes."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(self.entries):
                entry = self.entries[path]
                info = tarfile.TarInfo(path)
                info.mtime, info.mode, info.uid, info.gid = MTIME, entry.mode, 0, 0
                if entry.kind == "dir":
                    info.type = tarfile.DIRTYPE
                elif entry.kind == "symlink":
                    info.type, info.linkname = tarfile.SYMTYPE, entry.target
                else:
                    info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data) if entry.kind == "file" else None)
        return buffer.getvalue()


# -- what goes in ----------------------------------------------------------------------


def shared_libraries(binary: str) -> list[str]:
    """The loader and the libraries ``ldd`` resolves for ``binary``."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    paths = []
    for line in out.splitlines():
        words = line.split()
        if "=>" in words and len(words) > words.index("=>") + 1:
            candidate = words[words.index("=>") + 1]
        else:
            candidate = words[0] if words else ""
        if candidate.startswith("/"):
            paths.append(candidate)
    return paths


def module_files() -> list[str]:
    """Files under the stdlib that MODULES need, as the image's interpreter sees them."""
    out = subprocess.run([PYTHON, "-I", "-S", "-c", CLOSURE_SCRIPT, " ".join(MODULES),
                          *NOT_SHIPPED], capture_output=True, text=True, check=True).stdout
    return sorted({p for p in out.split("\n") if p.startswith(STDLIB + "/")})


def stdlib_files(needed: list[str]) -> tuple[list[str], list[str]]:
    """(Python sources, extension modules): whole packages for any module in one."""
    sources: set[str] = set()
    extensions: set[str] = set()
    for path in needed:
        relative = os.path.relpath(path, STDLIB)
        top = relative.split("/")[0]
        if top == "lib-dynload":
            extensions.add(path)
        elif "/" in relative:  # in a package: the whole package, a later import may want more
            sources.update(_package_sources(os.path.join(STDLIB, top)))
        elif path.endswith(".py"):
            sources.add(path)
    return sorted(sources), sorted(extensions)


def _package_sources(package: str) -> list[str]:
    found = []
    for directory, subdirs, files in os.walk(package):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS)
        found += [os.path.join(directory, f) for f in sorted(files) if f.endswith(".py")]
    return found


def compile_sources(tree: Tree, pairs: list[tuple[str, str]]) -> None:
    """Add an unchecked-hash .pyc beside each (host source, path in image)."""
    with tempfile.TemporaryDirectory() as out:
        result = subprocess.run([PYTHON, "-I", "-S", "-c", COMPILE_SCRIPT, out],
                                input=json.dumps(pairs), capture_output=True, text=True,
                                check=True)
        for cached in result.stdout.split():
            tree.file(cached, Path(out + cached).read_bytes())


def python_tree(example: str) -> Tree:
    """The root filesystem of a Python example."""
    tree = _base_tree()
    for path in [PYTHON, *shared_libraries(PYTHON)]:
        tree.copy(path)
    tree.symlink("/usr/bin/python3", "python3.11")
    sources, extensions = stdlib_files(module_files())
    for path in extensions:
        tree.copy(path)
        for library in shared_libraries(path):
            tree.copy(library)
    for path in sources:
        tree.copy(path)
    tree.file("/app/handler.py", (HERE / example / "handler.py").read_bytes())
    tree.file("/app/faas_handler.py", SDK.read_bytes())
    compile_sources(tree, [*((p, p) for p in sources),
                           (str(SDK), "/app/faas_handler.py")])
    tree.file("/etc/passwd", PASSWD)
    tree.file("/etc/group", GROUP)
    return tree


def c_tree(example: str) -> Tree:
    """The root filesystem of the C example: one static binary."""
    tree = Tree()
    with tempfile.TemporaryDirectory() as out:
        binary = os.path.join(out, "handler")
        subprocess.run(["gcc", "-static", "-O2", "-s", "-o", binary,
                        str(HERE / example / "handler.c")], check=True)
        tree.file("/handler", Path(binary).read_bytes(), 0o755)
    return tree


def _base_tree() -> Tree:
    tree = Tree()
    for mountpoint in ("proc", "dev", "sys"):  # the runtime mounts over these
        tree.dir(mountpoint)
    tree.dir("tmp", 0o1777)
    return tree


def image_config(example: str, diff_id: str) -> dict:
    """The image config (its sha256 is the image id)."""
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(MTIME))
    if example in PYTHON_EXAMPLES:
        config = {"Cmd": [PYTHON, "-S", "/app/handler.py"], "WorkingDir": "/app",
                  "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "PYTHONUNBUFFERED=1",
                          "PYTHONDONTWRITEBYTECODE=1"]}
    else:
        config = {"Cmd": ["/handler"], "WorkingDir": "/", "Env": ["PATH=/"]}
    config["User"] = "65534:65534"
    return {
        "architecture": ARCH.get(platform.machine(), platform.machine()),
        "os": "linux",
        "created": created,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": f"examples/build.py {example}"}],
    }


# -- the archive -----------------------------------------------------------------------


def archive(example: str, layer: bytes) -> bytes:
    """A classic ``docker save`` archive of one image with one layer."""
    layer_hex = hashlib.sha256(layer).hexdigest()
    config = json.dumps(image_config(example, f"sha256:{layer_hex}"), sort_keys=True).encode()
    config_hex = hashlib.sha256(config).hexdigest()
    tag = f"{example}:latest"
    manifest = [{"Config": f"{config_hex}.json", "RepoTags": [tag],
                 "Layers": [f"{layer_hex}/layer.tar"]}]
    members = {
        f"{config_hex}.json": config,
        f"{layer_hex}/layer.tar": layer,
        "manifest.json": json.dumps(manifest).encode(),
        "repositories": json.dumps({example: {"latest": layer_hex}}).encode(),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo(layer_hex)
        directory.type, directory.mode, directory.mtime = tarfile.DIRTYPE, 0o755, MTIME
        tar.addfile(directory)
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(members[name]), 0o644, MTIME
            tar.addfile(info, io.BytesIO(members[name]))
    return buffer.getvalue()


def build(example: str, output: Path) -> int:
    """Write ``example``'s archive to ``output``; returns the layer's size in bytes."""
    if example not in EXAMPLES:
        raise SystemExit(f"unknown example {example!r}: one of {', '.join(EXAMPLES)}")
    tree = c_tree(example) if example == "c-hello" else python_tree(example)
    layer = tree.tar()
    data = archive(example, layer)
    partial = output.with_name(output.name + ".partial")
    partial.write_bytes(data)
    partial.replace(output)  # never a half-written archive under the final name
    return len(layer)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``build.py EXAMPLE OUT.tar``."""
    parser = argparse.ArgumentParser(description="Build an example image as a docker save archive.")
    parser.add_argument("example", choices=EXAMPLES)
    parser.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    size = build(args.example, args.output)
    print(f"{args.output}: {args.example}:latest, layer {size / 1e6:.1f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
