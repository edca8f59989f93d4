"""supervisord.conf: the shape the platform's safety and healing rely on."""

from __future__ import annotations

import configparser
from pathlib import Path

CONF = Path(__file__).resolve().parents[2] / "supervisord.conf"


def parsed() -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser()
    cp.read(CONF)
    return cp


def test_control_socket_is_private_and_there_is_no_http_server():
    cp = parsed()
    assert "inet_http_server" not in cp
    assert cp["unix_http_server"]["chmod"] == "0700"
    assert cp["unix_http_server"]["file"].startswith("%(ENV_FAAS_RUN)s/")


def test_programs():
    cp = parsed()
    programs = {s.split(":", 1)[1]: cp[s] for s in cp if s.startswith("program:")}
    assert set(programs) == {"controller", "netagent", "dnsagent", "runner", "dns", "keeper"}
    for name, p in programs.items():
        binary = "faas-named" if name == "dns" else f"faas-{name}"
        assert p["command"] == f"%(ENV_FAAS_BIN)s/{binary}"
        assert p["autorestart"] == "true" and int(p["startsecs"]) >= 1
        assert p["stdout_logfile"] == f"%(ENV_FAAS_ROOT)s/logs/{name}.log"
        assert p["redirect_stderr"] == "true"
    for unprivileged in ("controller", "dnsagent"):
        assert programs[unprivileged]["user"] == "%(ENV_FAAS_USER)s"
    # named drops to user bind itself; a stop kills netagent's and named's children too
    for root in ("netagent", "dns"):
        assert "user" not in programs[root]
        assert programs[root]["stopasgroup"] == programs[root]["killasgroup"] == "true"
    # the runner's SIGTERM is its alone: its containers finish the connections they
    # serve (docs/operations.md); past stopwaitsecs the whole group is killed
    assert "user" not in programs["runner"]
    assert programs["runner"]["stopasgroup"] == "false"
    assert programs["runner"]["killasgroup"] == "true"
    # the keeper holds the runner's sockets: root, started before it
    assert "user" not in programs["keeper"]
    assert int(programs["keeper"]["priority"]) < int(programs["runner"]["priority"])


def test_every_path_comes_from_the_environment():
    for line in CONF.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(";") and "/" in line.split("=", 1)[1]:
            value = line.split("=", 1)[1].strip()
            if not value.startswith("supervisor."):
                assert "%(ENV_" in value, line
