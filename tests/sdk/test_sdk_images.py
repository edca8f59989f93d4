"""examples/build.py archives, and the images run for real (chroot as nobody); the C example."""

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sdk_harness import (
    EXAMPLES,
    REPO,
    SDK_DIR,
    TIMEOUT,
    FakeRunner,
    closed_by_peer,
    get,
)

BUILD = EXAMPLES / "build.py"
# The build must work with a fresh Debian 12's own interpreter (stdlib only).
SYSTEM_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
MAX_LAYER = 40_000_000
NAMES = ("fibonacci", "echo", "c-hello")


def build(name: str, output: Path) -> Path:
    subprocess.run([SYSTEM_PYTHON, str(BUILD), name, str(output)], check=True,
                   capture_output=True, timeout=120, cwd=REPO)
    return output


@pytest.fixture(scope="session")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("archives")
    return {name: build(name, directory / f"{name}.tar") for name in NAMES}


class Archive:
    """A docker save archive, read: its manifest, config and the one layer's members."""

    def __init__(self, path: Path) -> None:
        with tarfile.open(path) as outer:
            self.names = outer.getnames()
            self.manifest = json.load(outer.extractfile("manifest.json"))
            entry = self.manifest[0]
            self.config_bytes = outer.extractfile(entry["Config"]).read()
            self.config = json.loads(self.config_bytes)
            self.layer_bytes = outer.extractfile(entry["Layers"][0]).read()
        self.layer = tarfile.open(fileobj=io.BytesIO(self.layer_bytes))
        self.members = {m.name: m for m in self.layer.getmembers()}

    def read(self, name: str) -> bytes:
        return self.layer.extractfile(self.members[name]).read()

    def extract(self, directory: Path) -> Path:
        self.layer.extractall(directory)  # our own archive: trusted
        return directory


@pytest.fixture(scope="session")
def opened(archives: dict[str, Path]) -> dict[str, Archive]:
    return {name: Archive(path) for name, path in archives.items()}


@pytest.mark.parametrize("name", NAMES)
def test_archive_is_a_classic_docker_save(opened: dict[str, Archive], name: str) -> None:
    archive = opened[name]
    assert len(archive.manifest) == 1
    entry = archive.manifest[0]
    assert entry["RepoTags"] == [f"{name}:latest"]
    assert len(entry["Layers"]) == 1
    assert entry["Config"] == hashlib.sha256(archive.config_bytes).hexdigest() + ".json"
    diff_id = "sha256:" + hashlib.sha256(archive.layer_bytes).hexdigest()
    assert archive.config["rootfs"] == {"type": "layers", "diff_ids": [diff_id]}
    assert archive.config["os"] == "linux" and archive.config["architecture"]
    assert archive.config["config"]["User"] == "65534:65534"
    layer_dir = entry["Layers"][0].split("/")[0]
    assert set(archive.names) == {"manifest.json", "repositories", entry["Config"], layer_dir,
                                  entry["Layers"][0]}
    names = [m.name for m in archive.layer.getmembers()]
    assert names == sorted(names)  # deterministic order, parents first
    assert all(m.uid == 0 and m.gid == 0 and m.mtime == 1_700_000_000
               for m in archive.members.values())
    assert sum(m.size for m in archive.members.values()) < MAX_LAYER


@pytest.mark.parametrize("name", ["fibonacci", "echo"])
def test_python_layer_contents(opened: dict[str, Archive], name: str) -> None:
    archive = opened[name]
    config = archive.config["config"]
    assert config["Cmd"] == ["/usr/bin/python3.11", "-S", "/app/handler.py"]
    assert config["WorkingDir"] == "/app"
    assert any(e.startswith("PATH=") for e in config["Env"])
    assert archive.read("app/handler.py") == (EXAMPLES / name / "handler.py").read_bytes()
    assert archive.read("app/faas_handler.py") == (SDK_DIR / "faas_handler.py").read_bytes()
    assert "app/__pycache__/faas_handler.cpython-311.pyc" in archive.members
    python = archive.members["usr/bin/python3.11"]
    assert python.isfile() and python.mode & 0o111
    assert archive.members["lib64"].issym() or archive.members["lib64"].isdir()
    assert b"nobody:x:65534:65534:" in archive.read("etc/passwd")
    assert "usr/lib/python3.11/json/__init__.py" in archive.members
    assert "usr/lib/python3.11/ssl.py" not in archive.members  # no network: no OpenSSL


def test_build_is_deterministic(archives: dict[str, Path], tmp_path: Path) -> None:
    again = build("fibonacci", tmp_path / "again.tar")
    assert again.read_bytes() == archives["fibonacci"].read_bytes()


# -- the images, run -----------------------------------------------------------------------


@pytest.fixture
def image_runner(tmp_path: Path) -> Iterator[tuple[FakeRunner, Path]]:
    assert os.geteuid() == 0, "these tests chroot into the built images: run them as root"
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    runner = FakeRunner(rootfs)  # the control socket at /control.sock inside the image
    os.chmod(runner.path, 0o777)  # the handler runs as nobody
    try:
        yield runner, rootfs
    finally:
        runner.close()


