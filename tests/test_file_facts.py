"""What the indexer records about each image file: EXIF date and camera, displayed size, mtime fallback, hash."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from retrieval.file_facts import (
    EXIF_IFD,
    TAG_DATETIME,
    TAG_DATETIME_ORIGINAL,
    TAG_MAKE,
    TAG_MODEL,
    TAG_ORIENTATION,
    content_hash,
    file_facts,
    parse_exif_datetime,
)

NAMES = {"make": TAG_MAKE, "model": TAG_MODEL, "orientation": TAG_ORIENTATION, "datetime": TAG_DATETIME}


def _jpeg(path, size=(40, 30), **tags):
    exif = Image.Exif()
    for tag, value in tags.items():
        if tag == "original":
            exif.get_ifd(EXIF_IFD)[TAG_DATETIME_ORIGINAL] = value
        else:
            exif[NAMES[tag]] = value
    Image.new("RGB", size, (10, 200, 30)).save(path, exif=exif)
    return path


def test_exif_date_camera_and_rotated_size(tmp_path):
    f = _jpeg(tmp_path / "a.jpg", original="2019:07:04 18:22:10", make="Canon", model="EOS 5D", orientation=6)
    facts = file_facts(f)
    assert facts["taken_at"] == "2019-07-04T18:22:10" and facts["taken_at_source"] == "exif"
    assert (facts["camera_make"], facts["camera_model"]) == ("Canon", "EOS 5D")
    assert (facts["width"], facts["height"]) == (30, 40)  # orientation 6: shown rotated by 90 degrees
    assert facts["bytes"] == f.stat().st_size and facts["content_hash"] == content_hash(f)


def test_datetime_tag_when_there_is_no_original(tmp_path):
    f = _jpeg(tmp_path / "b.jpg", datetime="2001:02:03 04:05:06")
    assert file_facts(f)["taken_at"] == "2001-02-03T04:05:06"


def test_mtime_when_there_is_no_exif_date(tmp_path):
    f = _jpeg(tmp_path / "c.jpg", original="0000:00:00 00:00:00")  # cameras write zeros when the clock is unset
    os.utime(f, (1_600_000_000, 1_600_000_000))
    facts = file_facts(f, with_hash=False)
    assert facts["taken_at"] == "2020-09-13T12:26:40" and facts["taken_at_source"] == "mtime"
    assert facts["mtime"] == 1_600_000_000 and "content_hash" not in facts
    assert facts["camera_make"] is None and (facts["width"], facts["height"]) == (40, 30)


def test_a_file_that_is_not_an_image_still_has_size_and_hash(tmp_path):
    f = tmp_path / "broken.jpg"
    f.write_bytes(b"not a jpeg at all")
    facts = file_facts(f)
    assert facts["bytes"] == 17 and facts["width"] is None and facts["content_hash"].startswith("sha256:")
    with pytest.raises(OSError):
        file_facts(tmp_path / "missing.jpg")


@pytest.mark.parametrize(("raw", "want"), [
    ("2019:07:04 18:22:10", "2019-07-04T18:22:10"), (b"2019:07:04 18:22:10\x00", "2019-07-04T18:22:10"),
    ("2019-07-04 18:22", "2019-07-04T18:22:00"), ("    ", None), ("garbage", None), (None, None), (7, None)])
def test_parse_exif_datetime(raw, want):
    assert parse_exif_datetime(raw) == want


def test_content_hash_changes_with_content(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * 3_000_000)
    b.write_bytes(b"x" * 2_999_999 + b"y")
    assert content_hash(a) != content_hash(b) and content_hash(a) == content_hash(a)
