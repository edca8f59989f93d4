"""Fixtures for the VPN client tests: state and key files in tmp_path, config files."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def client_env(tmp_path, monkeypatch):
    """State and key files under tmp_path, never /run or /etc."""
    run_dir, key_file = tmp_path / "run", tmp_path / "keys" / "private.key"
    monkeypatch.setenv("FAAS_CLIENT_RUN", str(run_dir))
    monkeypatch.setenv("FAAS_CLIENT_KEY", str(key_file))
    return run_dir, key_file


@pytest.fixture
def write_config(tmp_path):
    def write(text: str, name: str = "client.conf") -> Path:
        path = tmp_path / name
        path.write_text(text)
        path.chmod(0o600)
        return path
    return write
