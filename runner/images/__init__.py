"""Safe extraction of ``docker save`` / OCI image archives into read-only root filesystems.

Entry points: :func:`runner.images.extract.extract` (archive -> rootfs, in a limited
child process), :func:`runner.images.archive.read_archive` (archive -> ImageSpec).
Design notes: docs/images.md.
"""
