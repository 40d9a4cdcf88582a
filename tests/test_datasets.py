"""Folder scanning, every captions format, splits, the real Flickr8k pack, and skipping bad images in a DataLoader."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from retrieval.datasets import (
    ImageRecord,
    discover_captions,
    load_dataset,
    read_captions,
    read_splits,
    scan_images,
)
from retrieval.datasets.loader import Batch, ImageLoadDataset, LoadedItem, collate_skipping
from retrieval.errors import DatasetError
from tests.conftest import make_images


def _touch_image(path: Path, color: tuple[int, int, int] = (200, 10, 10), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path, format=fmt)
    return path


def to_tensor_16(image: Image.Image) -> torch.Tensor:
    """A picklable transform: 16x16, float (3, H, W) in [0, 1]."""
    arr = np.asarray(image.resize((16, 16)), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# scan_images
# ----------------------------------------------------------------------------------------------------------------


def test_scan_nested_hidden_case_and_symlinks(tmp_path: Path):
    root = tmp_path / "coll"
    _touch_image(root / "b.jpg")
    _touch_image(root / "A.JPG", fmt="JPEG")
    _touch_image(root / "sub" / "deeper" / "c.PnG", fmt="PNG")
    _touch_image(root / "sub" / "d.webp")
    _touch_image(root / ".hidden.jpg")
    _touch_image(root / ".cache" / "e.jpg")
    _touch_image(root / "sub" / ".thumbs" / "f.jpg")
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "noext").write_bytes(b"\xff\xd8\xff")
    outside = _touch_image(tmp_path / "outside" / "x.jpg")
    os.symlink(outside, root / "link_out.jpg")
    os.symlink(tmp_path / "outside", root / "linkdir")
    os.symlink(root / "b.jpg", root / "sub" / "link_in.jpg")

    recs = scan_images(root)
    ids = [r.id for r in recs]
    assert ids == ["A.JPG", "b.jpg", "sub/d.webp", "sub/deeper/c.PnG", "sub/link_in.jpg"]
    assert all(r.path.is_absolute() and r.path.is_file() for r in recs)
    assert recs[3].path == (root / "sub" / "deeper" / "c.PnG").resolve()
    assert all(r.captions == () and r.split is None for r in recs)


def test_scan_errors(tmp_path: Path):
    with pytest.raises(DatasetError, match="not found"):
        scan_images(tmp_path / "nope")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a folder"):
        scan_images(tmp_path / "file.jpg")


def test_record_is_hashable_and_extra_ignored():
    a = ImageRecord("a.jpg", Path("/x/a.jpg"), ("cap",), "train", {"url": "u"})
    b = ImageRecord("a.jpg", Path("/x/a.jpg"), ("cap",), "train", {"url": "other"})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1


# ----------------------------------------------------------------------------------------------------------------
# read_captions / read_splits: one fixture per format
# ----------------------------------------------------------------------------------------------------------------


def test_jsonl_lists_single_captions_and_splits(tmp_path: Path):
    f = tmp_path / "captions.jsonl"
    f.write_text(
        "\n".join(
            [
                json.dumps({"image": "a.jpg", "captions": ["a one", "a two"], "split": "train", "url": "http://u"}),
                "",
                json.dumps({"image": "./sub/b.jpg", "caption": "b one", "split": "test"}),
                json.dumps({"image": "sub/b.jpg", "caption": "b two"}),
                json.dumps({"image": "c.jpg", "captions": []}),
            ]
        )
        + "\n"
    )
    assert read_captions(f) == {"a.jpg": ["a one", "a two"], "sub/b.jpg": ["b one", "b two"], "c.jpg": []}
    assert read_splits(f) == {"a.jpg": "train", "sub/b.jpg": "test"}


def test_json_array_and_single_line_jsonl_txt(tmp_path: Path):
    f = tmp_path / "captions.json"
    f.write_text(json.dumps([{"image": "a.jpg", "captions": ["x"]}, {"file_name": "b.jpg", "caption": "y"}]))
    assert read_captions(f) == {"a.jpg": ["x"], "b.jpg": ["y"]}
    g = tmp_path / "captions.txt"
    g.write_text(json.dumps({"image": "a.jpg", "captions": ["x"], "split": "dev"}) + "\n")
    assert read_captions(g) == {"a.jpg": ["x"]} and read_splits(g) == {"a.jpg": "dev"}


def test_kaggle_flickr8k_csv(tmp_path: Path):
    f = tmp_path / "captions.txt"
    f.write_text(
        "image,caption\n"
        '1000268201_693b08cb0e.jpg,"A child in a pink dress is climbing up a set of stairs , in an entry way ."\n'
        "1000268201_693b08cb0e.jpg,A girl going into a wooden building .\n"
        "1001773457_577c3a7d70.jpg,A black dog and a spotted dog are fighting\n"
    )
    caps = read_captions(f)
    assert caps == {
        "1000268201_693b08cb0e.jpg": [
            "A child in a pink dress is climbing up a set of stairs , in an entry way .",
            "A girl going into a wooden building .",
        ],
        "1001773457_577c3a7d70.jpg": ["A black dog and a spotted dog are fighting"],
    }
    assert read_splits(f) == {}


def test_flickr30k_results_csv_pipe(tmp_path: Path):
    f = tmp_path / "results.csv"
    f.write_text(
        "image_name| comment_number| comment\n"
        "1000092795.jpg| 0| Two young guys with shaggy hair look at their hands while hanging out in the yard .\n"
        '1000092795.jpg| 1| Two young , White males are outside near many "bushes" .\n'
        "2199200615.jpg| 4   A dog runs across the grass .\n"  # the real file's broken row
    )
    caps = read_captions(f)
    assert caps["1000092795.jpg"] == [
        "Two young guys with shaggy hair look at their hands while hanging out in the yard .",
        'Two young , White males are outside near many "bushes" .',
    ]
    assert caps["2199200615.jpg"] == ["A dog runs across the grass ."]


def test_csv_with_split_column_and_extra_commas(tmp_path: Path):
    f = tmp_path / "caps.csv"
    f.write_text("split,image,caption\ntest,a.jpg,one, two, three\n")
    assert read_captions(f) == {"a.jpg": ["one, two, three"]}
    assert read_splits(f) == {"a.jpg": "test"}


def test_flickr8k_token_txt(tmp_path: Path):
    f = tmp_path / "Flickr8k.token.txt"
    f.write_text(
        "1000268201_693b08cb0e.jpg#0\tA child in a pink dress is climbing up a set of stairs in an entry way .\n"
        "1000268201_693b08cb0e.jpg#1\tA girl going into a wooden building .\n"
        "1001773457_577c3a7d70.jpg#0\tA black dog and a spotted dog are fighting\n"
    )
    caps = read_captions(f)
    assert list(caps) == ["1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg"]
    assert caps["1000268201_693b08cb0e.jpg"][1] == "A girl going into a wooden building ."


def test_coco_captions_json(tmp_path: Path):
    f = tmp_path / "captions_val2014.json"
    f.write_text(
        json.dumps(
            {
                "info": {},
                "images": [
                    {"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "width": 640},
                    {"id": 7, "file_name": "COCO_val2014_000000000007.jpg"},
                ],
                "annotations": [
                    {"id": 1, "image_id": 42, "caption": "A man riding a wave. "},
                    {"id": 2, "image_id": 7, "caption": "A cat."},
                    {"id": 3, "image_id": 42, "caption": "Surfer on a board."},
                ],
            }
        )
    )
    assert read_captions(f) == {
        "COCO_val2014_000000000042.jpg": ["A man riding a wave.", "Surfer on a board."],
        "COCO_val2014_000000000007.jpg": ["A cat."],
    }
    assert read_splits(f) == {}


def test_karpathy_json(tmp_path: Path):
    f = tmp_path / "dataset_coco.json"
    f.write_text(
        json.dumps(
            {
                "dataset": "coco",
                "images": [
                    {
                        "filepath": "val2014",
                        "filename": "COCO_val2014_000000000042.jpg",
                        "split": "restval",
                        "sentences": [{"raw": "A man riding a wave.", "tokens": ["a"]}, {"raw": "Surfer."}],
                    },
                    {"filename": "x.jpg", "split": "test", "sentences": [{"raw": "X."}]},
                ],
            }
        )
    )
    assert read_captions(f) == {
        "val2014/COCO_val2014_000000000042.jpg": ["A man riding a wave.", "Surfer."],
        "x.jpg": ["X."],
    }
    assert read_splits(f) == {"val2014/COCO_val2014_000000000042.jpg": "restval", "x.jpg": "test"}


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        (
            "captions.jsonl",
            '{"image": "a.jpg", "captions": ["x"]}\n{"image": "b.jpg", "captions": [\n',
            r"captions\.jsonl:2",
        ),
        ("captions.jsonl", '{"captions": ["x"]}\n', r"captions\.jsonl:1: no image"),
        ("captions.json", '{"images": [{"filename": "a.jpg"}], \n oops', r"captions\.json:2"),
        ("captions.json", '{"something": 1}', "unknown JSON captions format"),
        ("captions.txt", "just some words\nand more\n", "unknown captions format"),
        ("captions.csv", "image,label\na.jpg,3\n", "caption column"),
        ("captions.csv", "image,caption\na.jpg,x\nb.jpg\n", r"captions\.csv:3: missing caption"),
        ("Flickr8k.token.txt", "a.jpg#0\tcap\nbroken line\n", r"token\.txt:2"),
        ("captions.txt", "", "empty"),
    ],
)
def test_unreadable_captions_raise_with_file_and_line(tmp_path: Path, name: str, content: str, match: str):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(DatasetError, match=match):
        read_captions(f)


def test_missing_and_binary_captions_file(tmp_path: Path):
    with pytest.raises(DatasetError, match="not found"):
        read_captions(tmp_path / "none.jsonl")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(DatasetError, match="UTF-8"):
        read_captions(tmp_path / "bin.txt")


# ----------------------------------------------------------------------------------------------------------------
# load_dataset
# ----------------------------------------------------------------------------------------------------------------


def test_load_image_folder_fixture(image_folder: Path):
    recs = load_dataset(image_folder)
    assert len(recs) == 12
    assert recs[0].id == "img_0000.jpg" and recs[0].captions == ("picture number 0", "image 0")
    assert [r.id for r in recs] == sorted(r.id for r in recs)


def test_images_subfolder_parent_captions_and_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    pack = tmp_path / "pack"
    make_images(pack / "images", 3)
    rows = [
        {"image": "img_0000.jpg", "captions": ["zero"], "split": "train"},
        {"image": "img_0001.jpg", "captions": ["one"], "split": "val"},
        {"image": "img_0002.jpg", "captions": ["two"], "split": "test"},
        {"image": "gone.jpg", "captions": ["no file"], "split": "test"},
    ]
    (pack / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="retrieval.datasets"):
        recs = load_dataset(pack)
    assert [r.id for r in recs] == ["img_0000.jpg", "img_0001.jpg", "img_0002.jpg"]
    assert recs[0].path == (pack / "images" / "img_0000.jpg").resolve()
    assert "1 captioned image(s)" in caplog.text and "gone.jpg" in caplog.text
    # the image folder itself finds captions in its parent
    assert [r.captions for r in load_dataset(pack / "images")] == [("zero",), ("one",), ("two",)]
    # dev and val are synonyms
    assert [r.id for r in load_dataset(pack, split="dev")] == ["img_0001.jpg"]
    assert [r.id for r in load_dataset(pack, split="val")] == ["img_0001.jpg"]
    assert [r.id for r in load_dataset(pack, split="test")] == ["img_0002.jpg"]
    with pytest.raises(DatasetError, match="available: dev, test, train"):
        load_dataset(pack, split="holdout")


def test_split_from_flickr8k_lists_and_token_file(tmp_path: Path):
    root = tmp_path / "Flickr8k"
    make_images(root / "Flicker8k_Dataset", 4)
    (root / "Flickr8k.token.txt").write_text(
        "".join(f"img_{i:04d}.jpg#{j}\tcaption {i}.{j}\n" for i in range(4) for j in range(2))
    )
    (root / "Flickr_8k.trainImages.txt").write_text("img_0000.jpg\nimg_0001.jpg\n")
    (root / "Flickr_8k.devImages.txt").write_text("img_0002.jpg\n")
    (root / "Flickr_8k.testImages.txt").write_text("img_0003.jpg\nmissing.jpg\n")
    src = root / "Flicker8k_Dataset"
    assert discover_captions(src) == [(root / "Flickr8k.token.txt").resolve()]
    train = load_dataset(src, split="train")
    assert [r.id for r in train] == ["img_0000.jpg", "img_0001.jpg"]
    assert train[1].captions == ("caption 1.0", "caption 1.1") and train[1].split == "train"
    assert [r.id for r in load_dataset(src, split="val")] == ["img_0002.jpg"]
    assert [r.id for r in load_dataset(src, split="test")] == ["img_0003.jpg"]
    assert len(load_dataset(src)) == 4


def test_split_without_split_information(image_folder: Path):
    with pytest.raises(DatasetError, match="no split information"):
        load_dataset(image_folder, split="test")


def test_nested_ids_match_basename_keys_and_explicit_captions(tmp_path: Path):
    root = tmp_path / "coco"
    _touch_image(root / "val2014" / "COCO_val2014_000000000042.jpg")
    _touch_image(root / "train2014" / "COCO_train2014_000000000001.jpg")
    _touch_image(root / "other" / "x.jpg")
    ann = tmp_path / "elsewhere" / "dataset_coco.json"
    ann.parent.mkdir()
    ann.write_text(
        json.dumps(
            {
                "images": [
                    {
                        "filepath": "val2014",
                        "filename": "COCO_val2014_000000000042.jpg",
                        "split": "test",
                        "sentences": [{"raw": "A wave."}],
                    },
                    {
                        "filepath": "train2014",
                        "filename": "COCO_train2014_000000000001.jpg",
                        "split": "restval",
                        "sentences": [{"raw": "A cat."}],
                    },
                    {"filename": "x.jpg", "split": "train", "sentences": [{"raw": "X."}]},
                ]
            }
        )
    )
    recs = {r.id: r for r in load_dataset(root, captions=ann)}
    assert recs["val2014/COCO_val2014_000000000042.jpg"].captions == ("A wave.",)
    assert recs["other/x.jpg"].captions == ("X.",)  # matched by base name
    train = load_dataset(root, captions=ann, split="train")  # restval counts as train
    assert [r.id for r in train] == ["other/x.jpg", "train2014/COCO_train2014_000000000001.jpg"]


def test_no_captions_file_is_fine(tmp_path: Path):
    make_images(tmp_path / "a" / "b", 2)
    recs = load_dataset(tmp_path / "a" / "b")
    assert [r.captions for r in recs] == [(), ()]
    with pytest.raises(DatasetError):
        load_dataset(tmp_path / "missing")


def test_real_flickr8k_splits(flickr8k: Path):
    test = load_dataset(flickr8k, split="test")
    assert len(test) == 1000
    assert all(len(r.captions) == 5 and r.split == "test" and r.path.is_file() for r in test[:50])
    assert all(len(r.captions) == 5 for r in test)
    listed = {ln.strip() for ln in (flickr8k / "Flickr_8k.testImages.txt").read_text().splitlines() if ln.strip()}
    assert {r.id for r in test} == listed
    assert len(load_dataset(flickr8k, split="train")) == 6000
    assert len(load_dataset(flickr8k, split="dev")) == 1000


# ----------------------------------------------------------------------------------------------------------------
# ImageLoadDataset + collate_skipping
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def folder_with_bad_images(tmp_path: Path) -> Path:
    folder = tmp_path / "mixed"
    good = make_images(folder, 5, size=(64, 64))
    (folder / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    data = good[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    return folder


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_skips_and_reports_bad_images(folder_with_bad_images: Path, tmp_path: Path, num_workers: int):
    records = scan_images(folder_with_bad_images)
    assert len(records) == 8
    ds = ImageLoadDataset(records, to_tensor_16)
    loader = DataLoader(ds, batch_size=3, num_workers=num_workers, collate_fn=collate_skipping)
    skipped: list[tuple[str, str]] = []
    loaded: list[int] = []
    for batch in loader:
        assert isinstance(batch, Batch)
        assert batch.pixels.dtype == torch.float32
        assert batch.pixels.shape == (len(batch.indices), 3, 16, 16)
        loaded.extend(batch.indices)
        skipped.extend((records[i].id, reason) for i, reason in batch.failed)
    bad = {"empty.png", "garbage.jpg", "truncated.jpg"}
    assert sorted(records[i].id for i in loaded) == sorted(r.id for r in records if r.id not in bad)
    assert {i for i, _ in skipped} == bad
    reasons = dict(skipped)
    assert "truncated" in reasons["truncated.jpg"]


def test_dataset_items_pickle_and_collate_all_failed(folder_with_bad_images: Path):
    records = scan_images(folder_with_bad_images)
    ds = pickle.loads(pickle.dumps(ImageLoadDataset(records, to_tensor_16, max_pixels=10_000)))
    ids = [r.id for r in records]
    good = ds[ids.index("img_0000.jpg")]
    assert isinstance(good, LoadedItem) and good.error is None and good.pixels is not None
    bad = ds[ids.index("garbage.jpg")]
    assert bad.pixels is None and "garbage.jpg" in (bad.error or "")
    tiny = ImageLoadDataset(records, to_tensor_16, max_pixels=100)  # 64x64 > 100 pixels: refused as a bomb
    assert "exceeds" in (tiny[ids.index("img_0001.jpg")].error or "")
    batch = collate_skipping([bad, tiny[0]])
    assert batch.indices == [] and batch.pixels.shape[0] == 0 and len(batch.failed) == 2