def start_image(runner: FakeRunner, rootfs: Path, archive: Archive, reuse: bool) -> None:
    """Start the image's command as its config says (env, user), chrooted into it."""
    archive.extract(rootfs)
    config = archive.config["config"]
    env = dict(item.split("=", 1) for item in config["Env"])
    env.update(FAAS_CONTROL_SOCKET="/control.sock", FAAS_REUSE="1" if reuse else "0")
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    runner.start([chroot, f"--userspec={config['User']}", str(rootfs), *config["Cmd"]],
                 env=env, inherit=False)
    runner.accept()


def test_fibonacci_image_runs(image_runner: tuple[FakeRunner, Path],
                              opened: dict[str, Archive]) -> None:
    runner, rootfs = image_runner
    start_image(runner, rootfs, opened["fibonacci"], reuse=True)
    reply = runner.request(get("/?n=10"), rid="a")
    assert (reply.status, reply.body) == (200, b"0, 1, 1, 2, 3, 5, 8, 13, 21, 34\n"), \
        runner.stderr()
    runner.expect_done("a")
    assert runner.request(get("/?n=abc"), rid="b").status == 400
    runner.expect_done("b")
    assert runner.stop() == 0, runner.stderr()
    assert runner.stderr() == ""


def test_echo_image_runs(image_runner: tuple[FakeRunner, Path],
                         opened: dict[str, Archive]) -> None:
    runner, rootfs = image_runner
    start_image(runner, rootfs, opened["echo"], reuse=False)
    reply = runner.request(b"POST /x?y=1 HTTP/1.1\r\nHost: e\r\nContent-Length: 3\r\n\r\nabc",
                           rid="e")
    assert reply.status == 200, runner.stderr()
    assert reply.body == b"POST /x?y=1 HTTP/1.1\nHost: e\nContent-Length: 3\n\nabc"
    assert runner.proc is not None and runner.proc.wait(TIMEOUT) == 0


def test_c_hello_image(image_runner: tuple[FakeRunner, Path], opened: dict[str, Archive]) -> None:
    archive = opened["c-hello"]
    assert list(archive.members) == ["handler"]
    assert archive.config["config"]["Cmd"] == ["/handler"]
    assert is_static_elf(archive.read("handler"))
    runner, rootfs = image_runner
    start_image(runner, rootfs, archive, reuse=False)
    assert not_dynamic(rootfs / "handler")
    reply = runner.request(get("/"))
    assert (reply.status, reply.body) == (200, b"hello from C, 42!\n")
    assert runner.proc is not None and runner.proc.wait(TIMEOUT) == 0


# -- the C example on the host -------------------------------------------------------------


def is_static_elf(data: bytes) -> bool:
    """No PT_INTERP program header: the kernel runs it without a dynamic loader."""
    assert data[:4] == b"\x7fELF"
    order = "<" if data[5] == 1 else ">"
    wide = data[4] == 2  # ELFCLASS64
    (phoff,) = struct.unpack_from(order + ("Q" if wide else "I"), data, 0x20 if wide else 0x1C)
    phentsize, phnum = struct.unpack_from(order + "HH", data, 0x36 if wide else 0x2A)
    types = [struct.unpack_from(order + "I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    return 3 not in types  # PT_INTERP


def not_dynamic(path: Path) -> bool:
    # ldd fails (exit 1) on a static binary: that failure is the answer
    result = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    return "not a dynamic executable" in output or "statically linked" in output


@pytest.fixture(scope="session")
def c_handler(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = tmp_path_factory.mktemp("c") / "handler"
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", str(binary),
                    str(EXAMPLES / "c-hello" / "handler.c")], check=True, timeout=120)
    return binary


def test_c_handler_is_static(c_handler: Path) -> None:
    assert is_static_elf(c_handler.read_bytes())
    assert not_dynamic(c_handler)


def test_c_handler_speaks_the_protocol(runner: FakeRunner, c_handler: Path) -> None:
    proc = runner.start([str(c_handler)])
    runner.accept()
    read_end, write_end = os.pipe()
    runner.send({"type": "later-version-thing"}, [write_end])  # unknown: fd closed, ignored
    os.close(write_end)
    assert closed_by_peer(read_end)
    os.close(read_end)
    extra = os.open(os.devnull, os.O_RDONLY)
    try:
        reply = runner.request(get("/anything"), extra_fds=[extra])
    finally:
        os.close(extra)
    assert (reply.status, reply.body) == (200, b"hello from C, 42!\n")
    assert reply.headers["connection"] == "close"
    assert proc.wait(TIMEOUT) == 0


def test_c_handler_stops_when_the_control_socket_closes(runner: FakeRunner,
                                                        c_handler: Path) -> None:
    runner.start([str(c_handler)])
    runner.accept()
    assert runner.stop() == 0
