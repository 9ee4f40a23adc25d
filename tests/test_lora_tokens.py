"""The request's hf_api_token / civitai_api_token: each reaches only its own host, wins over the
environment's, is never logged or echoed, and keeps what it fetched to itself in the cache.

Hugging Face is served as 127.0.0.1 and CivitAI as localhost: one loopback server, two host names,
so a token sent to the wrong service would show up in the other's recorded headers.
"""

from __future__ import annotations

import logging

import pytest

from errors import UserInputError
from tests.http_fixture import FixtureServer, fixture_server
from tests.test_lora_sources import LORA, OTHER, _clean_env, cache, hf_repo
from weights.lora_cache import LoraCache
from weights.lora_source import fetch_lora
from weights.lora_tokens import LoraTokens

__all__ = ["_clean_env", "cache", "fixture_server"]

HF_INPUT, HF_ENV = "hf_from_input_1234", "hf_from_env_5678"
CIV_INPUT, CIV_ENV = "civ_from_input_1234", "civ_from_env_5678"


@pytest.fixture
def services(fixture_server: FixtureServer, monkeypatch: pytest.MonkeyPatch) -> FixtureServer:
    port = fixture_server.base.rsplit(":", 1)[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}/hf")
    monkeypatch.setenv("FLUX_REPLICATE_BASE_URL", f"http://127.0.0.1:{port}/replicate")
    monkeypatch.setenv("FLUX_CIVITAI_BASE_URL", f"http://localhost:{port}/civitai")
    return fixture_server


def private_hf(server: FixtureServer, repo: str, token: str) -> None:
    hf_repo(server, repo, {"lora.safetensors": LORA}, require_auth=f"Bearer {token}")
    server.routes[f"/hf/api/models/{repo}/revision/main"].require_auth = f"Bearer {token}"


def authorizations(server: FixtureServer, prefix: str) -> set[str | None]:
    return {r.headers.get("Authorization") for r in server.requests if r.path.startswith(prefix)}


def test_each_input_token_reaches_only_its_own_host(services: FixtureServer, cache: LoraCache) -> None:
    private_hf(services, "alice/private", HF_INPUT)
    services.add("/civitai/api/download/models/501", OTHER, require_auth=f"Bearer {CIV_INPUT}")
    port = services.base.rsplit(":", 1)[1]
    services.redirect("/replicate/bob/trained/_weights", f"http://localhost:{port}/cdn/t.tar?sig=1")
    services.add("/cdn/t.tar", LORA)
    tokens = LoraTokens(hf=HF_INPUT, civitai=CIV_INPUT)
    assert fetch_lora("hf:alice/private", cache, tokens=tokens).read_bytes() == LORA
    civitai = "https://civitai.com/models/77?modelVersionId=501"
    assert fetch_lora(civitai, cache, tokens=tokens).read_bytes() == OTHER
    assert fetch_lora("bob/trained", cache, tokens=tokens).read_bytes() == LORA
    assert authorizations(services, "/hf/") == {f"Bearer {HF_INPUT}"}
    assert authorizations(services, "/civitai/") == {f"Bearer {CIV_INPUT}"}
    assert authorizations(services, "/replicate/") == {None}  # Replicate takes neither
    assert authorizations(services, "/cdn/") == {None}  # nor does the CDN a download redirects to


def test_a_bare_name_sends_the_hf_token_only_to_hugging_face(
    services: FixtureServer, cache: LoraCache
) -> None:
    private_hf(services, "alice/private", HF_INPUT)  # Replicate has no such model: on to Hugging Face
    assert fetch_lora("alice/private", cache, tokens=LoraTokens(hf=HF_INPUT)).read_bytes() == LORA
    assert authorizations(services, "/replicate/") == {None}
    assert authorizations(services, "/hf/") == {f"Bearer {HF_INPUT}"}


