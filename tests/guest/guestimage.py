"""The stock Debian 12 guest's disk, kernel and initrd: built once from Debian's packages,
cached under /var/cache/faasd-guest, keyed by what went in (docs/guest.md).

What goes in: debootstrap (bookworm, minbase) with systemd, udev, AppArmor, the kernel and
its initrd, sudo, and every package of install.sh's ``packages=(...)`` array (read from
install.sh, not copied), so its ``apt-get`` step finds nothing missing; a pip wheelhouse
of faasd's dependencies (and setuptools/wheel for its build backend) built on this host,
with an /etc/pip.conf (no-index, find-links) so install.sh's own ``pip install`` works with
no network; and the control agent (guestagent.py) as a systemd unit. The cache key is a
hash of the candidate version of every named package, the wheel file names and this
builder's own sources, so a new Debian point release, a new dependency or a change here
builds a new image.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = Path(os.environ.get("FAAS_GUEST_CACHE", "/var/cache/faasd-guest"))
MIRROR = os.environ.get("FAAS_GUEST_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
# Beyond install.sh's own list: what makes it a stock server (systemd as PID 1, udev for
# /dev/virtio-ports, AppArmor, the kernel) and what the README's command needs (sudo).
BASE_PACKAGES = ("systemd-sysv", "udev", "kmod", "dbus", "apparmor", "linux-image-amd64",
                 "initramfs-tools", "sudo", "ca-certificates", "less")
AGENT_PORT = "org.faasd.agent"
WHEELHOUSE = "/opt/faasd-wheelhouse"
HEADROOM_MB = 3072  # free space in the root filesystem for the venv, images, containers
BUILDER_FILES = ("guestimage.py", "guestagent.py")
STALE_BUILD = 6 * 3600  # seconds; a build takes minutes, so an older build-* is an orphan

Say = Callable[[str], None]


def install_packages(install_sh: str) -> list[str]:
    """The words of the ``packages=(...)`` array in install.sh's text."""
    m = re.search(r"^packages=\(([^)]*)\)", install_sh, re.M)
    if not m:
        raise ValueError("install.sh has no packages=(...) array")
    words = [w for line in m.group(1).splitlines() for w in line.split("#")[0].split()]
    if not words:
        raise ValueError("install.sh's packages=(...) array is empty")
    return words


def parse_policy(text: str) -> dict[str, str]:
    """Package -> candidate version, from ``apt-cache policy P...`` output."""
    out: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            name = line[:-1]
        elif name and line.strip().startswith("Candidate:"):
            out[name] = line.split(":", 1)[1].strip()
    return out


def cache_key(versions: dict[str, str], wheels: Iterable[str], builder: str) -> str:
    """One hex string for every input of the image; any change gives another key."""
    missing = sorted(p for p, v in versions.items() if not v or v == "(none)")
    if missing:
        raise ValueError(f"no candidate version for {', '.join(missing)}: run apt-get update")
    h = hashlib.sha256()
    for name in sorted(versions):
        h.update(f"deb {name}={versions[name]}\n".encode())
    for wheel in sorted(wheels):
        h.update(f"wheel {wheel}\n".encode())
    h.update(f"builder {builder}\n".encode())
    return h.hexdigest()[:24]


def builder_hash(files: Iterable[Path]) -> str:
    """The hash of the builder's own sources: a change to how the image is made."""
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _run(*argv: str | Path, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))[:200]} exited {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout)[-2000:]}")
    return proc


def packages() -> list[str]:
    """Every Debian package the image is built with, named explicitly."""
    listed = install_packages((REPO / "install.sh").read_text())
    return sorted(set(listed) | set(BASE_PACKAGES))


def candidate_versions(names: list[str]) -> dict[str, str]:
    """Each package's candidate version on this host (what debootstrap would fetch)."""
    return parse_policy(_run("apt-cache", "policy", *names).stdout)


def build_wheelhouse(dest: Path) -> list[str]:
    """Download (or build) wheels of faasd's dependencies, test extra and build backend."""
    dest.mkdir(parents=True, exist_ok=True)
    _run(sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
         "-d", dest, f"{REPO}[test]", "setuptools>=61", "wheel", timeout=600)
    # An sdist among them would need building in the guest: make every one a wheel here.
    for sdist in [p for p in dest.iterdir() if not p.name.endswith(".whl")]:
        _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dest, sdist,
             timeout=600)
        sdist.unlink()
    return sorted(p.name for p in dest.iterdir())


