"""HTTP downloads for weight files: redirects, tokens, size limits, timeouts, progress.

Plain urllib (no extra dependency). Redirects are followed here rather than by urllib so that a
token is only ever sent to the host it was meant for: Hugging Face, Replicate and CivitAI all
redirect downloads to signed CDN URLs that need no token, and forwarding it there would leak it.

Failures raise DownloadError with a `kind` the caller maps to a message for the user; this module
does not know which input field the URL came from.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

GIB = 1024**3
_CHUNK = 1024 * 1024
_PROGRESS_MIN_BYTES = 16 * 1024 * 1024  # smaller downloads finish before a progress line helps
_PROGRESS_EVERY_S = 5.0
_USER_AGENT = "flux-cog/1 (+https://github.com/replicate/cog)"


@dataclass(frozen=True)
class DownloadLimits:
    """How much one download may take: bytes, seconds without data, redirects, and in all.

    `deadline_s` bounds the whole download and `min_bytes_per_s` its average speed once
    `speed_grace_s` have passed: a host that sends a byte now and then never trips `timeout_s`
    (seconds without any data), and would otherwise hold a request, and the server, forever.
    None / 0 switch them off (the base weights' downloads, which take their own rules).
    """

    max_bytes: int = 2 * GIB
    timeout_s: float = 60.0
    max_redirects: int = 10
    max_json_bytes: int = 16 * 1024 * 1024
    deadline_s: float | None = None
    min_bytes_per_s: float = 0.0
    speed_grace_s: float = 30.0


@dataclass(frozen=True)
class Auth:
    """A header value (e.g. 'Bearer hf_...') sent only to `host` (the origin that wants it).

    `env_var` names where the token came from (an input such as hf_api_token, or an environment
    variable), or where one could be set, for error messages; never the token itself.
    """

    host: str
    header: str | None
    env_var: str


class DownloadError(Exception):
    """A download that did not produce the file.

    kind: 'auth' (401/403), 'not_found' (404/410), 'too_large', 'truncated', 'http' (other
    status), 'network' (connection/timeouts), 'bad_url' (scheme or redirect loop), 'too_slow'
    (past the deadline or under the minimum speed).
    """

    def __init__(self, kind: str, url: str, message: str, status: int | None = None):
        self.kind = kind
        self.url = url
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class DownloadResult:
    final_url: str
    bytes_written: int
    content_type: str


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Hands 3xx back to us; _open() follows them itself to control which headers go where."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        return None


_OPENER = urllib.request.build_opener(_NoRedirect())


def redact(url: str) -> str:
    """The URL without its query string, which often carries signatures or tokens."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def host_of(url: str) -> str:
    return (urllib.parse.urlsplit(url).hostname or "").lower()


def _open(url: str, auth: Auth | None, limits: DownloadLimits, accept: str) -> http.client.HTTPResponse:
    """GET `url`, following redirects; returns the open 200 response or raises DownloadError."""
    current = url
    for _ in range(limits.max_redirects + 1):
        scheme = urllib.parse.urlsplit(current).scheme.lower()
        if scheme not in ("http", "https"):
            raise DownloadError("bad_url", url, f"only http(s) URLs can be downloaded, got {redact(current)}")
        headers = {"User-Agent": _USER_AGENT, "Accept": accept}
        if auth is not None and auth.header and host_of(current) == auth.host:
            headers["Authorization"] = auth.header
        request = urllib.request.Request(current, headers=headers, method="GET")
        try:
            return _OPENER.open(request, timeout=limits.timeout_s)
        except urllib.error.HTTPError as err:
            location = err.headers.get("Location") if err.headers else None
            if err.code in (301, 302, 303, 307, 308) and location:
                err.close()
                nxt = urllib.parse.urljoin(current, location)
                log.debug("redirect %s -> %s", redact(current), redact(nxt))
                current = nxt
                continue
            err.close()
            raise _status_error(err.code, current, auth) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            raise DownloadError("network", current, f"could not reach {redact(current)}: {reason}") from None
    raise DownloadError("bad_url", url, f"more than {limits.max_redirects} redirects from {redact(url)}")


def _status_error(status: int, url: str, auth: Auth | None) -> DownloadError:
    shown = redact(url)
    if status in (401, 403):
        env = auth.env_var if auth is not None else "a token"
        if auth is not None and auth.header:
            hint = f"the token in {env} was sent but was not accepted for this file"
        elif auth is not None:
            hint = f"it may be private or gated: set {env} to a token that can read it"
        else:
            hint = "the server wants credentials this URL does not carry (a token is needed)"
        return DownloadError("auth", url, f"access denied (HTTP {status}) for {shown}: {hint}", status)
    if status in (404, 410):
        return DownloadError("not_found", url, f"not found (HTTP {status}): {shown}", status)
    return DownloadError("http", url, f"HTTP {status} from {shown}", status)


def download_to_file(
    url: str,
    dest: Path,
    *,
    auth: Auth | None = None,
    limits: DownloadLimits = DownloadLimits(),
) -> DownloadResult:
    """Stream `url` into `dest` (created or truncated); fsynced before returning.

    Refuses before reading when Content-Length is over the limit, stops when the stream passes
    it, and checks the byte count against Content-Length, so a connection that breaks off is an
    error rather than a short file. On error `dest` may hold partial data: the caller writes into
    a temporary location and deletes it (the LoRA cache does).
    """
    response = _open(url, auth, limits, accept="*/*")
    final_url = response.geturl()
    with response:
        declared = _content_length(response)
        if declared is not None and declared > limits.max_bytes:
            raise DownloadError(
                "too_large",
                url,
                f"{redact(final_url)} is {declared / GIB:.2f} GiB; the limit is {limits.max_bytes / GIB:.2f} GiB",
            )
        written = 0
        started = last_log = time.monotonic()
        try:
            with open(dest, "wb") as out:
                while True:
                    # read1: whatever has arrived (up to a chunk), so the limits below are checked
                    # between trickles too; read() would wait for a whole chunk.
                    chunk = response.read1(_CHUNK)
                    if not chunk:
                        break
                    written += len(chunk)
                    _check_pace(url, final_url, written, time.monotonic() - started, limits)
                    _wait_at_most(response, limits, time.monotonic() - started)
                    if written > limits.max_bytes:
                        raise DownloadError(
                            "too_large",
                            url,
                            f"{redact(final_url)} is larger than the limit of "
                            f"{limits.max_bytes / GIB:.2f} GiB; stopped downloading",
                        )
                    out.write(chunk)
                    now = time.monotonic()
                    if written >= _PROGRESS_MIN_BYTES and now - last_log >= _PROGRESS_EVERY_S:
                        last_log = now
                        _log_progress(final_url, written, declared, now - started)
                out.flush()
                os.fsync(out.fileno())  # the cache renames this file next; make its bytes durable
        except (http.client.IncompleteRead, OSError, http.client.HTTPException) as err:
            _check_pace(
                url, final_url, written, time.monotonic() - started, limits
            )  # a read cut at the deadline
            raise DownloadError(
                "truncated", url, f"download of {redact(final_url)} broke off after {written} bytes ({err})"
            ) from None
        if declared is not None and written != declared:
            raise DownloadError(
                "truncated",
                url,
                f"download of {redact(final_url)} broke off: got {written} of {declared} bytes",
            )
    elapsed = time.monotonic() - started
    if written >= _PROGRESS_MIN_BYTES:
        _log_progress(final_url, written, declared, elapsed)
    content_type = response.headers.get("Content-Type", "")
    return DownloadResult(final_url=final_url, bytes_written=written, content_type=content_type)


def fetch_json(url: str, *, auth: Auth | None = None, limits: DownloadLimits = DownloadLimits()) -> object:
    """GET a JSON API response (small; capped at limits.max_json_bytes)."""
    response = _open(url, auth, limits, accept="application/json")
    started = time.monotonic()
    body = b""
    with response:
        try:
            while len(body) <= limits.max_json_bytes:
                chunk = response.read1(limits.max_json_bytes + 1 - len(body))
                if not chunk:
                    break
                body += chunk
                _check_pace(url, url, len(body), time.monotonic() - started, limits)
                _wait_at_most(response, limits, time.monotonic() - started)
        except (http.client.IncompleteRead, OSError, http.client.HTTPException) as err:
            _check_pace(url, url, len(body), time.monotonic() - started, limits)
            raise DownloadError("truncated", url, f"reading {redact(url)} broke off ({err})") from None
    if len(body) > limits.max_json_bytes:
        raise DownloadError("too_large", url, f"the API answer from {redact(url)} is too large")
    try:
        return json.loads(body)
    except ValueError:
        raise DownloadError("http", url, f"{redact(url)} did not answer with JSON") from None


def _check_pace(url: str, final_url: str, written: int, elapsed: float, limits: DownloadLimits) -> None:
    if limits.deadline_s is not None and elapsed > limits.deadline_s:
        raise DownloadError(
            "too_slow",
            url,
            f"download of {redact(final_url)} passed its deadline of {limits.deadline_s:g} s "
            f"after {written / 1024**2:.1f} MiB",
        )
    if (
        limits.min_bytes_per_s
        and elapsed > limits.speed_grace_s
        and written / elapsed < limits.min_bytes_per_s
    ):
        raise DownloadError(
            "too_slow",
            url,
            f"download of {redact(final_url)} is too slow: {written / elapsed / 1024**2:.3f} MiB/s over "
            f"{elapsed:.0f} s, under the minimum of {limits.min_bytes_per_s / 1024**2:g} MiB/s",
        )


def _wait_at_most(response: http.client.HTTPResponse, limits: DownloadLimits, elapsed: float) -> None:
    """Shorten the next read's timeout to what is left of the deadline (a trickle that stops just
    before it would otherwise be waited on for timeout_s more)."""
    if limits.deadline_s is None:
        return
    sock = getattr(getattr(response.fp, "raw", None), "_sock", None)  # http.client's socket
    if sock is not None:
        sock.settimeout(max(0.05, min(limits.timeout_s, limits.deadline_s - elapsed + 0.05)))


def _content_length(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        return None
    return length if length >= 0 else None


def _log_progress(url: str, written: int, declared: int | None, elapsed: float) -> None:
    rate = written / max(elapsed, 1e-6) / 1024**2
    of = f" of {declared / 1024**2:.0f} MiB ({100 * written / declared:.0f}%)" if declared else ""
    log.info("downloading %s: %.0f MiB%s, %.1f MiB/s", redact(url), written / 1024**2, of, rate)
