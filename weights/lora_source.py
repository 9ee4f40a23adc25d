"""From a user's LoRA reference string to a verified local .safetensors file.

`fetch_lora(reference, cache)` is the one entry point. The reference forms are listed in
weights.lora_reference (parsing); weights.lora_hosts reaches Hugging Face, Replicate and CivitAI.
This module handles local paths and data: URLs itself.

Nothing but safetensors gets through: what arrives is classified by its bytes (weights.archive),
pickle files are refused unread, and the result is checked before it enters the cache.

Remote results are cached (weights.lora_cache) under a key built from the normalised reference,
so a repeated reference costs no network request. A reference that follows something mutable
(a repo's `main`, a model's latest version) is therefore not re-fetched while it stays cached;
name a revision or version to pin it.

Environment (read at each call, so tests and the server can change it):
  FLUX_LORA_MAX_DOWNLOAD_GB (2), FLUX_LORA_DOWNLOAD_TIMEOUT_S (60, without any data),
  FLUX_LORA_DOWNLOAD_DEADLINE_S (1200, in all), FLUX_LORA_DOWNLOAD_MIN_MIB_S (2, average after 30 s):
  a file at the size limit arriving at the minimum speed still makes the deadline
  (the services' endpoints: see weights.lora_hosts; their tokens: weights.lora_tokens)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import urllib.parse
from pathlib import Path

from errors import UserInputError
from weights.archive import (
    ArchiveError,
    NotSafetensorsError,
    extract_named_member,
    extract_single_safetensors,
    refusal_for,
    sniff,
    verify_safetensors,
)
from weights.download import GIB, Auth, DownloadError, DownloadLimits, download_to_file
from weights.download import redact as _redact
from weights.lora_cache import LoraCache
from weights.lora_hosts import (
    civitai_base,
    download_civitai,
    download_hf,
    download_replicate,
    hf_endpoint,
    replicate_base,
)
from weights.lora_reference import (
    ACCEPTED,
    ACCEPTED_REMOTE,
    CivitaiSource,
    DataSource,
    HfSource,
    LocalSource,
    LoraReferenceError,
    LoraSource,
    ReplicateSource,
    UrlSource,
    display_reference,
    parse_lora_reference,
    refuse_pickle_name,
)
from weights.lora_tokens import LoraTokens

log = logging.getLogger(__name__)


# --- cache keys ---


def source_key(source: LoraSource) -> str:
    """The normalised form of a remote source; equal keys are the same cached file."""
    if isinstance(source, UrlSource):
        return f"url:{source.url}"
    if isinstance(source, DataSource):
        return "data:sha256:" + hashlib.sha256(source.url.encode("utf-8")).hexdigest()
    if isinstance(source, HfSource):
        return f"hf:{hf_endpoint()}:{source.repo_id}@{source.revision}:{source.filename or '*'}"
    if isinstance(source, ReplicateSource):
        key = f"replicate:{replicate_base()}:{source.owner}/{source.model}@{source.version or 'latest'}"
        return key + (f"|hf:{hf_endpoint()}" if source.or_hf else "")
    if isinstance(source, CivitaiSource):
        if source.version_id is not None:
            return f"civitai:{civitai_base()}:version={source.version_id}?{source.query}"
        return f"civitai:{civitai_base()}:model={source.model_id}"
    raise TypeError(f"no cache key for {source!r}")


# --- the entry point ---


def fetch_lora(
    reference: str,
    cache: LoraCache,
    field: str = "lora_weights",
    *,
    limits: DownloadLimits | None = None,
    allow_local: bool = True,
    tokens: LoraTokens | None = None,
) -> Path:
    """A local, verified .safetensors file for `reference` (see the module docstring).

    Raises UserInputError(field, reference, why) for anything the user can fix: a reference that
    parses as nothing, a missing file or repo, a token that is needed, a download that breaks
    off, an archive with zero or several .safetensors, a pickle file.

    `limits` defaults to download_limits_from_env(). `allow_local=False` refuses local paths, for
    callers whose references come from people who should not read the server's file system.
    `tokens` are the request's own (weights.lora_tokens); without them the environment's are used.
    """
    if not isinstance(reference, str):
        raise UserInputError(field, reference, f"expected a string; {ACCEPTED}")
    limits = limits or download_limits_from_env()
    tokens = tokens or LoraTokens()
    try:
        source = parse_lora_reference(reference)
        if isinstance(source, LocalSource):
            if not allow_local:
                raise LoraReferenceError(f"local paths are not accepted here; {ACCEPTED_REMOTE}")
            return _fetch_local(source.path, cache, limits)
        key = source_key(source) + _token_scope(source, tokens)
        before = cache.misses
        path = cache.get_or_create(key, lambda workdir: _produce(source, workdir, limits, tokens))
        log.info("%s: %s (%s)", field, path, "downloaded" if cache.misses > before else "cached")
        return path
    except (LoraReferenceError, DownloadError, ArchiveError, NotSafetensorsError) as err:
        raise UserInputError(field, _shown(reference), str(err)) from None


def _token_scope(source: LoraSource, tokens: LoraTokens) -> str:
    """The part of the cache key that keeps a file fetched with a request's token to that token.

    A private or gated file cached for one caller must not reach a caller without the token, and
    the cache cannot tell a private file from a public one. So a download made with a token the
    request brought (an input, or ?token= in a CivitAI URL) is cached under a hash of that token;
    the server's own tokens (environment) act for every caller, so what they fetch is shared.
    The cost: a public LoRA is downloaded once per distinct request token.
    """
    if isinstance(source, HfSource) or (isinstance(source, ReplicateSource) and source.or_hf):
        credential = tokens.for_hf()  # the Replicate part takes no request token
    elif isinstance(source, CivitaiSource):
        credential = tokens.for_civitai(source.url_token)
    else:
        return ""
    return f"|token:{credential.fingerprint()}" if credential.from_request else ""


def _shown(reference: str) -> str:
    """The reference as errors echo it: a data: URL by its type and size (never its payload), a
    token pasted into a URL masked."""
    if reference.startswith("data:"):
        return display_reference(reference)
    return _hide_tokens(reference)


def _hide_tokens(reference: str) -> str:
    """The reference as shown in errors: a token pasted into a URL (?token=...) is masked."""
    return re.sub(r"(?i)([?&](?:token|api_key|access_token)=)[^&#\s]+", r"\1***", reference)


def download_limits_from_env() -> DownloadLimits:
    """The limits of a LoRA download (see the module docstring for the variables and defaults)."""
    max_gb = _env_float("FLUX_LORA_MAX_DOWNLOAD_GB", 2.0)
    timeout = _env_float("FLUX_LORA_DOWNLOAD_TIMEOUT_S", 60.0)
    deadline = _env_float("FLUX_LORA_DOWNLOAD_DEADLINE_S", 1200.0)
    min_speed = _env_float("FLUX_LORA_DOWNLOAD_MIN_MIB_S", 2.0)
    return DownloadLimits(
        max_bytes=int(max_gb * GIB),
        timeout_s=timeout,
        deadline_s=deadline,
        min_bytes_per_s=min_speed * 1024**2,
        speed_grace_s=min(30.0, deadline / 2),
    )


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
    try:
        is_dir = path.is_dir()
    except OSError as err:  # a name the file system refuses outright (too long, say)
        raise LoraReferenceError(f"not a usable local path ({err.strerror})") from None
    if is_dir:
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".safetensors" and p.is_file())
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise LoraReferenceError(f"the folder must hold exactly one .safetensors file (found: {names})")
        path = found[0]
    if not path.is_file():
        raise LoraReferenceError(f"no such local file: {path}")
    refuse_pickle_name(path.name)
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


def fetch_lora_companion(
    reference: str,
    cache: LoraCache,
    field: str,
    member: str,
    *,
    limits: DownloadLimits | None = None,
    tokens: LoraTokens | None = None,
) -> Path | None:
    """The member named `member` of the archive `reference` names (a tar this project's trainer
    wrote holds its training state beside the LoRA), verified as safetensors and cached like a LoRA;
    None when the reference is not an archive or holds no such member. Call fetch_lora first: this
    assumes the reference is valid, and raises UserInputError(field, ...) only for failed downloads."""
    limits = limits or download_limits_from_env()
    tokens = tokens or LoraTokens()
    try:
        source = parse_lora_reference(reference)
        if isinstance(source, LocalSource):
            path = source.path.expanduser()
            if not path.is_file() or sniff(path) not in ("tar", "zip"):
                return None
            st = path.stat()
            key = f"local:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}#{member}"
            return cache.get_or_create(
                key, lambda workdir: _member_of(path, member, workdir, limits, str(path))
            )
        key = source_key(source) + _token_scope(source, tokens) + f"#{member}"

        def produce(workdir: Path) -> Path:
            raw, what = _download_raw(source, workdir, limits, tokens)
            return _member_of(raw, member, workdir, limits, what)

        return cache.get_or_create(key, produce)
    except _NoMember:
        return None
    except (LoraReferenceError, DownloadError, ArchiveError, NotSafetensorsError) as err:
        raise UserInputError(field, _shown(reference), str(err)) from None


class _NoMember(Exception):
    pass


def _member_of(archive: Path, member: str, workdir: Path, limits: DownloadLimits, what: str) -> Path:
    kind = sniff(archive)
    if kind not in ("tar", "zip"):
        raise _NoMember
    out = workdir / member
    try:
        extract_named_member(archive, kind, member, out, limits.max_bytes)
    except ArchiveError:
        raise _NoMember from None
    return _verified(out, f"{member} in {what}")


def _download_raw(
    source: LoraSource, workdir: Path, limits: DownloadLimits, tokens: LoraTokens
) -> tuple[Path, str]:
    """Download `source` as it comes into `workdir`; (the file, how errors name it)."""
    raw = workdir / "download"
    if isinstance(source, DataSource):
        _decode_data_url(source.url, raw, limits.max_bytes)
        what = "the data: URL"
    elif isinstance(source, UrlSource):
        what = _download(source.url, raw, None, limits)
    elif isinstance(source, HfSource):
        what = download_hf(source, raw, limits, tokens)
    elif isinstance(source, ReplicateSource):
        what = download_replicate(source, raw, limits, tokens)
    elif isinstance(source, CivitaiSource):
        what = download_civitai(source, raw, limits, tokens)
    else:
        raise TypeError(f"cannot download {source!r}")
    return raw, what


def _produce(source: LoraSource, workdir: Path, limits: DownloadLimits, tokens: LoraTokens) -> Path:
    """Download `source` into `workdir` and return the verified .safetensors made from it."""
    raw, what = _download_raw(source, workdir, limits, tokens)
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
