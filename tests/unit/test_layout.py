"""common/layout.py owns the on-disk layout: the docs agree with it, the launcher makes
its directories as its table says, nobody else spells a path under $FAAS_ROOT or
$FAAS_RUN, cli/ imports no daemon package, and a backup part runs isolated."""

from __future__ import annotations

import ast
import os
import re
import stat
from pathlib import Path

import pytest

from cli import launcher
from common import layout, parts
from common.errors import Code, FaasError
from common.settings import load

REPO = Path(__file__).resolve().parents[2]
DAEMONS = ("controller", "netagent", "dnsagent", "runner", "keeper")


def on_disk_block(doc: Path) -> list[str]:
    """The indented block under the "## On disk" heading."""
    text = doc.read_text()
    section = text[text.index("## On disk"):].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("    ")]


@pytest.mark.parametrize("doc", ["docs/design.md", "README.md"])
def test_every_path_of_the_layout_is_in_the_on_disk_section(doc):
    block = on_disk_block(REPO / doc)
    text = "\n".join(block)
    for d in layout.DIRS:
        if not d.rel:  # the bases: their line names the variable and the mode
            line = next(x for x in block if d.what in x)
        else:
            line = next((x for x in block if re.search(rf"(^|[\s,]){d.rel}/", x)), "")
        assert line, f"{doc} does not list {d.rel}/"
        assert f"{d.mode:o}".rjust(4, "0") in line, f"{doc}: {d.rel or d.what} is not {d.mode:o}"
    for attr, (_, rel) in layout.FILES.items():
        assert rel in text, f"{doc} does not list {rel} ({attr})"
    assert "<service>.sock" in text and "<service>.lock" in text


def test_every_file_and_dir_in_the_tables_is_a_layout_path():
    paths = layout.Layout("/r", "/u")
    for d in layout.DIRS:
        assert getattr(paths, d.attr) == os.path.join("/u" if d.base == "run" else "/r",
                                                      d.rel).rstrip("/")
    for attr, (_, rel) in layout.FILES.items():
        got = getattr(paths, attr)
        assert got in (os.path.join("/r", rel).rstrip("/"),
                       os.path.join("/u", rel).rstrip("/")), attr
    assert paths.socket("runner") == "/u/runner.sock" and paths.lock("runner") == "/u/runner.lock"


def test_the_launcher_makes_each_directory_with_its_owner_and_mode(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("run as root: the launcher chowns to the faas user")
    settings = load({"FAAS_ROOT": str(tmp_path / "root"), "FAAS_RUN": str(tmp_path / "run"),
                     "FAAS_CONFIG": "/dev/null"})
    launcher.prepare(settings)
    uid, gid = launcher.owner_ids(settings)
    ids = {"root": (0, 0), "faas": (uid, gid)}
    paths = layout.of(settings)
    for d in layout.DIRS:
        st = os.lstat(getattr(paths, d.attr))
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == d.mode, d.attr
        assert (st.st_uid, st.st_gid) == (ids[d.owner][0], ids[d.group][1]), d.attr


def _production_files() -> list[Path]:
    return [p for pkg in ("cli", "common", *DAEMONS) for p in (REPO / pkg).rglob("*.py")]


def test_no_module_but_the_layout_spells_a_path_under_root_or_run():
    spelled = re.compile(r"os\.path\.join\([^)]*\b(settings\.(root|run)|root|run|run_dir)\s*,\s*"
                         r"[\"']")
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in _production_files()
                 if p != REPO / "common" / "layout.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if spelled.search(line)]
    assert not offenders, f"use common/layout.py: {offenders}"


def _imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", ["cli", "common", *DAEMONS])
def test_packages_import_only_common_and_themselves(package):
    """docs/design.md: the daemons import only common/ and their own package; cli/
    only common/ (backup reaches the daemons' parts as programs, common/parts.py)."""
    wrong = {f"{p.relative_to(REPO)}: {name}" for p in (REPO / package).rglob("*.py")
             for name in _imported(p) & {"cli", "common", *DAEMONS} - {"common", package}}
    assert not wrong, wrong


def test_a_part_runs_isolated_from_the_current_directory(tmp_path, monkeypatch):
    """Root runs faasctl restore from anywhere: a controller/backup.py planted in the
    current directory must not be what runs."""
    planted = tmp_path / "controller"
    planted.mkdir()
    (planted / "__init__.py").write_text("")
    (planted / "backup.py").write_text(
        "import sys, json\nsys.stdout.write(json.dumps({'result': {'planted': True}}))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    settings = load({"FAAS_ROOT": str(tmp_path / "root"), "FAAS_RUN": str(tmp_path / "run"),
                     "FAAS_CONFIG": "/dev/null"})
    assert parts.call("controller", "ready", settings, force=False) == {}


def test_a_part_error_keeps_its_code_and_unknown_actions_are_refused(tmp_path):
    settings = load({"FAAS_ROOT": str(tmp_path / "root"), "FAAS_RUN": str(tmp_path / "run"),
                     "FAAS_CONFIG": "/dev/null"})
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "dns").write_text("a file where dns/ should be")
    with pytest.raises(FaasError) as info:
        parts.call("dnsagent", "ready", settings, force=False)
    assert info.value.code == Code.CONFLICT and "not a directory" in info.value.message
    with pytest.raises(FaasError) as info:
        parts.call("dnsagent", "bogus", settings)
    assert info.value.code == Code.INTERNAL and "exit status 2" in info.value.message
