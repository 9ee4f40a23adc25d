"""From the user's zip to (image, caption) pairs for LoRA training.

The rules users know from the public FLUX trainers:
- images (jpg, jpeg, png, webp, bmp, gif, tif, tiff; any letter case) anywhere in the zip, subfolders
  included; `__MACOSX/`, `._*`, hidden and system files are ignored; nested archives are ignored with
  a note (their contents are not unpacked: one level of trust is enough);
- a caption is the .txt with the same stem in the same folder (`cat.jpg` <- `cat.txt`, or
  `cat.jpg.txt` as some captioning tools write it); UTF-8 with or without BOM, UTF-16 with BOM, else
  decoded as cp1252/latin-1 with a log line;
- `[trigger]` in a caption becomes the trigger word; a caption without the trigger word gets it
  prepended ("TOK, a photo of ..."); an image without a caption is captioned with the trigger word
  alone (captioning with a vision-language model is a later addition);
- every image goes through flux.images.open_user_image (EXIF orientation, transparency, CMYK,
  16-bit, palette, first frame, decompression bombs); one that fails is skipped with a log line.
"""

from __future__ import annotations

import codecs
import logging
import re
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path, PurePosixPath

from PIL import Image

from errors import UserInputError
from flux.images import DEFAULT_MAX_PIXELS, open_user_image
from training.zip_extract import (
    DEFAULT_LIMITS,
    ZipLimits,
    ZipMember,
    extract_members,
    list_members,
    open_user_zip,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CAPTION_SUFFIX = ".txt"
ARCHIVE_SUFFIXES = frozenset({".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".zst"})
SYSTEM_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", ".ds_store", "icon\r"})
SYSTEM_FOLDERS = frozenset({"__macosx", "$recycle.bin", "system volume information"})
FEW_IMAGES = 5  # below this a warning: a LoRA trained on so few images tends to copy them
MAX_CAPTION_BYTES = 64 * 1024
_NAMES_IN_ERROR = 20


@dataclass(frozen=True)
class TrainingExample:
    image: Image.Image  # RGB, fully loaded
    caption: str  # final caption, trigger word included
    source: str  # path of the image inside the zip
    caption_source: str  # "txt" (from a .txt next to the image) or "trigger" (trigger word alone)


@dataclass(frozen=True)
class DatasetReport:
    images_found: int  # members with an image extension, usable or not
    images_used: int
    captions_from_txt: int
    skipped: list[tuple[str, str]]  # (name in zip, reason): refused or unreadable members
    ignored: list[str]  # names left out on purpose: macOS/hidden/system files, archives, other types
    warnings: list[str]  # things the user should know about (also logged)
    extracted_dir: Path | None = dataclass_field(default=None, compare=False)

    def summary(self) -> str:
        from_trigger = self.images_used - self.captions_from_txt
        return (
            f"{self.images_used} of {self.images_found} images used; {self.captions_from_txt} captions from "
            f".txt files, {from_trigger} captioned with the trigger word alone; {len(self.skipped)} skipped, "
            f"{len(self.ignored)} ignored"
        )


def load_training_zip(
    zip_path: Path,
    work_dir: Path,
    trigger_word: str,
    field: str = "input_images",
    *,
    limits: ZipLimits = DEFAULT_LIMITS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    keep_pixels: int | None = None,
) -> tuple[list[TrainingExample], DatasetReport]:
    """Read the user's training zip into examples; UserInputError when it holds no usable image.

    keep_pixels: images larger than this many pixels are downscaled (aspect kept) right after
    decoding, to bound memory with many large photos; None keeps them as they are.
    """
    zip_path = Path(zip_path)
    zip_name = zip_path.name
    skipped: list[tuple[str, str]] = []
    ignored: list[str] = []
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        log.warning("%s: %s", field, message)

    with open_user_zip(zip_path, field) as archive:
        entries = [info.filename for info in archive.infolist() if not info.is_dir()]
        if not entries:
            raise UserInputError(
                field, zip_name, "the zip is empty; expected images with optional .txt captions"
            )
        listing = list_members(archive, field, limits)
        skipped.extend(listing.refused)

        images, captions, left_out = _classify(listing.members)
        for name, reason in left_out:
            if reason == "too large":
                skipped.append((name, f"caption file larger than {MAX_CAPTION_BYTES // 1024} KiB"))
                log.warning("%s: caption %s skipped: larger than %d bytes", field, name, MAX_CAPTION_BYTES)
            else:
                ignored.append(name)
                if reason == "nested archive":
                    warn(f"nested archive {name} ignored: put its images directly into the zip")
        _log_ignored(field, [(name, reason) for name, reason in left_out if reason != "too large"])

        images_found = len(images) + sum(
            1 for name, _ in listing.refused if PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES
        )
        work_dir.mkdir(parents=True, exist_ok=True)
        dest = Path(tempfile.mkdtemp(prefix="input_images-", dir=work_dir))
        written, failed = extract_members(archive, [*images, *captions], dest, field, limits)
        skipped.extend(failed)

    paths = {member.name: path for member, path in written}
    caption_paths = _caption_index([m for m in captions if m.name in paths])
    trigger = trigger_word.strip()
    caption_of = {member.name: _find_caption(member.name, caption_paths) for member in images}
    examples: list[TrainingExample] = []
    downscaled = 0
    usable_images = [m for m in sorted(images, key=lambda m: m.name) if m.name in paths]
    for number, member in enumerate(usable_images, start=1):
        try:
            image = open_user_image(paths[member.name], field, max_pixels)
        except UserInputError as exc:
            skipped.append((member.name, exc.allowed))
            log.warning("%s: image %s skipped: %s", field, member.name, exc.allowed)
            continue
        if keep_pixels is not None and image.width * image.height > keep_pixels:
            image = _downscale(image, keep_pixels)
            downscaled += 1
        caption_name = caption_of[member.name]
        text = _read_caption(caption_name, paths, field, warn) if caption_name else None
        if text:
            examples.append(TrainingExample(image, caption_with_trigger(text, trigger), member.name, "txt"))
        else:
            examples.append(TrainingExample(image, trigger, member.name, "trigger"))
        if number % 50 == 0:
            log.info("%s: decoded %d/%d images", field, number, len(usable_images))

    paired = set(caption_of.values())
    for member in captions:
        if member.name in paths and member.name not in paired:
            ignored.append(member.name)
            log.info("%s: caption %s has no image next to it; ignored", field, member.name)
    if downscaled:
        log.info("%s: %d images larger than %d pixels downscaled", field, downscaled, keep_pixels)
    if not trigger:
        warn("the trigger word is empty: captions are used as they are, images without a caption get none")
    if not examples:
        raise UserInputError(field, zip_name, _nothing_usable(entries, skipped))
    if len(examples) < FEW_IMAGES:
        warn(f"only {len(examples)} usable images; at least {FEW_IMAGES} (better 10-30) are recommended")

    report = DatasetReport(
        images_found=images_found,
        images_used=len(examples),
        captions_from_txt=sum(1 for example in examples if example.caption_source == "txt"),
        skipped=skipped,
        ignored=ignored,
        warnings=warnings,
        extracted_dir=dest,
    )
    log.info("%s: %s", field, report.summary())
    return examples, report


def caption_with_trigger(caption: str, trigger_word: str) -> str:
    """`[trigger]` replaced by the trigger word; the trigger word prepended when the caption lacks it.

    The presence check is case-sensitive and on word boundaries, so "TOK" is not found in "TOKEN".
    """
    trigger = trigger_word.strip()
    text = re.sub(r"\[trigger\]", lambda _: trigger, caption, flags=re.IGNORECASE)
    text = " ".join(text.split())
    if not trigger:
        return text
    if not text:
        return trigger
    if _whole_word(trigger).search(text):
        return text
    return f"{trigger}, {text}"


def decode_caption(data: bytes) -> tuple[str, str]:
    """Caption bytes to text with whitespace collapsed to single spaces; returns (text, encoding used).

    Raises ValueError for data that is not text (NUL characters after decoding).
    """
    if data.startswith(codecs.BOM_UTF8):
        data, encodings = data[len(codecs.BOM_UTF8) :], ("utf-8", "cp1252", "latin-1")
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encodings = ("utf-16",)  # Windows Notepad's "Unicode"
    else:
        encodings = ("utf-8", "cp1252", "latin-1")  # latin-1 decodes any byte: the last resort
    for encoding in encodings:
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        if "\x00" in text:
            raise ValueError("it is not text (contains NUL characters)")
        return " ".join(text.split()), encoding
    raise ValueError("it could not be decoded as text")


def _read_caption(name: str, paths: dict[str, Path], field: str, warn: Callable[[str], None]) -> str | None:
    try:
        text, encoding = decode_caption(paths[name].read_bytes())
    except (OSError, ValueError) as exc:
        warn(f"caption {name} not used: {exc}")
        return None
    if encoding not in ("utf-8", "utf-16"):
        log.info("%s: caption %s is not UTF-8; decoded as %s", field, name, encoding)
    if not text:
        log.info("%s: caption %s is empty; the trigger word alone is used", field, name)
    return text


def _caption_index(captions: list[ZipMember]) -> dict[tuple[str, str], list[str]]:
    """(folder, stem casefolded) -> caption names; stems match case-insensitively, exact case first."""
    index: dict[tuple[str, str], list[str]] = defaultdict(list)
    for member in captions:
        path = PurePosixPath(member.name)
        index[(str(path.parent), path.stem.casefold())].append(member.name)
    return index


def _find_caption(image_name: str, index: dict[tuple[str, str], list[str]]) -> str | None:
    path = PurePosixPath(image_name)
    folder = str(path.parent)
    # "cat.jpg.txt" (written by some captioning tools) is more specific than "cat.txt".
    for stem in (path.name, path.stem):
        candidates = index.get((folder, stem.casefold()), [])
        if candidates:
            exact = [name for name in candidates if PurePosixPath(name).stem == stem]
            return (exact or sorted(candidates))[0]
    return None


def _classify(members: list[ZipMember]) -> tuple[list[ZipMember], list[ZipMember], list[tuple[str, str]]]:
    """(images, captions, [(name, why it is left out)])."""
    images: list[ZipMember] = []
    captions: list[ZipMember] = []
    left_out: list[tuple[str, str]] = []
    for member in members:
        reason = _ignore_reason(member.name)
        suffix = PurePosixPath(member.name).suffix.lower()
        if reason is not None:
            left_out.append((member.name, reason))
        elif suffix in ARCHIVE_SUFFIXES:
            left_out.append((member.name, "nested archive"))
        elif suffix in IMAGE_SUFFIXES:
            images.append(member)
        elif suffix == CAPTION_SUFFIX and member.info.file_size > MAX_CAPTION_BYTES:
            left_out.append((member.name, "too large"))
        elif suffix == CAPTION_SUFFIX:
            captions.append(member)
        else:
            left_out.append((member.name, "not an image or a .txt caption"))
    return images, captions, left_out


def _log_ignored(field: str, ignored: list[tuple[str, str]]) -> None:
    # One line per reason: a __MACOSX folder alone can hold hundreds of entries.
    by_reason: dict[str, list[str]] = defaultdict(list)
    for name, reason in ignored:
        by_reason[reason].append(name)
    for reason, names in by_reason.items():
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        log.info("%s: ignored %d files (%s): %s%s", field, len(names), reason, ", ".join(names[:5]), more)


def _ignore_reason(name: str) -> str | None:
    parts = name.split("/")
    if any(part.casefold() in SYSTEM_FOLDERS for part in parts[:-1]):
        return "macOS or system folder"
    if parts[-1].startswith("._"):
        return "macOS resource fork"
    if parts[-1].casefold() in SYSTEM_FILES:
        return "system file"
    if any(part.startswith(".") for part in parts):
        return "hidden file or folder"
    return None


def _downscale(image: Image.Image, keep_pixels: int) -> Image.Image:
    scale = (keep_pixels / (image.width * image.height)) ** 0.5
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _nothing_usable(entries: list[str], skipped: list[tuple[str, str]]) -> str:
    reasons = dict(skipped)
    shown = [
        f"{name} ({reasons[name]})" if name in reasons else name for name in sorted(entries)[:_NAMES_IN_ERROR]
    ]
    more = f" and {len(entries) - _NAMES_IN_ERROR} more" if len(entries) > _NAMES_IN_ERROR else ""
    kinds = ", ".join(sorted(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES))
    return (
        f"expected at least one readable image ({kinds}) in the zip, optionally with same-name .txt captions; "
        f"found {len(entries)} entries: {'; '.join(shown)}{more}"
    )


def replace_trigger(caption: str, trigger_word: str, replacement: str) -> str:
    """The caption with every whole-word trigger word replaced ("TOK, a red TOK" -> "shape, a red shape")."""
    return _whole_word(trigger_word.strip()).sub(lambda _: replacement, caption)


def _whole_word(word: str) -> re.Pattern:
    """`word` where it stands as a word of its own: case-sensitive, so "TOK" is not found in "TOKEN"."""
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)")
