"""The keeper's fd store and the runner's side of it, in one process over a real unix
socket (keeper/main.py, runner/keep.py, common/fdstore.py)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from common import fdstore
from common.log import EventLog
from keeper.main import Keeper
from runner.keep import Keep


def pipe_reader_gone(write_end: int) -> bool:
    """True when no process holds the pipe's read end any more."""
    try:
        os.write(write_end, b"x")
    except BrokenPipeError:
        return True
    return False


def test_a_malformed_message_has_its_descriptors_closed():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        fdstore.send(a, {"op": "drop", "keys": ["k"]}, [r])  # a drop carries no fds
        os.close(r)
        with pytest.raises(fdstore.WireError, match="carries no descriptors"):
            fdstore.receive(b)
        assert pipe_reader_gone(w)
    finally:
        os.close(w)
        a.close()
        b.close()


@pytest.mark.parametrize("message, nfds, error", [
    ([], 0, "not a keeper message"),
    ({"op": "exec"}, 0, "not a keeper message"),
    ({"op": "hold", "items": [{"key": "a"}]}, 0, "one descriptor per item"),
    ({"op": "hold", "items": [{"key": ""}]}, 1, "usable key"),
    ({"op": "hold", "items": [{"key": "k" * 201}]}, 1, "usable key"),
    ({"op": "drop", "keys": "k"}, 0, "list of keys"),
])
def test_the_shape_of_every_message_is_checked(message, nfds, error):
    with pytest.raises(fdstore.WireError, match=error):
        fdstore.check(message, nfds)


def test_batches_stay_under_the_kernels_descriptor_limit():
    items = [(f"k{i}", {}, i) for i in range(450)]
    sizes = [len(fds) for _, fds in fdstore.batches(items)]
    assert sizes == [200, 200, 50] and max(sizes) < 253


class World:
    """A keeper and runners in one loop."""

    def __init__(self, tmp_path):
        self.path = str(tmp_path / "keeper.sock")
        self.log = EventLog("test")
        self.received: list[str] = []
        self.keeper: Keeper | None = None

    def start_keeper(self) -> Keeper:
        self.keeper = Keeper(self.path, self.log)
        handle = self.keeper._handle

        def counted(conn, message, fds):
            self.received.append(message["op"])
            return handle(conn, message, fds)
        self.keeper._handle = counted
        self.keeper.bind()
        return self.keeper

    async def settle(self, check, timeout: float = 5.0) -> None:
        """Let the loop run until ``check()`` holds (the keeper reads on callbacks)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not check():
            assert loop.time() < deadline, "timed out"
            await asyncio.sleep(0.01)


def listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.bind(("::1", 0))
    sock.listen(8)
    return sock


def test_what_is_handed_over_in_the_same_iteration_costs_no_message(tmp_path):
    async def main():
        world = World(tmp_path)
        keeper = world.start_keeper()
        keep = Keep(world.path, world.log, "boot1")
        await keep.start()
        await world.settle(lambda: world.received == ["take"])
        a, b = socket.socketpair()
        key = keep.pawn(a, "fd00::1", 80, "fd00::9")
        keep.release(key)  # handed over at once: a warm container
        await asyncio.sleep(0.05)
        assert world.received == ["take"] and keeper.store.items == {}
        key = keep.pawn(a, "fd00::1", 80, "fd00::9")
        await world.settle(lambda: key in keeper.store.items)
        keep.release(key)
        await world.settle(lambda: key not in keeper.store.items)
        assert world.received == ["take", "hold", "drop"]
        keep.close()
        keeper.close()
        a.close()
        b.close()
    asyncio.run(main())


def test_a_new_runner_takes_back_listeners_and_unserved_connections(tmp_path):
    async def main():
        world = World(tmp_path)
        keeper = world.start_keeper()
        first = Keep(world.path, world.log, "boot1")
        await first.start()
        made = listener()
        port = made.getsockname()[1]
        sock = first.listen("::1", port, lambda: made)
        client = socket.create_connection(("::1", port))
        conn, addr = sock.accept()
        key = first.pawn(conn, "::1", port, addr[0])
        await world.settle(lambda: len(keeper.store.items) == 2)
        first.sock.close()  # the runner dies: its descriptors with it
        sock.close()
        conn.close()
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        second = Keep(world.path, world.log, "boot2")
        await second.start()
        orphans = second.take_orphans()
        assert [(k, m["port"]) for k, _, m in orphans] == [(key, port)]
        assert orphans[0][1].recv(3, socket.MSG_PEEK) == b"GET"  # nothing was read away
        again = second.listen("::1", port, lambda: pytest.fail("bound anew"))
        late = socket.create_connection(("::1", port))  # the backlog was kept all along
        assert again.accept()[0] is not None
        assert second.release_unclaimed() == 0
        for s in (again, late, client, orphans[0][1]):
            s.close()
        second.close()
        keeper.close()
    asyncio.run(main())


def test_a_new_keeper_gets_the_whole_set_again(tmp_path):
    async def main():
        world = World(tmp_path)
        keeper = world.start_keeper()
        keep = Keep(world.path, world.log, "boot1")
        await keep.start()
        made = listener()
        keep.listen("::1", made.getsockname()[1], lambda: made)
        await world.settle(lambda: len(keeper.store.items) == 1)
        keeper.store.clear()
        keeper.close()  # killed: the runner goes on and tries again
        await world.settle(lambda: keep.sock is None)
        keeper = world.start_keeper()
        await world.settle(lambda: len(keeper.store.items) == 1)
        assert world.received[-1] == "hold"
        keep.close()
        keeper.close()
        made.close()
    asyncio.run(main())


CHILD = """
import socket, sys
import msgpack
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
try:
    s.send(msgpack.packb({"op": "take"}))
    print("given" if s.recv(10) else "closed")
