"""Read an image archive's index: which image, its config, its layers in order.

Formats (all uncompressed outer tars, read in place: layers are only located here,
never loaded, so a several-GB archive costs a header scan):

* ``docker save`` before Docker 25 and skopeo's ``docker-archive:``: ``manifest.json``
  naming ``<hex>.json`` configs and ``<id>/layer.tar`` or ``<hex>.tar`` layers; a layer
  entry may be a symlink to another layer's tar (a shared layer is stored once);
* Docker 25+: an OCI layout (``oci-layout``, ``index.json``, ``blobs/sha256/``) plus a
  ``manifest.json`` whose paths point into ``blobs/sha256/``;
* OCI archives (``podman save --format oci-archive``, skopeo ``oci-archive:``): no
  ``manifest.json``; ``index.json`` names manifests, maybe through nested indexes.

``manifest.json`` wins when present (its tags are the familiar ``name:tag``).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

from runner.images.config import (
    ImageConfig,
    host_architecture,
    load_json,
    parse_config,
    parse_diff_ids,
)
from runner.images.errors import AMBIGUOUS, NOT_FOUND, ImageError, bad_image, too_large
from runner.images.limits import Limits

_HEX64 = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_BARE_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json")
_MAX_INDEX_DEPTH = 4
_CHUNK = 1 << 20


@dataclass(frozen=True)
class LayerRef:
    """Where one layer's stored bytes are in the archive, and what they must hash to."""

    member: str  # archive member holding the bytes (symlinks already followed)
    offset: int  # of the data in the archive file
    size: int
    diff_id: str  # sha256 of the uncompressed tar, from the config: checked while extracting
    blob_digest: str | None = None  # sha256 of the stored bytes, when the archive names it


@dataclass(frozen=True)
class ImageSpec:
    """One image of an archive, chosen and checked; layers in rootfs.diff_ids order."""

    digest: str  # "sha256:<hex>" of the config blob: the image id, the rootfs key
    config: ImageConfig
    layers: tuple[LayerRef, ...]
    tags: tuple[str, ...]
    format: str  # "docker" (manifest.json) or "oci" (index.json only)


@dataclass
class _Candidate:
    tags: list[str]
    config_path: str
    config_digest: str | None  # expected, when the path or a descriptor says it
    layers: list[tuple[str, str | None]]  # (archive path, expected blob digest)
    manifest_digest: str | None = None
    platform: dict[str, Any] | None = None
    config_raw: bytes | None = field(default=None, repr=False)


def read_archive(path: str | os.PathLike[str], tag: str | None = None,
                 limits: Limits | None = None) -> ImageSpec:
    """Find the image to deploy in an archive (by ``tag`` if given) and check its config.

    Raises ImageError: ``bad_image`` (malformed, unsupported, hostile paths, bad config),
    ``ambiguous`` (several images, no tag), ``not_found`` (no image has ``tag``),
    ``too_large`` (a cap of ``limits``).
    """
    with _Archive(path, limits or Limits()) as arc:
        if "manifest.json" in arc.members:
            fmt, candidates = "docker", _docker_candidates(arc)
        elif "index.json" in arc.members:
            fmt, candidates = "oci", _oci_candidates(arc)
        else:
            raise bad_image(
                "the archive has neither manifest.json nor index.json at its top level: "
                "upload the output of 'docker save', 'podman save' or "
                "'skopeo copy ... oci-archive:'"
            )
        chosen = _choose(arc, candidates, tag)
        return _spec(arc, chosen, fmt)


class LayerReader:
    """The stored bytes of one layer, read with pread; checks the blob digest in :meth:`finish`."""

    def __init__(self, fd: int, ref: LayerRef, on_bytes: Callable[[int], None] | None = None):
        self._fd, self._pos, self._end, self._ref = fd, ref.offset, ref.offset + ref.size, ref
        self._on_bytes = on_bytes
        # When the blob IS the uncompressed layer its digest is the diff_id, checked anyway.
        self._sha = hashlib.sha256() if ref.blob_digest and ref.blob_digest != ref.diff_id else None

    def read(self, n: int) -> bytes:
        """Up to n bytes; b"" at the end of the member."""
        n = min(n, self._end - self._pos)
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._pos)
        if not data:
            raise bad_image(f"the archive ends inside layer {self._ref.member!r}: it is truncated; "
                            "upload it again")
        self._pos += len(data)
        if self._sha is not None:
            self._sha.update(data)
        if self._on_bytes is not None:
            self._on_bytes(len(data))
        return data

    def finish(self) -> None:
        """Read what is left and check the stored bytes' digest (if the archive names one)."""
        while self.read(_CHUNK):
            pass
        if self._sha is not None and f"sha256:{self._sha.hexdigest()}" != self._ref.blob_digest:
            raise bad_image(
                f"layer blob {self._ref.member!r} does not match its digest "
                f"{self._ref.blob_digest}: the archive is corrupted; save the image again",
                member=self._ref.member,
            )


