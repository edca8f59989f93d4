"""runner/images/child_protocol.py: the extraction child's messages, written by one side
and read by the other through the same module (the end-to-end runs: test_image_child)."""

from __future__ import annotations

import pytest

from runner.images import child_protocol as protocol
from runner.images.errors import bad_image
from runner.images.limits import Limits


def test_params_round_trip() -> None:
    data = protocol.encode_params(archive="/a/ü.tar", images_dir="/i", staging="/i/.s",
                                  tag=None, limits=Limits().to_dict(), sync=False)
    assert protocol.decode_params(data) == {
        "archive": "/a/ü.tar", "images_dir": "/i", "staging": "/i/.s", "tag": None,
        "limits": Limits().to_dict(), "sync": False}
    assert Limits.from_dict(protocol.decode_params(data)["limits"]) == Limits()


@pytest.mark.parametrize(("line", "kind", "value"), [
    (protocol.progress_line("extract", 5, None), protocol.PROGRESS, ["extract", 5, None]),
    (protocol.result_line({"digest": "sha256:" + "0" * 64}), protocol.RESULT,
     {"digest": "sha256:" + "0" * 64}),
    (protocol.error_line(bad_image("no\nway").to_dict()), protocol.ERROR,
     bad_image("no\nway").to_dict()),
    (protocol.crash_line("x" * 5000 + "end"), protocol.CRASH,
     ("x" * 5000 + "end")[-protocol.CRASH_CHARS:]),
])
def test_each_message_is_one_line_of_one_kind(line: str, kind: str, value: object) -> None:
    assert line.endswith("\n") and line.count("\n") == 1  # the parent splits on newlines
    assert protocol.parse_line(line.rstrip("\n").encode()) == {kind: value}
