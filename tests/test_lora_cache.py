"""The LoRA disk cache: hits cost no request, concurrent fetches download once, LRU eviction."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from errors import UserInputError
from tests.http_fixture import FixtureServer, fixture_server, safetensors_bytes
from weights.lora_cache import GB, LoraCache, default_lora_cache
from weights.lora_source import fetch_lora

__all__ = ["fixture_server"]

A, B, C = (safetensors_bytes(seed=s) for s in (21, 22, 23))


def test_cache_hit_makes_no_request(fixture_server: FixtureServer, tmp_path: Path) -> None:
    fixture_server.add("/a.safetensors", A)
    cache = LoraCache(tmp_path, max_bytes=10**9)
    first = fetch_lora(fixture_server.url("/a.safetensors"), cache)
    second = fetch_lora(fixture_server.url("/a.safetensors"), cache)
    # A fresh cache object on the same directory (a restarted server) also hits.
    third = fetch_lora(fixture_server.url("/a.safetensors"), LoraCache(tmp_path, max_bytes=10**9))
    assert first == second == third and first.read_bytes() == A
    assert fixture_server.hits["/a.safetensors"] == 1
    assert (cache.hits, cache.misses) == (1, 1)


def test_same_file_under_different_urls_is_keyed_by_url(
    fixture_server: FixtureServer, tmp_path: Path
) -> None:
    fixture_server.add("/a.safetensors", A)
    cache = LoraCache(tmp_path, max_bytes=10**9)
    one = fetch_lora(fixture_server.url("/a.safetensors"), cache)
    two = fetch_lora(fixture_server.url("/a.safetensors?v=2"), cache)
    assert one != two and fixture_server.hits["/a.safetensors"] == 2


def test_concurrent_fetches_download_once(fixture_server: FixtureServer, tmp_path: Path) -> None:
    fixture_server.add("/slow.safetensors", A, delay_s=0.3)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            # Separate cache objects: what two processes would have; they share only the directory.
            results.append(fetch_lora(fixture_server.url("/slow.safetensors"), LoraCache(tmp_path, 10**9)))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert len(results) == 3 and len(set(results)) == 1 and results[0].read_bytes() == A
    assert fixture_server.hits["/slow.safetensors"] == 1


_OTHER_PROCESS = """
import sys, time
from pathlib import Path
from weights.lora_cache import LoraCache

root, started = Path(sys.argv[1]), Path(sys.argv[2])

def produce(workdir):
    started.write_text("in")  # tells the test the lock is held
    time.sleep(0.5)
    (workdir / "f").write_bytes(b"from the other process")
    return workdir / "f"