# -- the outer tar ----------------------------------------------------------------


def _norm(name: str) -> str | None:
    """An archive path as ``a/b``; None for one that is absolute or climbs (never referable)."""
    if name.startswith("/") or "\x00" in name:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts or not parts:
        return None
    return "/".join(parts)


class _Archive:
    def __init__(self, path: str | os.PathLike[str], limits: Limits):
        self.limits = limits
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.size = os.fstat(self.fd).st_size
            self.members: dict[str, tarfile.TarInfo] = {}
            self._index()
        except BaseException:
            os.close(self.fd)
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def _index(self) -> None:
        head = os.pread(self.fd, 6, 0)
        if head.startswith((b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"BZh", b"\xfd7zXZ\x00")):
            raise bad_image(
                "the archive itself is compressed: upload the plain tar that 'docker save' writes "
                "(decompress it first)"
            )
        count = 0
        with os.fdopen(os.dup(self.fd), "rb") as f:
            try:
                with tarfile.open(fileobj=f, mode="r:", encoding="utf-8",
                                  errors="surrogateescape") as tf:
                    while (m := tf.next()) is not None:
                        tf.members.clear()
                        count += 1
                        if count > self.limits.max_entries:
                            raise too_large(
                                f"the archive has more than {self.limits.max_entries} members: "
                                "it is not an image archive"
                            )
                        name = _norm(m.name)
                        if name is not None and (m.isreg() or m.issym() or m.islnk()):
                            self.members[name] = m
            except (tarfile.TarError, EOFError) as exc:
                raise bad_image(
                    f"the upload is not a complete tar archive ({exc}): "
                    "upload the output of 'docker save' again"
                ) from None

    def resolve(self, path: Any, what: str) -> tarfile.TarInfo:
        """The regular member that archive path ``path`` (from a manifest) names, links followed."""
        if not isinstance(path, str):
            raise bad_image(f"{what} names {path!r}, which is not a path", what=what)
        name = _norm(path)
        if name is None:
            raise bad_image(
                f"{what} names {path[:200]!r}, a path outside the archive: "
                "this archive is hostile or broken",
                what=what, path=path[:200],
            )
        for _ in range(16):
            m = self.members.get(name)
            if m is None:
                raise bad_image(
                    f"{what} names {path[:200]!r}, which is not in the archive: "
                    "it is incomplete; save the image again",
                    what=what, path=path[:200],
                )
            if m.isreg():
                if m.issparse() or m.offset_data + m.size > self.size:
                    raise bad_image(f"archive member {name!r} is sparse or truncated: "
                                    "save the image again", path=name)
                return m
            link = m.linkname if m.islnk() else posixpath.join(posixpath.dirname(name), m.linkname)
            if m.issym() and m.linkname.startswith("/"):
                link = "/"  # refused just below, like any other escape
            name = _norm(posixpath.normpath(link)) if link else None
            if name is None:
                raise bad_image(
                    f"{what}: archive member {m.name[:200]!r} links outside the archive",
                    what=what, path=m.name[:200],
                )
        raise bad_image(f"{what}: archive member {path[:200]!r} is a loop of links", what=what)

    def read(self, path: Any, what: str, digest: str | None = None) -> bytes:
        """A small member (JSON), checked against ``digest`` when one is expected."""
        m = self.resolve(path, what)
        if m.size > self.limits.max_json_bytes:
            raise too_large(
                f"{what} is {m.size} bytes, more than {self.limits.max_json_bytes}: "
                "not a real image",
                what=what,
            )
        data = os.pread(self.fd, m.size, m.offset_data)
        if digest is not None and f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
            raise bad_image(
                f"{what} does not match its digest {digest}: "
                "the archive is corrupted; save the image again",
                what=what,
            )
        return data

    def json(self, path: str, what: str, digest: str | None = None) -> Any:
        return load_json(self.read(path, what, digest), what)


