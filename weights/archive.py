"""What a downloaded LoRA file is, and getting one verified .safetensors out of it.

Everything here decides from the file's bytes, never from its name or Content-Type: a Replicate
`_weights` URL has no extension, and a renamed pickle must still be caught. Nothing is ever
unpickled or imported: pickle files are recognised by their first bytes and refused.

Archives (tar, optionally compressed, and zip) are read member by member and the one
.safetensors member is streamed to a path the caller chose, so a member's name never becomes a
path on disk. Archives holding absolute paths, `..`, links or device files are refused as a
whole anyway: such an archive is either broken or hostile, and neither is worth guessing about.
"""

from __future__ import annotations

import json
import stat
import struct
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal

FileKind = Literal["safetensors", "zip", "tar", "pickle", "torch_zip", "unknown"]

ONLY_SAFETENSORS = "only .safetensors LoRA files are accepted (pickle formats such as .bin/.pt/.ckpt are not)"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_MAX_MEMBERS = 10_000
_MAX_TOTAL_FACTOR = 4  # all members together, as a multiple of the per-member limit
_LISTED = 20  # names shown in an error before "..."
_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


class NotSafetensorsError(ValueError):
    """The file is not a usable safetensors file (message says why and what is accepted)."""


class ArchiveError(ValueError):
    """The archive is unsafe, or does not hold exactly one .safetensors file."""


def sniff(path: Path) -> FileKind:
    """Classify a file by its leading bytes."""
    with open(path, "rb") as f:
        head = f.read(512)
    if _looks_like_safetensors(head):
        return "safetensors"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        # PyTorch's zip checkpoints (torch.save since 1.6) are zips around a data.pkl.
        try:
            with zipfile.ZipFile(path) as z:
                if any(PurePosixPath(n).name == "data.pkl" for n in z.namelist()[:_MAX_MEMBERS]):
                    return "torch_zip"
        except zipfile.BadZipFile:
            return "unknown"
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"  # PROTO opcode: legacy torch.save / pickle.dump output
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        return "tar" if _is_tar(path) else "unknown"  # compressed: only a tarball is of use to us
    if _is_tar(path):
        return "tar"  # old (v7) tar headers carry no magic
    return "unknown"


def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 10:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= _MAX_HEADER_BYTES and head[8:9] == b"{"


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, tarfile.TarError, EOFError):
        return False


def refusal_for(kind: FileKind, what: str) -> str:
    """The message for a file that is not safetensors or an archive of one."""
    if kind in ("pickle", "torch_zip"):
        return f"{what} is a PyTorch/pickle file, which can run code when loaded; {ONLY_SAFETENSORS}"
    return f"{what} is not a safetensors file (nor a .tar/.zip holding one); {ONLY_SAFETENSORS}"


