"""``indexer sync`` (added / changed / metadata-only / removed, resumable, one publish), ``indexer dupes`` and
``indexer migrate``."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.cli import main as cli_main
from indexer.local_engine import LocalEngine
from indexer.pipeline import build_index
from indexer.settings import IndexerSettings
from indexer.sync import sync_index, watch
from retrieval.errors import BadInput
from retrieval.images import load_image
from retrieval.index import IndexStore, read_vectors
from retrieval.index.dupes import near_duplicates
from tests.conftest import make_images


class Interrupted(Exception):
    pass


class CountingEngine(LocalEngine):
    """The local engine, remembering which ids it was asked to encode."""

    def __init__(self, encoder, settings):
        super().__init__(encoder, settings)
        self.encoded: list[str] = []

    def encode(self, records):
        self.encoded += [r.id for r in records]
        yield from super().encode(records)


def _settings(**kw) -> IndexerSettings:
    return IndexerSettings(**{"batch_size": 4, "workers": 0, "shard_size": 2, "progress": False, **kw})


@pytest.fixture
def collection(tmp_path, tiny_encoder):
    src = tmp_path / "photos"
    make_images(src, 10)
    make_images(src / "sub", 4, seed=7)
    out = tmp_path / "idx"
    build_index(src, out, _settings(), engine=LocalEngine(tiny_encoder, _settings()))
    return src, out


def _edit(path: Path, color: tuple[int, int, int]) -> None:
    Image.new("RGB", (48, 40), color).save(path, quality=90)


def test_sync_re_encodes_exactly_the_changed_files(collection, tiny_encoder):
    src, out = collection
    before = IndexStore.open(out)
    _edit(src / "img_0002.jpg", (255, 0, 0))                         # changed bytes
    _edit(src / "sub" / "img_0001.jpg", (0, 0, 255))
    st = (src / "img_0005.jpg").stat()
    os.utime(src / "img_0005.jpg", (st.st_atime, st.st_mtime + 100))  # touched: same bytes, new mtime
    (src / "img_0007.jpg").unlink()                                   # removed
    make_images(src / "new", 2, seed=3)                               # added
    engine = CountingEngine(tiny_encoder, _settings())
    result = sync_index(src, out, _settings(), engine=engine)

    p = result.plan
    assert sorted(r.id for r in p.added) == ["new/img_0000.jpg", "new/img_0001.jpg"]
    assert sorted(r.id for r in p.changed) == ["img_0002.jpg", "sub/img_0001.jpg"]
    assert [r.id for r in p.touched] == ["img_0005.jpg"] and p.removed == ["img_0007.jpg"]
    assert p.unchanged == 10 and p.hashed == 3
    assert sorted(engine.encoded) == sorted(["new/img_0000.jpg", "new/img_0001.jpg", "img_0002.jpg",
                                             "sub/img_0001.jpg"])  # exactly those
    assert "added 2, changed 2, removed 1, metadata only 1, unchanged 10" in result.summary()

    after = IndexStore.open(out)
    assert after.count == 15 and "img_0007.jpg" not in after and len(set(after.ids)) == 15
    for rid in ("img_0002.jpg", "new/img_0001.jpg"):  # new vectors are the encoder's
        want = tiny_encoder.encode_images([load_image(src / rid)])[0]
        np.testing.assert_allclose(after.vector(rid), want, atol=1e-5)
    for rid in ("img_0005.jpg", "img_0003.jpg"):  # untouched vectors are carried over
        np.testing.assert_array_equal(after.vector(rid), before.vector(rid))
    assert after.get(after.row_of("img_0005.jpg"))["mtime"] == pytest.approx((src / "img_0005.jpg").stat().st_mtime)

    again = sync_index(src, out, _settings(), engine=CountingEngine(tiny_encoder, _settings()))
    assert again.plan.is_empty and again.count is None and "nothing to do" in again.summary()


def test_a_caption_change_rewrites_metadata_without_encoding(collection, tiny_encoder):
    src, out = collection
    (src / "captions.jsonl").write_text(json.dumps({"image": "img_0004.jpg", "captions": ["a new caption"]}) + "\n")
    engine = CountingEngine(tiny_encoder, _settings())
    result = sync_index(src, out, _settings(), engine=engine)
    assert [r.id for r in result.plan.touched] == ["img_0004.jpg"] and engine.encoded == []
    store = IndexStore.open(out)
    assert store.get(store.row_of("img_0004.jpg"))["captions"] == ["a new caption"]


def test_interrupted_sync_resumes_without_encoding_twice(collection, tiny_encoder):
    src, out = collection
    for i in range(6):
        _edit(src / f"img_{i:04d}.jpg", (40 * i, 10, 10))

    def stop(n: int) -> None:
        if n == 2:
            raise Interrupted

    first = CountingEngine(tiny_encoder, _settings())
    with pytest.raises(Interrupted):
        sync_index(src, out, _settings(), engine=first, on_shard=stop)
    assert IndexStore.open(out).count == 14  # nothing published yet
    second = CountingEngine(tiny_encoder, _settings())
    result = sync_index(src, out, _settings(), engine=second)
    assert len(second.encoded) == 2 and set(first.encoded[:4]).isdisjoint(second.encoded)
    assert result.count == 14 and not (out.parent / "idx.sync.partial").exists()
    store = IndexStore.open(out)
    for i in range(6):
        want = tiny_encoder.encode_images([load_image(src / f"img_{i:04d}.jpg")])[0]
        np.testing.assert_allclose(store.vector(f"img_{i:04d}.jpg"), want, atol=1e-5)


def test_an_unreadable_changed_file_leaves_the_index_and_is_listed(collection, tiny_encoder):
    src, out = collection
    (src / "img_0001.jpg").write_bytes(b"now broken")
    result = sync_index(src, out, _settings(), engine=CountingEngine(tiny_encoder, _settings()))
    assert [rid for rid, _ in result.skipped] == ["img_0001.jpg"]
    store = IndexStore.open(out)
    assert "img_0001.jpg" not in store and store.count == 13


def test_sync_refuses_another_folder_and_an_emptied_one(collection, tmp_path, tiny_encoder):
    src, out = collection
    other = tmp_path / "other"
    make_images(other, 3)
    with pytest.raises(BadInput, match="indexes"):
        sync_index(other, out, _settings(), engine=CountingEngine(tiny_encoder, _settings()))
    for f in src.rglob("*.jpg"):
        f.unlink()
    with pytest.raises(BadInput, match="refusing to empty"):
        sync_index(src, out, _settings(), engine=CountingEngine(tiny_encoder, _settings()))
    assert IndexStore.open(out).count == 14


def test_watch_runs_rounds_and_reports_changes(collection, tiny_encoder):
    src, out = collection
    lines: list[str] = []
    calls = []

    def run():
        calls.append(1)
        if len(calls) == 2:
            _edit(src / "img_0000.jpg", (1, 2, 3))
        if len(calls) == 3:
            raise OSError("disk gone")
        return sync_index(src, out, _settings(), engine=CountingEngine(tiny_encoder, _settings()))

    watch(src, out, 0.0, run, print_fn=lines.append, rounds=3)
    assert len(calls) == 3 and len(lines) == 2
    assert "changed 1" in lines[0] and "failed: OSError: disk gone" in lines[1]


def test_cli_sync_builds_then_syncs(tmp_path, tiny_clip_spec, capsys):
    src = tmp_path / "p"
    make_images(src, 5)
    out = tmp_path / "idx"
    flags = ["--encoder", f"open_clip:{tiny_clip_spec.model}", "--precision", "fp32", "--device", "cpu",
             "--batch-size", "4", "--workers", "0", "--no-progress"]
    assert cli_main(["sync", str(src), str(out), *flags]) == 0
    assert "built" in capsys.readouterr().out and IndexStore.open(out).count == 5
    make_images(src / "more", 2)
    assert cli_main(["sync", str(src), str(out), "--workers", "0", "--no-progress"]) == 0
    assert "added 2, changed 0, removed 0" in capsys.readouterr().out
    assert IndexStore.open(out).count == 7


# --------------------------------------------------------------------------------------------------------------
# dupes
# --------------------------------------------------------------------------------------------------------------


def _dupe_index(tmp_path: Path, key: str = "Flat") -> Path:
    from retrieval.index import write_index

    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 16)).astype(np.float32)
    near = base[[0, 0, 3]] + 0.05 * rng.standard_normal((3, 16)).astype(np.float32)  # 2 copies of 0, 1 of 3
    x = np.concatenate([base, near])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    meta = [{"id": f"i{i}.jpg"} for i in range(len(x))]
    write_index(tmp_path / key, x.astype(np.float32), meta, encoder_identity={"b": 1}, encoder_label="t",
                index_key=key)
    return tmp_path / key


@pytest.mark.parametrize("key", ["Flat", "HNSW8"])
def test_near_duplicates_are_clustered(tmp_path, key):
    store = IndexStore.open(_dupe_index(tmp_path, key))
    clusters = near_duplicates(store, 0.95)
    assert [sorted(c.ids) for c in clusters] == [["i0.jpg", "i6.jpg", "i7.jpg"], ["i3.jpg", "i8.jpg"]]
    vecs = read_vectors(store.path)
    c = clusters[0]
    rep = store.row_of(c.representative)
    assert c.scores[0] == 1.0 and list(c.scores[1:]) == sorted(c.scores[1:], reverse=True)
    for rid, s in zip(c.ids[1:], c.scores[1:], strict=True):
        assert s == pytest.approx(float(vecs[store.row_of(rid)] @ vecs[rep]), abs=1e-5)
    assert near_duplicates(store, 0.9999) == []
    assert len(near_duplicates(store, -1.0)) == 1  # everything links to everything
    with pytest.raises(BadInput):
        near_duplicates(store, 1.5)


def test_cli_dupes_json_and_csv(tmp_path, capsys):
    path = _dupe_index(tmp_path)
    assert cli_main(["dupes", str(path), "--threshold", "0.95"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [c["size"] for c in doc["clusters"]] == [3, 2] and doc["threshold"] == 0.95
    out = tmp_path / "d.csv"
    assert cli_main(["dupes", str(path), "--format", "csv", "--out", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 5 and {r["cluster"] for r in rows} == {"1", "2"}


# --------------------------------------------------------------------------------------------------------------
# migrate
# --------------------------------------------------------------------------------------------------------------


def test_migrate_a_legacy_folder_adds_meta_sqlite_and_file_facts(collection):
    src, out = collection
    store = IndexStore.open(out)
    vectors = read_vectors(out)
    rows = [{"id": r["id"], "path": r["path"], "captions": r["captions"]} for r in store.metadata]
    (out / "meta.sqlite").unlink()
    (out / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    legacy = IndexStore.open(out)
    assert "taken_at" not in legacy.get(0)
    assert cli_main(["migrate", str(out)]) == 0
    assert (out / "meta.sqlite").is_file() and not (out / "meta.jsonl").exists()
    migrated = IndexStore.open(out)
    row = migrated.get(migrated.row_of("sub/img_0002.jpg"))
    assert row["bytes"] == (src / "sub" / "img_0002.jpg").stat().st_size and row["width"] == 48
    assert row["taken_at_source"] == "mtime" and row["content_hash"].startswith("sha256:")
    np.testing.assert_array_equal(read_vectors(out), vectors)
    assert migrated.ids == legacy.ids
