"""Build image archives for tests: docker save (legacy), Docker 25+, OCI and skopeo docker-archive.

Usage::

    from tests.imagebuild import File, Dir, Symlink, build_image
    built = build_image(tmp_path / "fn.tar", [[File("handler", b"...", mode=0o755)]],
                        config={"config": {"Cmd": ["/handler"]}}, fmt="oci", compression="zstd")
    built.digest  # "sha256:..." of the config: the image id

A layer is a list of entries (or a :class:`Layer` for raw bytes, a streamed tar or a
wrong diff_id). Entries: :class:`File`, :class:`Dir`, :class:`Symlink`, :class:`Hardlink`,
:class:`Whiteout`, :class:`Opaque`, :class:`Device`, :class:`Sparse`, :class:`Raw` (any
TarInfo, for hostile cases). ``config`` is merged over a valid default document
(linux, this host's architecture, ``Cmd: ["/handler"]``); ``rootfs`` is computed
unless given. Several images in one archive: :func:`build_archive`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from runner.images.config import host_architecture

MTIME = 1_700_000_000
FORMATS = ("legacy", "docker25", "oci", "skopeo")
COMPRESSIONS = ("none", "gzip", "zstd")
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


# -- entries -------------------------------------------------------------------------


@dataclass
class File:
    path: str
    content: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = MTIME


@dataclass
class Dir:
    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: int = MTIME


@dataclass
class Symlink:
    path: str
    target: str
    uid: int = 0
    gid: int = 0


@dataclass
class Hardlink:
    path: str
    target: str


@dataclass
class Whiteout:
    """Hide ``path`` of the lower layers (writes ``dir/.wh.name``)."""

    path: str


@dataclass
class Opaque:
    """Hide everything the lower layers have in directory ``dir``."""

    dir: str


@dataclass
class Device:
    path: str
    kind: str = "chr"  # chr, blk or fifo
    major: int = 1
    minor: int = 3


@dataclass
class Sparse:
    """An old-GNU sparse file of apparent ``size`` with data at ``segments`` [(offset, bytes)]."""

    path: str
    size: int
    segments: list[tuple[int, bytes]] = field(default_factory=list)
    mode: int = 0o644


@dataclass
class Raw:
    """Any header, as is (hostile cases)."""

    info: tarfile.TarInfo
    data: bytes = b""


Entry = File | Dir | Symlink | Hardlink | Whiteout | Opaque | Device | Sparse | Raw


@dataclass
class Layer:
    """A layer given other than as a list of entries."""

    entries: list[Entry] = field(default_factory=list)
    tar: bytes | None = None  # a ready uncompressed tar instead of entries
    chunks: Callable[[], Iterable[bytes]] | None = None  # a streamed uncompressed tar (huge layers)
    blob: bytes | None = None  # the stored bytes exactly (not compressed again)
    diff_id: str | None = None  # claim this diff_id instead of the real one
    compression: str | None = None  # instead of the archive's


@dataclass
class Image:
    layers: list[Any]
    config: dict[str, Any] | None = None
    tags: list[str] = field(default_factory=lambda: ["fn:latest"])


@dataclass
class BuiltImage:
    digest: str  # sha256 of the config: the image id
    diff_ids: list[str]
    config: bytes


def _info(path: str, kind: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0,
          mtime: int = MTIME) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, mtime
    return info


def _num12(n: int) -> bytes:
    if n < 8**11:
        return b"%011o\0" % n
    return b"\x80" + n.to_bytes(11, "big")  # GNU base-256


def _sparse_blocks(e: Sparse) -> bytes:
    data = b"".join(d for _, d in e.segments)
    info = _info(e.path, tarfile.GNUTYPE_SPARSE, e.mode)
    info.size = len(data)
    hdr = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    assert len(hdr) == 512 and len(e.segments) <= 4
    for i, (offset, chunk) in enumerate(e.segments):
        hdr[386 + 24 * i: 410 + 24 * i] = _num12(offset) + _num12(len(chunk))
    hdr[482] = 0
    hdr[483:495] = _num12(e.size)
    hdr[148:156] = b" " * 8
    hdr[148:155] = b"%06o\0" % sum(hdr)
    return bytes(hdr) + data + b"\0" * (-len(data) % 512)


def layer_tar(entries: Iterable[Entry]) -> bytes:
    """The uncompressed tar of a list of entries, in that order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            if isinstance(e, Sparse):  # tarfile cannot write sparse members: add the blocks by hand
                blocks = _sparse_blocks(e)
                tf.fileobj.write(blocks)
                tf.offset += len(blocks)
                continue
            info, data = _entry(e)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _entry(e: Entry) -> tuple[tarfile.TarInfo, bytes | None]:
    if isinstance(e, File):
        info = _info(e.path, tarfile.REGTYPE, e.mode, e.uid, e.gid, e.mtime)
        info.size = len(e.content)
        return info, e.content
    if isinstance(e, Dir):
        return _info(e.path, tarfile.DIRTYPE, e.mode, e.uid, e.gid, e.mtime), None
    if isinstance(e, Symlink):
        info = _info(e.path, tarfile.SYMTYPE, 0o777, e.uid, e.gid)
        info.linkname = e.target
        return info, None
    if isinstance(e, Hardlink):
        info = _info(e.path, tarfile.LNKTYPE)
        info.linkname = e.target
        return info, None
    if isinstance(e, Whiteout):
        parent, _, name = e.path.rstrip("/").rpartition("/")
        return _info(f"{parent}/.wh.{name}" if parent else f".wh.{name}", tarfile.REGTYPE), b""
    if isinstance(e, Opaque):
        d = e.dir.strip("/")
        return _info(f"{d}/.wh..wh..opq" if d else ".wh..wh..opq", tarfile.REGTYPE), b""
    if isinstance(e, Device):
        kind = {"chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}[e.kind]
        info = _info(e.path, kind)
        info.devmajor, info.devminor = e.major, e.minor
        return info, None
    if isinstance(e, Raw):
        if e.info.isreg():
            e.info.size = len(e.data)
        return e.info, e.data
    raise TypeError(f"not a layer entry: {e!r}")


def many_files(count: int, directory: str = "m") -> Layer:
    """A layer of ``count`` empty files, generated as a stream (a million takes ~2 s)."""

    def chunks() -> Iterator[bytes]:
        prefix = f"{directory}/".encode()
        template = bytearray(_info(f"{directory}/0000000",
                                   tarfile.REGTYPE).tobuf(tarfile.USTAR_FORMAT))
        width = len(prefix) + 7
        template[148:156] = b" " * 8
        head, tail = bytes(template[width:148]), bytes(template[155:])
        base = sum(template) - sum(template[:width]) + sum(prefix)  # checksum minus the digits
        digits = [sum(b"%04d" % i) for i in range(10000)]  # "%07d" = "%03d" + "%04d"
        for start in range(0, count, 10000):
            parts = []
            for i in range(start, min(count, start + 10000)):
                checksum = base + digits[i % 10000] + digits[i // 10000] - 48
                parts.append(prefix + b"%07d" % i + head + b"%06o\0" % checksum + tail)
            yield b"".join(parts)
        yield b"\0" * 1024

    return Layer(chunks=chunks)


# -- blobs ---------------------------------------------------------------------------


def _compress(data: bytes, compression: str) -> bytes:
    if compression == "none":
        return data
    if compression == "gzip":
        return gzip.compress(data, compresslevel=1, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    raise ValueError(compression)


class _Blob:
    """Stored layer bytes: in memory, or in a temporary file for streamed layers."""

    def __init__(self, data: bytes | None = None, path: str | None = None):
        self.data, self.path = data, path
        if data is not None:
            self.size, self.digest = len(data), "sha256:" + hashlib.sha256(data).hexdigest()
        else:
            h = hashlib.sha256()
            with open(path, "rb") as f:  # type: ignore[arg-type]
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            self.size, self.digest = os.path.getsize(path), "sha256:" + h.hexdigest()  # type: ignore[arg-type]

    def open(self) -> io.BufferedIOBase:
        return io.BytesIO(self.data) if self.data is not None else open(self.path, "rb")  # type: ignore[arg-type]


def _layer_blob(layer: Any, compression: str, tmpdir: str) -> tuple[_Blob, str]:
    if not isinstance(layer, Layer):
        layer = Layer(entries=list(layer))
    comp = layer.compression or compression
    if layer.blob is not None:
        return (_Blob(layer.blob),
                layer.diff_id or "sha256:" + hashlib.sha256(layer.blob).hexdigest())
    if layer.chunks is not None:
        blob, diff_id = _stream_blob(layer.chunks(), comp, tmpdir)
        return blob, layer.diff_id or diff_id
    tar = layer.tar if layer.tar is not None else layer_tar(layer.entries)
    return _Blob(_compress(tar, comp)), layer.diff_id or "sha256:" + hashlib.sha256(tar).hexdigest()


def _stream_blob(chunks: Iterable[bytes], compression: str, tmpdir: str) -> tuple[_Blob, str]:
    h = hashlib.sha256()
    fd, path = tempfile.mkstemp(dir=tmpdir)
    with os.fdopen(fd, "wb") as raw:
        if compression == "gzip":
            out: Any = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0)
        elif compression == "zstd":
            out = zstandard.ZstdCompressor(level=1).stream_writer(raw, closefd=False)
        else:
            out = raw
        for chunk in chunks:
            h.update(chunk)
            out.write(chunk)
        if out is not raw:
            out.close()
    return _Blob(path=path), "sha256:" + h.hexdigest()


# -- archives ------------------------------------------------------------------------


class OuterLink:
    """An outer-archive symlink member (legacy docker save shares layers this way)."""

    def __init__(self, target: str):
        self.target = target


def _config_bytes(config: dict[str, Any] | None, diff_ids: list[str]) -> bytes:
    doc: dict[str, Any] = {"architecture": host_architecture(), "os": "linux",
                           "config": {"Cmd": ["/handler"]}}
    doc.update(config or {})
    doc.setdefault("rootfs", {"type": "layers", "diff_ids": diff_ids})
    return json.dumps(doc, sort_keys=True).encode()


def _desc(media_type: str, data_or_blob: Any, annotations: dict[str, str] | None = None,
          **more: Any) -> dict[str, Any]:
    if isinstance(data_or_blob, _Blob):
        size, digest = data_or_blob.size, data_or_blob.digest
    else:
        size, digest = len(data_or_blob), "sha256:" + hashlib.sha256(data_or_blob).hexdigest()
    desc = {"mediaType": media_type, "digest": digest, "size": size, **more}
    if annotations:
        desc["annotations"] = annotations
    return desc


def _full_name(tag: str) -> str:
    from runner.images.archive import normalize_ref

    return normalize_ref(tag)


def build_archive(
    path: str | os.PathLike[str],
    images: list[Image],
    fmt: str = "legacy",
    compression: str = "none",
    tamper: Callable[[dict[str, Any]], None] | None = None,
    oci_nested: bool = False,
) -> list[BuiltImage]:
    """Write an archive holding ``images`` in format ``fmt`` (see FORMATS).

    ``tamper(members)`` may edit the member dict (name -> bytes, _Blob or OuterLink)
    before it is written. ``oci_nested``: index.json points to a nested index per image.
    """
    assert fmt in FORMATS and compression in COMPRESSIONS
    members: dict[str, Any] = {}
    built: list[BuiltImage] = []
    manifest: list[dict[str, Any]] = []
    index: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for image in images:
            blobs = [_layer_blob(layer, compression, tmpdir) for layer in image.layers]
            diff_ids = [d for _, d in blobs]
            config = _config_bytes(image.config, diff_ids)
            cfg_digest = "sha256:" + hashlib.sha256(config).hexdigest()
            built.append(BuiltImage(cfg_digest, diff_ids, config))
            if fmt == "legacy":
                manifest.append(_legacy(members, image, blobs, config, cfg_digest))
            elif fmt == "skopeo":
                manifest.append(_skopeo(members, image, blobs, config, cfg_digest))
            else:
                entry, desc = _oci(members, image, blobs, config, compression, fmt, oci_nested)
                index.append(desc)
                if fmt == "docker25":
                    manifest.append(entry)
        if fmt in ("docker25", "oci"):
            members["oci-layout"] = b'{"imageLayoutVersion":"1.0.0"}'
            top = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index}
            members["index.json"] = json.dumps(top).encode()
        if fmt != "oci":
            members["manifest.json"] = json.dumps(manifest).encode()
        if tamper is not None:
            tamper(members)
        _write_outer(path, members)
    return built


def _legacy(
    members: dict[str, Any], image: Image, blobs: list[tuple[_Blob, str]], config: bytes,
    cfg_digest: str
) -> dict[str, Any]:
    parent, paths = "", []
    first_of: dict[str, str] = {m.digest: k for k, m in members.items() if isinstance(m, _Blob)}
    for blob, diff_id in blobs:
        layer_id = hashlib.sha256(f"{parent}|{diff_id}|{blob.digest}".encode()).hexdigest()
        name = f"{layer_id}/layer.tar"
        if name not in members:
            members[f"{layer_id}/"] = None  # a directory entry, as docker writes one
            members[f"{layer_id}/VERSION"] = b"1.0"
            members[f"{layer_id}/json"] = json.dumps({"id": layer_id,
                                                      "parent": parent or None}).encode()
            if blob.digest in first_of:  # the same layer again: a symlink to its first copy
                members[name] = OuterLink(f"../{first_of[blob.digest]}")
            else:
                members[name] = blob
                first_of[blob.digest] = name
        paths.append(name)
        parent = layer_id
    members[f"{cfg_digest[7:]}.json"] = config
    return {"Config": f"{cfg_digest[7:]}.json", "RepoTags": image.tags, "Layers": paths}


def _skopeo(
    members: dict[str, Any], image: Image, blobs: list[tuple[_Blob, str]], config: bytes,
    cfg_digest: str
) -> dict[str, Any]:
    """skopeo copy ... docker-archive: layers as <digest>.tar and the config as <digest>.json,
    top level."""
    for blob, _ in blobs:
        members[f"{blob.digest[7:]}.tar"] = blob
    members[f"{cfg_digest[7:]}.json"] = config
    layers = [f"{blob.digest[7:]}.tar" for blob, _ in blobs]
    return {"Config": f"{cfg_digest[7:]}.json", "RepoTags": image.tags, "Layers": layers}


def _oci(
    members: dict[str, Any], image: Image, blobs: list[tuple[_Blob, str]], config: bytes,
    compression: str, fmt: str, nested: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    for blob, _ in blobs:
        members[f"blobs/sha256/{blob.digest[7:]}"] = blob
    cfg_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    members[f"blobs/sha256/{cfg_digest[7:]}"] = config
    man = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": _desc(OCI_CONFIG, config),
        "layers": [_desc(LAYER_TYPES[compression], blob) for blob, _ in blobs],
    }
    man_bytes = json.dumps(man).encode()
    members[f"blobs/sha256/{hashlib.sha256(man_bytes).hexdigest()}"] = man_bytes
    tag = image.tags[0] if image.tags else None
    if fmt == "docker25":
        # Docker 25 names the image in full and puts the bare tag in ref.name.
        ann = {"io.containerd.image.name": _full_name(tag),
               "org.opencontainers.image.ref.name": tag.rpartition(":")[2]}
        ann = ann if tag else None
    else:
        ann = {"org.opencontainers.image.ref.name": tag} if tag else None
    platform = {"os": "linux", "architecture": host_architecture()}
    desc = _desc(OCI_MANIFEST, man_bytes, None if nested else ann, platform=platform)
    if nested:
        inner = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                            "manifests": [desc]}).encode()
        members[f"blobs/sha256/{hashlib.sha256(inner).hexdigest()}"] = inner
        desc = _desc(OCI_INDEX, inner, ann)
    entry = {
        "Config": f"blobs/sha256/{cfg_digest[7:]}", "RepoTags": image.tags,
        "Layers": [f"blobs/sha256/{blob.digest[7:]}" for blob, _ in blobs],
    }
    return entry, desc


