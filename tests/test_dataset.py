"""The training zip: safe extraction, which files count, caption pairing and decoding, trigger word."""

from __future__ import annotations

import io
import logging
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from errors import UserInputError
from training.dataset import caption_with_trigger, decode_caption, load_training_zip
from training.zip_extract import ZipLimits


def _image_bytes(colour: tuple[int, int, int], fmt: str = "PNG", size: tuple[int, int] = (16, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


def _make_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


def _five_images(prefix: str = "") -> dict[str, bytes]:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    return {f"{prefix}img{i}.png": _image_bytes(colour) for i, colour in enumerate(colours)}


def _by_source(examples):
    return {example.source: example for example in examples}


def test_full_dataset_rules(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    members = {
        "photos/a.JPG": _image_bytes((200, 10, 10), "JPEG"),
        "photos/a.txt": "\ufeffa photo of [trigger] in a red room".encode(),
        "photos/deeper/b.png": _image_bytes((10, 200, 10)),
        "photos/deeper/b.txt": "café – naïve style".encode("cp1252"),
        "photos/c.webp": _image_bytes((10, 10, 200), "WEBP"),
        "photos/d.jpeg": _image_bytes((90, 90, 90), "JPEG"),
        "photos/d.txt": b"TOK standing, smiling",
        "other/a.txt": b"belongs to nobody",
        "e.GIF": _image_bytes((250, 250, 250), "GIF"),
        "f.TIFF": _image_bytes((1, 2, 3), "TIFF"),
        "g.bmp": _image_bytes((4, 5, 6), "BMP"),
        "__MACOSX/photos/._a.JPG": b"\x00\x05\x16\x07 resource fork",
        "photos/._c.webp": b"\x00\x05\x16\x07",
        ".hidden/h.png": _image_bytes((0, 0, 0)),
        "photos/Thumbs.db": b"junk",
        "desktop.ini": b"[.ShellClassInfo]",
        "notes.md": b"# my photos",
        "broken.png": b"\x89PNG\r\n\x1a\n this is not really a png",
        "more.zip": _make_zip(tmp_path / "inner.zip", _five_images()).read_bytes(),
    }
    zip_path = _make_zip(tmp_path / "photos.zip", members)
    with caplog.at_level(logging.INFO):
        examples, report = load_training_zip(zip_path, tmp_path / "work", "TOK")

    found = _by_source(examples)
    assert sorted(found) == sorted(
        ["photos/a.JPG", "photos/deeper/b.png", "photos/c.webp", "photos/d.jpeg", "e.GIF", "f.TIFF", "g.bmp"]
    )
    assert found["photos/a.JPG"].caption == "a photo of TOK in a red room"  # BOM gone, [trigger] replaced
    assert found["photos/a.JPG"].caption_source == "txt"
    assert (
        found["photos/deeper/b.png"].caption == "TOK, café – naïve style"
    )  # cp1252 decoded, trigger prepended
    assert found["photos/d.jpeg"].caption == "TOK standing, smiling"  # already has it
    assert found["photos/c.webp"].caption == "TOK" and found["photos/c.webp"].caption_source == "trigger"
    for example in examples:
        assert example.image.mode == "RGB" and example.image.size == (16, 12)
    assert np.asarray(found["photos/deeper/b.png"].image)[0, 0].tolist() == [10, 200, 10]

    assert report.images_found == 8  # the 7 used + broken.png
    assert report.images_used == 7
    assert report.captions_from_txt == 3
    assert [name for name, _ in report.skipped] == ["broken.png"]
    for name in ["__MACOSX/photos/._a.JPG", "photos/._c.webp", ".hidden/h.png", "photos/Thumbs.db"]:
        assert name in report.ignored
    assert {"desktop.ini", "notes.md", "more.zip", "other/a.txt"} <= set(report.ignored)
    assert any("more.zip" in warning and "nested archive" in warning for warning in report.warnings)
    assert not any("usable images" in warning for warning in report.warnings)  # 7 is not "few"

    log_text = caplog.text
    assert "broken.png" in log_text and "skipped" in log_text
    assert "cp1252" in log_text and "photos/deeper/b.txt" in log_text
    assert (
        "7 of 8 images used; 3 captions from .txt files, 4 captioned with the trigger word alone" in log_text
    )
    # Only images and captions were written, all inside the work folder.
    written = sorted(
        p.relative_to(report.extracted_dir).as_posix() for p in report.extracted_dir.rglob("*.*")
    )
    assert "more.zip" not in written and "notes.md" not in written and "photos/a.JPG" in written
    assert report.extracted_dir.is_relative_to(tmp_path / "work")


def test_unsafe_members_never_land_outside(tmp_path: Path) -> None:
    work = tmp_path / "deep" / "work"
    zip_path = tmp_path / "evil.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        for name, data in _five_images().items():
            archive.writestr(name, data)
        archive.writestr(zipfile.ZipInfo("../escape.png"), _image_bytes((1, 1, 1)))
        archive.writestr(zipfile.ZipInfo("../../escape2.png"), _image_bytes((1, 1, 1)))
        archive.writestr(zipfile.ZipInfo("/tmp/absolute.png"), _image_bytes((1, 1, 1)))
        archive.writestr(zipfile.ZipInfo("sub/../../escape3.png"), _image_bytes((1, 1, 1)))
        link = zipfile.ZipInfo("link.png")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    examples, report = load_training_zip(zip_path, work, "TOK")

    assert len(examples) == 5
    reasons = dict(report.skipped)
    assert set(reasons) == {
        "../escape.png",
        "../../escape2.png",
        "/tmp/absolute.png",
        "sub/../../escape3.png",
        "link.png",
    }
    assert reasons["link.png"] == "symbolic link"
    assert "unsafe path" in reasons["../escape.png"]
    assert not list(tmp_path.rglob("escape*.png"))
    assert not Path("/tmp/absolute.png").exists()
    assert not any(p.is_symlink() for p in work.rglob("*"))


def test_zip_bomb_member_is_refused_before_extraction(tmp_path: Path) -> None:
    members = _five_images()
    members["huge.bmp"] = bytes(20 * 1024 * 1024)  # 20 MiB of zeros: deflates ~1000:1
    zip_path = _make_zip(tmp_path / "bomb.zip", members)
    assert zip_path.stat().st_size < 200_000
    examples, report = load_training_zip(zip_path, tmp_path / "work", "TOK")
    assert len(examples) == 5
    reasons = dict(report.skipped)
    assert "zip bomb" in reasons["huge.bmp"] and "ratio" in reasons["huge.bmp"]
    assert not list((tmp_path / "work").rglob("huge.bmp"))


def test_size_limits_per_member_and_total(tmp_path: Path) -> None:
    zip_path = _make_zip(tmp_path / "big.zip", _five_images())
    per_member = ZipLimits(max_member_bytes=50)
    with pytest.raises(UserInputError, match="at most 50 bytes a file"):
        load_training_zip(zip_path, tmp_path / "w1", "TOK", limits=per_member)
    total = ZipLimits(max_total_bytes=200)
    with pytest.raises(UserInputError, match="add up to"):
        load_training_zip(zip_path, tmp_path / "w2", "TOK", limits=total)
    with pytest.raises(UserInputError, match="at most 3 are accepted"):
        load_training_zip(zip_path, tmp_path / "w3", "TOK", limits=ZipLimits(max_members=3))


def test_declared_size_lie_is_caught(tmp_path: Path) -> None:
    # A member whose header understates its size: zipfile stops at the declared size and the CRC
    # check fails, so the member is skipped instead of writing more than declared.
    zip_path = _make_zip(
        tmp_path / "lie.zip", {**_five_images(), "liar.png": _image_bytes((9, 9, 9))}, zipfile.ZIP_STORED
    )
    data = bytearray(zip_path.read_bytes())
    with zipfile.ZipFile(zip_path) as archive:
        real = archive.getinfo("liar.png").file_size
    # The central directory entry: signature, 42 bytes of fields, then the name at offset 46;
    # the uncompressed size sits at offset 24.
    offset = data.index(b"liar.png", data.index(b"PK\x01\x02")) - 46
    assert data[offset : offset + 4] == b"PK\x01\x02"
    data[offset + 24 : offset + 28] = (real // 2).to_bytes(4, "little")
    zip_path.write_bytes(bytes(data))
    examples, report = load_training_zip(zip_path, tmp_path / "work", "TOK")
    assert len(examples) == 5
    assert "CRC" in dict(report.skipped)["liar.png"]


def test_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "photos.zip"
    path.write_bytes(_image_bytes((1, 2, 3)))
    with pytest.raises(UserInputError) as info:
        load_training_zip(path, tmp_path / "work", "TOK")
    assert str(info.value).startswith("input_images:") and "photos.zip" in str(info.value)
    assert "expected a .zip file" in str(info.value)


def test_empty_zip(tmp_path: Path) -> None:
    path = _make_zip(tmp_path / "empty.zip", {})
    with pytest.raises(UserInputError, match="the zip is empty"):
        load_training_zip(path, tmp_path / "work", "TOK")


def test_zip_of_text_files_lists_what_was_found(tmp_path: Path) -> None:
    members = {f"caption{i}.txt": b"a photo" for i in range(25)}
    members["readme.md"] = b"hello"
    members["bad.jpg"] = b"not a jpeg"
    path = _make_zip(tmp_path / "texts.zip", members)
    with pytest.raises(UserInputError) as info:
        load_training_zip(path, tmp_path / "work", "TOK")
    message = str(info.value)
    assert "expected at least one readable image" in message
    assert "found 27 entries" in message and "and 7 more" in message
    assert "bad.jpg (expected a JPEG, PNG" in message
    assert "caption0.txt" in message


def test_few_images_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _make_zip(
        tmp_path / "few.zip", {"one.png": _image_bytes((1, 1, 1)), "two.png": _image_bytes((2, 2, 2))}
    )
    with caplog.at_level(logging.WARNING):
        examples, report = load_training_zip(path, tmp_path / "work", "TOK")
    assert len(examples) == 2
    assert any("only 2 usable images" in warning for warning in report.warnings)
    assert "only 2 usable images" in caplog.text


def test_caption_pairing_rules(tmp_path: Path) -> None:
    members = _five_images("set/")
    members["set/IMG0.TXT"] = b"upper case caption name"  # stems match case-insensitively
    members["set/img1.png.txt"] = b"full-name caption"  # cat.jpg.txt style
    members["set/img1.txt"] = b"stem caption"
    members["img2.txt"] = b"wrong folder"
    members["set/img3.txt"] = "utf16 caption ✓".encode("utf-16")
    members["set/img4.txt"] = b"   \n\t "
    path = _make_zip(tmp_path / "pairs.zip", members)
    examples, report = load_training_zip(path, tmp_path / "work", "sks")
    captions = {example.source: example.caption for example in examples}
    assert captions == {
        "set/img0.png": "sks, upper case caption name",
        "set/img1.png": "sks, full-name caption",
        "set/img2.png": "sks",
        "set/img3.png": "sks, utf16 caption ✓",
        "set/img4.png": "sks",
    }
    assert report.captions_from_txt == 3
    assert "img2.txt" in report.ignored and "set/img1.txt" in report.ignored


def test_examples_are_in_a_stable_order(tmp_path: Path) -> None:
    members = dict(reversed(list(_five_images("z/").items())))
    path = _make_zip(tmp_path / "order.zip", members)
    first, _ = load_training_zip(path, tmp_path / "w1", "TOK")
    second, _ = load_training_zip(path, tmp_path / "w2", "TOK")
    assert [e.source for e in first] == [e.source for e in second] == sorted(members)


def test_keep_pixels_downscales_large_images(tmp_path: Path) -> None:
    members = {"big.png": _image_bytes((5, 5, 5), size=(200, 100)), "small.png": _image_bytes((5, 5, 5))}
    path = _make_zip(tmp_path / "sizes.zip", members)
    examples, _ = load_training_zip(path, tmp_path / "work", "TOK", keep_pixels=5000)
    sizes = {e.source: e.image.size for e in examples}
    assert sizes == {"big.png": (100, 50), "small.png": (16, 12)}


def test_caption_with_trigger() -> None:
    assert caption_with_trigger("a photo of [trigger]", "TOK") == "a photo of TOK"
    assert caption_with_trigger("a photo of [TRIGGER] and [trigger]", "TOK") == "a photo of TOK and TOK"
    assert caption_with_trigger("a TOKEN on a table", "TOK") == "TOK, a TOKEN on a table"
    assert caption_with_trigger("TOK, on a table", "TOK") == "TOK, on a table"
    assert caption_with_trigger("  ", "TOK") == "TOK"
    assert caption_with_trigger("a photo", "") == "a photo"
    assert caption_with_trigger("a [trigger] photo", r"x\1y") == r"a x\1y photo"  # no regex escapes


def test_decode_caption() -> None:
    assert decode_caption("\ufeffline one\r\nline two ".encode()) == ("line one line two", "utf-8")
    assert decode_caption("naïve".encode("cp1252")) == ("naïve", "cp1252")
    assert decode_caption(b"\x81\x8d") == ("\x81\x8d", "latin-1")  # bytes cp1252 leaves undefined
    with pytest.raises(ValueError, match="not text"):
        decode_caption(b"\x00\x01\x02binary")