def fetch_with_env_set(
    services: FixtureServer,
    cache: LoraCache,
    monkeypatch: pytest.MonkeyPatch,
    accepted: str,
    tokens: LoraTokens,
) -> None:
    """HF_TOKEN / CIVITAI_API_TOKEN set, hosts that take only `accepted`'s pair: both fetches work."""
    hf_token, civitai_token = {"env": (HF_ENV, CIV_ENV), "input": (HF_INPUT, CIV_INPUT)}[accepted]
    private_hf(services, "alice/private", hf_token)
    services.add("/civitai/api/download/models/501", OTHER, require_auth=f"Bearer {civitai_token}")
    monkeypatch.setenv("HF_TOKEN", HF_ENV)
    monkeypatch.setenv("CIVITAI_API_TOKEN", CIV_ENV)
    assert fetch_lora("hf:alice/private", cache, tokens=tokens).read_bytes() == LORA
    civitai = "https://civitai.com/models/7?modelVersionId=501"
    assert fetch_lora(civitai, cache, tokens=tokens).read_bytes() == OTHER


@pytest.mark.parametrize("empty", [None, "", "   "])
def test_the_environment_token_is_used_when_the_input_is_empty(
    services: FixtureServer, cache: LoraCache, monkeypatch: pytest.MonkeyPatch, empty: str | None
) -> None:
    fetch_with_env_set(services, cache, monkeypatch, "env", LoraTokens(hf=empty, civitai=empty))


def test_the_input_token_wins_over_the_environment(
    services: FixtureServer, cache: LoraCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetch_with_env_set(services, cache, monkeypatch, "input", LoraTokens(hf=HF_INPUT, civitai=CIV_INPUT))
    sent = authorizations(services, "/")
    assert f"Bearer {HF_ENV}" not in sent and f"Bearer {CIV_ENV}" not in sent


def test_tokens_never_appear_in_logs_or_errors(
    services: FixtureServer, cache: LoraCache, caplog: pytest.LogCaptureFixture
) -> None:
    private_hf(services, "alice/private", "hf_the_right_one")
    services.add("/civitai/api/download/models/501", OTHER, require_auth="Bearer civ_the_right_one")
    tokens = LoraTokens(hf=HF_INPUT, civitai=CIV_INPUT)
    messages = []
    with caplog.at_level(logging.DEBUG):
        for reference in (
            "hf:alice/private",
            "alice/private",
            "https://civitai.com/models/7?modelVersionId=501",
        ):
            with pytest.raises(UserInputError) as info:
                fetch_lora(reference, cache, tokens=tokens)
            messages.append(str(info.value))
        hf_repo(services, "alice/public", {"lora.safetensors": LORA})
        fetch_lora("hf:alice/public", cache, tokens=tokens)  # a success logs too
    assert "hf_api_token set cannot read it" in messages[0]  # says which token, not what it is
    assert "civitai_api_token" in messages[2]
    shown = "\n".join(messages + [caplog.text, repr(tokens)])
    assert HF_INPUT not in shown and CIV_INPUT not in shown


def test_a_malformed_token_is_refused_without_echoing_it() -> None:
    with pytest.raises(UserInputError) as info:
        LoraTokens(hf="hf_secret\nInjected: header")
    assert info.value.field == "hf_api_token"
    assert "hf_secret" not in str(info.value) and "visible ASCII" in str(info.value)
    assert LoraTokens(hf="  hf_padded \n").hf == "hf_padded"


def test_a_file_fetched_with_a_request_token_is_cached_for_that_token_only(
    services: FixtureServer, cache: LoraCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    private_hf(services, "alice/private", HF_INPUT)
    file_path = "/hf/alice/private/resolve/main/lora.safetensors"
    assert fetch_lora("hf:alice/private", cache, tokens=LoraTokens(hf=HF_INPUT)).read_bytes() == LORA
    # Without the token the cached copy is not handed out: the host is asked, and refuses.
    with pytest.raises(UserInputError, match="HTTP 401"):
        fetch_lora("hf:alice/private", cache)
    with pytest.raises(UserInputError, match="HTTP 401"):
        fetch_lora("hf:alice/private", cache, tokens=LoraTokens(hf="hf_someone_else"))
    assert fetch_lora("hf:alice/private", cache, tokens=LoraTokens(hf=HF_INPUT)).read_bytes() == LORA
    assert services.hits[file_path] == 1  # the same token again: a cache hit
    # The server's own token acts for every caller, so what it fetches is shared.
    monkeypatch.setenv("HF_TOKEN", HF_INPUT)
    fetch_lora("hf:alice/private", cache)
    fetch_lora("hf:alice/private", cache, tokens=LoraTokens())
    assert services.hits[file_path] == 2
