"""HTTP downloads, archives and the safetensors-only rule, against a loopback server."""

from __future__ import annotations

import base64
import pickle
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load, load_file

from errors import UserInputError
from tests.http_fixture import FixtureServer, fixture_server, safetensors_bytes, tar_bytes, zip_bytes
from weights.download import Auth, DownloadError, DownloadLimits, download_to_file
from weights.lora_cache import LoraCache
from weights.lora_source import fetch_lora

__all__ = ["fixture_server"]  # the pytest fixture, imported so tests here can request it

LORA = safetensors_bytes(seed=1)
OTHER = safetensors_bytes(seed=2)


@pytest.fixture(autouse=True)
def _no_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "REPLICATE_API_TOKEN", "CIVITAI_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def cache(tmp_path: Path) -> LoraCache:
    return LoraCache(tmp_path / "cache", max_bytes=10**9)


def leftovers(cache: LoraCache) -> list[str]:
    """Anything in the cache directory besides the lock folder: entries and temporary files."""
    if not cache.root.exists():
        return []
    return sorted(p.name for p in cache.root.iterdir() if p.name != "locks")


def same_tensors(path: Path, expected: bytes) -> None:
    got, want = load_file(str(path)), load(expected)
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


# --- plain HTTP ---


def test_200_safetensors_url(fixture_server: FixtureServer, cache: LoraCache) -> None:
    fixture_server.add("/lora.safetensors", LORA)
    path = fetch_lora(fixture_server.url("/lora.safetensors"), cache)
    assert path.read_bytes() == LORA
    assert path.parent == cache.root
    same_tensors(path, LORA)


def test_redirect_is_followed(fixture_server: FixtureServer, cache: LoraCache) -> None:
    fixture_server.redirect("/old", "/new/lora.safetensors", status=302)
    fixture_server.redirect("/new/lora.safetensors", fixture_server.url("/final"), status=307)
    fixture_server.add("/final", LORA)
    path = fetch_lora(fixture_server.url("/old"), cache)
    assert path.read_bytes() == LORA
    assert [fixture_server.hits[p] for p in ("/old", "/new/lora.safetensors", "/final")] == [1, 1, 1]


def test_token_is_not_forwarded_to_another_host(fixture_server: FixtureServer, tmp_path: Path) -> None:
    # 127.0.0.1 and localhost are the same server but different hosts, as a CDN would be.
    port = fixture_server.base.rsplit(":", 1)[1]
    fixture_server.redirect("/start", "/same-host?x=1")
    fixture_server.redirect("/same-host", f"http://localhost:{port}/cdn")
    fixture_server.add("/cdn", LORA)
    auth = Auth(host="127.0.0.1", header="Bearer secret", env_var="HF_TOKEN")
    result = download_to_file(fixture_server.url("/start"), tmp_path / "out", auth=auth)
    assert (tmp_path / "out").read_bytes() == LORA and result.bytes_written == len(LORA)
    assert fixture_server.seen("/start")[0].headers.get("Authorization") == "Bearer secret"
    assert fixture_server.seen("/same-host?x=1")[0].headers.get("Authorization") == "Bearer secret"
    assert "Authorization" not in fixture_server.seen("/cdn")[0].headers


def test_redirect_loop_is_an_error(fixture_server: FixtureServer, cache: LoraCache) -> None:
    fixture_server.redirect("/loop", "/loop")
    with pytest.raises(UserInputError, match="redirects"):
        fetch_lora(fixture_server.url("/loop"), cache)


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors_say_a_token_is_needed(
    fixture_server: FixtureServer, cache: LoraCache, status: int
) -> None:
    fixture_server.add("/private.safetensors", b"no", status=status)
    with pytest.raises(UserInputError) as info:
        fetch_lora(fixture_server.url("/private.safetensors"), cache, field="extra_lora")
    message = str(info.value)
    assert message.startswith("extra_lora: got ")
    assert f"HTTP {status}" in message and "token is needed" in message
    assert leftovers(cache) == []


def test_404_names_the_url(fixture_server: FixtureServer, cache: LoraCache) -> None:
    url = fixture_server.url("/missing/lora.safetensors")
    with pytest.raises(UserInputError) as info:
        fetch_lora(url + "?sig=abc", cache)
    message = str(info.value)
    assert "HTTP 404" in message and url in message
    assert "sig=abc" not in message.split("; ", 1)[1]  # signatures are not echoed in the explanation


