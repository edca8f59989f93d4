"""Integration tests need root and real tools: missing either is a failure, never a skip."""

from __future__ import annotations

import os
import shutil

import pytest
from harness import BIN, Netns, Platform

TOOLS = ("ip", "setpriv", "nsenter", "runc", "gcc", "curl", "wireguard-go")


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
