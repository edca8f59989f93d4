"""Every function the runner serves, converged from the controller's desired state.

A new function gets its listeners at once; a changed one keeps its listeners (opening
and closing only the ports that changed) and connections in flight while new containers
use the new version and settings; a removed one stops accepting, finishes what is in
flight and stops its containers, and its logs are deleted.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
from typing import Any, Callable, Mapping

from common import fnsettings
from common.layout import Layout
from common.log import EventLog
from common.paths import root_dir
from runner.budget import MemoryBudget
from runner.bundle import BundleError, EgressNet, FunctionSettings, build_config
from runner.callers import Callers
from runner.container import Container
from runner.fnlogs import FunctionLogs
from runner.keep import Keep
from runner.runtime import Runtime
from runner.secretstore import MissingSecret, SecretStore
from runner.serve import Function, settings_from
from runner.volumes import Volumes, bind_mounts


def host_account(uid: int) -> str | None:
    """The name of a host account with this uid, if any (NSS: /etc/passwd, LDAP, ...)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def check_private_uid(function: str, uid: int) -> None:
    """A container that holds secrets or volumes must not run as a host account's uid:
    without a user namespace, a local user (or daemon) with that uid could read the files
    through /proc/PID/root and the process's memory. Root (any process of root's can read
    everything anyway) and nobody (65534, the default user; docs/secrets.md says what is
    left) are let through."""
    if uid in (0, 65534):
        return
    account = host_account(uid)
    if account is not None:
        raise BundleError(f"{function} has secrets or volumes but its image runs as uid "
                          f"{uid}, which is this host's account {account!r}: that user could "
                          "read them through /proc; give the image a USER whose uid no host "
                          "account has (for example 10001)")


def is_netns(path: str) -> bool:
    """Whether ``path`` is a network namespace (a bind mount of nsfs), not a plain file."""
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev
    except FileNotFoundError:
        return False