def verify_safetensors(path: Path) -> int:
    """Check the safetensors framing without loading tensors; returns the number of tensors.

    Reads the 8-byte header length and the JSON header, checks every tensor's dtype, shape and
    byte range against the file size, then lets the safetensors library open it (memory-mapped,
    nothing read) as the authority on the format.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise NotSafetensorsError(
                f"the file is {size} bytes, too short to be safetensors; {ONLY_SAFETENSORS}"
            )
        (n,) = struct.unpack("<Q", prefix)
        if n < 2 or n > _MAX_HEADER_BYTES or 8 + n > size:
            raise NotSafetensorsError(
                f"the file does not start with a safetensors header; {ONLY_SAFETENSORS}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError:
        raise NotSafetensorsError(f"the safetensors header is not valid JSON; {ONLY_SAFETENSORS}") from None
    if not isinstance(header, dict):
        raise NotSafetensorsError("the safetensors header is not a JSON object")
    data_size = size - 8 - n
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise NotSafetensorsError("the safetensors file holds no tensors")
    for name, info in tensors.items():
        _check_tensor_entry(name, info, data_size)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as st:
            st.keys()
    except Exception as err:  # the library's own error types vary across versions
        raise NotSafetensorsError(f"the safetensors library rejects the file: {err}") from None
    return len(tensors)


def _check_tensor_entry(name: str, info: object, data_size: int) -> None:
    bad = NotSafetensorsError(f"the safetensors header entry {name!r} is malformed")
    if not isinstance(info, dict):
        raise bad
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _DTYPE_SIZES or not isinstance(shape, list) or not isinstance(offsets, list):
        raise bad
    if len(offsets) != 2 or not all(isinstance(o, int) and o >= 0 for o in offsets):
        raise bad
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise bad
    start, end = offsets
    count = 1
    for d in shape:
        count *= d
    if end < start or end > data_size or end - start != count * _DTYPE_SIZES[dtype]:
        raise NotSafetensorsError(
            f"tensor {name!r} points outside the file (truncated or corrupt safetensors file)"
        )


def extract_single_safetensors(archive: Path, kind: FileKind, dest: Path, max_member_bytes: int) -> str:
    """Stream the archive's one .safetensors member into `dest`; returns the member's name.

    Raises ArchiveError when any member is unsafe (absolute path, `..`, link, device), a member is
    over `max_member_bytes`, or the archive holds zero or several .safetensors files (the error
    lists what it holds). Nested archives are listed, never opened.
    """
    return _extract(archive, kind, dest, max_member_bytes, _is_candidate)


def extract_named_member(
    archive: Path, kind: FileKind, basename: str, dest: Path, max_member_bytes: int
) -> str:
    """extract_single_safetensors for the one member whose file name is `basename` (at any depth),
    with the same checks; ArchiveError when there is none."""
    return _extract(archive, kind, dest, max_member_bytes, lambda name: PurePosixPath(name).name == basename)


def _extract(archive: Path, kind: FileKind, dest: Path, limit: int, wanted: Callable[[str], bool]) -> str:
    if kind == "zip":
        return _extract_from_zip(archive, dest, limit, wanted)
    if kind == "tar":
        return _extract_from_tar(archive, dest, limit, wanted)
    raise ArchiveError(f"not an archive ({kind})")


def _check_name(name: str) -> None:
    normalised = name.replace("\\", "/")
    parts = PurePosixPath(normalised).parts
    if normalised.startswith("/") or (len(normalised) > 1 and normalised[1] == ":") or ".." in parts:
        raise ArchiveError(f"the archive is refused: member {name!r} points outside the archive")


def _is_candidate(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    # macOS zips carry AppleDouble copies (__MACOSX/, ._name) that are not the weights.
    if "__MACOSX" in path.parts or path.name.startswith("._"):
        return False
    return path.suffix.lower() == ".safetensors"


def _one(candidates: list[str], listing: list[str]) -> str:
    if len(candidates) == 1:
        return candidates[0]
    shown = ", ".join(listing[:_LISTED]) + (", ..." if len(listing) > _LISTED else "")
    if not candidates:
        raise ArchiveError(f"the archive holds no .safetensors file (it holds: {shown or 'nothing'})")
    raise ArchiveError(
        f"the archive holds {len(candidates)} .safetensors files ({', '.join(candidates[:_LISTED])}); "
        "it must hold exactly one"
    )


def _extract_from_tar(archive: Path, dest: Path, limit: int, wanted: Callable[[str], bool]) -> str:
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members: dict[str, tarfile.TarInfo] = {}
            listing: list[str] = []
            total = 0
            for i, member in enumerate(tar):
                if i >= _MAX_MEMBERS:
                    raise ArchiveError(f"the archive has more than {_MAX_MEMBERS} members")
                total += max(member.size, 0)
                if total > _MAX_TOTAL_FACTOR * limit:
                    # Listing a compressed tar decompresses it all; bound that work too.
                    raise ArchiveError(
                        f"the archive unpacks to more than {_MAX_TOTAL_FACTOR}x the size limit"
                    )
                _check_name(member.name)
                if member.issym() or member.islnk():
                    raise ArchiveError(f"the archive is refused: member {member.name!r} is a link")
                if not (member.isfile() or member.isdir()):
                    raise ArchiveError(f"the archive is refused: member {member.name!r} is a device or fifo")
                if member.isfile():
                    listing.append(member.name)
                    if wanted(member.name):
                        members[member.name] = member
            name = _one(list(members), listing)
            member = members[name]
            if member.size > limit:
                raise ArchiveError(f"{name!r} in the archive is {member.size} bytes; the limit is {limit}")
            source = tar.extractfile(member)
            if source is None:
                raise ArchiveError(f"cannot read {name!r} from the archive")
            with source:
                _copy_limited(source, dest, limit, name)
            return name
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ArchiveError(f"the tar archive is damaged or truncated ({err})") from None


def _extract_from_zip(archive: Path, dest: Path, limit: int, wanted: Callable[[str], bool]) -> str:
    try:
        with zipfile.ZipFile(archive) as z:
            infos = z.infolist()
            if len(infos) > _MAX_MEMBERS:
                raise ArchiveError(f"the archive has more than {_MAX_MEMBERS} members")
            candidates: dict[str, zipfile.ZipInfo] = {}
            listing: list[str] = []
            for info in infos:
                _check_name(info.filename)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise ArchiveError(f"the archive is refused: member {info.filename!r} is a link")
                # Many zip tools store permission bits without a file type; only a stated
                # non-regular type (char/block device, fifo, socket) is refused.
                if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise ArchiveError(
                        f"the archive is refused: member {info.filename!r} is a device or fifo"
                    )
                if info.is_dir():
                    continue
                listing.append(info.filename)
                if wanted(info.filename):
                    candidates[info.filename] = info
            name = _one(list(candidates), listing)
            info = candidates[name]
            if info.file_size > limit:
                raise ArchiveError(f"{name!r} in the archive is {info.file_size} bytes; the limit is {limit}")
            with z.open(info) as source:
                _copy_limited(source, dest, limit, name)
            return name
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as err:
        raise ArchiveError(f"the zip archive is damaged or truncated ({err})") from None


def _copy_limited(source: BinaryIO, dest: Path, limit: int, name: str) -> None:
    """Copy at most `limit` bytes; a member that grows past its declared size is refused."""
    copied = 0
    with open(dest, "wb") as out:
        while chunk := source.read(1024 * 1024):
            copied += len(chunk)
            if copied > limit:
                raise ArchiveError(f"{name!r} in the archive is larger than the limit of {limit} bytes")
            out.write(chunk)


__all__ = [
    "ArchiveError",
    "FileKind",
    "NotSafetensorsError",
    "ONLY_SAFETENSORS",
    "extract_named_member",
    "extract_single_safetensors",
    "refusal_for",
    "sniff",
    "verify_safetensors",
]
