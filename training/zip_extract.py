"""Extracting a user's zip without trusting it.

A zip from a user can name members `../../etc/x` or `/etc/x`, carry symbolic links, declare
gigabytes that compress to kilobytes (zip bombs), or hold thousands of members. This module lists
the members, refuses the unsafe ones with a reason, and writes the wanted ones under one folder,
counting the bytes actually written (Python's zipfile stops at the declared size and checks the CRC,
so the declared sizes bound what can come out; the count is a second guard).
"""

from __future__ import annotations

import logging
import stat
import unicodedata
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from errors import UserInputError

log = logging.getLogger(__name__)

_MiB = 1024 * 1024


@dataclass(frozen=True)
class ZipLimits:
    """How much a user's zip may hold; every limit is checked before anything is written."""

    max_members: int = 20_000
    max_member_bytes: int = 512 * _MiB  # a 40 M pixel 16-bit TIFF is ~320 MiB
    max_total_bytes: int = 4 * 1024 * _MiB
    # Photos barely compress (ratio ~1); uncompressed BMP/TIFF of flat graphics can reach a few
    # hundred. A ratio above this on a member larger than ratio_min_bytes is treated as a bomb.
    max_ratio: float = 200.0
    ratio_min_bytes: int = 16 * _MiB


DEFAULT_LIMITS = ZipLimits()


@dataclass(frozen=True)
class ZipMember:
    name: str  # normalised path inside the zip: '/'-separated, NFC, no leading './'
    info: zipfile.ZipInfo


@dataclass(frozen=True)
class ZipListing:
    members: list[ZipMember]  # regular files with a safe path, within the per-member limits
    refused: list[tuple[str, str]]  # (name as stored, reason)


def open_user_zip(zip_path: Path, field: str) -> zipfile.ZipFile:
    """Open the user's file as a zip, or raise UserInputError saying it is not one."""
    try:
        return zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise UserInputError(
            field, Path(zip_path).name, f"expected a .zip file of images (with optional .txt captions): {exc}"
        ) from exc


def list_members(archive: zipfile.ZipFile, field: str, limits: ZipLimits = DEFAULT_LIMITS) -> ZipListing:
    """Regular, safely named members; every other member is refused with a reason."""
    infos = archive.infolist()
    if len(infos) > limits.max_members:
        raise UserInputError(
            field,
            Path(archive.filename or "zip").name,
            f"the zip holds {len(infos)} entries; at most {limits.max_members} are accepted",
        )
    members: list[ZipMember] = []
    refused: list[tuple[str, str]] = []
    seen: set[str] = set()
    for info in infos:
        if info.is_dir() or info.filename.endswith("\\"):  # Windows tools may write "folder\\"
            continue
        name = _normalise(info.filename)
        reason = _refusal(info, limits)
        if reason is None and name is None:
            reason = "unsafe path (absolute or leading outside the folder)"
        elif reason is None and name in seen:
            reason = "duplicate name in the zip"
        if reason is not None or name is None:
            refused.append((info.filename, reason or "unsafe path"))
            log.warning("zip member %r refused: %s", info.filename, reason)
            continue
        seen.add(name)
        members.append(ZipMember(name, info))
    return ZipListing(members, refused)


def extract_members(
    archive: zipfile.ZipFile,
    members: Iterable[ZipMember],
    dest: Path,
    field: str,
    limits: ZipLimits = DEFAULT_LIMITS,
) -> tuple[list[tuple[ZipMember, Path]], list[tuple[str, str]]]:
    """Write members under dest (which must exist); returns (written, failed with reason)."""
    members = list(members)
    declared = sum(member.info.file_size for member in members)
    if declared > limits.max_total_bytes:
        raise UserInputError(
            field,
            Path(archive.filename or "zip").name,
            f"the files to use add up to {_size(declared)} uncompressed; "
            f"at most {_size(limits.max_total_bytes)} are accepted",
        )
    root = dest.resolve()
    written: list[tuple[ZipMember, Path]] = []
    failed: list[tuple[str, str]] = []
    budget = limits.max_total_bytes
    for member in members:
        target = (root / member.name).resolve()
        if not target.is_relative_to(root) or target == root:
            failed.append((member.name, "unsafe path"))  # unreachable after _normalise; kept as a guard
            continue
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            cap = min(member.info.file_size, limits.max_member_bytes, budget)
            budget -= _copy_capped(archive, member.info, target, cap)
        except (OSError, zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
            # Corrupt data, unsupported compression, a name the file system refuses, an encrypted
            # member: this file is skipped, the rest of the zip still counts.
            failed.append((member.name, f"could not be extracted: {exc}"))
            log.warning("zip member %r skipped: could not be extracted: %s", member.name, exc)
            target.unlink(missing_ok=True)
            continue
        written.append((member, target))
    return written, failed


def _copy_capped(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, cap: int) -> int:
    copied = 0
    with archive.open(info) as source, open(target, "xb") as sink:
        while chunk := source.read(1024 * 1024):
            copied += len(chunk)
            if copied > cap:
                raise ValueError(f"more data than declared or allowed ({cap} bytes)")
            sink.write(chunk)
    return copied


def _refusal(info: zipfile.ZipInfo, limits: ZipLimits) -> str | None:
    # The upper 16 bits of external_attr hold the Unix mode when the zip was made on Unix.
    file_type = stat.S_IFMT(info.external_attr >> 16)
    if file_type == stat.S_IFLNK:
        return "symbolic link"
    if file_type not in (0, stat.S_IFREG):
        return "not a regular file"
    if info.flag_bits & 0x1:
        return "encrypted"
    if info.file_size > limits.max_member_bytes:
        return f"{_size(info.file_size)} uncompressed; at most {_size(limits.max_member_bytes)} a file"
    if info.file_size > limits.ratio_min_bytes:
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > limits.max_ratio:
            return f"compression ratio {ratio:,.0f}:1 exceeds {limits.max_ratio:,.0f}:1 (zip bomb protection)"
    return None


def _normalise(raw: str) -> str | None:
    """A relative '/'-separated path, or None when the name is absolute or climbs out with '..'."""
    text = unicodedata.normalize("NFC", raw.replace("\\", "/"))
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):  # /abs, C:\abs, C:rel
        return None
    parts = [part for part in PurePosixPath(text).parts if part not in ("", ".")]
    if not parts or ".." in parts or any("\x00" in part for part in parts):
        return None
    return "/".join(parts)


def _size(count: int) -> str:
    return f"{count / _MiB:,.0f} MiB" if count >= _MiB else f"{count:,} bytes"