def _agent_unit() -> str:
    return f"""[Unit]
Description=faasd test guest's control agent (virtio-serial {AGENT_PORT})
After=systemd-udevd.service

[Service]
ExecStart=/usr/bin/python3 /usr/local/sbin/faasd-guest-agent /dev/virtio-ports/{AGENT_PORT}
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""


def _configure(root: Path, wheelhouse: Path) -> None:
    """Files that make the debootstrap tree a bootable, agent-controlled server."""
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    (root / "etc/hostname").write_text("faasd-guest\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 faasd-guest\n"
                                    "::1 localhost ip6-localhost ip6-loopback\n")
    (root / "etc/apt/sources.list").write_text(f"deb {MIRROR} {SUITE} main\n")
    shutil.copytree(wheelhouse, root / WHEELHOUSE.lstrip("/"))
    (root / "etc/pip.conf").write_text(f"[global]\nno-index = true\nfind-links = {WHEELHOUSE}\n")
    agent = root / "usr/local/sbin/faasd-guest-agent"
    shutil.copyfile(HERE / "guestagent.py", agent)
    agent.chmod(0o755)
    unit = root / "etc/systemd/system/faasd-guest-agent.service"
    unit.write_text(_agent_unit())
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / unit.name).symlink_to(f"/etc/systemd/system/{unit.name}")
    # No network: timers that would only try one are masked, a login on the console is
    # there for a human debugging a failed run (root, no password; the guest has no network).
    for timer in ("apt-daily.timer", "apt-daily-upgrade.timer", "man-db.timer"):
        link = root / "etc/systemd/system" / timer
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    _run("chroot", root, "passwd", "-d", "root")


def _debootstrap(root: Path, names: list[str], say: Say) -> None:
    say(f"debootstrap {SUITE} from {MIRROR} with {len(names)} packages (about 2 minutes)")
    _run("debootstrap", "--variant=minbase", f"--include={','.join(names)}", SUITE, root,
         MIRROR, timeout=1800)
    _run("chroot", root, "apt-get", "clean")


def _make_ext4(root: Path, image: Path) -> None:
    used_kb = int(_run("du", "-sk", "--apparent-size", root).stdout.split()[0])
    size_mb = used_kb // 1024 + used_kb // 4096 + HEADROOM_MB
    _run("mkfs.ext4", "-q", "-F", "-L", "faasd-guest", "-d", root, image, f"{size_mb}M")


def ensure_image(say: Say = print) -> Path:
    """The cache directory (rootfs.img, vmlinuz, initrd.img) for today's inputs, built if
    absent. Older keys are removed once a new one is complete."""
    for tool in ("debootstrap", "mkfs.ext4", "apt-cache", "chroot"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing: run ./install.sh --no-start, which "
                               "installs the test tools")
    names = packages()
    versions = candidate_versions(names)
    CACHE.mkdir(parents=True, exist_ok=True)
    for left in CACHE.glob("build-*"):  # from a run that was killed a while ago
        if time.time() - left.stat().st_mtime > STALE_BUILD:
            shutil.rmtree(left, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=CACHE))
    try:
        say("building the pip wheelhouse on the host")
        wheels = build_wheelhouse(work / "wheels")
        key = cache_key(versions, wheels, builder_hash(HERE / f for f in BUILDER_FILES))
        final = CACHE / key
        if (final / "rootfs.img").exists():
            say(f"guest image cached: {final}")
            return final
        t0 = time.monotonic()
        root = work / "root"
        _debootstrap(root, names, say)
        say("configuring the guest (agent, pip.conf, fstab)")
        _configure(root, work / "wheels")
        out = work / "out"
        out.mkdir()
        boot = root / "boot"
        kernels = sorted(boot.glob("vmlinuz-*"))
        initrds = sorted(boot.glob("initrd.img-*"))
        if not kernels or not initrds:
            raise RuntimeError(f"debootstrap left no kernel or initrd in {boot}")
        shutil.copyfile(kernels[-1], out / "vmlinuz")
        shutil.copyfile(initrds[-1], out / "initrd.img")
        say("making the ext4 root filesystem (mkfs.ext4 -d)")
        _make_ext4(root, out / "rootfs.img")
        (out / "versions.txt").write_text(
            "".join(f"{n} {versions[n]}\n" for n in sorted(versions))
            + "".join(f"wheel {w}\n" for w in wheels))
        os.rename(out, final)
        for old in CACHE.iterdir():
            if old.is_dir() and old != final and not old.name.startswith("build-"):
                shutil.rmtree(old, ignore_errors=True)
        say(f"guest image built in {time.monotonic() - t0:.0f}s: {final}")
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def checkout_disk(dest: Path, extra: dict[str, Path]) -> Path:
    """An ext4 image holding ``faasd/`` (the files ``git ls-files`` names, as they are in
    the working tree) and ``extra`` (name -> host file), for the guest's second disk."""
    stage = dest.parent / (dest.name + ".d")
    files = _run("git", "-C", REPO, "ls-files", "-z").stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() or src.is_symlink():
            target = stage / "faasd" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target, follow_symlinks=False)
    for name, src in extra.items():
        (stage / "extra").mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, stage / "extra" / name)
    used_kb = int(_run("du", "-sk", "--apparent-size", stage).stdout.split()[0])
    _run("mkfs.ext4", "-q", "-F", "-L", "faasd-src", "-d", stage, dest,
         f"{used_kb // 1024 * 2 + 64}M")
    shutil.rmtree(stage)
    return dest