def _write_outer(path: str | os.PathLike[str], members: dict[str, Any]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, value in members.items():
            if value is None:
                tf.addfile(_info(name.rstrip("/"), tarfile.DIRTYPE, 0o755))
            elif isinstance(value, OuterLink):
                info = _info(name, tarfile.SYMTYPE, 0o777)
                info.linkname = value.target
                tf.addfile(info)
            elif isinstance(value, _Blob):
                info = _info(name, tarfile.REGTYPE)
                info.size = value.size
                with value.open() as f:
                    tf.addfile(info, f)
            else:
                info = _info(name, tarfile.REGTYPE)
                info.size = len(value)
                tf.addfile(info, io.BytesIO(value))


def build_image(
    path: str | os.PathLike[str],
    layers: list[Any],
    config: dict[str, Any] | None = None,
    fmt: str = "legacy",
    compression: str = "none",
    tags: Iterable[str] = ("fn:latest",),
    tamper: Callable[[dict[str, Any]], None] | None = None,
    oci_nested: bool = False,
) -> BuiltImage:
    """Write an archive with one image; see the module docstring."""
    image = Image(list(layers), config, list(tags))
    return build_archive(path, [image], fmt, compression, tamper, oci_nested)[0]


def layer_from_file_tree(root: str | os.PathLike[str]) -> list[Entry]:
    """Entries for the files under a directory (e.g. to package a built handler binary)."""
    out: list[Entry] = []
    root = Path(root)
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        st = p.lstat()
        if p.is_symlink():
            out.append(Symlink(rel, os.readlink(p)))
        elif p.is_dir():
            out.append(Dir(rel, st.st_mode & 0o7777))
        else:
            out.append(File(rel, p.read_bytes(), st.st_mode & 0o7777))
    return out
