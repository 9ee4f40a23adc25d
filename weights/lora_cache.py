"""The on-disk LoRA cache: one verified .safetensors per source, shared by requests and processes.

Layout under `root`:
    <key>.safetensors   finished entries; the key is a hash of the normalised source string
    locks/<key>.lock    the key's lock (flock), present only while someone holds it: the holder
                        deletes it before letting go, and a waiter that then finds another file
                        at the path locks that one instead (so deleting never lets two in)
    .tmp-<key>-<rand>/  a producer's private work directory; renamed from, then removed

An entry is produced inside its temporary directory, fsynced, and moved into place with
os.replace, so a reader sees either nothing or the whole verified file, never a partial one.
Two requests (threads or processes) for the same key serialise on the key's lock, and the
second finds the first one's entry instead of downloading again. Recency is the file's mtime,
set on every hit, and the least recently used entries are removed when the cache passes its
byte budget. Entries used in the last `protect_recent_s` seconds are kept even over budget:
the request that just fetched them (say a LoRA and its extra_lora) is about to read them. Entries
whose lock is held at that moment are skipped too: someone is replacing them. The budget is checked
at every lookup, and partial downloads count against it until a process that finds their key's lock
free (nobody producing) removes them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_SUFFIX = ".safetensors"
_TMP_PREFIX = ".tmp-"
GB = 1000**3


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    size: int
    last_used: float


class LoraCache:
    """A directory of verified LoRA files with LRU eviction under `max_bytes`."""

    def __init__(self, root: Path, max_bytes: int, protect_recent_s: float = 60.0):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.root = Path(root).expanduser()
        self.max_bytes = int(max_bytes)
        self.protect_recent_s = protect_recent_s
        self.hits = 0
        self.misses = 0
        self._counter_lock = threading.Lock()
        self._ready = False

    def __repr__(self) -> str:
        return f"LoraCache(root={str(self.root)!r}, max_bytes={self.max_bytes})"

    @staticmethod
    def key_for(source: str) -> str:
        """The file-name key of a normalised source string."""
        return hashlib.sha256(source.encode("utf-8")).hexdigest()[:32]

    def path_for(self, source: str) -> Path:
        return self.root / f"{self.key_for(source)}{_SUFFIX}"

    def lookup(self, source: str) -> Path | None:
        """The cached file for `source`, marked as just used; None when absent."""
        path = self.path_for(source)
        try:
            os.utime(path)  # the LRU clock; also proves the file is there
        except FileNotFoundError:
            return None
        self._count(hit=True)
        return path

    def get_or_create(self, source: str, produce: Callable[[Path], Path]) -> Path:
        """The cached file for `source`, calling `produce(workdir)` once to make it when absent.

        `produce` gets an empty private directory inside the cache (same file system, so the
        final rename is atomic) and returns the path of the finished, verified file inside it.
        Whatever it leaves there, including after an exception, is removed.
        """
        found = self.lookup(source)
        if found is not None:
            self.evict(keep=found)  # the budget holds at every request, not only when a file is added
            return found
        self._prepare()
        key = self.key_for(source)
        with self._locked(key):
            found = self.lookup(source)  # another thread or process made it while we waited
            if found is not None:
                return found
            self._count(hit=False)
            final = self.path_for(source)
            workdir = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{key}-", dir=self.root))
            try:
                produced = produce(workdir)
                if produced.parent != workdir:
                    # os.replace would move someone else's file (a user's local LoRA) into the cache.
                    raise ValueError(f"a producer must return a file inside {workdir}, got {produced}")
                _fsync_file(produced)
                os.replace(produced, final)
                _fsync_dir(self.root)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
        self.evict(keep=final)
        return final

    def entries(self) -> list[CacheEntry]:
        """Finished entries, least recently used first."""
        found: list[CacheEntry] = []
        if not self.root.is_dir():
            return found
        for path in self.root.glob(f"*{_SUFFIX}"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # evicted by someone else just now
            found.append(CacheEntry(path=path, size=st.st_size, last_used=st.st_mtime))
        found.sort(key=lambda e: (e.last_used, e.path.name))
        return found

    def total_bytes(self) -> int:
        """Finished entries and partial downloads (until remove_abandoned takes the abandoned ones)."""
        return sum(e.size for e in self.entries()) + self._workdir_bytes()

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove least recently used entries until the cache fits its budget; returns them.

        `keep` (the entry just produced or used) and entries used in the last
        `protect_recent_s` seconds are never removed, even when that leaves the cache over
        budget: a request is about to read them.
        """
        recent = time.time() - self.protect_recent_s
        entries = self.entries()
        total = sum(e.size for e in entries) + self._workdir_bytes()
        removed: list[Path] = []
        for entry in entries:
            if total <= self.max_bytes:
                break
            if (keep is not None and entry.path == keep) or entry.last_used > recent:
                continue
            key = entry.path.name[: -len(_SUFFIX)]
            with self._try_locked(key) as got:
                if not got:
                    continue  # being produced or replaced right now
                try:
                    entry.path.unlink()
                except FileNotFoundError:
                    pass
            total -= entry.size
            removed.append(entry.path)
            log.info("LoRA cache: evicted %s (%.1f MB) to stay under %.1f GB",
                     entry.path.name, entry.size / 1e6, self.max_bytes / GB)  # fmt: skip
        if total > self.max_bytes:
            log.warning("LoRA cache holds %.2f GB, over its %.2f GB budget (entries in use)",
                        total / GB, self.max_bytes / GB)  # fmt: skip
        return removed

    # --- internals ---

    def _count(self, hit: bool) -> None:
        with self._counter_lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def _prepare(self) -> None:
        if self._ready:
            return
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        self.remove_abandoned()
        self._ready = True

    def remove_abandoned(self) -> list[Path]:
        """Remove partial downloads that no live process is producing (their key's lock is free):
        a process killed mid-download leaves its work folder behind."""
        removed = []
        for path in self._workdirs():
            key = path.name[len(_TMP_PREFIX) :].split("-", 1)[0]
            with self._try_locked(key) as free:
                if free:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        if removed:
            log.info("LoRA cache: removed %d partial download(s) left by ended processes", len(removed))
        return removed

    def _workdirs(self) -> list[Path]:
        return (
            sorted(p for p in self.root.glob(f"{_TMP_PREFIX}*") if p.is_dir()) if self.root.is_dir() else []
        )

    def _workdir_bytes(self) -> int:
        total = 0
        for folder in self._workdirs():
            for path in folder.rglob("*"):
                try:
                    total += path.stat().st_size if path.is_file() else 0
                except FileNotFoundError:
                    pass
        return total

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """Exclusive per-key lock across threads and processes (each call opens its own fd)."""
        fd = self._acquire(key, blocking=True)
        try:
            yield
        finally:
            self._release(key, fd)

    @contextlib.contextmanager
    def _try_locked(self, key: str) -> Iterator[bool]:
        fd = self._acquire(key, blocking=False)
        try:
            yield fd is not None
        finally:
            if fd is not None:
                self._release(key, fd)

    def _acquire(self, key: str, blocking: bool) -> int | None:
        """flock the key's lock file; None if someone holds it and `blocking` is off.

        Lock files exist only while held: the holder deletes its file before letting go. So after
        getting the lock, check that the file locked is still the one at the path; if its holder
        deleted it meanwhile, lock the new one instead.
        """
        path = self.root / "locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return None
                raise
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _release(self, key: str, fd: int) -> None:
        try:
            os.unlink(self.root / "locks" / f"{key}.lock")
        except FileNotFoundError:
            pass
        os.close(fd)  # closing releases the lock


def default_lora_cache() -> LoraCache:
    """The cache predict.py uses, configured from the environment.

    FLUX_LORA_CACHE_DIR: where entries live. Default: /src/.cache/flux-cog/loras inside a Cog
        container (/src is the image's working directory), else $XDG_CACHE_HOME or ~/.cache,
        under flux-cog/loras.
    FLUX_LORA_CACHE_MAX_GB: the byte budget in GB (10^9 bytes; decimals allowed). Default 20.
    """
    root_env = os.environ.get("FLUX_LORA_CACHE_DIR")
    if root_env:
        root = Path(root_env).expanduser()
    elif os.path.isdir("/src") and os.access("/src", os.W_OK):
        root = Path("/src/.cache/flux-cog/loras")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(base) / "flux-cog" / "loras"
    raw = os.environ.get("FLUX_LORA_CACHE_MAX_GB", "20")
    try:
        max_gb = float(raw)
    except ValueError:
        raise ValueError(f"FLUX_LORA_CACHE_MAX_GB must be a number of GB, got {raw!r}") from None
    if not max_gb > 0:
        raise ValueError(f"FLUX_LORA_CACHE_MAX_GB must be positive, got {raw!r}")
    return LoraCache(root, int(max_gb * GB))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable (the directory entry), where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
