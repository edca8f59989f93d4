"""Integration tests need root and real tools: missing either is a failure, never a skip."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from harness import BIN, Netns, Platform, run

from tests.imagebuild import Dir, File, build_image

HERE = Path(__file__).parent

TOOLS = ("ip", "setpriv", "nsenter", "runc", "crun", "gcc", "curl", "wireguard-go", "wg",
         "ip6tables", "ip6tables-restore", "named", "dig", "timeout",
         "iptables", "iptables-restore", "unshare", "mount", "umount", "python3", "mkfs.ext4")


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _requirements():
    if os.geteuid() != 0:
        pytest.fail("integration tests run as root (sudo ./test.sh)", pytrace=False)
    missing = [t for t in TOOLS if shutil.which(t) is None]
    missing += [p for p in ("faasd", "faasctl", "supervisord") if not (BIN / p).exists()]
    if missing:
        pytest.fail(f"missing tools: {', '.join(missing)}; run ./install.sh", pytrace=False)


@pytest.fixture(scope="module")
def netns():
    ns = Netns()
    yield ns
    left = ns.delete()
    assert not left, f"processes left in {ns.name}: {left}"


@pytest.fixture(scope="module")
def platform_config() -> str:
    """faasd.toml for the module's platform; modules override this fixture."""
    return ""


@pytest.fixture(scope="module")
def platform(netns, platform_config):
    p = Platform(netns, platform_config)
    p.start()
    try:
        p.wait_healthy()
        yield p
    finally:
        p.stop()
        p.remove()


@pytest.fixture(scope="session")
def handler_binary(tmp_path_factory) -> bytes:
    """The static C test handler (handlers/testhandler.c): one binary, any mode."""
    out = tmp_path_factory.mktemp("handler") / "handler"
    run("gcc", "-static", "-O2", "-o", out, HERE / "handlers" / "testhandler.c")
    return out.read_bytes()


@pytest.fixture(scope="session")
def image_tar(tmp_path_factory, handler_binary) -> Path:
    """A docker-save archive whose only command is the test handler."""
    path = tmp_path_factory.mktemp("image") / "handler.tar"
    build_image(path, [[Dir("tmp", mode=0o1777), File("handler", handler_binary, mode=0o755)]],
                {"config": {"Cmd": ["/handler"]}})
    return path


@pytest.fixture(scope="session")
def examples(tmp_path_factory) -> dict[str, Path]:
    """The example images (Python and C handlers), built as install.sh builds them."""
    out = tmp_path_factory.mktemp("examples")
    built = {}
    for name in ("fibonacci", "echo", "c-hello"):
        built[name] = out / f"{name}.tar"
        run(sys.executable, HERE.parents[1] / "examples" / "build.py", name, built[name],
            timeout=120)
    return built
