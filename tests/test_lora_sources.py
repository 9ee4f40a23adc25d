"""Reference parsing and the Hugging Face / Replicate / CivitAI / local sources.

The services are faked on a loopback server: HF_ENDPOINT, FLUX_REPLICATE_BASE_URL and
FLUX_CIVITAI_BASE_URL point at it, with just the routes each lookup uses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from errors import UserInputError
from tests.http_fixture import FixtureServer, fixture_server, safetensors_bytes, tar_bytes, zip_bytes
from weights.lora_cache import LoraCache
from weights.lora_reference import (
    CivitaiSource,
    DataSource,
    HfSource,
    LocalSource,
    LoraReferenceError,
    ReplicateSource,
    UrlSource,
    parse_lora_reference,
)
from weights.lora_source import fetch_lora, source_key

__all__ = ["fixture_server"]

LORA = safetensors_bytes(seed=11)
OTHER = safetensors_bytes(seed=12)
VERSION = "5f" * 32  # a Replicate version id: 64 hex digits


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "REPLICATE_API_TOKEN",
        "CIVITAI_API_TOKEN",
        "HF_ENDPOINT",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def services(fixture_server: FixtureServer, monkeypatch: pytest.MonkeyPatch) -> FixtureServer:
    monkeypatch.setenv("HF_ENDPOINT", fixture_server.url("/hf"))
    monkeypatch.setenv("FLUX_REPLICATE_BASE_URL", fixture_server.url("/replicate"))
    monkeypatch.setenv("FLUX_CIVITAI_BASE_URL", fixture_server.url("/civitai"))
    return fixture_server


@pytest.fixture
def cache(tmp_path: Path) -> LoraCache:
    return LoraCache(tmp_path / "cache", max_bytes=10**9)


def hf_repo(
    server: FixtureServer, repo: str, files: dict[str, bytes], revision: str = "main", **options
) -> None:  # noqa: ANN003
    siblings = [{"rfilename": name} for name in files] + [{"rfilename": "README.md"}]
    server.add_json(
        f"/hf/api/models/{repo}/revision/{revision}", json.dumps({"id": repo, "siblings": siblings})
    )
    for name, body in files.items():
        server.add(f"/hf/{repo}/resolve/{revision}/{name}", body, **options)


# --- parsing (no network) ---


@pytest.mark.parametrize(
    "reference,expected",
    [
        ("alice/style", ReplicateSource("alice", "style", or_hf=True)),
        ("  alice/style  ", ReplicateSource("alice", "style", or_hf=True)),
        ("hf:alice/style", HfSource("alice/style")),
        ("alice/style/sub/lora.safetensors", HfSource("alice/style", filename="sub/lora.safetensors")),
        ("huggingface.co/alice/style", HfSource("alice/style")),
        ("https://huggingface.co/alice/style/", HfSource("alice/style")),
        ("huggingface.co/alice/style/lora.safetensors", HfSource("alice/style", filename="lora.safetensors")),
        (
            "https://huggingface.co/alice/style/blob/v2/lora.safetensors",
            HfSource("alice/style", revision="v2", filename="lora.safetensors"),
        ),
        (
            "https://huggingface.co/alice/style/resolve/main/a%20b.safetensors?download=true",
            HfSource("alice/style", filename="a b.safetensors"),
        ),
        ("https://hf.co/alice/style/tree/dev", HfSource("alice/style", revision="dev")),
        ("replicate:bob/trained", ReplicateSource("bob", "trained")),
        (f"bob/trained/{VERSION}", ReplicateSource("bob", "trained", VERSION)),
        (f"bob/trained:{VERSION}", ReplicateSource("bob", "trained", VERSION)),
        ("replicate.com/bob/trained", ReplicateSource("bob", "trained")),
        (f"https://replicate.com/bob/trained/versions/{VERSION}", ReplicateSource("bob", "trained", VERSION)),
        (
            f"https://replicate.com/bob/trained/versions/{VERSION}/_weights",
            ReplicateSource("bob", "trained", VERSION),
        ),
        ("https://replicate.com/bob/trained/_weights", ReplicateSource("bob", "trained")),
        ("https://civitai.com/models/1234", CivitaiSource("1234", None)),
        ("https://civitai.com/models/1234/some-slug?modelVersionId=99", CivitaiSource("1234", "99")),
        (
            "https://civitai.com/api/download/models/99?type=Model&token=SECRET",
            CivitaiSource(None, "99", "type=Model"),
        ),
        (
            "https://replicate.delivery/yhqm/abc/trained_model.tar",
            UrlSource("https://replicate.delivery/yhqm/abc/trained_model.tar"),
        ),
        ("HTTPS://Example.COM/x/lora.safetensors#frag", UrlSource("https://example.com/x/lora.safetensors")),
        ("data:;base64,AAAA", DataSource("data:;base64,AAAA")),
        ("/abs/lora.safetensors", LocalSource(Path("/abs/lora.safetensors"))),
        ("./rel/lora.safetensors", LocalSource(Path("rel/lora.safetensors"))),
        ("file:///abs/my%20lora.safetensors", LocalSource(Path("/abs/my lora.safetensors"))),
    ],
)
def test_parse(reference: str, expected: object) -> None:
    assert parse_lora_reference(reference) == expected


@pytest.mark.parametrize(
    "reference,why",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("justaword", "no such local file"),
        ("dir/lora.safetensors", "no such local file"),
        ("a/b/c/d", "expected a Hugging Face repo"),
        ("alice/style/pytorch_lora_weights.bin", "pickle format"),
        ("https://example.com/model.ckpt", "pickle format"),
        ("hf:alice/style/lora.pt", "pickle format"),
        ("ftp://example.com/lora.safetensors", "only http"),
        ("huggingface.co/datasets/alice/x", "only Hugging Face model repos"),
        ("huggingface.co/alice", "huggingface.co/owner/repo"),
        ("https://huggingface.co/alice/style/blob/main", "no file"),
        ("https://civitai.com/user/someone", "civitai.com/models/<id>"),
        ("https://civitai.com/models/12?modelVersionId=abc", "must be a number"),
        ("replicate:bob/trained/notahexversion", "not a Replicate version id"),
        ("al..ice/style", "not a valid owner"),
        ("hf:alice/style/../x.safetensors", "not a valid file name"),
        ("hf:alice/../etc/passwd.safetensors", "not a valid owner"),
    ],
)
def test_parse_errors(reference: str, why: str) -> None:
    with pytest.raises(LoraReferenceError, match=why):
        parse_lora_reference(reference)


def test_bad_reference_becomes_user_input_error(cache: LoraCache) -> None:
    with pytest.raises(UserInputError) as info:
        fetch_lora("a/b/c/d", cache, field="extra_lora")
    assert info.value.field == "extra_lora" and info.value.value == "a/b/c/d"
    assert str(info.value).startswith("extra_lora: got 'a/b/c/d'; ")
    with pytest.raises(UserInputError, match="expected a string"):
        fetch_lora(None, cache)  # type: ignore[arg-type]


def test_equivalent_hf_references_share_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = {
        source_key(parse_lora_reference(r))
        for r in (
            "hf:alice/style",
            "huggingface.co/alice/style",
            "https://huggingface.co/alice/style/tree/main",
        )
    }
    assert len(keys) == 1
    assert source_key(parse_lora_reference("alice/style")) not in keys  # a Replicate model first
    assert source_key(parse_lora_reference("hf:alice/style/a.safetensors")) not in keys


# --- Hugging Face ---


def test_hf_repo_with_one_safetensors(services: FixtureServer, cache: LoraCache) -> None:
    hf_repo(services, "alice/style", {"lora.safetensors": LORA})
    path = fetch_lora("hf:alice/style", cache)
    assert path.read_bytes() == LORA
    assert services.hits["/hf/api/models/alice/style/revision/main"] == 1


def test_hf_url_forms_download_the_named_file(services: FixtureServer, cache: LoraCache) -> None:
    hf_repo(services, "alice/style", {"a.safetensors": LORA, "sub/b.safetensors": OTHER}, revision="v2")
    hf_repo(services, "alice/style", {"a.safetensors": LORA, "sub/b.safetensors": OTHER})
    assert (
        fetch_lora("https://huggingface.co/alice/style/blob/v2/sub/b.safetensors", cache).read_bytes()
        == OTHER
    )
    assert fetch_lora("alice/style/a.safetensors", cache).read_bytes() == LORA
    assert fetch_lora("huggingface.co/alice/style/sub/b.safetensors", cache).read_bytes() == OTHER
    assert services.hits["/hf/alice/style/resolve/v2/sub/b.safetensors"] == 1
    assert services.hits["/hf/alice/style/resolve/main/sub/b.safetensors"] == 1
    # A named file needs no listing.
    assert services.hits["/hf/api/models/alice/style/revision/main"] == 0


def test_hf_repo_with_several_files_lists_them(services: FixtureServer, cache: LoraCache) -> None:
    hf_repo(services, "alice/multi", {"one.safetensors": LORA, "two.safetensors": OTHER})
    with pytest.raises(UserInputError) as info:
        fetch_lora("huggingface.co/alice/multi", cache)
    message = str(info.value)
    assert "2 .safetensors files" in message and "one.safetensors" in message and "two.safetensors" in message
    assert "alice/multi/one.safetensors" in message  # tells the user how to name one


def test_hf_repo_with_only_pickles(services: FixtureServer, cache: LoraCache) -> None:
    hf_repo(services, "alice/old", {"pytorch_lora_weights.bin": b"\x80\x02."})
    with pytest.raises(UserInputError) as info:
        fetch_lora("hf:alice/old", cache)
    assert "no .safetensors file" in str(info.value) and "pytorch_lora_weights.bin" in str(info.value)
    assert services.hits["/hf/alice/old/resolve/main/pytorch_lora_weights.bin"] == 0


def test_hf_token_sent_for_private_repo(
    services: FixtureServer, cache: LoraCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf_repo(services, "alice/private", {"lora.safetensors": LORA}, require_auth="Bearer hf_secret")
    services.routes["/hf/api/models/alice/private/revision/main"].require_auth = "Bearer hf_secret"
    with pytest.raises(UserInputError) as info:
        fetch_lora("hf:alice/private", cache)
    assert "HF_TOKEN" in str(info.value) and "HTTP 401" in str(info.value)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert fetch_lora("hf:alice/private", cache).read_bytes() == LORA
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(UserInputError, match="HF_TOKEN set cannot read"):
        fetch_lora("hf:alice/private/lora.safetensors", cache)


def test_hf_cdn_redirect_drops_the_token(
    services: FixtureServer, cache: LoraCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = services.base.rsplit(":", 1)[1]
    services.redirect(
        "/hf/alice/big/resolve/main/lora.safetensors", f"http://localhost:{port}/cdn/blob?sig=1"
    )
    services.add("/cdn/blob", LORA)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert fetch_lora("hf:alice/big/lora.safetensors", cache).read_bytes() == LORA
    assert services.seen("/hf/alice/big/resolve/main/lora.safetensors")[0].headers["Authorization"] == (
        "Bearer hf_secret"
    )
    assert "Authorization" not in services.seen("/cdn/blob?sig=1")[0].headers


def test_hf_missing_file_names_it(services: FixtureServer, cache: LoraCache) -> None:
    hf_repo(services, "alice/style", {"lora.safetensors": LORA})
    with pytest.raises(UserInputError) as info:
        fetch_lora("hf:alice/style/nope.safetensors", cache)
    assert "alice/style/nope.safetensors" in str(info.value) and "HTTP 404" in str(info.value)


# --- owner/name: Replicate first (as on Replicate), then Hugging Face ---


def test_bare_name_prefers_replicate(services: FixtureServer, cache: LoraCache) -> None:
    hf_repo(services, "carol/both", {"lora.safetensors": LORA})
    services.redirect("/replicate/carol/both/_weights", "/delivery/xyz/trained_model.tar")
    services.add("/delivery/xyz/trained_model.tar", tar_bytes({"lora.safetensors": OTHER}))
    assert fetch_lora("carol/both", cache).read_bytes() == OTHER
    assert services.hits["/hf/api/models/carol/both/revision/main"] == 0
    # Naming the host picks Hugging Face.
    assert fetch_lora("hf:carol/both", cache).read_bytes() == LORA
    assert fetch_lora("huggingface.co/carol/both", cache).read_bytes() == LORA


def test_bare_name_falls_back_to_hugging_face(services: FixtureServer, cache: LoraCache) -> None:
    hf_repo(services, "alice/style", {"lora.safetensors": LORA})  # Replicate answers 404 for it
    assert fetch_lora("alice/style", cache).read_bytes() == LORA
    assert services.hits["/replicate/alice/style/_weights"] == 1


def test_bare_name_refused_by_replicate_is_not_looked_up_elsewhere(
    services: FixtureServer, cache: LoraCache
) -> None:
    hf_repo(services, "dan/private", {"lora.safetensors": LORA})
    services.add("/replicate/dan/private/_weights", b"no", status=401)
    with pytest.raises(UserInputError) as info:
        fetch_lora("dan/private", cache)
    assert "REPLICATE_API_TOKEN" in str(info.value) and "hf:dan/private" in str(info.value)
    assert services.hits["/hf/api/models/dan/private/revision/main"] == 0


def test_bare_name_on_neither_names_both(services: FixtureServer, cache: LoraCache) -> None:
    with pytest.raises(UserInputError) as info:
        fetch_lora("nobody/nothing", cache)
    message = str(info.value)
    assert "Replicate (HTTP 404)" in message and "Hugging Face (HTTP 404)" in message
    assert "hf:owner/repo" in message and "replicate:owner/model" in message


# --- Replicate ---


def test_replicate_version_and_token(
    services: FixtureServer, cache: LoraCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = f"/replicate/bob/trained/versions/{VERSION}/_weights"
    services.add(weights, zip_bytes({"lora.safetensors": OTHER}), require_auth="Bearer r8_secret")
    with pytest.raises(UserInputError, match="REPLICATE_API_TOKEN"):
        fetch_lora(f"https://replicate.com/bob/trained/versions/{VERSION}", cache)
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_secret")
    assert fetch_lora(f"bob/trained/{VERSION}", cache, field="replicate_weights").read_bytes() == OTHER
    assert services.hits["/hf/api/models/bob/trained/revision/main"] == 0  # a version id means Replicate


def test_replicate_missing_model(services: FixtureServer, cache: LoraCache) -> None:
    with pytest.raises(UserInputError) as info:
        fetch_lora("replicate:bob/untrained", cache)
    assert "Replicate has no weights for bob/untrained" in str(info.value)
    assert services.hits["/hf/api/models/bob/untrained/revision/main"] == 0


# --- CivitAI ---


def civitai_model(server: FixtureServer, model_id: str, kind: str = "LORA") -> None:
    versions = [{"id": 502, "name": "v2", "baseModel": "Flux.1 D"}, {"id": 501, "name": "v1"}]
    server.add_json(
        f"/civitai/api/v1/models/{model_id}",
        json.dumps({"id": model_id, "type": kind, "modelVersions": versions}),
    )


def test_civitai_model_resolves_newest_version(services: FixtureServer, cache: LoraCache) -> None:
    civitai_model(services, "77")
    services.redirect("/civitai/api/download/models/502", "/civitai-cdn/file?sig=x")
    services.add("/civitai-cdn/file", LORA)
    assert fetch_lora("https://civitai.com/models/77/cool-style", cache).read_bytes() == LORA
    download = services.seen("/civitai/api/download/models/502?type=Model&format=SafeTensor")
    assert len(download) == 1


def test_civitai_version_needs_no_lookup_and_sends_token(
    services: FixtureServer, cache: LoraCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    services.add("/civitai/api/download/models/501", OTHER, require_auth="Bearer civ_secret")
    with pytest.raises(UserInputError, match="CIVITAI_API_TOKEN"):
        fetch_lora("https://civitai.com/models/77?modelVersionId=501", cache)
    monkeypatch.setenv("CIVITAI_API_TOKEN", "civ_secret")
    assert fetch_lora("https://civitai.com/models/77?modelVersionId=501", cache).read_bytes() == OTHER
    assert services.hits["/civitai/api/v1/models/77"] == 0
    # A token pasted into a download URL is used as well, and is not part of the cache key.
    monkeypatch.delenv("CIVITAI_API_TOKEN")
    services.add("/civitai/api/download/models/600", LORA, require_auth="Bearer pasted")
    source = parse_lora_reference("https://civitai.com/api/download/models/600?token=pasted")
    assert "pasted" not in source_key(source) and "pasted" not in repr(source)
    assert fetch_lora("https://civitai.com/api/download/models/600?token=pasted", cache).read_bytes() == LORA
    with pytest.raises(UserInputError) as info:
        fetch_lora("https://civitai.com/api/download/models/601?type=Model&token=pasted", cache)
    assert "pasted" not in str(info.value) and "601?type=Model&token=***" in str(info.value)


def test_civitai_refuses_non_lora_and_missing(services: FixtureServer, cache: LoraCache) -> None:
    civitai_model(services, "88", kind="Checkpoint")
    with pytest.raises(UserInputError, match="is a Checkpoint, not a LoRA"):
        fetch_lora("https://civitai.com/models/88", cache)
    with pytest.raises(UserInputError, match="CivitAI has no model 89"):
        fetch_lora("https://civitai.com/models/89", cache)
    with pytest.raises(UserInputError, match="version id, not the model id"):
        fetch_lora("https://civitai.com/api/download/models/90", cache)


# --- local files ---


def test_local_file_is_used_in_place(
    tmp_path: Path, cache: LoraCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    lora = tmp_path / "mine.safetensors"
    lora.write_bytes(LORA)
    assert fetch_lora(str(lora), cache) == lora
    assert fetch_lora(f"file://{lora}", cache) == lora
    monkeypatch.chdir(tmp_path)
    assert fetch_lora("mine.safetensors", cache) == Path("mine.safetensors")
    assert not cache.root.exists() or not list(cache.root.glob("*.safetensors"))


def test_local_archive_and_folder(tmp_path: Path, cache: LoraCache) -> None:
    archive = tmp_path / "trained.tar"
    archive.write_bytes(tar_bytes({"output/lora.safetensors": LORA, "output/config.yaml": b"x"}))
    first = fetch_lora(str(archive), cache)
    assert first.read_bytes() == LORA and first.parent == cache.root
    assert fetch_lora(str(archive), cache) == first and cache.misses == 1
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(OTHER)
    (folder / "README.md").write_text("hi")
    assert fetch_lora(str(folder), cache).read_bytes() == OTHER
    (folder / "second.safetensors").write_bytes(LORA)
    with pytest.raises(UserInputError, match="exactly one .safetensors"):
        fetch_lora(str(folder), cache)


def test_local_errors(tmp_path: Path, cache: LoraCache) -> None:
    with pytest.raises(UserInputError, match="no such local file"):
        fetch_lora(str(tmp_path / "missing.safetensors"), cache)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(UserInputError, match=r"only \.safetensors"):
        fetch_lora(str(ckpt), cache)
    renamed = tmp_path / "renamed.safetensors"
    renamed.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(UserInputError, match="PyTorch/pickle"):
        fetch_lora(str(renamed), cache)
    assert os.path.exists(renamed)  # the user's file is left alone
    good = tmp_path / "good.safetensors"
    good.write_bytes(LORA)
    with pytest.raises(UserInputError, match="local paths are not accepted here"):
        fetch_lora(str(good), cache, allow_local=False)
