"""Parsing a user's LoRA reference string into a LoraSource, without touching the network.

`parse_lora_reference(reference)` classifies; weights.lora_hosts turns a remote source into a
download and weights.lora_source.fetch_lora is the entry point. A reference is one of:

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

The `owner/name` rule: both Hugging Face and Replicate use this form; it means what it means on
Replicate, a Replicate model's weights. When Replicate answers that it has no such model (404),
the Hugging Face repo `owner/name` is tried, and the error then names both. `hf:`,
`huggingface.co/` or `replicate:` in front picks one and skips the other lookup. Three segments
are told apart by the last one, as nothing else can: a hex version id is Replicate's
`owner/model/<version>`, a `.safetensors` name is a file in a Hugging Face repo.

Pickle file names are refused here, before anything is fetched.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from weights.archive import ONLY_SAFETENSORS
from weights.download import redact as _redact
from weights.lora_tokens import TOKEN

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


@dataclass(frozen=True)
class ReplicateSource:
    owner: str
    model: str
    version: str | None = None
    or_hf: bool = False  # a bare owner/name: try Hugging Face when Replicate has no such model


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
        return _parse_hf_path(ref.split(":", 1)[1].strip("/"))
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
    if _exists(Path(ref)):
        return LocalSource(Path(ref))
    return _parse_bare(ref)


def _exists(path: Path) -> bool:
    """Whether a file is there; a name too long to be a path (a pasted payload) is none."""
    try:
        return path.exists()
    except OSError:
        return False


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
    refuse_pickle_name(parts.path)
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


def _parse_hf_path(path: str) -> HfSource:
    segments = [s for s in path.split("/") if s]
    if len(segments) < 2:
        raise LoraReferenceError("a Hugging Face reference is owner/repo[/file.safetensors]")
    repo_id = _repo_id(segments[0], segments[1])
    filename = "/".join(segments[2:]) or None
    if filename is not None:
        _check_hf_filename(filename)
    return HfSource(repo_id, filename=filename)


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
        if token is not None and not TOKEN.match(token):
            raise LoraReferenceError("the token in the URL has characters an HTTP token cannot have")
        return CivitaiSource(None, segments[3], urllib.parse.urlencode(kept), url_token=token)
    raise LoraReferenceError(
        "a CivitAI reference is https://civitai.com/models/<id>[?modelVersionId=<v>] "
        "or https://civitai.com/api/download/models/<versionId>"
    )


def _parse_bare(ref: str) -> LoraSource:
    refuse_pickle_name(ref)
    segments = ref.split("/")
    if len(segments) == 2 and ":" in segments[1]:
        return _parse_replicate_path(ref)  # owner/model:version, as replicate.run writes it
    if len(segments) == 1 or (len(segments) == 2 and segments[1].lower().endswith(".safetensors")):
        raise LoraReferenceError(f"no such local file; {ACCEPTED}")
    if len(segments) == 2:
        owner, model = _repo_id(*segments).split("/")
        return ReplicateSource(owner, model, or_hf=True)
    if len(segments) == 3 and _VERSION.match(segments[2]):
        return _parse_replicate_path(ref)
    if segments[-1].lower().endswith(".safetensors"):
        return _parse_hf_path(ref)
    raise LoraReferenceError(ACCEPTED)


def _repo_id(owner: str, name: str) -> str:
    for part in (owner, name):
        if not _NAME.match(part) or ".." in part or part.endswith("."):
            raise LoraReferenceError(f"{part!r} is not a valid owner or repository/model name; {ACCEPTED}")
    return f"{owner}/{name}"


def _check_hf_filename(filename: str) -> None:
    if any(p in ("", ".", "..") for p in filename.split("/")):
        raise LoraReferenceError(f"{filename!r} is not a valid file name inside a repo")
    refuse_pickle_name(filename)


def refuse_pickle_name(name: str) -> None:
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise LoraReferenceError(f"{Path(name).name} is a pickle format; {ONLY_SAFETENSORS}")


def same_reference(a: str, b: str) -> bool:
    """Whether two references name the same LoRA: equal text, or spellings of one source.

    Offline (parsing only), so `hf:o/r` and `huggingface.co/o/r` match but a Replicate model and
    the version it points to do not. A reference that does not parse is only equal to itself.
    """
    if a.strip() == b.strip():
        return True
    try:
        return parse_lora_reference(a) == parse_lora_reference(b)
    except LoraReferenceError:
        return False


def display_reference(reference: str, limit: int = 120) -> str:
    """A reference as logs show it: data: URLs by type and size, URLs without their query (tokens)."""
    if reference.startswith("data:"):
        header, _, payload = reference.partition(",")
        return f"{header.split(';')[0]} ({len(payload) * 3 // 4 // 1024} kB)"
    if "://" in reference:
        reference = _redact(reference)
    return reference if len(reference) <= limit else reference[:limit] + "..."
