"""Directories a root daemon trusts: made by root, never reached through a symlink.

``$FAAS_RUN`` is writable by the faas group (its unprivileged daemons bind their
endpoints there). A root daemon that later ``rmtree``s or hands to runc a directory
under it must not find one an unprivileged process planted first: a symlink to /etc,
or a directory of its own. So each such directory is checked with ``lstat`` after it
is made, and refused unless it is a real directory owned by root.
"""

from __future__ import annotations

import os
import stat

from common.settings import SettingsError


def root_dir(path: str, mode: int = 0o700) -> str:
    """Make ``path`` (if missing) and return it once it is a real, root-owned directory
    with ``mode``; SettingsError otherwise, saying what to remove."""
    os.makedirs(path, mode=mode, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise SettingsError(f"{path} is not a real directory (a symlink or a file): remove "
                            "it and start again; faasd makes it itself")
    if st.st_uid != 0:
        raise SettingsError(f"{path} belongs to uid {st.st_uid}, not root: something else "
                            "made it before faasd did; remove it and start again")
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)
    return path
