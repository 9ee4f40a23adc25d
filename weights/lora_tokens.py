"""Tokens for private or gated LoRAs: the request's own when it brings one, else the server's.

Replicate's public LoRA model takes `hf_api_token` and `civitai_api_token` as Secret inputs; a
server started with HF_TOKEN (or HUGGING_FACE_HUB_TOKEN), CIVITAI_API_TOKEN or REPLICATE_API_TOKEN
uses those when a request brings none. A request's token wins: it is the caller's own access,
and the server's token may not reach what the caller's does. This module is the one place that
chooses between the two; weights.lora_hosts sends the result, only to its own host.

Token values never appear in a repr, a log line or an error message, only where a token came
from ("hf_api_token", "HF_TOKEN"). A token with characters no HTTP header can carry is refused
here, since the HTTP library's own error would quote it.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field

from errors import UserInputError

TOKEN = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII: what a Bearer header value may hold
_HF_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_CIVITAI_ENV = ("CIVITAI_API_TOKEN",)
_REPLICATE_ENV = ("REPLICATE_API_TOKEN",)


@dataclass(frozen=True)
class Credential:
    """One service's token for one request, and where it came from (for messages)."""

    token: str | None = field(repr=False)
    # "hf_api_token" or "HF_TOKEN" when a token is sent; where one could be set when none is.
    origin: str
    # Files fetched with a request's token are cached apart from everyone else's (lora_source).
    from_request: bool = False

    @property
    def header(self) -> str | None:
        return f"Bearer {self.token}" if self.token else None

    def fingerprint(self) -> str:
        """A stable name for the token that does not reveal it (for cache keys)."""
        return hashlib.sha256(b"flux-cog lora token\0" + (self.token or "").encode()).hexdigest()[:24]


@dataclass(frozen=True)
class LoraTokens:
    """The request's `hf_api_token` and `civitai_api_token`; None or blank means not given."""

    hf: str | None = field(default=None, repr=False)
    civitai: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hf", _checked("hf_api_token", self.hf))
        object.__setattr__(self, "civitai", _checked("civitai_api_token", self.civitai))

    def for_hf(self) -> Credential:
        return _resolve(self.hf, "hf_api_token", _HF_ENV)

    def for_civitai(self, url_token: str | None = None) -> Credential:
        """A token pasted into a CivitAI download URL (?token=) is the most specific, so it wins."""
        if url_token:  # checked by weights.lora_reference when it parsed the URL
            return Credential(url_token, "the token in the URL", from_request=True)
        return _resolve(self.civitai, "civitai_api_token", _CIVITAI_ENV)

    def for_replicate(self) -> Credential:
        return _resolve(None, None, _REPLICATE_ENV)  # Replicate's models take no such input


def _resolve(given: str | None, input_name: str | None, env_names: tuple[str, ...]) -> Credential:
    if given:
        return Credential(given, input_name or "", from_request=True)
    for name in env_names:
        value = (os.environ.get(name) or "").strip()
        if value:
            if not TOKEN.match(value):
                # The server's own setting, not the user's input: a plain error, naming only the variable.
                raise ValueError(f"{name} holds characters an HTTP token cannot have")
            return Credential(value, name)
    where = " or ".join(([input_name] if input_name else []) + [env_names[0]])
    return Credential(None, where)


def _checked(field_name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{field_name} must be a str or None, got {type(value).__name__}")
    value = value.strip()
    if value and not TOKEN.match(value):
        # Never echo the value: it is a secret, and a malformed one is still mostly someone's token.
        raise UserInputError(field_name, "***", "a token of visible ASCII characters, without spaces")
    return value or None
