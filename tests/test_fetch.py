"""The dataset fetcher, offline: tiny archives with the real layouts, served from file:// URLs."""

from __future__ import annotations

import dataclasses
import io
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from retrieval.datasets import fetch as fetch_mod
from retrieval.datasets import load_dataset
from retrieval.errors import DatasetError


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 16), color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def flickr8k_archives(tmp_path: Path) -> Path:
    src = tmp_path / "server"
    src.mkdir()
    names = [f"{i}_abc.jpg" for i in range(4)]
    with zipfile.ZipFile(src / "Flickr8k_Dataset.zip", "w") as zf:
        for i, n in enumerate(names):
            zf.writestr(f"Flicker8k_Dataset/{n}", _jpeg((i * 50, 10, 10)))
        zf.writestr("__MACOSX/._junk", b"x")
    with zipfile.ZipFile(src / "Flickr8k_text.zip", "w") as zf:
        zf.writestr("Flickr8k.token.txt", "".join(f"{n}#{k}\ta caption {k} of {n}\n" for n in names for k in range(5)))
        zf.writestr("Flickr_8k.trainImages.txt", "\n".join(names[:2]) + "\n")
        zf.writestr("Flickr_8k.devImages.txt", names[2] + "\n")
        zf.writestr("Flickr_8k.testImages.txt", names[3] + "\n")
        zf.writestr("readme.txt", "ignored")
    return src


def _local_recipe(monkeypatch, name: str, server: Path, check) -> None:
    r = fetch_mod.RECIPES[name]
    local = tuple(dataclasses.replace(d, url=(server / d.filename).as_uri()) for d in r.downloads)
    monkeypatch.setitem(fetch_mod.RECIPES, name, dataclasses.replace(r, downloads=local, check=check))


def test_flickr8k_layout_is_what_the_readers_expect(tmp_path, flickr8k_archives, monkeypatch):
    _local_recipe(monkeypatch, "flickr8k", flickr8k_archives,
                  lambda d: fetch_mod._need(d, 4, {"train": 2, "dev": 1, "test": 1}))
    dest = tmp_path / "data" / "flickr8k"
    summary = fetch_mod.fetch("flickr8k", dest, quiet=True)
    assert summary.startswith("4 images")
    test = load_dataset(dest, split="test")
    assert [r.id for r in test] == ["3_abc.jpg"] and len(test[0].captions) == 5
    sums = (dest / "downloads" / "SHA256SUMS").read_text()
    assert "Flickr8k_Dataset.zip" in sums and "Flickr8k_text.zip" in sums
    # a second fetch reuses the downloads and verifies them against the recorded checksums
    assert fetch_mod.fetch("flickr8k", dest, quiet=True) == summary


def test_a_download_that_changed_is_refused(tmp_path, flickr8k_archives, monkeypatch):
    _local_recipe(monkeypatch, "flickr8k", flickr8k_archives, lambda d: "ok")
    dest = tmp_path / "f8k"
    fetch_mod.fetch("flickr8k", dest, quiet=True)
    with zipfile.ZipFile(dest / "downloads" / "Flickr8k_text.zip", "a") as zf:
        zf.writestr("extra.txt", "tampered")
    with pytest.raises(DatasetError, match="SHA-256"):
        fetch_mod.fetch("flickr8k", dest, quiet=True)


def test_a_corrupt_zip_member_is_refused(tmp_path, flickr8k_archives, monkeypatch):
    archive = flickr8k_archives / "Flickr8k_Dataset.zip"
    data = bytearray(archive.read_bytes())
    at = data.find(b"JFIF")
    data[at + 40] ^= 0xFF  # flip a byte inside the first stored image: its CRC no longer matches
    archive.write_bytes(bytes(data))
    _local_recipe(monkeypatch, "flickr8k", flickr8k_archives, lambda d: "ok")
    with pytest.raises(DatasetError, match="CRC"):
        fetch_mod.fetch("flickr8k", tmp_path / "f8k", quiet=True)


def test_too_few_images_fail_the_check(tmp_path, flickr8k_archives, monkeypatch):
    _local_recipe(monkeypatch, "flickr8k", flickr8k_archives, lambda d: fetch_mod._need(d, 8091))
    with pytest.raises(DatasetError, match="expected at least 8091"):
        fetch_mod.fetch("flickr8k", tmp_path / "f8k", quiet=True)


def test_caltech101_gets_prompts_and_labels(tmp_path, monkeypatch):
    server = tmp_path / "server"
    server.mkdir()
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w:gz") as tf:
        for folder in ("Faces_easy", "lobster", "BACKGROUND_Google"):
            for k in range(2):
                data = _jpeg((k * 90, 40, 40))
                info = tarfile.TarInfo(f"101_ObjectCategories/{folder}/image_000{k}.jpg")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    with zipfile.ZipFile(server / "caltech-101.zip", "w") as zf:
        zf.writestr("caltech-101/101_ObjectCategories.tar.gz", tar_buf.getvalue())
    _local_recipe(monkeypatch, "caltech101", server, lambda d: fetch_mod._need(d, 4))
    dest = tmp_path / "c101"
    fetch_mod.fetch("caltech101", dest, quiet=True)
    records = {r.id: r for r in load_dataset(dest)}
    assert sorted(records) == ["Faces_easy__image_0000.jpg", "Faces_easy__image_0001.jpg",
                               "lobster__image_0000.jpg", "lobster__image_0001.jpg"]  # no background class
    assert records["Faces_easy__image_0000.jpg"].captions == ("a photo of a centered face.",)
    assert records["lobster__image_0001.jpg"].extra["label"] == "lobster"


def test_archives_behind_a_form_are_asked_for(tmp_path):
    with pytest.raises(DatasetError, match=r"flickr30k-images\.tar\.gz"):
        fetch_mod.fetch("flickr30k", tmp_path / "f30k", quiet=True)


def test_cli_lists_and_reports_errors(capsys):
    assert fetch_mod.main(["--list"]) == 0
    assert "caltech101" in capsys.readouterr().out
    assert fetch_mod.main(["no-such-set"]) == 2
    assert "unknown dataset" in capsys.readouterr().err