def test_broken_off_download_leaves_nothing(fixture_server: FixtureServer, cache: LoraCache) -> None:
    fixture_server.add("/broken.safetensors", LORA, truncate_at=len(LORA) // 2)
    with pytest.raises(UserInputError, match="broke off"):
        fetch_lora(fixture_server.url("/broken.safetensors"), cache)
    assert leftovers(cache) == []
    # The same URL works once the server behaves, proving nothing stale was cached.
    fixture_server.add("/broken.safetensors", LORA)
    assert fetch_lora(fixture_server.url("/broken.safetensors"), cache).read_bytes() == LORA


def test_size_limit_from_content_length(fixture_server: FixtureServer, cache: LoraCache) -> None:
    fixture_server.add("/big.safetensors", LORA)
    limits = DownloadLimits(max_bytes=len(LORA) - 1)
    with pytest.raises(UserInputError, match="limit"):
        fetch_lora(fixture_server.url("/big.safetensors"), cache, limits=limits)
    assert leftovers(cache) == []


def test_size_limit_while_streaming(fixture_server: FixtureServer, tmp_path: Path) -> None:
    fixture_server.add("/big", b"x" * 3_000_000, send_length=False)
    with pytest.raises(DownloadError) as info:
        download_to_file(
            fixture_server.url("/big"), tmp_path / "out", limits=DownloadLimits(max_bytes=1_000_000)
        )
    assert info.value.kind == "too_large" and "stopped" in str(info.value)
    assert (tmp_path / "out").stat().st_size <= 1_000_000


def test_timeout_is_a_clean_error(fixture_server: FixtureServer, cache: LoraCache) -> None:
    fixture_server.add("/slow.safetensors", LORA, delay_s=1.0)
    with pytest.raises(UserInputError, match="could not reach"):
        fetch_lora(fixture_server.url("/slow.safetensors"), cache, limits=DownloadLimits(timeout_s=0.2))
    assert leftovers(cache) == []


def test_a_trickling_host_fails_at_the_deadline(fixture_server: FixtureServer, cache: LoraCache) -> None:
    import time

    # Headers at once, then a byte every 0.3 s: never silent for timeout_s, never done either.
    fixture_server.add("/drip.safetensors", LORA, drip_s=0.3)
    limits = DownloadLimits(timeout_s=10, deadline_s=1.0)
    started = time.monotonic()
    with pytest.raises(UserInputError, match=r"lora_weights: got .*/drip.safetensors.*deadline of 1 s"):
        fetch_lora(fixture_server.url("/drip.safetensors"), cache, limits=limits)
    assert time.monotonic() - started < 2.0
    assert leftovers(cache) == []
    fixture_server.add("/drip.safetensors", LORA)  # the host recovers: the next fetch works
    assert fetch_lora(fixture_server.url("/drip.safetensors"), cache, limits=limits).read_bytes() == LORA


def test_a_host_under_the_minimum_speed_fails(fixture_server: FixtureServer, tmp_path: Path) -> None:
    fixture_server.add("/drip", b"x" * 100, drip_s=0.1)
    limits = DownloadLimits(deadline_s=60, min_bytes_per_s=1024**2, speed_grace_s=0.5)
    with pytest.raises(DownloadError, match=r"too slow: .* under the minimum of 1 MiB/s") as info:
        download_to_file(fixture_server.url("/drip"), tmp_path / "out", limits=limits)
    assert info.value.kind == "too_slow"


def test_download_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from weights.lora_source import download_limits_from_env

    defaults = download_limits_from_env()
    # A file at the size limit, arriving at the minimum speed, makes the deadline.
    assert defaults.max_bytes / defaults.min_bytes_per_s < defaults.deadline_s
    monkeypatch.setenv("FLUX_LORA_DOWNLOAD_DEADLINE_S", "5")
    monkeypatch.setenv("FLUX_LORA_DOWNLOAD_MIN_MIB_S", "0.5")
    limits = download_limits_from_env()
    assert (limits.deadline_s, limits.min_bytes_per_s, limits.speed_grace_s) == (5, 0.5 * 1024**2, 2.5)


def test_unsupported_scheme(cache: LoraCache) -> None:
    with pytest.raises(UserInputError, match="only http"):
        fetch_lora("ftp://example.com/lora.safetensors", cache)


# --- only safetensors ---


class _Exploit:
    """Unpickling this would create a marker file; the tests prove it never happens."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def test_pickle_suffix_refused_before_download(fixture_server: FixtureServer, cache: LoraCache) -> None:
    for suffix in (".bin", ".pt", ".ckpt", ".pth"):
        fixture_server.add(f"/lora{suffix}", LORA)
        with pytest.raises(UserInputError, match=r"only \.safetensors"):
            fetch_lora(fixture_server.url(f"/lora{suffix}"), cache)
        assert fixture_server.hits[f"/lora{suffix}"] == 0


def test_pickle_content_refused_unread(
    fixture_server: FixtureServer, cache: LoraCache, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    fixture_server.add("/sneaky.safetensors", pickle.dumps(_Exploit(marker), protocol=4))
    fixture_server.add("/weights", pickle.dumps(_Exploit(marker), protocol=2))
    for path in ("/sneaky.safetensors", "/weights"):
        with pytest.raises(UserInputError) as info:
            fetch_lora(fixture_server.url(path), cache)
        assert "pickle" in str(info.value) and "only .safetensors" in str(info.value)
    assert not marker.exists()
    assert leftovers(cache) == []


def test_torch_zip_checkpoint_refused(
    fixture_server: FixtureServer, cache: LoraCache, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    payload = zip_bytes({"archive/data.pkl": pickle.dumps(_Exploit(marker)), "archive/version": b"3"})
    fixture_server.add("/model", payload)
    with pytest.raises(UserInputError, match="PyTorch/pickle"):
        fetch_lora(fixture_server.url("/model"), cache)
    assert not marker.exists()


def test_random_bytes_and_corrupt_safetensors_refused(
    fixture_server: FixtureServer, cache: LoraCache
) -> None:
    fixture_server.add("/junk.safetensors", b"<html>rate limited</html>" * 10)
    with pytest.raises(UserInputError, match="not a safetensors file"):
        fetch_lora(fixture_server.url("/junk.safetensors"), cache)
    # A valid header whose tensor data is cut short (a truncated upload, say).
    fixture_server.add("/cut.safetensors", LORA[:-16])
    with pytest.raises(UserInputError, match="outside the file"):
        fetch_lora(fixture_server.url("/cut.safetensors"), cache)
    assert leftovers(cache) == []


# --- archives ---


@pytest.mark.parametrize(
    "name,payload",
    [
        ("/weights.tar", tar_bytes({"output/lora.safetensors": LORA, "output/config.yaml": b"rank: 2"})),
        ("/weights.tar.gz", tar_bytes({"lora.safetensors": LORA}, compression="gz")),
        ("/weights.zip", zip_bytes({"lora.safetensors": LORA, "captions/1.txt": b"a TOK"})),
        ("/mac.zip", zip_bytes({"lora.safetensors": LORA, "__MACOSX/._lora.safetensors": b"\0\5\26\7"})),
    ],
)
def test_archive_with_one_safetensors(
    fixture_server: FixtureServer, cache: LoraCache, name: str, payload: bytes
) -> None:
    fixture_server.add(name, payload)
    path = fetch_lora(fixture_server.url(name), cache)
    assert path.read_bytes() == LORA
    assert leftovers(cache) == [path.name]  # the archive itself is not kept


@pytest.mark.parametrize("make", [tar_bytes, zip_bytes])
def test_archive_with_zero_or_two_safetensors(fixture_server: FixtureServer, cache: LoraCache, make) -> None:  # noqa: ANN001
    fixture_server.add("/none", make({"README.md": b"hi", "lora.bin": b"\x80\x02."}))
    fixture_server.add("/two", make({"a/one.safetensors": LORA, "b/two.safetensors": OTHER}))
    with pytest.raises(UserInputError) as info:
        fetch_lora(fixture_server.url("/none"), cache)
    assert "no .safetensors file" in str(info.value) and "README.md" in str(info.value)
    assert "lora.bin" in str(info.value)
    with pytest.raises(UserInputError) as info:
        fetch_lora(fixture_server.url("/two"), cache)
    assert "2 .safetensors files" in str(info.value)
    assert "a/one.safetensors" in str(info.value) and "b/two.safetensors" in str(info.value)
    assert leftovers(cache) == []


@pytest.mark.parametrize(
    "payload,why",
    [
        (tar_bytes({"../evil": b"x", "lora.safetensors": LORA}), "outside the archive"),
        (tar_bytes({"/etc/evil": b"x", "lora.safetensors": LORA}), "outside the archive"),
        (zip_bytes({"../evil": b"x", "lora.safetensors": LORA}), "outside the archive"),
        (tar_bytes({"lora.safetensors": LORA}, symlinks={"link": "/etc/passwd"}), "is a link"),
        (tar_bytes({"lora.safetensors": LORA}, hardlinks={"hard": "lora.safetensors"}), "is a link"),
        (zip_bytes({"lora.safetensors": LORA}, symlinks={"link": "/etc/passwd"}), "is a link"),
    ],
)
def test_unsafe_archives_refused(
    fixture_server: FixtureServer, cache: LoraCache, tmp_path: Path, payload: bytes, why: str
) -> None:
    fixture_server.add("/evil", payload)
    with pytest.raises(UserInputError, match=why):
        fetch_lora(fixture_server.url("/evil"), cache)
    assert not (tmp_path / "evil").exists() and not (cache.root.parent / "evil").exists()
    assert leftovers(cache) == []


def test_device_member_refused(fixture_server: FixtureServer, cache: LoraCache) -> None:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("dev/null")
        info.type = tarfile.CHRTYPE
        tar.addfile(info)
        info = tarfile.TarInfo("lora.safetensors")
        info.size = len(LORA)
        tar.addfile(info, io.BytesIO(LORA))
    fixture_server.add("/dev.tar", buf.getvalue())
    with pytest.raises(UserInputError, match="device"):
        fetch_lora(fixture_server.url("/dev.tar"), cache)


def test_nested_archive_is_not_opened(fixture_server: FixtureServer, cache: LoraCache) -> None:
    inner = tar_bytes({"lora.safetensors": LORA})
    fixture_server.add("/outer.tar", tar_bytes({"inner.tar": inner}))
    with pytest.raises(UserInputError) as info:
        fetch_lora(fixture_server.url("/outer.tar"), cache)
    assert "no .safetensors file" in str(info.value) and "inner.tar" in str(info.value)


def test_archive_member_size_limit(fixture_server: FixtureServer, cache: LoraCache) -> None:
    big = safetensors_bytes(seed=3, rank=64)
    payload = tar_bytes({"lora.safetensors": big}, compression="gz")
    assert len(payload) < len(big)  # the archive passes the download limit; its member does not
    fixture_server.add("/big.tar.gz", payload)
    limits = DownloadLimits(max_bytes=len(payload) + (len(big) - len(payload)) // 2)
    with pytest.raises(UserInputError, match="limit"):
        fetch_lora(fixture_server.url("/big.tar.gz"), cache, limits=limits)
    assert leftovers(cache) == []


# --- data: URLs ---


def test_data_url_safetensors_and_tar(cache: LoraCache) -> None:
    plain = "data:application/octet-stream;base64," + base64.b64encode(LORA).decode()
    assert fetch_lora(plain, cache).read_bytes() == LORA
    tarred = (
        "data:application/x-tar;base64," + base64.b64encode(tar_bytes({"x/lora.safetensors": OTHER})).decode()
    )
    assert fetch_lora(tarred, cache).read_bytes() == OTHER
    urlsafe = "data:;base64," + base64.urlsafe_b64encode(OTHER).decode().rstrip("=")
    assert fetch_lora(urlsafe, cache).read_bytes() == OTHER


def test_bad_data_urls(cache: LoraCache) -> None:
    with pytest.raises(UserInputError, match="not valid base64"):
        fetch_lora("data:;base64,@@@not-base64@@@", cache)
    with pytest.raises(UserInputError, match="comma"):
        fetch_lora("data:application/octet-stream;base64", cache)
    with pytest.raises(UserInputError, match="pickle"):
        fetch_lora("data:;base64," + base64.b64encode(pickle.dumps({"a": 1}, protocol=4)).decode(), cache)
    assert leftovers(cache) == []


def test_errors_never_echo_a_data_urls_payload(cache: LoraCache) -> None:
    payload = base64.b64encode(pickle.dumps(list(range(3000)), protocol=4)).decode()
    with pytest.raises(UserInputError) as info:
        fetch_lora("data:application/octet-stream;base64," + payload, cache, field="extra_lora")
    message = str(info.value)
    assert message.startswith("extra_lora: got 'data:application/octet-stream (")
    assert payload[:20] not in message and len(message) < 400
    with pytest.raises(UserInputError) as info:  # any long value is cut to a short excerpt
        fetch_lora("x" * 5000, cache)
    assert len(str(info.value)) < 500
    with pytest.raises(UserInputError) as info:  # a path too long for the file system is refused too
        fetch_lora("/" + "x" * 5000, cache)
    assert len(str(info.value)) < 500


def test_archive_that_unpacks_to_far_more_is_refused(fixture_server: FixtureServer, cache: LoraCache) -> None:
    limits = DownloadLimits(max_bytes=len(LORA) + 1024)
    padding = bytes(5 * limits.max_bytes)  # the LoRA fits the limit; the whole archive unpacks to far more
    payload = tar_bytes(
        {"lora.safetensors": LORA, "a.txt": padding[:1000], "b.txt": padding}, compression="gz"
    )
    fixture_server.add("/bomb.tar.gz", payload)
    assert len(payload) <= limits.max_bytes
    with pytest.raises(UserInputError, match="unpacks to more than"):
        fetch_lora(fixture_server.url("/bomb.tar.gz"), cache, limits=limits)
