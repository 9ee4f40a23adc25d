"""Turning Hugging Face, Replicate and CivitAI sources into downloads: URLs, tokens, lookups.

Each `download_*` function writes the raw file a source names (a .safetensors, or a tar/zip from
a trainer) to `dest` and returns a description for messages; weights.lora_source verifies it.

A bare `owner/name` (ReplicateSource with or_hf) follows the `owner/name` rule described in
weights.lora_reference: the Replicate model first, then the Hugging Face repo of that name.

Tokens (weights.lora_tokens: the request's hf_api_token / civitai_api_token, else HF_TOKEN,
CIVITAI_API_TOKEN, REPLICATE_API_TOKEN) are sent as Bearer tokens, only to their own service.

Environment (read at each call, so tests and the server can change it):
  HF_ENDPOINT (https://huggingface.co), FLUX_REPLICATE_BASE_URL (https://replicate.com),
  FLUX_CIVITAI_BASE_URL (https://civitai.com)       where those services are reached
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from pathlib import Path

from weights.archive import ONLY_SAFETENSORS
from weights.download import Auth, DownloadError, DownloadLimits, download_to_file, fetch_json, host_of
from weights.download import redact as _redact
from weights.lora_reference import (
    PICKLE_SUFFIXES,
    CivitaiSource,
    HfSource,
    LoraReferenceError,
    ReplicateSource,
)
from weights.lora_tokens import Credential, LoraTokens

log = logging.getLogger(__name__)


# --- Hugging Face ---


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _auth(base: str, credential: Credential) -> Auth:
    return Auth(host_of(base), credential.header, credential.origin)


def download_hf(source: HfSource, dest: Path, limits: DownloadLimits, tokens: LoraTokens) -> str:
    endpoint, credential = hf_endpoint(), tokens.for_hf()
    auth = _auth(endpoint, credential)
    filename = source.filename
    if filename is None:
        try:
            filename = _pick_hf_file(source, endpoint, auth, limits)
        except DownloadError as err:
            raise _hf_error(source, err, credential) from None
    url = "/".join(
        (
            endpoint,
            source.repo_id,
            "resolve",
            urllib.parse.quote(source.revision, safe=""),
            urllib.parse.quote(filename),
        )
    )
    try:
        download_to_file(url, dest, auth=auth, limits=limits)
    except DownloadError as err:
        raise _hf_error(source, err, credential, filename) from None
    return f"{filename} from Hugging Face repo {source.repo_id}"


def _pick_hf_file(source: HfSource, endpoint: str, auth: Auth, limits: DownloadLimits) -> str:
    url = f"{endpoint}/api/models/{source.repo_id}/revision/{urllib.parse.quote(source.revision, safe='')}"
    info = fetch_json(url, auth=auth, limits=limits)
    siblings = info.get("siblings") if isinstance(info, dict) else None
    if not isinstance(siblings, list):
        raise LoraReferenceError(f"Hugging Face did not list the files of {source.repo_id}")
    files = [s["rfilename"] for s in siblings if isinstance(s, dict) and isinstance(s.get("rfilename"), str)]
    weights = sorted(f for f in files if f.lower().endswith(".safetensors"))
    if len(weights) == 1:
        log.info("Hugging Face repo %s: using its one .safetensors file, %s", source.repo_id, weights[0])
        return weights[0]
    if not weights:
        pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
        extra = f" (it has {', '.join(pickles[:10])}; {ONLY_SAFETENSORS})" if pickles else ""
        raise LoraReferenceError(f"Hugging Face repo {source.repo_id} has no .safetensors file{extra}")
    raise LoraReferenceError(
        f"Hugging Face repo {source.repo_id} has {len(weights)} .safetensors files: {', '.join(weights[:30])}; "
        f"name one, e.g. {source.repo_id}/{weights[0]}"
    )


def _hf_error(
    source: HfSource, err: DownloadError, credential: Credential, filename: str | None = None
) -> DownloadError:
    target = f"{source.repo_id}/{filename}" if filename else f"repo {source.repo_id}"
    if err.kind == "auth":
        hint = (
            f"the {credential.origin} set cannot read it"
            if credential.token
            else f"the repo may be private or gated, or may not exist: set {credential.origin} to read a private repo"
        )
        message = f"Hugging Face refused access to {target} (HTTP {err.status}): {hint}"
    elif err.kind == "not_found":
        message = f"Hugging Face has no {target} at revision {source.revision} (HTTP {err.status}: {_redact(err.url)})"
    else:
        message = f"Hugging Face {target}: {err}"
    return DownloadError(err.kind, err.url, message, err.status)


# --- Replicate ---


def replicate_base() -> str:
    return (os.environ.get("FLUX_REPLICATE_BASE_URL") or "https://replicate.com").rstrip("/")


def download_replicate(
    source: ReplicateSource, dest: Path, limits: DownloadLimits, tokens: LoraTokens
) -> str:
    """A Replicate model's `_weights` URL redirects to the trained weights (a tar)."""
    base = replicate_base()
    credential = tokens.for_replicate()
    auth = _auth(base, credential)
    name = f"{source.owner}/{source.model}"
    path = f"{name}/versions/{source.version}/_weights" if source.version else f"{name}/_weights"
    try:
        download_to_file(f"{base}/{path}", dest, auth=auth, limits=limits)
    except DownloadError as err:
        # Only "no such model" sends a bare owner/name on to Hugging Face: a refusal (401/403)
        # means the Replicate model exists, and a same-named repo elsewhere is not what was meant.
        if source.or_hf and err.kind == "not_found":
            return _hf_after_replicate(source, dest, limits, tokens, err)
        raise _replicate_error(source, err, credential) from None
    return f"the weights of Replicate model {name}"