except (BrokenPipeError, ConnectionResetError):  # closed before or after the ask
    print("closed")
"""


def test_a_peer_that_is_not_root_is_refused():
    where = tempfile.mkdtemp()  # pytest's tmp_path is not nobody's to reach
    os.chmod(where, 0o711)

    async def main():
        world = World(Path(where))
        keeper = world.start_keeper()
        os.chmod(world.path, 0o777)
        child = await asyncio.create_subprocess_exec(
            "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
            "-c", CHILD, world.path, stdout=asyncio.subprocess.PIPE,
            env={"PYTHONPATH": os.pathsep.join(sys.path)})
        out, _ = await asyncio.wait_for(child.communicate(), 30)
        assert out.decode().strip() == "closed"  # nothing given
        assert keeper.client is None and world.received == []
        keeper.close()
    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(where)


def test_a_keeper_lost_again_while_reconnecting_is_reached_in_the_end(tmp_path, monkeypatch):
    """A runner that reaches a keeper which was exiting (its socket still open) loses it
    again within its own reconnect; it must go on trying, not stop."""
    async def main():
        world = World(tmp_path)
        keeper = world.start_keeper()
        keep = Keep(world.path, world.log, "boot1")
        await keep.start()
        made = listener()
        keep.listen("::1", made.getsockname()[1], lambda: made)
        await world.settle(lambda: len(keeper.store.items) == 1)
        send, failed = fdstore.send, []

        def once(sock, message, fds=()):
            if message["op"] == "hold" and not failed:
                failed.append(message)
                raise ConnectionResetError("the old keeper went away")
            return send(sock, message, fds)
        monkeypatch.setattr(fdstore, "send", once)
        keeper.store.clear()
        keeper.close()
        keeper = world.start_keeper()
        await world.settle(lambda: len(keeper.store.items) == 1)
        assert failed and keep.sock is not None
        keep.close()
        keeper.close()
        made.close()
    asyncio.run(main())
