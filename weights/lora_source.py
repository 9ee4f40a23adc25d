"""From a user's LoRA reference string to a verified local .safetensors file.

`fetch_lora(reference, cache)` is the one entry point. A reference is one of:

  local path         /abs/x.safetensors, ./x.safetensors, ~/x.safetensors, file:///abs/x, or a
                     relative path naming an existing file; also a .tar/.zip holding one
                     .safetensors, or a folder holding exactly one .safetensors
  https URL          to a .safetensors, or to a .tar/.zip holding exactly one (trainer output)
  Hugging Face       hf:owner/repo[/file.safetensors], huggingface.co/owner/repo[/file.safetensors],
                     https://huggingface.co/owner/repo/(blob|resolve|tree)/<rev>[/<file>],
                     owner/repo/file.safetensors (a path ending in .safetensors is a file in a repo)
  Replicate          replicate:owner/model[/version], owner/model/<hex version id>,
                     owner/model:<version>, replicate.com/owner/model[/versions/<id>][/_weights],
                     https://replicate.delivery/... (a plain URL)
  CivitAI            https://civitai.com/models/<id>[/<slug>][?modelVersionId=<v>],
                     https://civitai.com/api/download/models/<versionId>
  data: URL          base64 (or percent-encoded) bytes of a .safetensors, .tar or .zip

The `owner/name` rule: both Hugging Face and Replicate use this form. A bare `owner/name` is
looked up on Hugging Face first; when Hugging Face answers that it has no such repo (404, or 401,
which it also returns for a missing repo), the Replicate model `owner/name` is tried. The error
then names both. `hf:` or `replicate:` in front picks one and skips the other lookup.

Nothing but safetensors gets through: what arrives is classified by its bytes (weights.archive),
pickle files are refused unread, and the result is checked before it enters the cache.

Remote results are cached (weights.lora_cache) under a key built from the normalised reference,
so a repeated reference costs no network request. A reference that follows something mutable
(a repo's `main`, a model's latest version) is therefore not re-fetched while it stays cached;
name a revision or version to pin it.

Environment (read at each call, so tests and the server can change it):
  HF_TOKEN, REPLICATE_API_TOKEN, CIVITAI_API_TOKEN  sent as Bearer tokens, only to their service
  HF_ENDPOINT (https://huggingface.co), FLUX_REPLICATE_BASE_URL (https://replicate.com),
  FLUX_CIVITAI_BASE_URL (https://civitai.com)       where those services are reached
  FLUX_LORA_MAX_DOWNLOAD_GB (2), FLUX_LORA_DOWNLOAD_TIMEOUT_S (60)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from weights.archive import (
    ONLY_SAFETENSORS,
    ArchiveError,
    NotSafetensorsError,
    extract_single_safetensors,
    refusal_for,
    sniff,
    verify_safetensors,
)
from weights.download import GIB, Auth, DownloadError, DownloadLimits, download_to_file, fetch_json, host_of
from weights.download import redact as _redact
from weights.errors import UserInputError
from weights.lora_cache import LoraCache

log = logging.getLogger(__name__)

_REMOTE_FORMS = (
    "a Hugging Face repo (owner/repo, huggingface.co/owner/repo[/file.safetensors], hf:owner/repo), "
    "a Replicate model (owner/model[/version], replicate.com/owner/model, replicate:owner/model), "
    "a CivitAI model URL (https://civitai.com/models/<id>), an https URL to a .safetensors, .tar or .zip"
)
ACCEPTED = f"expected {_REMOTE_FORMS}, a data: URL, or a local path"
ACCEPTED_REMOTE = f"expected {_REMOTE_FORMS}, or a data: URL"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_HF_HOSTS = ("huggingface.co", "www.huggingface.co", "hf.co")
_REPLICATE_HOSTS = ("replicate.com", "www.replicate.com")
_CIVITAI_HOSTS = ("civitai.com", "www.civitai.com")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_VERSION = re.compile(r"^[0-9a-f]{12,64}$")


class LoraReferenceError(ValueError):
    """A reference that cannot be used; fetch_lora turns it into UserInputError."""


# --- what a reference names ---


@dataclass(frozen=True)
class LocalSource:
    path: Path


@dataclass(frozen=True)
class UrlSource:
    url: str


@dataclass(frozen=True)
class DataSource:
    url: str


@dataclass(frozen=True)
class HfSource:
    repo_id: str
    revision: str = "main"
    filename: str | None = None
    or_replicate: bool = False  # a bare owner/name: try Replicate when Hugging Face has no such repo


@dataclass(frozen=True)
class ReplicateSource:
    owner: str
    model: str
    version: str | None = None


@dataclass(frozen=True)
class CivitaiSource:
    model_id: str | None
    version_id: str | None
    query: str = ""  # the download URL's own query (type/format/size), without any token
    # A token pasted into a download URL (?token=...): used, but kept out of the cache key and repr.
    url_token: str | None = field(default=None, compare=False, repr=False)


LoraSource = LocalSource | UrlSource | DataSource | HfSource | ReplicateSource | CivitaiSource


def parse_lora_reference(reference: str) -> LoraSource:
    """Classify a reference without touching the network (raises LoraReferenceError)."""
    ref = reference.strip()
    if not ref:
        raise LoraReferenceError(f"the reference is empty; {ACCEPTED}")
    lower = ref.lower()
    if lower.startswith("data:"):
        return DataSource(ref)
    if lower.startswith(("hf:", "huggingface:")):
        return _parse_hf_path(ref.split(":", 1)[1].strip("/"), explicit=True)
    if lower.startswith("replicate:"):
        return _parse_replicate_path(ref.split(":", 1)[1].strip("/"))
    if lower.startswith("file://"):
        return LocalSource(Path(urllib.parse.unquote(urllib.parse.urlsplit(ref).path)))
    if ref.startswith(("/", "./", "../", "~")):
        return LocalSource(Path(ref).expanduser())
    if "://" in ref:
        return _parse_url(ref)
    first = ref.split("/", 1)[0].lower()
    if first in _HF_HOSTS + _REPLICATE_HOSTS + _CIVITAI_HOSTS or first.endswith("replicate.delivery"):
        return _parse_url("https://" + ref)
    if Path(ref).exists():
        return LocalSource(Path(ref))
    return _parse_bare(ref)


def _parse_url(url: str) -> LoraSource:
    parts = urllib.parse.urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in ("http", "https"):
        raise LoraReferenceError(
            f"only http(s) and data: URLs are supported, got a {scheme}: URL; {ACCEPTED}"
        )
    if not host:
        raise LoraReferenceError(f"the URL has no host; {ACCEPTED}")
    segments = [urllib.parse.unquote(s) for s in parts.path.split("/") if s]
    if host in _HF_HOSTS:
        return _parse_hf_url(segments)
    if host in _REPLICATE_HOSTS:
        return _parse_replicate_url(segments)
    if host in _CIVITAI_HOSTS:
        return _parse_civitai_url(segments, parts.query)
    _refuse_pickle_name(parts.path)
    normalised = urllib.parse.urlunsplit((scheme, parts.netloc.lower(), parts.path or "/", parts.query, ""))
    return UrlSource(normalised)


def _parse_hf_url(segments: list[str]) -> HfSource:
    usage = "a Hugging Face URL looks like huggingface.co/owner/repo[/blob/<rev>/<file>.safetensors]"
    if segments and segments[0] in ("datasets", "spaces"):
        raise LoraReferenceError(f"only Hugging Face model repos are supported, not {segments[0]}; {usage}")
    if len(segments) < 2:
        raise LoraReferenceError(usage)
    repo_id = _repo_id(segments[0], segments[1])
    rest = segments[2:]
    if not rest:
        return HfSource(repo_id)
    if rest[0] in ("blob", "resolve", "tree") and len(rest) >= 2:
        filename = "/".join(rest[2:]) or None
        if rest[0] != "tree" and filename is None:
            raise LoraReferenceError(f"the URL names a revision but no file; {usage}")
        if filename is not None:
            _check_hf_filename(filename)
        return HfSource(repo_id, revision=rest[1], filename=filename)
    filename = "/".join(rest)
    _check_hf_filename(filename)
    return HfSource(repo_id, filename=filename)


def _parse_hf_path(path: str, explicit: bool) -> HfSource:
    segments = [s for s in path.split("/") if s]
    if len(segments) < 2:
        raise LoraReferenceError("a Hugging Face reference is owner/repo[/file.safetensors]")
    repo_id = _repo_id(segments[0], segments[1])
    filename = "/".join(segments[2:]) or None
    if filename is not None:
        _check_hf_filename(filename)
    return HfSource(repo_id, filename=filename, or_replicate=not explicit and filename is None)


def _parse_replicate_path(path: str) -> ReplicateSource:
    segments = [s for s in path.replace(":", "/").split("/") if s]
    if segments[2:3] == ["versions"]:
        del segments[2]
    if segments[-1:] == ["_weights"]:
        segments.pop()
    if len(segments) not in (2, 3):
        raise LoraReferenceError("a Replicate reference is owner/model or owner/model/<version id>")
    _repo_id(segments[0], segments[1])
    version = segments[2] if len(segments) == 3 else None
    if version is not None and not _VERSION.match(version):
        raise LoraReferenceError(f"{version!r} is not a Replicate version id (64 hex digits)")
    return ReplicateSource(segments[0], segments[1], version)


def _parse_replicate_url(segments: list[str]) -> ReplicateSource:
    if len(segments) < 2:
        raise LoraReferenceError("a Replicate URL looks like replicate.com/owner/model[/versions/<id>]")
    return _parse_replicate_path("/".join(segments))


def _parse_civitai_url(segments: list[str], query: str) -> CivitaiSource:
    params = urllib.parse.parse_qs(query)
    if segments[:1] == ["models"] and len(segments) >= 2 and segments[1].isdigit():
        version = params.get("modelVersionId", [None])[0]
        if version is not None and not version.isdigit():
            raise LoraReferenceError(f"modelVersionId must be a number, got {version!r}")
        return CivitaiSource(segments[1], version)
    if segments[:3] == ["api", "download", "models"] and len(segments) == 4 and segments[3].isdigit():
        pairs = urllib.parse.parse_qsl(query)
        kept = [(k, v) for k, v in pairs if k.lower() != "token"]
        token = next((v for k, v in pairs if k.lower() == "token"), None)
        return CivitaiSource(None, segments[3], urllib.parse.urlencode(kept), url_token=token)
    raise LoraReferenceError(
        "a CivitAI reference is https://civitai.com/models/<id>[?modelVersionId=<v>] "
        "or https://civitai.com/api/download/models/<versionId>"
    )


def _parse_bare(ref: str) -> LoraSource:
    _refuse_pickle_name(ref)
    segments = ref.split("/")
    if len(segments) == 2 and ":" in segments[1]:
        return _parse_replicate_path(ref)  # owner/model:version, as replicate.run writes it
    if len(segments) == 1 or (len(segments) == 2 and segments[1].lower().endswith(".safetensors")):
        raise LoraReferenceError(f"no such local file; {ACCEPTED}")
    if len(segments) == 3 and _VERSION.match(segments[2]):
        return _parse_replicate_path(ref)
    if len(segments) == 2 or segments[-1].lower().endswith(".safetensors"):
        return _parse_hf_path(ref, explicit=False)
    raise LoraReferenceError(ACCEPTED)


def _repo_id(owner: str, name: str) -> str:
    for part in (owner, name):
        if not _NAME.match(part) or ".." in part or part.endswith("."):
            raise LoraReferenceError(f"{part!r} is not a valid owner or repository/model name; {ACCEPTED}")
    return f"{owner}/{name}"


def _check_hf_filename(filename: str) -> None:
    if any(p in ("", ".", "..") for p in filename.split("/")):
        raise LoraReferenceError(f"{filename!r} is not a valid file name inside a repo")
    _refuse_pickle_name(filename)


def _refuse_pickle_name(name: str) -> None:
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise LoraReferenceError(f"{Path(name).name} is a pickle format; {ONLY_SAFETENSORS}")


# --- cache keys ---


def source_key(source: LoraSource) -> str:
    """The normalised form of a remote source; equal keys are the same cached file."""
    if isinstance(source, UrlSource):
        return f"url:{source.url}"
    if isinstance(source, DataSource):
        return "data:sha256:" + hashlib.sha256(source.url.encode("utf-8")).hexdigest()
    if isinstance(source, HfSource):
        key = f"hf:{_hf_endpoint()}:{source.repo_id}@{source.revision}:{source.filename or '*'}"
        return key + (f"|replicate:{_replicate_base()}" if source.or_replicate else "")
    if isinstance(source, ReplicateSource):
        return f"replicate:{_replicate_base()}:{source.owner}/{source.model}@{source.version or 'latest'}"
    if isinstance(source, CivitaiSource):
        if source.version_id is not None:
            return f"civitai:{_civitai_base()}:version={source.version_id}?{source.query}"
        return f"civitai:{_civitai_base()}:model={source.model_id}"
    raise TypeError(f"no cache key for {source!r}")


# --- the entry point ---


def fetch_lora(
    reference: str,
    cache: LoraCache,
    field: str = "lora_weights",
    *,
    limits: DownloadLimits | None = None,
    allow_local: bool = True,
) -> Path:
    """A local, verified .safetensors file for `reference` (see the module docstring).

    Raises UserInputError(field, reference, why) for anything the user can fix: a reference that
    parses as nothing, a missing file or repo, a token that is needed, a download that breaks
    off, an archive with zero or several .safetensors, a pickle file.

    `limits` defaults to download_limits_from_env(). `allow_local=False` refuses local paths, for
    callers whose references come from people who should not read the server's file system.
    """
    if not isinstance(reference, str):
        raise UserInputError(field, reference, f"expected a string; {ACCEPTED}")
    limits = limits or download_limits_from_env()
    try:
        source = parse_lora_reference(reference)
        if isinstance(source, LocalSource):
            if not allow_local:
                raise LoraReferenceError(f"local paths are not accepted here; {ACCEPTED_REMOTE}")
            return _fetch_local(source.path, cache, limits)
        key = source_key(source)
        before = cache.misses
        path = cache.get_or_create(key, lambda workdir: _produce(source, workdir, limits))
        log.info("%s: %s (%s)", field, path, "downloaded" if cache.misses > before else "cached")
        return path
    except (LoraReferenceError, DownloadError, ArchiveError, NotSafetensorsError) as err:
        raise UserInputError(field, _hide_tokens(reference), str(err)) from None


def _hide_tokens(reference: str) -> str:
    """The reference as shown in errors: a token pasted into a URL (?token=...) is masked."""
    return re.sub(r"(?i)([?&](?:token|api_key|access_token)=)[^&#\s]+", r"\1***", reference)


def download_limits_from_env() -> DownloadLimits:
    """FLUX_LORA_MAX_DOWNLOAD_GB (GiB, default 2) and FLUX_LORA_DOWNLOAD_TIMEOUT_S (default 60)."""
    max_gb = _env_float("FLUX_LORA_MAX_DOWNLOAD_GB", 2.0)
    timeout = _env_float("FLUX_LORA_DOWNLOAD_TIMEOUT_S", 60.0)
    return DownloadLimits(max_bytes=int(max_gb * GIB), timeout_s=timeout)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return value


def _fetch_local(path: Path, cache: LoraCache, limits: DownloadLimits) -> Path:
    path = path.expanduser()
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".safetensors" and p.is_file())
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise LoraReferenceError(f"the folder must hold exactly one .safetensors file (found: {names})")
        path = found[0]
    if not path.is_file():
        raise LoraReferenceError(f"no such local file: {path}")
    _refuse_pickle_name(path.name)
    kind = sniff(path)
    if kind == "safetensors":
        _verified(path, f"local file {path}")
        return path  # the user's own file: used in place, not copied into the cache
    if kind not in ("tar", "zip"):
        raise LoraReferenceError(refusal_for(kind, f"local file {path}"))
    st = path.stat()
    key = f"local:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"

    def produce(workdir: Path) -> Path:
        out = workdir / "lora.safetensors"
        member = extract_single_safetensors(path, kind, out, limits.max_bytes)
        _verified(out, f"{member} in {path}")
        return out

    return cache.get_or_create(key, produce)


def _produce(source: LoraSource, workdir: Path, limits: DownloadLimits) -> Path:
    """Download `source` into `workdir` and return the verified .safetensors made from it."""
    raw = workdir / "download"
    if isinstance(source, DataSource):
        _decode_data_url(source.url, raw, limits.max_bytes)
        what = "the data: URL"
    elif isinstance(source, UrlSource):
        what = _download(source.url, raw, None, limits)
    elif isinstance(source, HfSource):
        what = _download_hf(source, raw, limits)
    elif isinstance(source, ReplicateSource):
        what = _download_replicate(source, raw, limits)
    elif isinstance(source, CivitaiSource):
        what = _download_civitai(source, raw, limits)
    else:
        raise TypeError(f"cannot download {source!r}")
    kind = sniff(raw)
    if kind == "safetensors":
        return _verified(raw, what)
    if kind not in ("tar", "zip"):
        raise LoraReferenceError(refusal_for(kind, what))
    out = workdir / "lora.safetensors"
    try:
        member = extract_single_safetensors(raw, kind, out, limits.max_bytes)
    except ArchiveError as err:
        raise ArchiveError(f"{what}: {err}") from None
    raw.unlink()  # the archive itself is not kept; only the extracted file counts against the budget
    return _verified(out, f"{member} in {what}")


def _verified(path: Path, what: str) -> Path:
    try:
        verify_safetensors(path)
    except NotSafetensorsError as err:
        raise NotSafetensorsError(f"{what}: {err}") from None
    return path


def _download(url: str, dest: Path, auth: Auth | None, limits: DownloadLimits) -> str:
    result = download_to_file(url, dest, auth=auth, limits=limits)
    log.info("downloaded %d bytes from %s", result.bytes_written, urllib.parse.urlsplit(url).netloc)
    return f"the file at {_redact(url)}"


# --- Hugging Face ---


def _hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _hf_auth() -> Auth:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return Auth(host_of(_hf_endpoint()), f"Bearer {token}" if token else None, "HF_TOKEN")


def _download_hf(source: HfSource, dest: Path, limits: DownloadLimits) -> str:
    endpoint, auth = _hf_endpoint(), _hf_auth()
    filename = source.filename
    if filename is None:
        try:
            filename = _pick_hf_file(source, endpoint, auth, limits)
        except DownloadError as err:
            if source.or_replicate and err.kind in ("not_found", "auth"):
                return _replicate_after_hf(source, dest, limits, err)
            raise _hf_error(source, err) from None
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
        raise _hf_error(source, err, filename) from None
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


def _hf_error(source: HfSource, err: DownloadError, filename: str | None = None) -> DownloadError:
    target = f"{source.repo_id}/{filename}" if filename else f"repo {source.repo_id}"
    if err.kind == "auth":
        hint = (
            "the HF_TOKEN set cannot read it"
            if _hf_auth().header
            else "the repo may be private or gated, or may not exist: set HF_TOKEN to read a private repo"
        )
        message = f"Hugging Face refused access to {target} (HTTP {err.status}): {hint}"
    elif err.kind == "not_found":
        message = f"Hugging Face has no {target} at revision {source.revision} (HTTP {err.status}: {_redact(err.url)})"
    else:
        message = f"Hugging Face {target}: {err}"
    return DownloadError(err.kind, err.url, message, err.status)


def _replicate_after_hf(source: HfSource, dest: Path, limits: DownloadLimits, hf_err: DownloadError) -> str:
    owner, model = source.repo_id.split("/")
    log.info(
        "%s is not a Hugging Face repo (HTTP %s); trying the Replicate model", source.repo_id, hf_err.status
    )
    try:
        return _download_replicate(ReplicateSource(owner, model), dest, limits)
    except DownloadError as err:
        if err.kind not in ("not_found", "auth"):
            raise
        raise LoraReferenceError(
            f"{source.repo_id} was looked up on Hugging Face (HTTP {hf_err.status}) and on Replicate "
            f"(HTTP {err.status}) and neither returned it; private repos/models need HF_TOKEN or "
            "REPLICATE_API_TOKEN; write hf:owner/repo or replicate:owner/model to pick one"
        ) from None


# --- Replicate ---


def _replicate_base() -> str:
    return (os.environ.get("FLUX_REPLICATE_BASE_URL") or "https://replicate.com").rstrip("/")


def _download_replicate(source: ReplicateSource, dest: Path, limits: DownloadLimits) -> str:
    """A Replicate model's `_weights` URL redirects to the trained weights (a tar)."""
    base = _replicate_base()
    token = os.environ.get("REPLICATE_API_TOKEN")
    auth = Auth(host_of(base), f"Bearer {token}" if token else None, "REPLICATE_API_TOKEN")
    name = f"{source.owner}/{source.model}"
    path = f"{name}/versions/{source.version}/_weights" if source.version else f"{name}/_weights"
    try:
        download_to_file(f"{base}/{path}", dest, auth=auth, limits=limits)
    except DownloadError as err:
        shown = f"{name}" + (f" version {source.version}" if source.version else "")
        if err.kind == "not_found":
            message = (
                f"Replicate has no weights for {shown} ({_redact(err.url)}): check the name; only "
                "trained models have downloadable weights; a private model needs REPLICATE_API_TOKEN"
            )
        elif err.kind == "auth":
            message = f"Replicate refused access to {shown} (HTTP {err.status}): set REPLICATE_API_TOKEN"
        else:
            message = f"Replicate model {shown}: {err}"
        raise DownloadError(err.kind, err.url, message, err.status) from None
    return f"the weights of Replicate model {name}"