def _replicate_error(source: ReplicateSource, err: DownloadError, credential: Credential) -> DownloadError:
    name = f"{source.owner}/{source.model}"
    shown = f"{name}" + (f" version {source.version}" if source.version else "")
    if err.kind == "not_found":
        message = (
            f"Replicate has no weights for {shown} ({_redact(err.url)}): check the name; only "
            f"trained models have downloadable weights; a private model needs {credential.origin}"
        )
    elif err.kind == "auth":
        hint = (
            f"the {credential.origin} set cannot read it" if credential.token else f"set {credential.origin}"
        )
        message = f"Replicate refused access to {shown} (HTTP {err.status}): {hint}"
        if source.or_hf:
            message += f"; for the Hugging Face repo of that name write hf:{name}"
    else:
        message = f"Replicate model {shown}: {err}"
    return DownloadError(err.kind, err.url, message, err.status)


def _hf_after_replicate(
    source: ReplicateSource,
    dest: Path,
    limits: DownloadLimits,
    tokens: LoraTokens,
    replicate_err: DownloadError,
) -> str:
    name = f"{source.owner}/{source.model}"
    log.info(
        "%s is not a Replicate model (HTTP %s); trying the Hugging Face repo", name, replicate_err.status
    )
    try:
        return download_hf(HfSource(name), dest, limits, tokens)
    except DownloadError as err:
        if err.kind not in ("not_found", "auth"):
            raise
        raise LoraReferenceError(
            f"{name} was looked up on Replicate (HTTP {replicate_err.status}) and on Hugging Face "
            f"(HTTP {err.status}) and neither returned it; private models/repos need "
            f"{tokens.for_replicate().origin} or {tokens.for_hf().origin}; write replicate:owner/model or "
            "hf:owner/repo to pick one"
        ) from None


# --- CivitAI ---


def civitai_base() -> str:
    return (os.environ.get("FLUX_CIVITAI_BASE_URL") or "https://civitai.com").rstrip("/")


_LORA_TYPES = {"lora", "locon", "dora", "lycoris"}


def download_civitai(source: CivitaiSource, dest: Path, limits: DownloadLimits, tokens: LoraTokens) -> str:
    base = civitai_base()
    credential = tokens.for_civitai(source.url_token)
    auth = _auth(base, credential)
    version = source.version_id
    if version is None:
        version = _latest_civitai_version(source.model_id or "", base, auth, limits)
    query = source.query or "type=Model&format=SafeTensor"
    url = f"{base}/api/download/models/{version}?{query}"
    try:
        download_to_file(url, dest, auth=auth, limits=limits)
    except DownloadError as err:
        if err.kind == "auth":
            message = (
                f"CivitAI refused model version {version} with the token from {credential.origin}"
                if credential.token
                else f"CivitAI requires a login for model version {version}: set {credential.origin}"
            )
        elif err.kind == "not_found":
            message = (
                f"CivitAI has no model version {version} ({_redact(err.url)}); the number in a download "
                "link is a version id, not the model id of the model page"
            )
        else:
            message = f"CivitAI model version {version}: {err}"
        raise DownloadError(err.kind, err.url, message, err.status) from None
    return f"CivitAI model version {version}"


def _latest_civitai_version(model_id: str, base: str, auth: Auth, limits: DownloadLimits) -> str:
    try:
        info = fetch_json(f"{base}/api/v1/models/{model_id}", auth=auth, limits=limits)
    except DownloadError as err:
        if err.kind == "not_found":
            raise LoraReferenceError(f"CivitAI has no model {model_id}") from None
        raise
    if not isinstance(info, dict):
        raise LoraReferenceError(f"CivitAI gave no information for model {model_id}")
    kind = str(info.get("type") or "")
    if kind and kind.lower() not in _LORA_TYPES:
        raise LoraReferenceError(f"CivitAI model {model_id} is a {kind}, not a LoRA")
    versions = info.get("modelVersions")
    if not isinstance(versions, list) or not versions or not isinstance(versions[0], dict):
        raise LoraReferenceError(f"CivitAI model {model_id} has no versions to download")
    newest = versions[0]  # CivitAI lists the newest version first
    if "id" not in newest:
        raise LoraReferenceError(f"CivitAI model {model_id} has no versions to download")
    base_model = str(newest.get("baseModel") or "")
    if base_model and "flux" not in base_model.lower():
        log.warning(
            "CivitAI model %s version %s is made for %s, not FLUX", model_id, newest["id"], base_model
        )
    log.info("CivitAI model %s: using its newest version %s (%s)", model_id, newest["id"], newest.get("name"))
    return str(newest["id"])
