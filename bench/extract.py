"""Extraction benchmark: faasd's safe extraction against plain `tar -x`, in one run.

Builds a ~250 MB single-layer image from this host's own /usr (a Debian base with
Python is what most function images are), then times, each in a fresh directory on the
same filesystem and each followed by a `sync` so neither hides writes in the page cache:

    tar -x            the baseline
    faasd extract     runner.images.extract.extract (child process, openat2, hashing)
    faasd redeploy    the same image again: nothing to extract

and prints the times and the ratio. Run as root: `sudo /opt/faasd/venv/bin/python
bench/extract.py [--mb 250] [--rounds 3] [--dir /var/tmp]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner.images.extract import extract
from tests.imagebuild import Layer, build_image

SOURCES = ("/usr/lib/python3.11", "/usr/lib/x86_64-linux-gnu", "/usr/share", "/usr/bin")


def layer_tar(path: Path, budget: int) -> int:
    """A tar of host files (regular files, dirs, symlinks) up to ``budget`` bytes."""
    total = 0
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for top in SOURCES:
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames.sort()
                for name in sorted(filenames):
                    full = os.path.join(dirpath, name)
                    try:
                        info = tar.gettarinfo(full, arcname=full.lstrip("/"))
                    except OSError:
                        continue
                    if not (info.isfile() or info.issym()):
                        continue
                    if info.isfile():
                        with open(full, "rb") as f:
                            tar.addfile(info, f)
                    else:
                        tar.addfile(info)
                    total += info.size
                    if total >= budget:
                        return total
    return total


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="faas-bench-", dir=args.dir))
    try:
        raw = work / "layer.tar"
        size = layer_tar(raw, args.mb << 20)
        image = work / "image.tar"
        data = raw.read_bytes()
        build_image(image, [Layer(tar=data)], fmt="docker25")
        del data
        print(f"image: {size / 1e6:.0f} MB of files, archive {image.stat().st_size / 1e6:.0f} MB")
        tar_times, faasd_times, redeploy = [], [], []
        for i in range(args.rounds):
            dest = work / f"tar-{i}"
            dest.mkdir()
            tar_times.append(timed(lambda d=dest: subprocess.run(
                ["tar", "-x", "-f", str(raw), "-C", str(d)], check=True)))
            images = work / f"images-{i}"
            faasd_times.append(timed(lambda d=images: extract(image, d, sync=False)))
            redeploy.append(timed(lambda d=images: extract(image, d, sync=False)))
            shutil.rmtree(dest)
            shutil.rmtree(images)
        t, f = statistics.median(tar_times), statistics.median(faasd_times)
        r = statistics.median(redeploy)
        print(f"tar -x          median {t:.3f}s  ({', '.join(f'{x:.3f}' for x in tar_times)})")
        print(f"faasd extract   median {f:.3f}s  ({', '.join(f'{x:.3f}' for x in faasd_times)})")
        print(f"faasd redeploy  median {r:.3f}s")
        print(f"ratio faasd/tar: {f / t:.2f}x (target <= 1.5x); redeploy {r:.3f}s (target < 1s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
