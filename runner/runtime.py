"""The seam over the OCI runtime binary (runc or crun): every call goes through here.

The runner reaches a runtime only through :class:`Runtime`: it starts a container with
:meth:`Runtime.spawn_run`, stops it with :meth:`Runtime.kill` and removes it with
:meth:`Runtime.delete`. A runtime is one class: :class:`Runtime` speaks runc's command
line (which crun and youki copy) and starts containers detached; a subclass changes what
differs (:class:`Crun`: the foreground, a mount namespace) and is listed in
:data:`RUNTIMES` under its binary's name.

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

import asyncio
import ctypes
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

from common.layout import DEFAULT_RUN, Layout
from common.paths import root_dir
from common.proc import die_with_parent
from common.settings import SettingsError

CGROUP_ROOT = "/sys/fs/cgroup"
UNIFIED = "/sys/fs/cgroup/unified"

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_SLAVE = 0x80000
MNT_DETACH = 0x2

DEFAULT_TIMEOUT = 10.0  # seconds for every call but run: they only touch local state
POLL_EXIT = 0.1  # seconds between waitpid calls when no pidfd can be had

_libc = ctypes.CDLL(None, use_errno=True)

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
    """An OCI runtime with runc's command line, and faasd's state directory.

    Containers start detached (``run --detach --pid-file``): runc in the foreground
    copies the container's stdout and stderr through pipes of its own (a Go wakeup per
    line); detached, it hands them over and exits. A subclass sets :attr:`detach` False
    for a runtime that passes them straight through in the foreground (:class:`Crun`).
    Use :func:`runtime_for` to get the class that fits a binary.
    """

    # Whether spawn_run starts containers detached. The caller must then be a child
    # subreaper (common.proc.adopt_orphans): the orphaned init becomes its child.
    detach = True

    def __init__(self, binary: str = "runc", root: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT):
        self.binary = binary
        self.name = os.path.basename(binary)
        run_dir = os.environ.get("FAAS_RUN", DEFAULT_RUN)
        self.root = root or Layout(run=run_dir).runtime_state(self.name)
        self.timeout = timeout
        self.hide_unified = self.needs_private_mounts()

    def needs_private_mounts(self) -> bool:
        """Whether this runtime must run without /sys/fs/cgroup/unified (module docstring)."""
        return False

    # --- argv: what a new runtime with another command line changes -------------------

    def command(self, *args: str) -> list[str]:
        """The full argv of one runtime call: the binary, ``--root``, ``args``."""
        return [self.binary, "--root", self.root, *args]

    def run_argv(self, bundle: str, container_id: str, pidfile: str | None = None
                 ) -> list[str]:
        """``run``: create and start a container; detached, writing the init's pid to
        ``pidfile``, if one is given; else in the foreground (its exit is the container's)."""
        detach = ("--detach", "--pid-file", pidfile) if pidfile is not None else ()
        return self.command("run", *detach, "--bundle", bundle, container_id)

    def kill_argv(self, container_id: str, signal: str) -> list[str]:
        return self.command("kill", container_id, signal)

    def delete_argv(self, container_id: str) -> list[str]:
        return self.command("delete", "--force", container_id)

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

    # --- the container's life -------------------------------------------------------------

    async def spawn_run(self, bundle: str, container_id: str, *, stdout: int, stderr: int,
                        pidfile: str, pass_fds: Sequence[int] = ()) -> Running:
        """Start the container: detached (``pidfile`` receives the init's pid) or in
        the foreground, as :attr:`detach` says. Its stdin is /dev/null; ``stdout`` and
        ``stderr`` (fds, pipes in the runner) become the container's own.

        No other fd reaches the container: ``pass_fds`` only lets the runtime process
        inherit them, and runc and crun close every fd above 2 in the container unless
        told ``--preserve-fds`` (never, here). The runtime process dies with its parent.
        """
        pidfile_or_none = pidfile if self.detach else None
        proc = await asyncio.create_subprocess_exec(
            *self.run_argv(bundle, container_id, pidfile_or_none),
            stdin=asyncio.subprocess.DEVNULL, stdout=stdout, stderr=stderr,
            pass_fds=tuple(pass_fds), preexec_fn=self._run_preexec)
        return Running(proc, pidfile_or_none)

    def _run_preexec(self) -> None:
        die_with_parent()
        if self.hide_unified:
            hide_unified_hierarchy()

    async def kill(self, container_id: str, signal: str = "KILL") -> None:
        """Send a signal to the container's init (pid 1 of its pid namespace: when it
        dies the kernel kills every other process of the container);
        :class:`ContainerNotFound` if there is no such container."""
        await self._acall(self.kill_argv(container_id, signal), container_id)

    async def delete(self, container_id: str) -> None:
        """Remove the container (killing it first if it runs) and its cgroup.
        Deleting a container that does not exist succeeds, as with both runtimes.
        The one way faasd removes a container: the runner's containers, the leftovers
        of its previous run, the bench's."""
        try:
            await self._acall(self.delete_argv(container_id), container_id)
        except ContainerNotFound:
            # The container's own ``run`` process removes its state when the container
            # dies; crun's delete then fails to remove that state again. Gone is gone.
            pass

    # --- queries ----------------------------------------------------------------------

    def list(self) -> list[str]:
        """The ids of the containers in faasd's state directory."""
        return list(self.statuses())

    def statuses(self) -> dict[str, str]:
        """Each container's status (created, running, stopped), by id."""
        out = self._call("list", "--format", "json")
        return {c["id"]: c.get("status", "") for c in json.loads(out or "null") or []}

    def state(self, container_id: str) -> dict[str, Any]:
        """The runtime's state of one container (``status``: created, running, stopped;
        ``pid``); :class:`ContainerNotFound` if there is none. For tests and diagnosis."""
        return json.loads(self._call("state", container_id, container=container_id))

    # --- calls ------------------------------------------------------------------------

    def _call(self, *args: str, container: str | None = None) -> str:
        """A query, blocking (start-up and tests): its stdout."""
        argv = self.command(*args)
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=self.timeout, preexec_fn=self.preexec_fn,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeFailed(argv, None, f"no answer within {self.timeout}s") from None
        self._raise_for(argv, proc.returncode, proc.stderr, container)
        return proc.stdout.decode()

    async def _acall(self, argv: list[str], container: str) -> None:
        """A verb on one container, without blocking the runner's loop; the same timeout
        as :meth:`_call` (a hung runtime is killed: the container is then left to the
        next start's removal of leftovers, and the caller is not held up)."""
        # Without the private mount namespace (no preexec_fn, so Python may vfork): the
        # runtime finds a container's cgroups from the state it recorded at `run`, and
        # the namespace would cost crun about 2 ms of CPU per call, once per container.
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        try:
            _, stderr = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeFailed(argv, None, f"no answer within {self.timeout}s") from None
        self._raise_for(argv, proc.returncode, stderr, container)

    def _raise_for(self, argv: Sequence[str], returncode: int | None, stderr: bytes,
                   container: str | None) -> None:
        """The one reading of a failed call: :class:`ContainerNotFound` when the
        container's state is gone, else :class:`RuntimeFailed`."""
        if returncode == 0:
            return
        missing = container is not None and not self._exists(container)
        raise (ContainerNotFound if missing else RuntimeFailed)(
            argv, returncode, stderr.decode(errors="replace"))

    def _exists(self, container_id: str) -> bool:
        # runc and crun both keep a container's state in <root>/<id>/.
        return os.path.isdir(os.path.join(self.root, container_id))


class Runc(Runtime):
    """runc: runc's command line; detached; handles cgroup hybrid mode itself."""


class Crun(Runtime):
    """crun: runc's command line, in the foreground (it passes the container's stdout
    and stderr straight through, and detached it would leave an intermediate process of
    its own behind for whoever adopts it to reap); on a host whose cgroup layout it
    refuses, in a mount namespace of its own (module docstring)."""

    detach = False

    def needs_private_mounts(self) -> bool:
        return crun_refuses_host()


# The class of each runtime faasd knows, by its binary's name; any other binary is taken
# to speak runc's command line (Runtime).
RUNTIMES: dict[str, type[Runtime]] = {"runc": Runc, "crun": Crun}


def runtime_for(binary: str, root: str | None = None, timeout: float = DEFAULT_TIMEOUT
                ) -> Runtime:
    """The runtime for ``binary`` (a name or a path), of the class its name selects."""
    return RUNTIMES.get(os.path.basename(binary), Runtime)(binary, root, timeout)


class Running:
    """A container started by :meth:`Runtime.spawn_run`, until its exit.

    Detached, the runtime exits once the container runs: its init, orphaned, becomes
    our child (we are a child subreaper), watched through a pidfd. In the foreground,
    the runtime's exit is the container's.
    """

    def __init__(self, proc: asyncio.subprocess.Process, pidfile: str | None):
        self.proc = proc  # the runtime's `run`
        self.pidfile = pidfile
        self.pid = 0  # of the container's init, once the detached runtime has started it
        self._pidfd = -1

    async def wait(self) -> int:
        """The container's exit status (call once): the runtime's, if it failed to start
        it; else its init's, which we adopted when the runtime exited (-1 if we could not)."""
        code = await self.proc.wait()
        if self.pidfile is None or code != 0:
            return code
        try:
            with open(self.pidfile, encoding="ascii") as f:
                self.pid = int(f.read())
        except (OSError, ValueError):  # the runtime said it started it: cannot happen
            return -1
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:  # gone already and reaped: by someone else
            return -1
        except OSError:  # out of fds: ask the kernel now and then instead
            return await self._poll_exit()
        loop = asyncio.get_running_loop()
        gone: asyncio.Future[None] = loop.create_future()

        def readable() -> None:  # the pidfd reads once the process has exited
            loop.remove_reader(self._pidfd)
            gone.set_result(None)
        loop.add_reader(self._pidfd, readable)
        try:
            await gone
        finally:
            if not gone.done():
                loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        try:
            return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        except ChildProcessError:  # not our child (not adopted): someone else reaps it
            return -1

    async def _poll_exit(self) -> int:
        """The init's exit status, by waitpid every POLL_EXIT s (no pidfd to wait on)."""
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # not our child (not adopted): someone else reaps it
                return -1
            if pid:
                return os.waitstatus_to_exitcode(status)
            await asyncio.sleep(POLL_EXIT)

    def kill_now(self) -> None:
        """SIGKILL without the runtime (it is stuck, or could not kill): its own process
        if it still runs, and the adopted init if we watch one."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        if self._pidfd >= 0:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
