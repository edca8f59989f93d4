"""The seam over the OCI runtime binary (runc or crun): every call goes through here.

Argument lists, never a shell. Every call passes ``--root``: faasd keeps its containers'
state in a directory of its own (``$FAAS_RUN/<runc|crun>``), so ``list`` shows only
faasd's containers and nothing faasd does can touch another user of the same runtime.

crun and cgroup "hybrid" mode: crun 1.8 refuses to create any container (even with
``--cgroup-manager=disabled``) when /sys/fs/cgroup is a v1 tmpfs with a cgroup2 mounted
at /sys/fs/cgroup/unified whose ``cgroup.controllers`` is not empty ("cgroups in hybrid
mode not supported, drop all controllers from cgroupv2"). Such a host is left as it is:
crun runs in a mount namespace of its own where that one mount is detached, so crun
sees a pure v1 host and uses the v1 controllers. The namespace is made in the child
between fork and exec (:meth:`Runtime.preexec_fn`); its mounts are slaves of the
host's, so the detach never reaches the host while mounts made later on the host still
appear to crun. runc handles hybrid mode itself and runs as is.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from typing import IO, Any

from common.layout import DEFAULT_RUN, Layout
from common.paths import root_dir
from common.settings import SettingsError

CGROUP_ROOT = "/sys/fs/cgroup"
UNIFIED = "/sys/fs/cgroup/unified"

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_SLAVE = 0x80000
MNT_DETACH = 0x2

DEFAULT_TIMEOUT = 10.0  # seconds for every call but run: they only touch local state

_libc = ctypes.CDLL(None, use_errno=True)

Stdio = int | IO[Any] | None


class RuntimeUnavailable(Exception):
    """This runtime cannot run faasd's containers on this host; the message says why."""


