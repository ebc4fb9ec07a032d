"""Files of ours written into folders others can write to too (a shared batch folder, a name an
API answer chose): never through a symlink planted under our name, never into another file.

A new file is created exclusively (O_EXCL, O_NOFOLLOW) under a name of our own, after whatever
was there is unlinked (unlinking a symlink removes the link, not its target), and renamed into
place once whole: a rename replaces the name's entry, never writes through it. downloads.py and
reuse.py both write this way.
"""

from __future__ import annotations

import os
import shutil
from typing import BinaryIO

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def unlink(path: str) -> None:
    """Remove ``path`` (a symlink itself, not its target) if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def create(path: str, append: bool = False) -> BinaryIO:
    """Open a file of ours for writing, never through a symlink or into another file. A fresh
    file replaces whatever is under its name and is created exclusively; one appended to (a
    resumed download) is opened only if it is not a symlink (the caller checked that it is a
    plain file with one link)."""
    if append:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | NOFOLLOW)
        return open(fd, "ab")
    unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o666)
    return open(fd, "wb")


def copy(src: str, path: str) -> None:
    """A durable copy of ``src`` as a new file ``path`` (created as ``create`` does); nothing
    left under ``path`` if it fails."""
    try:
        with open(src, "rb") as fh, create(path) as out:
            shutil.copyfileobj(fh, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
    except OSError:
        unlink(path)
        raise
