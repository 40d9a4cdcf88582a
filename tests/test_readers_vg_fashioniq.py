"""The Visual Genome region-descriptions reader (captions) and the FashionIQ triplet reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrieval.datasets import load_dataset, read_captions
from retrieval.datasets.fashioniq import image_split, load_triplets, read_triplets
from retrieval.errors import DatasetError
from tests.conftest import make_images

REGIONS = [
    {"id": 1, "regions": [
        {"region_id": 10, "image_id": 1, "phrase": "a man  riding a horse", "x": 1, "y": 2, "width": 3, "height": 4},
        {"region_id": 11, "image_id": 1, "phrase": "A man riding a horse", "x": 0, "y": 0, "width": 1, "height": 1},
        {"region_id": 12, "image_id": 1, "phrase": "green grass", "x": 0, "y": 0, "width": 1, "height": 1}]},
    {"id": 2, "regions": [{"region_id": 13, "image_id": 2, "phrase": "white clouds", "x": 0, "y": 0,
                           "width": 1, "height": 1}]},
    {"id": 3, "regions": []},
]
IMAGE_DATA = [
    {"image_id": 1, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg", "width": 800, "height": 600},
    {"image_id": 2, "url": "https://cs.stanford.edu/people/rak248/VG_100K/2.jpg", "width": 800, "height": 600},
    {"image_id": 3, "url": "https://cs.stanford.edu/people/rak248/VG_100K/3.jpg"},
]


def test_region_descriptions_become_captions(tmp_path: Path):
    f = tmp_path / "region_descriptions.json"
    f.write_text(json.dumps(REGIONS))
    assert read_captions(f) == {"1.jpg": ["a man riding a horse", "green grass"], "2.jpg": ["white clouds"],
                                "3.jpg": []}
    (tmp_path / "image_data.json").write_text(json.dumps(IMAGE_DATA))
    assert read_captions(f) == {"VG_100K_2/1.jpg": ["a man riding a horse", "green grass"],
                                "VG_100K/2.jpg": ["white clouds"], "VG_100K/3.jpg": []}


def test_a_visual_genome_folder_loads_with_captions(tmp_path: Path):
    root = tmp_path / "visual-genome"
    for folder, n in (("VG_100K", 3), ("VG_100K_2", 2)):
        for p in make_images(root / "images" / folder, n):
            p.rename(p.with_name(f"{int(p.stem[4:]) + (1 if folder == 'VG_100K_2' else 2)}.jpg"))
    (root / "region_descriptions.json").write_text(json.dumps(REGIONS))
    (root / "image_data.json").write_text(json.dumps(IMAGE_DATA))
    records = {r.id: r for r in load_dataset(root)}
    assert records["VG_100K_2/1.jpg"].captions == ("a man riding a horse", "green grass")
    assert records["VG_100K/2.jpg"].captions == ("white clouds",)


@pytest.mark.parametrize(("data", "match"), [
    ([{"id": 1, "regions": [{"phrase": 7}]}], "phrase"),
    ([{"id": 1, "regions": []}, {"id": 2}], "entry 1"),
    ([{"regions": [{"region_id": 1}]}], "no image id|phrase"),
])
def test_bad_region_descriptions(tmp_path: Path, data, match):
    f = tmp_path / "region_descriptions.json"
    f.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=match):
        read_captions(f)


# --------------------------------------------------------------------------------------------------------------
# FashionIQ
# --------------------------------------------------------------------------------------------------------------


def fashioniq_folder(root: Path, n_images: int = 6) -> Path:
    """A FashionIQ-shaped folder: images B0..B5 (B5 missing on disk), dress triplets in train and val."""
    for p in make_images(root / "images", n_images - 1):
        p.rename(p.with_name(f"B{int(p.stem[4:])}.png"))
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").mkdir()
    train = [{"candidate": "B0", "target": "B1", "captions": ["is darker", "has long sleeves"]},
             {"candidate": "B2", "target": "B5", "captions": ["is red", "no pattern"]},  # B5 is missing
             {"candidate": "B3", "target": "B4", "captions": ["is shorter", ""]}]
    (root / "captions" / "cap.dress.train.json").write_text(json.dumps(train))
    (root / "captions" / "cap.shirt.train.json").write_text(json.dumps(train[:1]))
    (root / "captions" / "cap.dress.val.json").write_text(json.dumps(train[2:]))
    (root / "captions" / "cap.dress.test.json").write_text(json.dumps([{"candidate": "B0", "captions": ["x", "y"]}]))
    (root / "image_splits" / "split.dress.val.json").write_text(json.dumps(["B3", "B4"]))
    return root


def test_fashioniq_triplets(tmp_path: Path):
    root = fashioniq_folder(tmp_path / "fiq")
    all_train = read_triplets(root, "train")
    assert [(t.candidate, t.target, t.category) for t in all_train] == [
        ("B0", "B1", "dress"), ("B2", "B5", "dress"), ("B3", "B4", "dress"), ("B0", "B1", "shirt")]
    assert all_train[0].text == "is darker and has long sleeves" and all_train[2].text == "is shorter"
    kept, paths = load_triplets(root, "train", ("dress",))
    assert [(t.candidate, t.target) for t in kept] == [("B0", "B1"), ("B3", "B4")]
    assert sorted(paths) == ["B0", "B1", "B3", "B4"] and paths["B0"].name == "B0.png"
    assert [t.split for t in read_triplets(root, "dev")] == ["val"]
    assert read_triplets(root, "test") == []  # targets hidden
    assert image_split(root, "dress", "val") == ["B3", "B4"]


@pytest.mark.parametrize(("content", "match"), [
    ("{oops", "not valid JSON"), ('{"a": 1}', "list of triplets"), ('[{"target": "B1", "captions": ["x"]}]',
                                                                   "candidate"),
    ('[{"candidate": "B0", "target": "B1", "captions": "x"}]', "caption strings"),
    ('[{"candidate": "B0", "target": 3, "captions": ["x"]}]', "target"),
])
def test_bad_fashioniq_files(tmp_path: Path, content, match):
    root = fashioniq_folder(tmp_path / "fiq")
    (root / "captions" / "cap.dress.train.json").write_text(content)
    with pytest.raises(DatasetError, match=match):
        read_triplets(root, "train", ("dress",))


def test_missing_fashioniq_parts(tmp_path: Path):
    with pytest.raises(DatasetError, match="no FashionIQ captions"):
        read_triplets(tmp_path, "train")
    root = fashioniq_folder(tmp_path / "fiq")
    for p in (root / "images").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match="both images"):
        load_triplets(root, "train")