LoraCache(root, 10**9).get_or_create("shared", produce)
"""


def test_another_process_producing_the_same_key_is_waited_for(tmp_path: Path) -> None:
    started = tmp_path / "started"
    root = tmp_path / "cache"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", _OTHER_PROCESS, str(root), str(started)], cwd=repo)
    try:
        deadline = time.monotonic() + 20
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "helper process did not start"
            time.sleep(0.02)

        def must_not_run(workdir: Path) -> Path:
            raise AssertionError("downloaded again although another process was producing it")

        path = LoraCache(root, 10**9).get_or_create("shared", must_not_run)
        assert path.read_bytes() == b"from the other process"
    finally:
        assert proc.wait(timeout=20) == 0


def test_failed_producer_leaves_no_trace_and_releases_the_lock(tmp_path: Path) -> None:
    cache = LoraCache(tmp_path, max_bytes=10**9)

    def broken(workdir: Path) -> Path:
        (workdir / "partial").write_bytes(b"half")
        raise RuntimeError("connection lost")

    with pytest.raises(RuntimeError):
        cache.get_or_create("url:x", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locks"]

    path = cache.get_or_create("url:x", producer(A))  # would hang if the lock were still held
    assert path.read_bytes() == A and path == cache.path_for("url:x")


def producer(body: bytes):  # noqa: ANN201
    """A get_or_create producer that writes `body` into its work directory."""

    def produce(workdir: Path) -> Path:
        (workdir / "f").write_bytes(body)
        return workdir / "f"

    return produce


def _set_last_used(path: Path, seconds_ago: float) -> None:
    t = time.time() - seconds_ago
    os.utime(path, (t, t))


def test_lru_eviction_under_a_tiny_budget(fixture_server: FixtureServer, tmp_path: Path) -> None:
    for name, body in (("a", A), ("b", B), ("c", C)):
        fixture_server.add(f"/{name}.safetensors", body)
    size = len(A)
    assert len(B) == len(C) == size
    cache = LoraCache(tmp_path, max_bytes=2 * size + size // 2, protect_recent_s=30)
    path_a = fetch_lora(fixture_server.url("/a.safetensors"), cache)
    path_b = fetch_lora(fixture_server.url("/b.safetensors"), cache)
    _set_last_used(path_a, 300)
    _set_last_used(path_b, 200)
    # A hit on a makes b the least recently used.
    assert fetch_lora(fixture_server.url("/a.safetensors"), cache) == path_a
    path_c = fetch_lora(fixture_server.url("/c.safetensors"), cache)
    assert path_a.exists() and path_c.exists() and not path_b.exists()
    assert cache.total_bytes() <= cache.max_bytes
    # b comes back by downloading again.
    assert fetch_lora(fixture_server.url("/b.safetensors"), cache).read_bytes() == B
    assert fixture_server.hits["/b.safetensors"] == 2


def test_recent_entries_survive_until_they_age(tmp_path: Path) -> None:
    cache = LoraCache(tmp_path, max_bytes=1, protect_recent_s=60)

    first = cache.get_or_create("k1", producer(A))
    second = cache.get_or_create("k2", producer(B))  # both over the 1-byte budget, both just used
    assert first.exists() and second.exists()
    _set_last_used(first, 120)
    assert cache.evict(keep=second) == [first]
    assert not first.exists() and second.exists()


def test_eviction_skips_an_entry_being_replaced(tmp_path: Path) -> None:
    cache = LoraCache(tmp_path, max_bytes=1, protect_recent_s=0)
    path = cache.get_or_create("k", producer(A))
    with cache._locked(cache.key_for("k")):  # another producer holds this key
        assert cache.evict() == []
    assert cache.evict() == [path]


def test_abandoned_work_directories_are_cleaned(tmp_path: Path) -> None:
    abandoned = tmp_path / ".tmp-deadbeef-x"  # its producer died: nobody holds its key's lock
    abandoned.mkdir()
    (abandoned / "download").write_bytes(b"half")
    in_progress = tmp_path / ".tmp-cafe-y"
    in_progress.mkdir()
    cache = LoraCache(tmp_path, max_bytes=10**9)
    with cache._locked("cafe"):  # a download in progress (here or in another process) holds its key
        cache.get_or_create("k", producer(A))
        assert not abandoned.exists() and in_progress.exists()
    assert cache.remove_abandoned() == [in_progress]


def test_default_cache_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUX_LORA_CACHE_DIR", str(tmp_path / "loras"))
    monkeypatch.setenv("FLUX_LORA_CACHE_MAX_GB", "0.5")
    cache = default_lora_cache()
    assert cache.root == tmp_path / "loras" and cache.max_bytes == GB // 2
    monkeypatch.delenv("FLUX_LORA_CACHE_DIR")
    monkeypatch.delenv("FLUX_LORA_CACHE_MAX_GB")
    cache = default_lora_cache()
    assert cache.root.parts[-2:] == ("flux-cog", "loras") and cache.max_bytes == 20 * GB
    monkeypatch.setenv("FLUX_LORA_CACHE_MAX_GB", "lots")
    with pytest.raises(ValueError, match="FLUX_LORA_CACHE_MAX_GB"):
        default_lora_cache()


def test_bad_download_is_not_cached(fixture_server: FixtureServer, tmp_path: Path) -> None:
    fixture_server.add("/flaky.safetensors", b"not yet", status=503)
    cache = LoraCache(tmp_path, max_bytes=10**9)
    with pytest.raises(UserInputError, match="HTTP 503"):
        fetch_lora(fixture_server.url("/flaky.safetensors"), cache)
    fixture_server.add("/flaky.safetensors", A)
    assert fetch_lora(fixture_server.url("/flaky.safetensors"), cache).read_bytes() == A
    assert cache.misses == 2


def test_producer_must_not_hand_over_an_outside_file(tmp_path: Path) -> None:
    outside = tmp_path / "users_own.safetensors"
    outside.write_bytes(A)
    cache = LoraCache(tmp_path / "cache", max_bytes=10**9)
    with pytest.raises(ValueError, match="inside"):
        cache.get_or_create("k", lambda workdir: outside)
    assert outside.read_bytes() == A and cache.lookup("k") is None