class RuntimeFailed(Exception):
    """A runtime call failed: ``argv``, ``returncode`` and the runtime's ``stderr``."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str):
        what = "timed out" if returncode is None else f"exited {returncode}"
        call = " ".join([os.path.basename(argv[0]), *argv[3:]])  # without --root DIR
        super().__init__(f"{call} {what}: {stderr.strip()[-500:]}")
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


class ContainerNotFound(RuntimeFailed):
    """The runtime has no container of that id."""


def cgroup_mode(mountinfo: str = "/proc/self/mountinfo") -> str:
    """"unified" (cgroup v2 only), "hybrid" (v1 plus a v2 at /sys/fs/cgroup/unified),
    "legacy" (v1 only) or "none", from the mounts this process sees."""
    types: dict[str, str] = {}
    with open(mountinfo, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields, _, tail = line.partition(" - ")
            parts = fields.split()
            if len(parts) >= 5 and tail:
                # Later lines are mounted over earlier ones at the same place.
                types[_unescape(parts[4])] = tail.split()[0]
    top = types.get(CGROUP_ROOT)
    if top == "cgroup2":
        return "unified"
    if top is None and not any(p.startswith(CGROUP_ROOT + "/") for p in types):
        return "none"
    return "hybrid" if types.get(UNIFIED) == "cgroup2" else "legacy"


def _unescape(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return path.encode().decode("unicode_escape") if "\\" in path else path


def crun_refuses_host() -> bool:
    """True where crun would refuse every container: hybrid mode with controllers on v2."""
    if cgroup_mode() != "hybrid":
        return False
    try:
        with open(os.path.join(UNIFIED, "cgroup.controllers"), encoding="ascii") as f:
            return bool(f.read().strip())
    except OSError:
        return False


def hide_unified_hierarchy() -> None:
    """For preexec_fn: a private mount namespace without /sys/fs/cgroup/unified.

    Slave first: detaching a shared mount would otherwise detach it on the host too.
    """
    for ret in (_libc.unshare(CLONE_NEWNS),
                _libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None),
                _libc.umount2(UNIFIED.encode(), MNT_DETACH)):
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


class Runtime:
    """One OCI runtime binary with faasd's state directory."""

    def __init__(self, binary: str = "runc", root: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT):
        self.binary = binary
        self.name = os.path.basename(binary)
        run_dir = os.environ.get("FAAS_RUN", DEFAULT_RUN)
        self.root = root or Layout(run=run_dir).runtime_state(self.name)
        self.timeout = timeout
        self.hide_unified = self.name == "crun" and crun_refuses_host()
        # Whether a caller that keeps containers running should start them detached.
        # runc in the foreground copies the container's stdout and stderr through pipes
        # of its own (a Go wakeup per line); detached, it hands them over and exits.
        # crun passes them straight through in the foreground, and detached it leaves
        # an intermediate process of its own behind for whoever adopts it to reap.
        self.detach = self.name != "crun"

    # --- what a caller that spawns the runtime itself needs ----------------------------

    @property
    def prefix(self) -> list[str]:
        """The argv every call starts with: the binary and ``--root``."""
        return [self.binary, "--root", self.root]

    def command(self, *args: str) -> list[str]:
        """The full argv of one runtime call."""
        return [*self.prefix, *args]

    @property
    def preexec_fn(self) -> Callable[[], None] | None:
        """What the child must run before exec (call it from your own preexec_fn), or
        None: crun on a hybrid host needs its own mount namespace (module docstring).
        It only makes three syscalls through ctypes (no Python-level locks, no I/O),
        which keeps it safe in the forked child of a threaded parent."""
        return hide_unified_hierarchy if self.hide_unified else None

    # --- start-up check -----------------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`RuntimeUnavailable` unless this runtime can run containers here.

        The runner calls it at start, so a host it cannot work on fails at once with a
        message saying why instead of at the first connection.
        """
        if shutil.which(self.binary) is None:
            raise RuntimeUnavailable(f"OCI runtime {self.binary!r} is not installed "
                                     f"(apt-get install {self.name})")
        if os.geteuid() != 0:
            raise RuntimeUnavailable(f"{self.name} needs root to create containers")
        if cgroup_mode() == "none":
            raise RuntimeUnavailable(f"no cgroup filesystem at {CGROUP_ROOT}: "
                                     f"{self.name} cannot limit containers")
        try:  # container state: root's business only, never a planted directory
            root_dir(self.root, 0o700)
        except SettingsError as exc:
            raise RuntimeUnavailable(str(exc)) from None
        try:
            self.list()
        except subprocess.SubprocessError as exc:  # preexec_fn failed: no namespace
            raise RuntimeUnavailable(
                f"{self.name} refuses cgroup hybrid mode and faasd could not hide "
                f"{UNIFIED} in a private mount namespace ({exc}); use runc") from None
        except (RuntimeFailed, OSError) as exc:
            raise RuntimeUnavailable(f"{self.name} does not work here: {exc}") from None

    # --- verbs --------------------------------------------------------------------------

    def run(self, bundle: str, container_id: str, *, stdin: Stdio = subprocess.DEVNULL,
            stdout: Stdio = subprocess.PIPE, stderr: Stdio = subprocess.PIPE,
            pass_fds: Sequence[int] = (), timeout: float | None = None
            ) -> subprocess.CompletedProcess[bytes]:
        """Create, start and wait for a container; its exit status is the returncode.

        The container's stdio is the runtime's. No other fd reaches it: ``pass_fds``
        only lets the runtime process inherit them, and runc and crun close every fd
        above 2 in the container unless told ``--preserve-fds`` (never, here).
        On ``timeout`` the container is killed and :class:`RuntimeFailed` raised.
        """
        argv = self.command("run", "--bundle", bundle, container_id)
        try:
            return subprocess.run(argv, stdin=stdin, stdout=stdout, stderr=stderr,
                                  pass_fds=tuple(pass_fds), timeout=timeout,
                                  preexec_fn=self.preexec_fn, check=False)
        except subprocess.TimeoutExpired:
            self.delete(container_id, force=True)
            raise RuntimeFailed(argv, None, f"container ran longer than {timeout}s") from None

    def spawn(self, bundle: str, container_id: str, *, stdin: Stdio = subprocess.DEVNULL,
              stdout: Stdio = subprocess.PIPE, stderr: Stdio = subprocess.PIPE,
              pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
        """Start ``run`` without waiting: the Popen's exit is the container's."""
        return subprocess.Popen(self.command("run", "--bundle", bundle, container_id),
                                stdin=stdin, stdout=stdout, stderr=stderr,
                                pass_fds=tuple(pass_fds),
                                preexec_fn=self.preexec_fn)  # noqa: PLW1509 (see preexec_fn)

    def create(self, bundle: str, container_id: str, *, stdin: Stdio = subprocess.DEVNULL,
               stdout: Stdio = subprocess.DEVNULL, stderr: Stdio = None,
               pass_fds: Sequence[int] = ()) -> None:
        """Create a container, stopped before its process is exec'd (see :meth:`start`).

        The container keeps the runtime's stdio, so these must be files or fds, not
        pipes that this call would wait on. ``stderr`` None: an unlinked temporary file
        that the runtime's error message is read back from.
        """
        with tempfile.TemporaryFile() as errors:
            sink = errors if stderr is None else stderr
            argv = self.command("create", "--bundle", bundle, container_id)
            try:
                proc = subprocess.run(argv, stdin=stdin, stdout=stdout, stderr=sink,
                                      pass_fds=tuple(pass_fds), timeout=self.timeout,
                                      preexec_fn=self.preexec_fn, check=False)
            except subprocess.TimeoutExpired:
                self.delete(container_id, force=True)
                raise RuntimeFailed(argv, None, "create timed out") from None
            if proc.returncode != 0:
                errors.seek(0)
                raise RuntimeFailed(argv, proc.returncode, errors.read(4096).decode(
                    errors="replace") or "(the runtime's stderr was the caller's)")

    def start(self, container_id: str) -> None:
        """Exec the process of a created container."""
        self._call("start", container_id, container=container_id)

    def kill(self, container_id: str, signal: str | int = "KILL") -> None:
        """Send a signal to the container's init (pid 1 of its pid namespace: when it
        dies the kernel kills every other process of the container)."""
        self._call("kill", container_id, str(signal), container=container_id)

    def delete(self, container_id: str, force: bool = True) -> None:
        """Remove the container (``force``: kill it first if it runs) and its cgroup.
        Deleting a container that does not exist succeeds, as with both runtimes."""
        try:
            self._call("delete", *(["--force"] if force else []), container_id,
                       container=container_id)
        except ContainerNotFound:
            # The container's own ``run`` process removes its state when the container
            # dies; crun's delete then fails to remove that state again. Gone is gone.
            pass

    def list(self) -> list[str]:
        """The ids of the containers in faasd's state directory."""
        out = self._call("list", "--format", "json")
        return [c["id"] for c in json.loads(out or "null") or []]

    def state(self, container_id: str) -> dict[str, Any]:
        """The runtime's state of one container (``status``: created, running, stopped;
        ``pid``); :class:`ContainerNotFound` if there is none."""
        return json.loads(self._call("state", container_id, container=container_id))

    def _call(self, *args: str, container: str | None = None) -> str:
        argv = self.command(*args)
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=self.timeout, preexec_fn=self.preexec_fn,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeFailed(argv, None, f"no answer within {self.timeout}s") from None
        if proc.returncode != 0:
            stderr = proc.stderr.decode(errors="replace")
            missing = container is not None and not self._exists(container)
            raise (ContainerNotFound if missing else RuntimeFailed)(argv, proc.returncode, stderr)
        return proc.stdout.decode()

    def _exists(self, container_id: str) -> bool:
        # runc and crun both keep a container's state in <root>/<id>/.
        return os.path.isdir(os.path.join(self.root, container_id))
