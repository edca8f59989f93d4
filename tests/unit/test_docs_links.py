"""The repository stands alone: every relative link in the docs resolves inside it, and
nothing points at the design notes the project grew from, which a clone does not have."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"}
OUTSIDE = re.compile(r"\.\./shared|" + "DESIGN" + r"\.md")
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def _files(*suffixes: str) -> list[Path]:
    return [p for p in REPO.rglob("*")
            if p.is_file() and p.suffix in suffixes
            and not any(part in SKIP_DIRS or part.endswith(".egg-info")
                        for part in p.relative_to(REPO).parts)]


def test_nothing_points_outside_the_repository():
    here = Path(__file__).resolve()
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in _files(".py", ".md", ".sh", ".toml",
                                                                  ".conf", ".cfg", ".json")
                 if p != here
                 for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
                 if OUTSIDE.search(line)]
    assert not offenders, f"these point at files a clone does not have: {offenders}"


def test_design_document_exists_and_is_linked_from_the_readme():
    assert (REPO / "docs" / "design.md").is_file()
    assert "(docs/design.md)" in (REPO / "README.md").read_text()


def test_relative_links_in_markdown_resolve():
    broken = []
    for doc in _files(".md"):
        for target, _ in LINK.findall(doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(REPO)} -> {target}")
    assert not broken, f"broken links: {broken}"
