"""Temporary folders that say whether their owner is alive, so a killed process's leftovers can go.

A process that creates a work folder (a training's extracted images and caches, a request's output
files) holds an exclusive flock on `.owner` inside it for as long as it uses it. The kernel releases
that lock when the process ends, however it ends (an out-of-memory kill never reaches a `finally`).
So a folder whose `.owner` can be locked by someone else has no live owner and can be removed; one
that is locked belongs to a running request and is left alone.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

OWNER_FILE = ".owner"
# A folder without an owner file is either being created this instant or was made by code that does
# not take the lock; such folders are removed only when this old.
UNMARKED_GRACE_S = 3600.0


class OwnedFolder:
    """A fresh temporary folder, locked by this process until `release()` (which removes it)."""

    def __init__(self, prefix: str, parent: Path | None = None):
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self._fd: int | None = os.open(self.path / OWNER_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def empty(self) -> Path:
        """Remove everything in the folder but the owner file; return the folder."""
        for child in self.path.iterdir():
            if child.name == OWNER_FILE:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        return self.path

    def release(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OwnedFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_abandoned(prefix: str, parent: Path | None = None) -> list[Path]:
    """Remove the folders named `prefix*` in `parent` (the temp folder) whose owner is gone."""
    parent = Path(parent or tempfile.gettempdir())
    removed = []
    for path in sorted(parent.glob(f"{prefix}*")):
        if path.is_dir() and not path.is_symlink() and is_abandoned(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d folder(s) left by ended processes: %s*", len(removed), parent / prefix)
    return removed


def is_abandoned(path: Path) -> bool:
    try:
        fd = os.open(path / OWNER_FILE, os.O_RDWR)
    except FileNotFoundError:
        try:
            return time.time() - path.stat().st_mtime > UNMARKED_GRACE_S
        except FileNotFoundError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False  # a live process holds it
        raise
    finally:
        os.close(fd)  # closing releases our lock at once, if we got it
    return True
