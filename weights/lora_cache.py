"""The on-disk LoRA cache: one verified .safetensors per source, shared by requests and processes.

Layout under `root`:
    <key>.safetensors   finished entries; the key is a hash of the normalised source string
    locks/<key>.lock    one lock file per key (flock); kept, since deleting a lock file that
                        another process has open would let two producers run at once
    .tmp-<key>-<rand>/  a producer's private work directory; renamed from, then removed

An entry is produced inside its temporary directory, fsynced, and moved into place with
os.replace, so a reader sees either nothing or the whole verified file, never a partial one.
Two requests (threads or processes) for the same key serialise on the key's lock, and the
second finds the first one's entry instead of downloading again. Recency is the file's mtime,
set on every hit, and the least recently used entries are removed when the cache passes its
byte budget. Entries used in the last `protect_recent_s` seconds are kept even over budget:
the request that just fetched them (say a LoRA and its extra_lora) is about to read them. Entries
whose lock is held at that moment are skipped too: someone is replacing them.
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
_STALE_TMP_S = 6 * 3600  # a work directory this old belongs to a process that died mid-download
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
        return sum(e.size for e in self.entries())

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove least recently used entries until the cache fits its budget; returns them.

        `keep` (the entry just produced or used) and entries used in the last
        `protect_recent_s` seconds are never removed, even when that leaves the cache over
        budget: a request is about to read them.
        """
        recent = time.time() - self.protect_recent_s
        entries = self.entries()
        total = sum(e.size for e in entries)
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
        self._remove_stale_workdirs()
        self._ready = True

    def _remove_stale_workdirs(self) -> None:
        cutoff = time.time() - _STALE_TMP_S
        for path in self.root.glob(f"{_TMP_PREFIX}*"):
            try:
                if path.stat().st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)
            except FileNotFoundError:
                pass

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """Exclusive per-key lock across threads and processes (each call opens its own fd)."""
        fd = os.open(self.root / "locks" / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @contextlib.contextmanager
    def _try_locked(self, key: str) -> Iterator[bool]:
        lock_path = self.root / "locks" / f"{key}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            yield True  # no lock directory: nobody can be holding the lock
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    yield False
                    return
                raise
            yield True
        finally:
            os.close(fd)


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