# -- the formats --------------------------------------------------------------------


def _digest_of_path(path: str) -> str | None:
    """The content digest an archive path promises: blobs/sha256/<hex> or <hex>.json."""
    parts = path.split("/")
    if len(parts) >= 3 and parts[-2] == "sha256" and _HEX64.fullmatch(parts[-1]):
        return f"sha256:{parts[-1]}"
    if path.endswith(".json") and _HEX64.fullmatch(parts[-1][:-5]):
        return f"sha256:{parts[-1][:-5]}"
    return None


def _docker_candidates(arc: _Archive) -> list[_Candidate]:
    manifest = arc.json("manifest.json", "manifest.json")
    if not isinstance(manifest, list) or not all(isinstance(e, dict) for e in manifest):
        raise bad_image("manifest.json is not a list of objects: "
                        "the archive is damaged; save the image again")
    out = []
    for i, entry in enumerate(manifest):
        config, layers, tags = entry.get("Config"), entry.get("Layers"), entry.get("RepoTags") or []
        if (not isinstance(config, str) or not isinstance(layers, list)
                or not isinstance(tags, list)):
            raise bad_image(
                f"manifest.json entry {i} lacks Config or Layers: "
                "the archive is damaged; save the image again"
            )
        paths = [(p, _digest_of_path(p) if isinstance(p, str) and p.startswith("blobs/") else None)
                 for p in layers]
        out.append(_Candidate([str(t) for t in tags], config, _digest_of_path(config), paths))
    return out


def _blob_path(desc: Any, what: str) -> tuple[str, str]:
    """Archive path and digest of an OCI descriptor (only sha256 digests exist in practice)."""
    digest = desc.get("digest") if isinstance(desc, dict) else None
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise bad_image(
            f"{what} has a descriptor without a sha256 digest: "
            "the archive is damaged or unsupported",
            what=what,
        )
    return f"blobs/sha256/{digest[7:]}", digest


def _names(desc: dict[str, Any]) -> list[str]:
    ann = desc.get("annotations")
    if not isinstance(ann, dict):
        return []
    keys = ("io.containerd.image.name", "org.opencontainers.image.ref.name")
    return [ann[k] for k in keys if isinstance(ann.get(k), str)]


def _oci_candidates(arc: _Archive) -> list[_Candidate]:
    out: list[_Candidate] = []
    work = [(arc.json("index.json", "index.json"), "index.json", [], 0)]
    while work:
        index, what, names, depth = work.pop()
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(manifests, list):
            raise bad_image(f"{what} has no manifests list: "
                            "the archive is damaged; save the image again")
        for desc in manifests:
            path, digest = _blob_path(desc, what)
            doc = arc.json(path, f"manifest {digest[:19]}", digest)
            tags = names + _names(desc)
            if (desc.get("mediaType") in _INDEX_TYPES
                    or (isinstance(doc, dict) and "manifests" in doc)):
                if depth >= _MAX_INDEX_DEPTH:
                    raise bad_image("the archive nests image indexes too deeply: "
                                    "it is not a build tool's output")
                work.append((doc, f"index {digest[:19]}", tags, depth + 1))
                continue
            if not isinstance(doc, dict) or not isinstance(doc.get("layers"), list):
                raise bad_image(f"manifest {digest[:19]} has no layers list: "
                                "the archive is damaged or unsupported")
            config_path, config_digest = _blob_path(doc.get("config"), f"manifest {digest[:19]}")
            layers = [_blob_path(d, f"manifest {digest[:19]}") for d in doc["layers"]]
            platform = desc.get("platform") if isinstance(desc.get("platform"), dict) else None
            out.append(_Candidate(tags, config_path, config_digest, layers, digest, platform))
    return _for_this_host(out)


