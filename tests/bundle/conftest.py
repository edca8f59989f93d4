"""Fixtures for the bundle and runtime tests: a tiny rootfs holding a static probe
program (probe.c), and containers of it that are always removed, even on failure.

Tests get everything here through fixtures, never ``from conftest import``: several
conftest.py files share that module name in this suite."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common.proc import adopt_orphans
from runner.bundle import FunctionSettings, build_config, write_bundle
from runner.runtime import Runtime, RuntimeFailed, runtime_for

HERE = Path(__file__).resolve().parent
RUNTIMES = ("runc", "crun")
DEFAULTS = FunctionSettings()

PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:app:/home/app:/bin/sh\n" \
         "nobody:x:65534:65534:nobody:/:/bin/false\n"
GROUP = "root:x:0:\napp:x:1001:\nextra:x:2000:someone,app\nother:x:3000:someone\n" \
        "nogroup:x:65534:\n"


def poll(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Wait for ``predicate`` to return something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def make_rootfs(root: Path, probe: Path) -> None:
    """An image's rootfs as the runner finds it: the probe, /etc/passwd and /etc/group,
    and the mount points runner.store creates. /tmp is 0755 on purpose (see bundle.py)."""
    for d in ("bin", "etc", "proc", "dev", "sys", "tmp", "home/app"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(probe, root / "bin" / "probe")
    (root / "bin" / "probe").chmod(0o755)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    (root / "control.sock").touch()
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755)


@pytest.fixture
def etc_files() -> dict[str, str]:
    """The /etc/passwd and /etc/group of the probe rootfs."""
    return {"passwd": PASSWD, "group": GROUP}


@pytest.fixture(scope="session")
def scratch() -> Iterator[Path]:
    """A temporary directory for the whole session, removed at the end."""
    path = Path(tempfile.mkdtemp(prefix="faasd-bundle-tests-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def probe_rootfs(scratch: Path) -> Path:
    """The rootfs with the probe compiled by gcc -static (a missing gcc fails)."""
    binary = scratch / "probe"
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", str(binary),
                    str(HERE / "probe.c")], check=True, capture_output=True, timeout=60)
    root = scratch / "rootfs"
    make_rootfs(root, binary)
    return root


@dataclass
class Result:
    """What one container run gave."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict[str, Any]:
        assert self.returncode == 0, f"container failed ({self.returncode}): {self.stderr}"
        return json.loads(self.stdout)


@contextlib.contextmanager
def adopted() -> Iterator[None]:
    """As the runner: a child subreaper while a detached container runs, so its init
    becomes ours to wait for."""
    adopt_orphans()
    try:
        yield
    finally:
        adopt_orphans(False)


@dataclass
class Containers:
    """Containers of the probe rootfs on one runtime; all removed at teardown."""

    runtime: Runtime
    rootfs: Path
    base: Path
    ids: list[str] = field(default_factory=list)

    def new_id(self) -> str:
        cid = f"t-{os.getpid()}-{secrets.token_hex(4)}"
        self.ids.append(cid)
        return cid

    def bundle(self, cid: str) -> str:
        return str(self.base / "bundles" / cid)

    def control_socket(self, cid: str) -> socket.socket:
        """The listening control socket of ``cid``, as the runner makes it."""
        path = self.base / "ctl" / f"{cid}.sock"
        path.parent.mkdir(exist_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(str(path))
        path.chmod(0o666)
        listener.listen(1)
        return listener

    def prepare(self, *args: str, user: str = "", env: tuple[str, ...] = (),
                workdir: str = "", settings: FunctionSettings = DEFAULTS) -> str:
        """Write the bundle of a new container running ``probe ARGS``; return its id."""
        cid = self.new_id()
        image = {"entrypoint": ["/bin/probe"], "cmd": list(args), "env": list(env),
                 "workdir": workdir, "user": user, "os": "linux", "architecture": "amd64"}
        config = build_config(str(self.rootfs), image, container_id=cid, hostname="probe",
                              control_socket=str(self.base / "ctl" / f"{cid}.sock"),
                              settings=settings)
        write_bundle(self.bundle(cid), config)
        return cid

    adopted = staticmethod(adopted)

    def run(self, *args: str, pass_fds: tuple[int, ...] = (), **kwargs: Any) -> Result:
        """Run ``probe ARGS`` in a new container to its end."""
        cid = self.prepare(*args, **kwargs)
        with self.control_socket(cid):
            result = self.run_prepared(cid, pass_fds=pass_fds)
        self.remove(cid)
        return result

    def run_prepared(self, cid: str, runtime: Runtime | None = None,
                     pass_fds: tuple[int, ...] = (), timeout: float = 30) -> Result:
        """Run a prepared container to its end as the runner does (Runtime.spawn_run:
        detached on runc, in the foreground on crun). A signal's death is 128 + signal,
        as a runtime in the foreground reports it."""
        runtime = runtime or self.runtime

        async def to_end(out: int, err: int) -> int:
            running = await runtime.spawn_run(self.bundle(cid), cid, stdout=out, stderr=err,
                                              pidfile=os.path.join(self.bundle(cid), "pid"),
                                              pass_fds=pass_fds)
            try:
                return await asyncio.wait_for(running.wait(), timeout)
            except TimeoutError:
                await runtime.delete(cid)
                raise AssertionError(f"{cid} ran longer than {timeout}s") from None

        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, self.adopted():
            code = asyncio.run(to_end(out.fileno(), err.fileno()))
            out.seek(0)
            err.seek(0)
            return Result(128 - code if code < 0 else code, out.read().decode(errors="replace"),
                          err.read().decode(errors="replace"))

    def wait_for(self, cid: str, status: str, timeout: float = 20) -> None:
        """Poll the runtime until the container has ``status``."""
        poll(lambda: self.runtime.state(cid)["status"] == status, timeout,
             f"{cid} to be {status}")

    def remove(self, cid: str) -> None:
        """Delete the container and its bundle."""
        asyncio.run(self.runtime.delete(cid))
        shutil.rmtree(self.bundle(cid), ignore_errors=True)
        (self.base / "ctl" / f"{cid}.sock").unlink(missing_ok=True)

    def cleanup(self) -> None:
        """Remove every container this test made; fail if any is left."""
        errors = []
        for cid in self.ids:
            try:
                self.remove(cid)
            except (RuntimeFailed, OSError) as exc:  # keep removing the others
                errors.append(str(exc))
        left = self.runtime.list()
        assert not left and not errors, f"containers left behind: {left} {errors}"


@pytest.fixture(params=RUNTIMES)
def containers(request: pytest.FixtureRequest, probe_rootfs: Path, scratch: Path
               ) -> Iterator[Containers]:
    """Containers on runc and on crun (each must work here; neither is skipped)."""
    base = Path(tempfile.mkdtemp(prefix=f"{request.param}-", dir=scratch))
    runtime = runtime_for(request.param, root=str(base / "state"))
    runtime.check()
    box = Containers(runtime, probe_rootfs, base)
    try:
        yield box
    finally:
        box.cleanup()
        shutil.rmtree(base, ignore_errors=True)
