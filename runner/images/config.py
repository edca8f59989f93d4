"""The image config (the JSON blob whose sha256 is the image id): parse and check it."""

from __future__ import annotations

import json
import platform
import posixpath
import re
from dataclasses import dataclass
from typing import Any

from runner.images.errors import bad_image

# platform.machine() -> the GOARCH names images use. Only the host's own architecture
# is accepted: no emulation is set up, and "amd64 can run 386" needs 32-bit support
# that a minimal host may lack, so it is refused too (documented in docs/images.md).
_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}

_DIFF_ID = re.compile(r"sha256:[0-9a-f]{64}")


def host_architecture() -> str:
    """The image architecture name of this host (e.g. ``amd64``)."""
    machine = platform.machine()
    return _ARCH.get(machine, machine.lower())


@dataclass(frozen=True)
class ImageConfig:
    """What the runtime needs from an image config, checked and normalized.

    Sequences are tuples so that the value is really immutable; ``to_dict`` gives lists.
    """

    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: tuple[str, ...]
    workdir: str
    user: str
    os: str
    architecture: str

    @property
    def command(self) -> list[str]:
        """The argv a container starts with: Entrypoint followed by Cmd."""
        return [*self.entrypoint, *self.cmd]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what ``config.json`` beside a rootfs holds)."""
        return {
            "entrypoint": list(self.entrypoint),
            "cmd": list(self.cmd),
            "env": list(self.env),
            "workdir": self.workdir,
            "user": self.user,
            "os": self.os,
            "architecture": self.architecture,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageConfig:
        """Inverse of :meth:`to_dict` (trusted data written by this package)."""
        return cls(
            entrypoint=tuple(data["entrypoint"]),
            cmd=tuple(data["cmd"]),
            env=tuple(data["env"]),
            workdir=data["workdir"],
            user=data["user"],
            os=data["os"],
            architecture=data["architecture"],
        )


def load_json(raw: bytes, what: str) -> Any:
    """Parse a JSON blob of the archive; malformed JSON or a NUL anywhere is bad_image."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested input
        raise bad_image(
            f"{what} is not valid JSON ({exc}): the archive is damaged; save the image again",
            file=what,
        ) from None
    where = _find_nul(doc, "$")
    if where:
        raise bad_image(
            f"{what} has a NUL byte in {where}: NUL is never valid there; fix the image",
            file=what, where=where,
        )
    return doc


def _find_nul(value: Any, where: str) -> str | None:
    """The JSON path of the first string (key or value) holding a NUL byte, if any."""
    stack = [(value, where)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return where
        elif isinstance(value, dict):
            for key, item in value.items():
                if "\x00" in key:
                    return f"{where} key {key[:40]!r}"
                stack.append((item, f"{where}.{key[:40]}"))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))
    return None


def parse_config(doc: Any, host_arch: str | None = None) -> ImageConfig:
    """Check a parsed image config (see :func:`load_json`) and return what the runtime needs."""
    if not isinstance(doc, dict):
        raise bad_image("the image config is not a JSON object: "
                        "the archive is damaged; save the image again")
    _check_platform(doc, host_arch or host_architecture())
    section = doc.get("config")
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise bad_image("the image config's 'config' member is not an object: fix the image")
    entrypoint = _strings(section, "Entrypoint")
    cmd = _strings(section, "Cmd")
    if not entrypoint and not cmd:
        raise bad_image(
            "the image has no command (its config has neither Entrypoint nor Cmd): "
            "add ENTRYPOINT or CMD to the Dockerfile and build it again"
        )
    env = _strings(section, "Env")
    for item in env:
        if "=" not in item or item.startswith("="):
            raise bad_image(
                f"image Env entry {item[:60]!r} is not NAME=value: fix ENV in the Dockerfile",
                entry=item[:200],
            )
    return ImageConfig(
        entrypoint=entrypoint,
        cmd=cmd,
        env=env,
        workdir=_workdir(section.get("WorkingDir")),
        user=_string(section, "User"),
        os=doc["os"],
        architecture=doc["architecture"],
    )


def parse_diff_ids(doc: Any) -> list[str]:
    """The config's ``rootfs.diff_ids``: the uncompressed sha256 of each layer, in order."""
    rootfs = doc.get("rootfs") if isinstance(doc, dict) else None
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise bad_image("the image config has no rootfs of type 'layers': "
                        "the archive is damaged; save the image again")
    diff_ids = rootfs.get("diff_ids")
    if diff_ids is None:
        diff_ids = []
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) and _DIFF_ID.fullmatch(d)
                                                 for d in diff_ids):
        raise bad_image(
            "the image config's rootfs.diff_ids are not all sha256:<64 hex digits>: "
            "fix or re-save the image"
        )
    return diff_ids


def _check_platform(doc: dict[str, Any], host_arch: str) -> None:
    os_name = doc.get("os")
    if os_name != "linux":
        raise bad_image(
            f"the image is for os {str(os_name)[:40]!r}, this host runs only 'linux' images: "
            "build the image for linux (docker build --platform linux/...)",
            os=str(os_name)[:40],
        )
    arch = doc.get("architecture")
    if arch != host_arch:
        raise bad_image(
            f"the image is for architecture {str(arch)[:40]!r}, this host runs {host_arch!r}: "
            f"build it with --platform linux/{host_arch}",
            architecture=str(arch)[:40],
            host=host_arch,
        )


def _strings(section: dict[str, Any], key: str) -> tuple[str, ...]:
    value = section.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad_image(f"the image config's {key} is not a list of strings: fix the image",
                        field=key)
    return tuple(value)


def _string(section: dict[str, Any], key: str) -> str:
    value = section.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise bad_image(f"the image config's {key} is not a string: fix the image", field=key)
    return value


def _workdir(value: Any) -> str:
    if value is None or value == "":
        return "/"
    if not isinstance(value, str):
        raise bad_image("the image config's WorkingDir is not a string: "
                        "fix WORKDIR in the Dockerfile")
    if not value.startswith("/"):
        raise bad_image(
            f"the image's WorkingDir {value[:100]!r} is relative: "
            "use an absolute WORKDIR in the Dockerfile",
            workdir=value[:200],
        )
    # normpath keeps a leading "//" (POSIX allows it to mean something else), which
    # would hide "//proc" from the check below: collapse it first.
    path = posixpath.normpath("/" + value.lstrip("/"))
    if path == "/proc" or path.startswith("/proc/"):
        raise bad_image(
            f"the image's WorkingDir {value[:100]!r} is under /proc: "
            "choose a directory of the image as WORKDIR",
            workdir=value[:200],
        )
    return path
