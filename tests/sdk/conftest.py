"""Fixtures of the SDK tests; the fake runner itself is in sdk_harness.py."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from sdk_harness import FakeRunner


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[FakeRunner]:
    """A fake runner; whatever it started is stopped at the end."""
    fake = FakeRunner(tmp_path)
    try:
        yield fake
    finally:
        fake.close()