# --- CivitAI ---


def _civitai_base() -> str:
    return (os.environ.get("FLUX_CIVITAI_BASE_URL") or "https://civitai.com").rstrip("/")


_LORA_TYPES = {"lora", "locon", "dora", "lycoris"}


def _download_civitai(source: CivitaiSource, dest: Path, limits: DownloadLimits) -> str:
    base = _civitai_base()
    token = source.url_token or os.environ.get("CIVITAI_API_TOKEN")
    auth = Auth(host_of(base), f"Bearer {token}" if token else None, "CIVITAI_API_TOKEN")
    version = source.version_id
    if version is None:
        version = _latest_civitai_version(source.model_id or "", base, auth, limits)
    query = source.query or "type=Model&format=SafeTensor"
    url = f"{base}/api/download/models/{version}?{query}"
    try:
        download_to_file(url, dest, auth=auth, limits=limits)
    except DownloadError as err:
        if err.kind == "auth":
            message = f"CivitAI requires a login for model version {version}: set CIVITAI_API_TOKEN"
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


# --- data: URLs ---


def _decode_data_url(url: str, dest: Path, max_bytes: int) -> None:
    head, sep, payload = url.partition(",")
    if not sep:
        raise LoraReferenceError("a data: URL needs a comma before its data (data:[<type>][;base64],<data>)")
    if len(payload) * 3 // 4 > max_bytes:
        raise LoraReferenceError(f"the data: URL holds more than the limit of {max_bytes / GIB:.2f} GiB")
    if head.lower().endswith(";base64"):
        compact = "".join(urllib.parse.unquote(payload).split())
        urlsafe = "-" in compact or "_" in compact  # some encoders use the URL-safe alphabet
        padded = compact + "=" * (-len(compact) % 4)
        try:
            data = base64.b64decode(padded, altchars=b"-_" if urlsafe else None, validate=True)
        except (binascii.Error, ValueError):
            raise LoraReferenceError("the data: URL's base64 data is not valid base64") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if not data:
        raise LoraReferenceError("the data: URL holds no data")
    with open(dest, "wb") as out:
        out.write(data)


def display_reference(reference: str, limit: int = 120) -> str:
    """A reference as logs show it: data: URLs by type and size, URLs without their query (tokens)."""
    if reference.startswith("data:"):
        header, _, payload = reference.partition(",")
        return f"{header.split(';')[0]} ({len(payload) * 3 // 4 // 1024} kB)"
    if "://" in reference:
        reference = _redact(reference)
    return reference if len(reference) <= limit else reference[:limit] + "..."