def _for_this_host(candidates: list[_Candidate]) -> list[_Candidate]:
    """Drop manifests a multi-platform index declares for other platforms (and attestations).

    If that leaves nothing, keep them all: the config check then says what is wrong.
    """
    arch = host_architecture()
    fits = [
        c for c in candidates
        if c.platform is None or (c.platform.get("os") == "linux"
                                  and c.platform.get("architecture") == arch)
    ]
    return fits or candidates


# -- choosing one image -------------------------------------------------------------


def normalize_ref(ref: str) -> str:
    """A reference in full form: ``fib`` -> ``docker.io/library/fib:latest``."""
    name, at, digest = ref.strip().partition("@")
    slash, colon = name.rfind("/"), name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    elif not at:
        tag = "latest"
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        domain, path = first, rest
    else:
        domain, path = "docker.io", name
    if domain in ("index.docker.io", "registry-1.docker.io"):
        domain = "docker.io"
    if domain == "docker.io" and "/" not in path:
        path = f"library/{path}"
    return f"{domain}/{path}" + (f":{tag}" if tag else "") + (f"@{digest}" if at else "")


def _matches(c: _Candidate, wanted: str, arc: _Archive) -> bool:
    if _DIGEST.fullmatch(wanted) or (wanted.startswith("sha256:") and len(wanted) >= 19):
        return ((c.manifest_digest or "").startswith(wanted)
                or _config_digest(arc, c).startswith(wanted))
    full = normalize_ref(wanted)
    wanted_tag = full.rpartition(":")[2] if full.rfind(":") > full.rfind("/") else ""
    for name in c.tags:
        if normalize_ref(name) == full:
            return True
        # An OCI ref.name is often just a tag ("latest"): it matches the tag part alone.
        if _BARE_TAG.fullmatch(name) and name in (wanted, wanted_tag):
            return True
    return False


def _config_digest(arc: _Archive, c: _Candidate) -> str:
    if c.config_raw is None:
        c.config_raw = arc.read(c.config_path, "the image config", c.config_digest)
    return f"sha256:{hashlib.sha256(c.config_raw).hexdigest()}"


def _choose(arc: _Archive, candidates: list[_Candidate], tag: str | None) -> _Candidate:
    every_tag = sorted({t for c in candidates for t in c.tags})
    if tag is not None:
        candidates = [c for c in candidates if _matches(c, tag, arc)]
        if not candidates:
            raise ImageError(
                NOT_FOUND,
                f"the archive has no image tagged {tag!r}; "
                f"it has: {', '.join(every_tag) or '(no tags)'}: "
                "pass one of those, or leave the tag out if there is one image",
                {"tag": tag, "tags": every_tag},
            )
    distinct: dict[str, _Candidate] = {}
    for c in candidates:
        first = distinct.setdefault(_config_digest(arc, c), c)
        if first is not c:
            first.tags.extend(t for t in c.tags if t not in first.tags)
    if not distinct:
        raise bad_image("the archive holds no image: save the image again")
    if len(distinct) > 1:
        tags = sorted({t for c in candidates for t in c.tags})
        raise ImageError(
            AMBIGUOUS,
            f"the archive holds {len(distinct)} images ({', '.join(tags) or 'untagged'}): "
            "choose one with --tag",
            {"tags": tags, "images": sorted(distinct)},
        )
    return next(iter(distinct.values()))


def _spec(arc: _Archive, c: _Candidate, fmt: str) -> ImageSpec:
    digest = _config_digest(arc, c)
    doc = load_json(c.config_raw or b"", "the image config")
    config = parse_config(doc)
    diff_ids = parse_diff_ids(doc)
    if len(diff_ids) != len(c.layers):
        raise bad_image(
            f"the image lists {len(c.layers)} layers but its config has {len(diff_ids)} diff_ids: "
            "the archive is damaged; save the image again"
        )
    if len(diff_ids) > arc.limits.max_layers:
        raise too_large(f"the image has {len(diff_ids)} layers, more than "
                        f"{arc.limits.max_layers}: squash some")
    layers = []
    for i, ((path, blob), diff_id) in enumerate(zip(c.layers, diff_ids, strict=True)):
        m = arc.resolve(path, f"layer {i + 1} of {len(diff_ids)}")
        layers.append(LayerRef(m.name, m.offset_data, m.size, diff_id, blob))
    return ImageSpec(digest, config, tuple(layers), tuple(c.tags), fmt)