class Fleet:
    """The runner's functions."""

    def __init__(self, root: str, run: str, runtime: Runtime, logs: FunctionLogs,
                 log: EventLog, image_config: Callable[[str], Mapping[str, Any] | None],
                 budget: MemoryBudget | None = None, secrets: SecretStore | None = None,
                 callers: Callers | None = None, nameserver: str = "",
                 volumes: Volumes | None = None, keep: Keep | None = None):
        self.paths = Layout(root, run)
        self.nameserver = nameserver  # egress functions' resolver: named's VPN address
        self.secrets = secrets if secrets is not None else SecretStore(
            self.paths.secrets, self.paths.secret_copies)
        self.images = self.paths.images
        self.bundles = self.paths.bundles
        self.ctl = self.paths.ctl
        self.runtime = runtime
        self.logs = logs
        self.log = log
        self.image_config = image_config  # the runner's own record, by digest
        self.budget = budget if budget is not None else MemoryBudget()  # every function's
        self.volumes = volumes  # where a function's mounts come from (runner/volumes.py)
        self.callers = callers  # the VPN peers by address, shared by every function
        self.keep = keep  # the keeper's client (runner/keep.py); None: no keeper
        self._adopted = False  # what the previous runner left was given out
        self.functions: dict[str, Function] = {}
        self.specs: dict[str, dict[str, Any]] = {}
        self.closing: set[asyncio.Future[None]] = set()  # dropped functions finishing
        # One token per function from its creation to its removal: the output of a removed
        # function's containers still finishing must not land in a later same-named log.
        self.owners: dict[str, object] = {}
        self._lock = asyncio.Lock()  # one converge at a time, in the order they came

    def recover(self) -> dict[str, int]:
        """At start: remove bundles and control sockets a previous run left behind (the
        containers themselves are removed through the runtime by the caller)."""
        counts = {}
        for path in (self.bundles, self.ctl):
            root_dir(path, 0o700)  # never a directory someone else planted
            entries = list(os.scandir(path))
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            counts[os.path.basename(path)] = len(entries)
        counts.update(self.secrets.recover())
        return counts

    async def converge(self, specs: list[dict[str, Any]]) -> None:
        """Serve exactly these functions."""
        async with self._lock:
            await self._converge(specs)

    async def _converge(self, specs: list[dict[str, Any]]) -> None:
        wanted = {s["name"]: s for s in specs}
        for name in sorted(set(self.functions) - set(wanted)):
            await self._drop(name, removed=True)
        for name in self.logs.prune(set(wanted)):
            self.owners.pop(name, None)
            self.log.info("logs_removed", function=name)
        for name, spec in wanted.items():
            if spec == self.specs.get(name):
                continue
            fn = self.functions.get(name)
            if fn is not None and fn.address != spec["address"]:
                await self._drop(name)
                fn = None
            factory = self._factory(spec, self.owners.setdefault(name, object()))
            if fn is None:
                self.functions[name] = Function(name, spec["address"],
                                                settings_from(spec["settings"]), factory, self.log,
                                                budget=self.budget, callers=self.callers,
                                                keep=self.keep)
                self.log.info("serving", function=name, address=spec["address"],
                              digest=spec["digest"])
            else:
                fn.update(settings_from(spec["settings"]), factory)
                self.log.info("updated", function=name, digest=spec["digest"])
            self.specs[name] = spec
        if not self._adopted:
            self._adopted = True
            self.adopt()

    def adopt(self) -> None:
        """After the first sync: the connections the previous runner accepted and never
        handed over are served now, by the function they came to; the listeners of
        functions no longer served are closed."""
        if self.keep is None:
            return
        by_address = {fn.address: fn for fn in self.functions.values()}
        served = closed = 0
        for key, conn, meta in self.keep.take_orphans():
            fn = by_address.get(meta.get("address", ""))
            port = meta.get("port")
            if fn is None or fn.closed or port not in fn.settings.ports:
                self.keep.release(key)
                conn.close()
                closed += 1
                continue
            fn.adopt(conn, port, str(meta.get("remote", "")), key)
            served += 1
        listeners = self.keep.release_unclaimed()
        self.log.info("adopted", connections=served, closed=closed, listeners_closed=listeners)

    async def _drop(self, name: str, removed: bool = False, leave: bool = False) -> None:
        """Stop accepting at once; requests in flight finish in the background, so a
        sync never waits out a function's timeout. A ``removed`` function's containers
        log nothing more (its logs are deleted by the prune that follows)."""
        fn = self.functions.pop(name)
        self.specs.pop(name, None)
        if removed:
            self.owners.pop(name, None)
        fn.stop_accepting(leave)
        self.log.info("stopped_serving", function=name)
        task = asyncio.ensure_future(self._finish(name, fn, leave))
        self.closing.add(task)
        task.add_done_callback(self.closing.discard)

    async def _finish(self, name: str, fn: Function, leave: bool = False) -> None:
        await fn.close(leave)
        if name not in self.functions:
            self.logs.forget(name)

    def _factory(self, spec: dict[str, Any], owner: object) -> Callable[[], Container]:
        rootfs = self.paths.image_rootfs(spec["digest"])
        limits = FunctionSettings.of(spec["settings"])
        name = spec["name"]

        def make_config(container_id: str, control_socket: str) -> dict[str, Any]:
            image = self.image_config(spec["digest"])
            if image is None or not os.path.isdir(rootfs):  # restored from a backup, image
                # not yet uploaded
                raise BundleError(f"the image of {name} ({spec['digest'][:19]}) is not on "
                                  f"this host: deploy it again (faasctl new {name} -f "
                                  "IMAGE.tar)")
            egress = self.egress_net(name, limits, container_id) \
                if limits.network == "egress" else None
            sources = {}
            if limits.mounts:
                if self.volumes is None:
                    raise BundleError("this runner serves no volumes")
                sources = self.volumes.sources(limits.mounts)
            if not limits.secrets and not sources:  # nothing to pay for a plain function
                return build_config(rootfs, image, container_id=container_id, hostname=name,
                                    control_socket=control_socket, settings=limits,
                                    egress=egress)
            config = build_config(rootfs, image, container_id=container_id, hostname=name,
                                  control_socket=control_socket, settings=limits,
                                  egress=egress, volumes=bind_mounts(limits.mounts, sources),
                                  secrets_dir=self.secrets.copies_of(container_id)
                                  if limits.secrets else None)
            user = config["process"]["user"]
            check_private_uid(name, user["uid"])
            if sources:
                assert self.volumes is not None
                self.volumes.adopt(sources, user["uid"], user["gid"])
            if limits.secrets:
                try:
                    self.secrets.materialize(container_id, limits.secrets, user["uid"],
                                             user["gid"])
                except MissingSecret as exc:  # names the secret, never a value
                    raise BundleError(str(exc)) from None
            return config

        def sink(container: str, stream: str, request: str | None, lines: list[str]) -> None:
            if self.owners.get(name) is owner:  # else: removed, maybe deployed anew since
                self.logs.write(name, container, stream, request, lines)

        drop = self.secrets.drop if limits.secrets else None
        return lambda: Container(name, self.bundles, self.ctl, self.runtime, make_config, sink,
                                 drop)

    def settings_by_name(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, settings) of each function of the desired state."""
        return [(name, spec["settings"]) for name, spec in self.specs.items()]

    def secret_users(self, secret: str) -> list[str]:
        """Functions of the desired state that name ``secret``."""
        return fnsettings.users(self.settings_by_name(), "secrets").get(secret, [])

    def secret_changed(self, secret: str) -> None:
        """A secret's value was replaced: the functions using it replace their idle
        containers and reuse none in flight, so every connection from now on is served by
        a container started with the new value."""
        for name in self.secret_users(secret):
            fn = self.functions.get(name)
            if fn is not None:
                fn.update(fn.settings, fn.new_container)

    def mounting(self, volume: str) -> list[str]:
        """The functions of the desired state whose mounts name ``volume``."""
        return fnsettings.users(self.settings_by_name(), "mounts").get(volume, [])

    def egress_net(self, name: str, limits: FunctionSettings, container_id: str) -> EgressNet:
        """The namespace netagent holds for ``name`` (refused until it is one: the next
        container tries again) and this container's resolv.conf and hosts: named on the
        VPN address for every name, the functions it may call by NAME.faas."""
        netns = self.paths.netns_path(name)
        if not is_netns(netns):
            raise BundleError(f"the network namespace of {name} is not made yet (netagent "
                              "makes it at its next sync): network=egress waits for it")
        bundle = os.path.join(self.bundles, container_id)
        hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost"]
        hosts += [f"{self.specs[n]['address']}\t{n}.faas {n}"
                  for n in limits.may_call if n in self.specs]
        files = {"resolv.conf": f"nameserver {self.nameserver}\n", "hosts": "\n".join(hosts)
                 + "\n"}
        for file, text in files.items():
            fd = os.open(os.path.join(bundle, file), os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
        return EgressNet(netns, os.path.join(bundle, "resolv.conf"),
                         os.path.join(bundle, "hosts"))

    def held(self) -> list[dict[str, Any]]:
        """The ports each served function holds a listener on, by address: what netagent
        may open to peers (docs/network.md, "Ports and callers"). A port another program
        holds (listen_failed) is not in it until the runner's own bind succeeds."""
        return [{"address": fn.address, "ports": sorted(fn.listeners)}
                for fn in sorted(self.functions.values(), key=lambda f: f.address)
                if not fn.closed]

    def snapshot(self) -> list[dict[str, Any]]:
        """Per-function pool and counters, by name."""
        return [self.functions[name].snapshot() for name in sorted(self.functions)]

    async def close(self) -> None:
        """Graceful stop: every function finishes what is in flight; what waits is left
        to the next runner through the keeper."""
        for name in list(self.functions):
            await self._drop(name, leave=True)
        if self.closing:
            await asyncio.gather(*self.closing, return_exceptions=True)
        self.logs.flush()
