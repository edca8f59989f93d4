"""controller (unprivileged): the desired state, the operator APIs, orchestration.

It never runs ip, wg or runc and never writes a zone file: it tells the agents, through
their narrow ops, what the world should look like, and watches that they listen.
Operators reach it with faasctl over ``$FAAS_RUN/controller.sock`` (mode 0660, group
faas) and over HTTP (controller/http.py: on ``http_listen``, loopback, and
``$FAAS_RUN/http.sock``, for operators by uid and token holders; with ``http_listen_vpn``
on the server's VPN address, for token holders).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any, TypeVar

from common import egressnets, fnsettings, layout, protocol, rpc, wgconf
from common.daemon import VERSION, Daemon, run_main
from common.errors import Code, FaasError
from common.fnsettings import host_maxima
from common.rpc import Client, Handler
from common.settings import vpn_server
from controller import access, vpn
from controller.access import Operators
from controller.health import Monitor
from controller.http import Endpoints, HttpApi, Tokens
from controller.metrics import Metrics
from controller.secretops import SecretOps
from controller.state import State
from controller.uploads import UNKNOWN_CALLER, Uploads
from controller.volumes import VolumeOps

T = TypeVar("T")
LOG_CHUNK = 256 << 10


class Controller(SecretOps, VolumeOps, Daemon):
    """The controller daemon."""

    service = "controller"
    socket_mode = 0o660

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        paths = layout.of(self.settings)
        self.state = State(paths.state_db, self.settings.function_prefix,
                           self.settings.vpn_prefix, host_maxima(self.settings))
        self.state.egress_caps = self.settings  # max_egress_functions, max_egress_calls
        self.uploads = Uploads(paths.spool, self.settings.upload_max_bytes,
                               self.settings.upload_idle_seconds, self.settings.upload_min_rate,
                               self.settings.upload_rate_window, self.settings.upload_slots,
                               self.settings.upload_slots_per_user)
        self.clients = {name: Client(name, self.settings.run) for name in protocol.AGENTS}
        self.monitor = Monitor(self.clients, self.desired_state, lambda: self.state.generation,
                               self.settings.ping_interval, self.log)
        self.metrics = Metrics()
        self.http = HttpApi(self.handlers(), self.http_endpoints(), self.log,
                            operators=Operators(self.settings.group),
                            tokens=Tokens(self.state.token_by_digest, self.state.token_used),
                            metrics=self.metrics_text,
                            max_connections=self.settings.http_max_connections)

    def http_endpoints(self) -> Endpoints:
        """Loopback TCP, the unix socket in $FAAS_RUN and, if asked, the VPN address."""
        _, gid = self.socket_owner()
        return Endpoints(
            self.settings.http_listen, unix=layout.of(self.settings).http_sock,
            unix_gid=gid,
            vpn=str(vpn_server(self.settings.vpn_prefix).ip) if self.settings.http_listen_vpn
            else None)

    def handlers(self) -> dict[str, Handler]:
        return {
            "ping": self.op_ping, "status": self.op_status,
            "upload_begin": self.op_upload_begin, "upload_chunk": self.op_upload_chunk,
            "upload_abort": self.op_upload_abort, "deploy": self.op_deploy,
            "deploy_progress": self.op_deploy_progress, "list": self.op_list,
            "info": self.op_info, "ip": self.op_ip, "versions": self.op_versions,
            "rollback": self.op_rollback, "rm": self.op_rm, "set": self.op_set,
            "logs": self.op_logs, "vpn_add": self.op_vpn_add, "vpn_list": self.op_vpn_list,
            "vpn_rm": self.op_vpn_rm, "vpn_disable": self.op_vpn_disable,
            "vpn_enable": self.op_vpn_enable, "stats": self.op_stats,
            "token_create": self.op_token_create, "token_list": self.op_token_list,
            "token_rm": self.op_token_rm, "secret_create": self.op_secret_create,
            "secret_list": self.op_secret_list, "secret_rm": self.op_secret_rm,
            **self.volume_handlers(),
        }

    async def op_ping(self, args: dict[str, Any]) -> dict[str, Any]:
        reply = await super().op_ping(args)
        reply.update(synced=True, generation=self.state.generation)
        return reply

    def desired_state(self, agent: str) -> dict[str, Any]:
        """The whole desired state for one agent."""
        if agent == "runner":
            return {"images": sorted(self.state.digests()), "functions": self.state.specs(),
                    "peers": self.state.peer_names()}
        if agent == "netagent":
            return {"addresses": self.state.addresses(), "peers": self.state.active_peers(),
                    "ports": vpn.peer_ports(self.state.specs(), self.monitor.held),
                    "egress": vpn.egress_targets(self.state.egress(), self.monitor.held)}
        if agent == "dnsagent":
            return {"records": [{"name": s["name"], "address": s["address"]}
                                for s in self.state.specs()]}
        return {}

    async def setup(self) -> None:
        removed = self.uploads.clear()
        if removed:
            self.log.info("spool_cleared", files=removed)
        await self.http.start()

    async def background(self) -> None:
        async def expire() -> None:
            while True:
                await asyncio.sleep(1)
                try:
                    for uid in self.uploads.expire():
                        self.log.info("upload_expired", upload=uid,
                                      reason=self.uploads.dropped.get(uid))
                    expired = self.state.expire_peers(time.time())
                    if expired:
                        self.log.info("peers_expired", names=expired)
                        await self.monitor.push()
                except Exception as exc:  # an expired peer must never keep its access
                    self.log.error("janitor_failed", error=repr(exc))
        janitor = asyncio.ensure_future(expire())
        try:
            await self.monitor.run(self.stop)
        finally:
            janitor.cancel()
            await self.http.stop()

    async def changed(self, result: T, event: str, **fields: Any) -> T:
        """After a change of the desired state: tell the agents, log the event, answer.
        An agent the push misses is synced at its next ping."""
        await self.monitor.push()
        self.log.info(event, **fields)
        return result

    # --- status ----------------------------------------------------------------------

    async def op_status(self, args: dict[str, Any]) -> dict[str, Any]:
        """Every faasd process as the controller sees it, itself first, with flags for
        what needs looking at; every function the runner does not serve as the state says."""
        me = await self.op_ping({})
        generation = self.state.generation
        rows = [{
            "name": "controller", "state": "up", "pid": os.getpid(), "boot_id": self.boot_id,
            "version": VERSION, "uptime": me["uptime"], "rss": me["rss"],
            "last_seen": time.time(), "synced": True, "restarts": 0, "error": None,
            "flags": [],
        }]
        rows += [agent.row(generation) for agent in self.monitor.agents.values()]
        return {"processes": rows, "generation": generation,
                "functions": await self.function_problems()}

    async def function_problems(self) -> list[dict[str, Any]]:
        """Functions whose listeners or warm pool are not what the state says."""
        runner = self.monitor.agents["runner"]
        if runner.state != "up" or not runner.synced:
            return []  # the process table says so already
        try:
            served = {f["name"]: f for f in
                      (await self.clients["runner"].call("stats", {}, retries=0,
                                                         timeout=2.0))["functions"]}
            held = {h["address"]: h["ports"] for h in (await self.clients["runner"].call(
                "ping", {}, retries=0)).get("held") or []}  # now, not at the last ping
        except FaasError:
            return []
        problems = []
        for fn in self.state.functions():
            got = served.pop(fn["name"], None)
            want = fn["settings"]["min_warm"]
            if got is None:
                problems.append({"name": fn["name"], "problem": "no listener: the runner "
                                 "does not serve it", "serious": True})
            elif got["idle"] + got["starting"] + got["busy"] < want:
                problems.append({"name": fn["name"], "serious": False, "problem":
                                 f"warm pool {got['idle']}+{got['starting']} starting of "
                                 f"min_warm {want}"})
            lost = [str(p) for p in fn["settings"]["ports"]
                    if p not in held.get(fn["address"], fn["settings"]["ports"])]
            if got is not None and lost:
                problems.append({"name": fn["name"], "serious": True, "problem": "port "
                                 f"{','.join(lost)} held by another program (runner log: "
                                 "listen_failed): closed to peers until the runner binds it"})
        problems += [{"name": name, "problem": "served, but not in the state", "serious": True}
                     for name in served]
        return problems

    # --- deploy ----------------------------------------------------------------------

    async def op_upload_begin(self, args: dict[str, Any]) -> dict[str, Any]:
        """Open an upload; the name was checked by the schema before we got here. It
        takes a slot of its caller: the uid the kernel gives for the socket's peer, or the
        HTTP API's token."""
        caller = rpc.caller.get() or UNKNOWN_CALLER
        up = self.uploads.begin(args["name"], args["tag"], caller)
        self.log.info("upload_begin", upload=up.id, name=up.name, caller=caller)
        return {"upload": up.id, "chunk": protocol.CHUNK_SIZE, "window": protocol.UPLOAD_WINDOW}

    async def op_upload_chunk(self, args: dict[str, Any]) -> dict[str, Any]:
        """Spool one chunk."""
        return {"received": self.uploads.write(args["upload"], args["offset"], args["data"])}

    async def op_upload_abort(self, args: dict[str, Any]) -> dict[str, Any]:
        """Drop an upload."""
        self.uploads.drop(args["upload"])
        return {}

    async def op_deploy(self, args: dict[str, Any]) -> dict[str, Any]:
        """Hand the spooled image to the runner, then record the new version."""
        return await self.deploy(args["upload"])

    async def deploy(self, upload_id: str) -> dict[str, Any]:
        """Deploy a finished upload: one transaction records it once the rootfs exists."""
        started = time.monotonic()
        up = self.uploads.finish(upload_id)
        try:
            image = await self.clients["runner"].call(
                "image_add", {"upload": up.id, "tag": up.tag})
        except BaseException:
            self.metrics.deploy_failed()
            raise
        finally:
            self.uploads.drop(upload_id)
        result = self.state.add_version(up.name, image["digest"], image["config"], up.received)
        await self.monitor.push()
        seconds = time.monotonic() - started
        self.metrics.deployed(seconds, up.received)
        result.update(reused=image["reused"], size=up.received, seconds=round(seconds, 3))
        self.log.info("deployed", **result)
        return result

    async def op_deploy_progress(self, args: dict[str, Any]) -> dict[str, Any]:
        """Where an upload or deploy stands; extraction figures come from the runner."""
        up = self.uploads.get(args["upload"])
        if up.phase in ("verify", "extract"):
            try:
                seen = await self.clients["runner"].call("image_progress", {"upload": up.id},
                                                         retries=0)
                up.phase, up.done, up.total = seen["phase"], seen["done"], seen["total"]
            except FaasError:
                pass  # a missed reading is not worth failing the caller over
        return {"phase": up.phase, "done": up.done, "total": up.total}

    # --- functions ---------------------------------------------------------------------

    async def op_list(self, args: dict[str, Any]) -> dict[str, Any]:
        """Every function."""
        return {"functions": self.state.functions()}

    async def op_info(self, args: dict[str, Any]) -> dict[str, Any]:
        """One function and its versions."""
        info = self.state.function(args["name"])
        info["versions"] = [v.row() for v in self.state.versions(args["name"])]
        return info

    async def op_ip(self, args: dict[str, Any]) -> dict[str, Any]:
        """The function's address."""
        return {"address": self.state.function(args["name"])["address"]}

    async def op_versions(self, args: dict[str, Any]) -> dict[str, Any]:
        """The function's versions."""
        current = self.state.function(args["name"])["version"]
        rows = [v.row() | {"current": v.version == current}
                for v in self.state.versions(args["name"])]
        return {"name": args["name"], "versions": rows}

    async def op_rollback(self, args: dict[str, Any]) -> dict[str, Any]:
        """Serve an earlier version."""
        result = self.state.rollback(args["name"], args["version"])
        return await self.changed(result, "rolled_back", name=args["name"],
                                  version=result["version"])

    async def op_set(self, args: dict[str, Any]) -> dict[str, Any]:
        """Change a function's settings; the runner applies them without dropping
        connections in flight."""
        await self.check_mounts(args["settings"])
        await self.check_secrets(args["name"], args["settings"])
        self.check_egress_allow(args["settings"].get("egress_allow"))
        if args["settings"].get("network") == "egress":
            self.check_egress_room(args["name"])
        settings = self.state.set(args["name"], args["settings"])
        return await self.changed({"name": args["name"], "settings": settings},
                                  "settings_changed", name=args["name"],
                                  changes=sorted(args["settings"]))

    def check_egress_room(self, name: str) -> None:
        """netagent derives the namespace's addresses from the function's place in
        function_prefix: one past the egress prefixes' room is refused now."""
        s = self.settings
        at = egressnets.index(self.state.function(name)["address"], s.function_prefix)
        room = egressnets.room(s.egress_prefix, s.egress_prefix4)
        if at >= room:
            raise FaasError(Code.CONFLICT, f"network=egress: {name}'s address is past what "
                            f"egress_prefix and egress_prefix4 hold ({room} functions); "
                            "widen them", {"key": "network", "room": room})

    def check_egress_allow(self, text: str | None) -> None:
        """A range netagent would refuse (faasd's own, loopback, link-local, multicast)
        is refused now, not at the next sync of every function."""
        try:
            items = fnsettings.BY_KEY["egress_allow"].value(text) if text else []
        except ValueError:
            return  # the state's parse says what is wrong with it
        own = egressnets.own_prefixes(self.settings)
        for item in items:
            bad = egressnets.conflict(item, own)
            if bad:
                raise FaasError(Code.FORBIDDEN, f"egress_allow={item}: overlaps {bad}, which "
                                "an egress function may never reach (docs/network.md)",
                                {"key": "egress_allow"})

    async def op_logs(self, args: dict[str, Any]) -> dict[str, Any]:
        """Lines of a function's log from ``offset`` (at most LOG_CHUNK bytes of them).

        Only the function of that name now: lines older than its creation belong to an
        earlier function of the same name whose file the runner has not deleted yet."""
        created = self.state.function(args["name"])["created"]
        since = created if args["since"] is None else max(args["since"], created)
        path = layout.of(self.settings).function_log(args["name"])
        offset = args["offset"] or 0
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if offset > size:
                    offset = 0  # rotated since: start the new file from its beginning
                f.seek(offset)
                data = f.read(LOG_CHUNK)
        except FileNotFoundError:
            return {"lines": [], "offset": 0}
        data = data[:data.rfind(b"\n") + 1]  # whole lines only
        lines = []
        for raw in data.splitlines():
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if entry.get("ts", 0) >= since:
                lines.append(entry)
        return {"lines": lines, "offset": offset + len(data)}

    async def op_rm(self, args: dict[str, Any]) -> dict[str, Any]:
        """Remove a function; the runner frees images no version uses on its next sync."""
        return await self.changed(self.state.remove(args["name"]), "removed", name=args["name"])


    # --- figures ------------------------------------------------------------------------

    async def op_stats(self, args: dict[str, Any]) -> dict[str, Any]:
        """The runner's per-function figures (None when it does not answer) and every
        agent's health."""
        try:
            runner = await self.clients["runner"].call("stats", {}, retries=0, timeout=2.0)
        except FaasError:
            runner = None
        return {"runner": runner, "agents": [a.row() for a in self.monitor.agents.values()]}

    async def metrics_text(self) -> str:
        """Prometheus exposition text for GET /metrics."""
        stats = await self.op_stats({})
        return self.metrics.render(stats["runner"], stats["agents"])

    # --- VPN peers ----------------------------------------------------------------------

    async def op_vpn_add(self, args: dict[str, Any]) -> dict[str, Any]:
        """A new peer and its client config; a server-made private key is returned once."""
        endpoint = vpn.check_endpoint(self.settings.vpn_endpoint)
        server = await self.clients["netagent"].call("wg_info", {})
        private = None
        public = args["public_key"]
        if public is None:
            private, public = await vpn.key_pair()
        if public == server["public_key"]:
            raise FaasError(Code.BAD_REQUEST, "that is the server's own public key: give the "
                            "peer's (faasctl vpn pubkey on the peer prints it)")
        peer = self.state.add_peer(args["name"], public, vpn.expiry(args["expires"]))
        await self.monitor.push()
        self.log.info("peer_added", name=peer["name"], address=peer["address"],
                      server_made_key=private is not None)
        config = wgconf.render(
            name=peer["name"], address=peer["address"], server_key=server["public_key"],
            endpoint=endpoint, dns=str(vpn_server(self.settings.vpn_prefix).ip),
            allowed=self.settings.client_prefix, private_key=private)
        return {**peer, "config": config, "private_key_included": private is not None}

    async def op_vpn_list(self, args: dict[str, Any]) -> dict[str, Any]:
        """Peers from the state, with what the interface says of each."""
        try:
            seen = {p["public_key"]: p for p in
                    (await self.clients["netagent"].call("peers", {}))["peers"]}
        except FaasError:
            seen = {}  # netagent down: the list still shows what the state holds
        rows = []
        for peer in self.state.peers():
            live = seen.get(peer["public_key"], {})
            rows.append({**peer, "latest_handshake": live.get("latest_handshake", 0),
                         "endpoint": live.get("endpoint"), "rx_bytes": live.get("rx_bytes", 0),
                         "tx_bytes": live.get("tx_bytes", 0), "on_interface": bool(live)})
        return {"peers": rows}

    async def op_vpn_rm(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self.changed(self.state.remove_peer(args["name"]), "peer_removed",
                                  name=args["name"])

    async def op_vpn_disable(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self.changed(self.state.set_peer_state(args["name"], "disabled"),
                                  "peer_disabled", name=args["name"])

    async def op_vpn_enable(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self.changed(self.state.set_peer_state(args["name"], "enabled"),
                                  "peer_enabled", name=args["name"])

    # --- HTTP API tokens ----------------------------------------------------------------

    async def op_token_create(self, args: dict[str, Any]) -> dict[str, Any]:
        """A new token; its value is in this answer only (the state keeps its digest)."""
        token = access.new_token()
        row = self.state.add_token(args["name"], args["role"], access.token_digest(token),
                                   vpn.expiry(args["expires"]))
        self.log.info("token_created", name=row["name"], role=row["role"],
                      expires=row["expires"])
        return {**row, "token": token}

    async def op_token_list(self, args: dict[str, Any]) -> dict[str, Any]:
        """Every token, without its value or digest."""
        return {"tokens": self.state.tokens()}

    async def op_token_rm(self, args: dict[str, Any]) -> dict[str, Any]:
        """Remove a token; a request holding it is refused from now on."""
        row = self.state.remove_token(args["name"])
        self.log.info("token_removed", name=args["name"])
        return row


def main() -> None:
    """Console script faas-controller."""
    run_main(Controller)

