"""The layer stream on its own: reader, hasher and consumer threads of layers._Stream."""

from __future__ import annotations

import hashlib
import io

import pytest

from runner.images.errors import ImageError
from runner.images.layers import Budget, _Stream
from runner.images.limits import Limits


class _Chunks:
    """A Reader returning the given pieces, then an optional error instead of the end."""

    def __init__(self, pieces: list[bytes], error: BaseException | None = None):
        self._pieces, self._error = list(pieces), error

    def read(self, n: int) -> bytes:
        if self._pieces:
            return self._pieces.pop(0)[:n]
        if self._error is not None:
            raise self._error
        return b""


def _payload(size: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(size))


def test_stream_hashes_exactly_what_it_hands_out() -> None:
    data = _payload(5 << 20 | 12345)  # several 1 MiB chunks and a short tail
    stream = _Stream(io.BytesIO(data), Budget(Limits()))
    try:
        head = stream.read(512)
        assert isinstance(head, bytes) and head == data[:512]  # tarfile gets bytes
        view = stream.read1(1 << 20)
        assert isinstance(view, memoryview)  # file data is a view, not a copy
        assert bytes(view) == data[512:512 + len(view)]
        got = head + bytes(view) + stream.read(len(data))  # a read across chunk boundaries
        assert got == data and stream.tell() == len(data)
        assert stream.read(1) == b"" and not stream.read1()
        stream.drain()
        assert stream.hexdigest() == hashlib.sha256(data).hexdigest()
    finally:
        stream.close()


def test_stream_hash_covers_bytes_nobody_read() -> None:
    data = _payload(3 << 20)
    stream = _Stream(io.BytesIO(data), Budget(Limits()))
    try:
        stream.seek(1000)
        stream.drain()  # what follows the tar's end marker counts too
        assert stream.hexdigest() == hashlib.sha256(data).hexdigest()
        with pytest.raises(ValueError):
            stream.seek(10)
    finally:
        stream.close()


def test_stream_passes_reader_errors_and_caps() -> None:
    boom = ImageError("bad_image", "corrupt")
    stream = _Stream(_Chunks([b"x" * 100], boom), Budget(Limits()))
    try:
        assert stream.read(100) == b"x" * 100
        with pytest.raises(ImageError, match="corrupt"):
            stream.read(1)
    finally:
        stream.close()
    tiny = Limits(max_bytes=1 << 20)
    stream = _Stream(io.BytesIO(bytes(3 << 20)), Budget(tiny))
    try:
        with pytest.raises(ImageError, match="uncompress to more than"):
            stream.drain()
    finally:
        stream.close()


def test_stream_close_stops_threads_blocked_on_full_queues() -> None:
    stream = _Stream(io.BytesIO(bytes(64 << 20)), Budget(Limits()))  # far more than the queues hold
    stream.read(10)
    stream.close()
    stream._reader.join(timeout=5)
    stream._hasher.join(timeout=5)
    assert not stream._reader.is_alive() and not stream._hasher.is_alive()
