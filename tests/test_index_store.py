"""Index folder: chooser table, round trip, mmap, atomic replace, corruption, encoder check, add/remove, ANN recall."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import faiss
import numpy as np
import pytest

from retrieval import atomic as atomic_mod
from retrieval.errors import BadInput, IndexCorrupt, IndexEncoderMismatch, IndexNotFound, UnknownId
from retrieval.index import (
    IndexStore,
    Manifest,
    add_to_index,
    check_encoder,
    choose_index_key,
    read_vectors,
    remove_from_index,
    write_index,
)
from retrieval.index import folder as folder_mod
from retrieval.index.choose import choose_nlist
from retrieval.index.manifest import SCHEMA_VERSION

IDENT = {"backend": "open_clip", "model": "tiny", "pretrained": None, "text_model": None, "heads_sha256": None}
LABEL = "open_clip:tiny:None"
GiB = 2**30


def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, d: int, seed: int = 0, centers: int = 50) -> np.ndarray:
    """Unit vectors around random centres: closer to real embeddings than uniform noise."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def meta(n: int, prefix: str = "img") -> list[dict]:
    return [{"id": f"{prefix}{i}", "path": f"{prefix}/{i}.jpg", "captions": [f"caption {i}"], "w": i}
            for i in range(n)]


def write(path: Path, vectors: np.ndarray, metadata: list[dict] | None = None, **kw) -> Manifest:
    return write_index(path, vectors, metadata if metadata is not None else meta(len(vectors)),
                       encoder_identity=IDENT, encoder_label=LABEL, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Chooser
# ---------------------------------------------------------------------------------------------------------------

CHOOSER_TABLE = [
    # (n, dim, budget) -> key
    ((0, 512, None), "Flat"),
    ((1_000, 512, None), "Flat"),
    ((999_999, 512, None), "Flat"),
    ((1_000_000, 512, None), "HNSW32"),  # at FLAT_MAX_VECTORS, unlimited budget: HNSW
    ((50_000_000, 384, None), "HNSW32"),
    ((500_000, 512, 500_000 * 512 * 4), "Flat"),  # flat fits exactly
    ((500_000, 512, 500_000 * 512 * 4 - 1), "IVF2048,PQ64"),  # HNSW needs more than flat
    ((1_000_000, 512, 1_000_000 * (2048 + 256 + 16)), "HNSW32"),  # HNSW fits exactly
    ((1_000_000, 512, 1_000_000 * (2048 + 256 + 16) - 1), "IVF4096,PQ64"),
    ((2_000_000, 512, 8 * GiB), "HNSW32"),  # 4.6 GB with the graph
    ((2_000_000, 512, 4 * GiB), "IVF4096,PQ64"),  # 4*sqrt(2e6)=5657 -> 4096
    ((10_000_000, 512, 4 * GiB), "OPQ64_512,IVF16384_HNSW32,PQ64"),
    ((100_000_000, 512, 4 * GiB), "OPQ32_512,IVF32768_HNSW32,PQ32"),  # budget forces m=32
    ((100_000_000, 768, 2 * GiB), "OPQ12_768,IVF32768_HNSW32,PQ12"),  # m must divide 768
    ((1_000, 64, 50_000), "IVF16,PQ32x4"),  # nlist clamped to n/39; 4-bit PQ below 39*256 points
    ((5_000, 64, 100_000), "IVF128,PQ8x4"),
]


@pytest.mark.parametrize(("args", "expected"), CHOOSER_TABLE, ids=[str(a) for a, _ in CHOOSER_TABLE])
def test_choose_index_key_table(args, expected):
    assert choose_index_key(*args) == expected


def test_choose_index_key_keys_are_valid_faiss_keys():
    for (_, dim, _), key in CHOOSER_TABLE:
        index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
        assert index.d == dim


def test_choose_index_key_rejects_impossible():
    with pytest.raises(BadInput, match="no index type fits"):
        choose_index_key(1_000, 64, 10_000)
    with pytest.raises(BadInput):
        choose_index_key(-1, 64)
    with pytest.raises(BadInput):
        choose_index_key(10, 0)


@pytest.mark.parametrize("n", [1, 38, 39, 1_000, 10_000, 1_000_000, 10**9])
def test_choose_nlist_has_enough_training_points(n):
    nlist = choose_nlist(n)
    assert nlist >= 1 and nlist & (nlist - 1) == 0
    assert nlist == 1 or n >= 39 * nlist


# ---------------------------------------------------------------------------------------------------------------
# Round trip, search, validation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip_flat(tmp_path, mmap):
    x = unit(500, 32)
    m = write(tmp_path / "idx", x, build={"source": "unit"})
    assert m.index_key == "Flat" and m.count == 500 and m.dim == 32 and m.schema_version == SCHEMA_VERSION
    assert m.created_at.endswith("Z") and m.build["source"] == "unit"
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["index.faiss", "manifest.json", "meta.sqlite"]
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temp folder left beside it

    s = IndexStore.open(tmp_path / "idx", expected_encoder=IDENT, mmap=mmap)
    assert s.count == 500 and s.dim == 32 and s.manifest == m
    assert s.ids == [f"img{i}" for i in range(500)]
    assert s.get(7) == meta(500)[7]
    assert s.row_of("img42") == 42
    np.testing.assert_array_equal(s.vector("img42"), x[42])
    assert faiss.cvar.distance_compute_blas_threshold == 20

    scores, rows = s.search(x[:64], 5)
    assert scores.shape == rows.shape == (64, 5) and scores.dtype == np.float32 and rows.dtype == np.int64
    np.testing.assert_array_equal(rows[:, 0], np.arange(64))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    exact = x[:64] @ x.T
    np.testing.assert_array_equal(rows, np.argsort(-exact, axis=1)[:, :5])

    st = s.stats()
    assert st["count"] == 500 and st["dim"] == 32 and st["index_key"] == "Flat" and st["encoder_label"] == LABEL
    assert st["size_bytes"] >= 500 * 32 * 4 and st["created_at"] == m.created_at


def test_search_shapes_and_errors(tmp_path):
    x = unit(10, 16)
    write(tmp_path / "i", x)
    s = IndexStore.open(tmp_path / "i")
    _, rows = s.search(x[:3], 100)
    assert rows.shape == (3, 10)  # k' = min(k, count)
    _, rows = s.search(x[3], 2)  # one query as (d,)
    assert rows.shape == (1, 2) and rows[0, 0] == 3
    _, rows = s.search(x[:2].astype(np.float64), 1)  # cast to float32
    assert rows[:, 0].tolist() == [0, 1]
    with pytest.raises(BadInput, match="shape"):
        s.search(unit(2, 8), 3)
    with pytest.raises(BadInput):
        s.search(x[:2], 0)
    with pytest.raises(BadInput):
        s.search(np.full((1, 16), np.nan, np.float32), 1)
    with pytest.raises(UnknownId):
        s.row_of("nope")
    with pytest.raises(UnknownId):
        s.vector("nope")
    with pytest.raises(UnknownId):
        s.get(10)


def test_empty_index(tmp_path):
    m = write(tmp_path / "e", np.zeros((0, 8), np.float32), [])
    assert m.count == 0 and m.index_key == "Flat"
    s = IndexStore.open(tmp_path / "e")
    scores, rows = s.search(unit(2, 8), 5)
    assert scores.shape == rows.shape == (2, 0)
    assert read_vectors(tmp_path / "e").shape == (0, 8)


@pytest.mark.parametrize(
    ("vectors", "metadata", "match"),
    [
        (unit(4, 8).astype(np.float64), meta(4), "float32"),
        (unit(4, 8)[:, :, None], meta(4), "shape"),
        (unit(4, 8) * 2, meta(4), "L2-normalised"),
        (np.where(np.eye(4, 8) > 0, np.nan, unit(4, 8)).astype(np.float32), meta(4), "NaN"),
        (unit(4, 8), meta(3), "3 metadata rows for 4"),
        (unit(4, 8), [*meta(3), {"id": "img1"}], "duplicate ids"),
        (unit(4, 8), [*meta(3), {"path": "x.jpg"}], "'id'"),
        (unit(4, 8), [*meta(3), {"id": 5}], "'id'"),
    ],
)
def test_write_validates_inputs(tmp_path, vectors, metadata, match):
    with pytest.raises(BadInput, match=match):
        write(tmp_path / "bad", vectors, metadata)
    assert not (tmp_path / "bad").exists()
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_bad_key_and_dim_identity(tmp_path):
    with pytest.raises(BadInput, match="index key"):
        write(tmp_path / "k", unit(10, 8), index_key="NotAKey99")
    with pytest.raises(BadInput, match="dim"):
        write_index(tmp_path / "k", unit(10, 8), meta(10), encoder_identity={**IDENT, "dim": 16}, encoder_label=LABEL)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# Encoder identity
# ---------------------------------------------------------------------------------------------------------------


def test_encoder_mismatch_is_refused_with_clear_message(tmp_path):
    write(tmp_path / "i", unit(5, 8))
    other = {**IDENT, "model": "ViT-B-32", "heads_sha256": "abc123"}
    with pytest.raises(IndexEncoderMismatch) as err:
        IndexStore.open(tmp_path / "i", expected_encoder=other)
    msg = str(err.value)
    assert "model=tiny" in msg and "model=ViT-B-32" in msg
    assert "heads_sha256=None" in msg and "heads_sha256=abc123" in msg
    assert "backend" not in msg  # only the differing fields are named
    assert LABEL in msg


def test_check_encoder_fields():
    m = Manifest(schema_version=1, encoder={**IDENT, "dim": 8}, encoder_label=LABEL, dim=8, index_key="Flat",
                 count=0, created_at="2026-01-01T00:00:00Z")
    check_encoder(m, {**IDENT, "dim": 8})
    check_encoder(m, IDENT)  # "dim" absent from the identity asked for: checked elsewhere (search)
    with pytest.raises(IndexEncoderMismatch, match=r"dim=8.*dim=16"):
        check_encoder(m, {**IDENT, "dim": 16})
    with pytest.raises(IndexEncoderMismatch, match=r"extra=None.*extra=1"):
        check_encoder(m, {**IDENT, "extra": 1})  # a key the index does not record
    m2 = m.model_copy(update={"encoder": IDENT})
    check_encoder(m2, {**IDENT, "dim": 8})  # compared with manifest.dim
    with pytest.raises(IndexEncoderMismatch, match="dim"):
        check_encoder(m2, {**IDENT, "dim": 4})


# ---------------------------------------------------------------------------------------------------------------
# Missing / corrupt folders
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def built(tmp_path) -> Path:
    write(tmp_path / "idx", unit(20, 8))
    return tmp_path / "idx"


def test_missing_folder_and_files(tmp_path, built):
    with pytest.raises(IndexNotFound):
        IndexStore.open(tmp_path / "nothing")
    for name in ["manifest.json", "index.faiss", "meta.sqlite"]:
        data = (built / name).read_bytes()
        (built / name).unlink()
        with pytest.raises(IndexNotFound, match=name):
            IndexStore.open(built)
        (built / name).write_bytes(data)
    IndexStore.open(built)


def _edit_meta(folder: Path, sql: str) -> None:
    con = sqlite3.connect(folder / "meta.sqlite")
    con.execute(sql)
    con.commit()
    con.close()


def _legacy(folder: Path, text: str) -> None:
    """A folder from before meta.sqlite: only meta.jsonl."""
    (folder / "meta.sqlite").unlink()
    (folder / "meta.jsonl").write_text(text)


def _edit_manifest(folder: Path, **changes) -> None:
    raw = json.loads((folder / "manifest.json").read_text())
    raw.update(changes)
    (folder / "manifest.json").write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("breakage", "match"),
    [
        (lambda f: (f / "manifest.json").write_text("{not json"), "not valid JSON"),
        (lambda f: (f / "manifest.json").write_text("[1, 2]"), "not a JSON object"),
        (lambda f: _edit_manifest(f, schema_version=99), "schema_version 99"),
        (lambda f: _edit_manifest(f, metric="l2"), "invalid"),
        (lambda f: _edit_manifest(f, count=21), "row counts disagree"),
        (lambda f: _edit_manifest(f, dim=16), "dim"),
        (lambda f: _edit_meta(f, "INSERT INTO items(row, id, path, folder) VALUES (20, 'extra', 'x', '')"),
         "row counts disagree"),
        (lambda f: _edit_meta(f, "UPDATE items SET row = 40 WHERE row = 3"), "not numbered"),
        (lambda f: _edit_meta(f, "UPDATE info SET value = '7'"), "metadata schema '7'"),
        (lambda f: (f / "meta.sqlite").write_bytes(b"garbage" * 100), "cannot read"),
        (lambda f: _legacy(f, '{"id": "a"}\n' * 20), "duplicate ids"),
        (lambda f: _legacy(f, '{"id": "a"}\ngarbage\n'), "line 2"),
        (lambda f: (f / "index.faiss").write_bytes(b"\0" * 100), "cannot read"),
    ],
)
def test_corrupt_index_is_refused(built, breakage, match):
    breakage(built)
    with pytest.raises(IndexCorrupt, match=match):
        IndexStore.open(built)


# ---------------------------------------------------------------------------------------------------------------
# Atomic replace
# ---------------------------------------------------------------------------------------------------------------


def _boom(*args, **kwargs):
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize(("module", "step"), [(folder_mod, "write_faiss"), (folder_mod, "write_meta"),
                                              (folder_mod, "manifest_json"), (atomic_mod, "fsync_file")])
def test_crash_mid_write_keeps_old_index(tmp_path, monkeypatch, module, step):
    old = unit(30, 8, seed=1)
    write(tmp_path / "idx", old)
    monkeypatch.setattr(module, step, _boom)
    with pytest.raises(OSError, match="simulated"):
        write(tmp_path / "idx", unit(50, 8, seed=2), meta(50, "new"))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # temp folder cleaned away
    s = IndexStore.open(tmp_path / "idx")
    assert s.count == 30 and s.ids[0] == "img0"
    np.testing.assert_array_equal(read_vectors(tmp_path / "idx"), old)


def test_crash_on_fresh_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_mod, "write_meta", _boom)
    with pytest.raises(OSError):
        write(tmp_path / "idx", unit(5, 8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_swaps_whole_folder(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic_mod, "exchange", lambda a, b: False)
    write(tmp_path / "idx", unit(30, 8, seed=1), index_key="IVF2,PQ2x4")  # has vectors.npy
    assert (tmp_path / "idx" / "vectors.npy").exists()
    new = unit(50, 8, seed=2)
    write(tmp_path / "idx", new, meta(50, "new"))
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]
    assert not (tmp_path / "idx" / "vectors.npy").exists()  # no file of the old folder survives
    s = IndexStore.open(tmp_path / "idx")
    assert s.count == 50 and s.ids[0] == "new0" and s.manifest.index_key == "Flat"


def test_fallback_swap_rolls_back_when_second_rename_fails(tmp_path, monkeypatch):
    write(tmp_path / "idx", unit(30, 8, seed=1))
    monkeypatch.setattr(atomic_mod, "exchange", lambda a, b: False)
    real_rename = os.rename
    calls = []

    def flaky_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old moved aside, moving the new one in fails
            raise OSError("rename failed (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic_mod.os, "rename", flaky_rename)
    with pytest.raises(OSError, match="simulated"):
        write(tmp_path / "idx", unit(50, 8, seed=2), meta(50, "new"))
    monkeypatch.undo()
    assert len(calls) == 3  # aside, (failed) in, roll back
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]
    assert IndexStore.open(tmp_path / "idx").count == 30


# ---------------------------------------------------------------------------------------------------------------
# Add / remove
# ---------------------------------------------------------------------------------------------------------------

KEYS = ["Flat", "HNSW16", "IVF8,PQ8x4"]


def _check_aligned(path: Path, expected_ids: list[str], expected_vectors: np.ndarray, exact: bool) -> IndexStore:
    s = IndexStore.open(path)
    assert s.ids == expected_ids and s.count == len(expected_ids) == s.manifest.count
    assert [m["id"] for m in s.metadata] == expected_ids
    assert all(m["path"].endswith(f"/{m['id'][3:]}.jpg") for m in s.metadata)
    vecs = read_vectors(path)
    atol = 0 if exact else 2e-3  # vectors.npy is float16
    np.testing.assert_allclose(vecs, expected_vectors, atol=atol)
    for i in range(0, len(expected_ids), 7):
        np.testing.assert_allclose(s.vector(expected_ids[i]), expected_vectors[i], atol=atol)
    if exact:  # self-query finds every row itself
        _, rows = s.search(expected_vectors, 1)
        np.testing.assert_array_equal(rows[:, 0], np.arange(len(expected_ids)))
    return s


@pytest.mark.parametrize("key", KEYS)
def test_add_and_remove_keep_rows_aligned(tmp_path, key):
    path = tmp_path / "idx"
    x = clustered(400, 16, seed=3)
    m0 = write(path, x[:300], meta(300), index_key=key)
    exact = key != "IVF8,PQ8x4"
    assert (path / "vectors.npy").exists() == (not exact)

    m1 = add_to_index(path, x[300:], meta(400)[300:], encoder_identity=IDENT)
    assert m1.count == 400 and m1.index_key == key and m1.encoder == m0.encoder
    ids = [f"img{i}" for i in range(400)]
    _check_aligned(path, ids, x, exact)

    drop = [f"img{i}" for i in (0, 5, 399, 123, 250, 301)]
    m2 = remove_from_index(path, drop)
    keep = [i for i in range(400) if f"img{i}" not in drop]
    assert m2.count == 394
    s = _check_aligned(path, [f"img{i}" for i in keep], x[keep], exact)
    assert s.get(s.row_of("img6"))["w"] == 6
    if not exact:  # reused training: the IVF index still searches well
        _, rows = s.search(x[keep][:50], 10, nprobe=8)
        assert np.mean([i in r for i, r in enumerate(rows)]) >= 0.9
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]


def test_remove_unknown_changes_nothing(tmp_path, built):
    before = {p.name: p.read_bytes() for p in built.iterdir()}
    with pytest.raises(UnknownId, match="ghost"):
        remove_from_index(built, ["img1", "ghost"])
    assert {p.name: p.read_bytes() for p in built.iterdir()} == before


def test_remove_everything(tmp_path, built):
    m = remove_from_index(built, [f"img{i}" for i in range(20)])
    assert m.count == 0 and IndexStore.open(built).count == 0


def test_add_existing_ids_error_skip_replace(tmp_path, built):
    x = unit(20, 8)
    y = unit(3, 8, seed=9)
    rows = [{"id": "img3", "path": "img/3.jpg", "v": "new"}, {"id": "img20", "path": "img/20.jpg", "v": "new"},
            {"id": "img7", "path": "img/7.jpg", "v": "new"}]
    before = (built / "manifest.json").read_bytes()
    with pytest.raises(BadInput, match="already in the index"):
        add_to_index(built, y, rows, encoder_identity=IDENT)
    assert (built / "manifest.json").read_bytes() == before

    add_to_index(built, y, rows, encoder_identity=IDENT, on_existing="skip")
    s = IndexStore.open(built)
    assert s.count == 21 and s.ids[-1] == "img20" and s.get(3).get("v") is None
    np.testing.assert_array_equal(read_vectors(built), np.concatenate([x, y[1:2]]))

    add_to_index(built, y, rows, encoder_identity=IDENT, on_existing="replace")
    s = IndexStore.open(built)
    expected_ids = [f"img{i}" for i in range(20) if i not in (3, 7)] + ["img3", "img20", "img7"]
    assert s.ids == expected_ids and s.count == 21
    assert [s.get(s.row_of(i)).get("v") for i in ("img3", "img20", "img7")] == ["new"] * 3
    keep = [i for i in range(20) if i not in (3, 7)]
    np.testing.assert_array_equal(read_vectors(built), np.concatenate([x[keep], y]))


def test_add_checks_encoder_and_dim(tmp_path, built):
    with pytest.raises(IndexEncoderMismatch, match="model=other"):
        add_to_index(built, unit(1, 8, seed=5), [{"id": "n"}], encoder_identity={**IDENT, "model": "other"})
    with pytest.raises(BadInput, match="dim"):
        add_to_index(built, unit(1, 16, seed=5), [{"id": "n"}], encoder_identity=IDENT)
    with pytest.raises(BadInput, match="duplicate"):
        add_to_index(built, unit(2, 8, seed=5), [{"id": "n"}, {"id": "n"}], encoder_identity=IDENT)
    assert IndexStore.open(built).count == 20


# ---------------------------------------------------------------------------------------------------------------
# Approximate indexes: build, mmap open, recall sanity
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    """8-bit PQ training is slow on a shared 2-core box; tests use 4-bit PQ and one OpenMP thread."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def ann_data():
    x = clustered(5_000, 64, seed=11)
    rng = np.random.default_rng(12)
    q = x[rng.choice(5_000, 200, replace=False)] + 0.05 * rng.standard_normal((200, 64)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = np.argmax(q @ x.T, axis=1)
    return x, q, truth


def _recall_at(rows: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([t in r for t, r in zip(truth, rows, strict=True)]))


@pytest.mark.parametrize(
    ("key", "search_kw", "min_recall"),
    [
        ("HNSW32", {}, 0.95),
        ("IVF64,PQ16x4", {"nprobe": 16}, 0.8),
        ("OPQ16_64,IVF64_HNSW32,PQ16x4", {"nprobe": 16}, 0.8),
    ],
)
def test_ann_indexes_build_and_recall(tmp_path, ann_data, key, search_kw, min_recall):
    x, q, truth = ann_data
    m = write(tmp_path / "ann", x, meta(5_000), index_key=key)
    assert m.index_key == key
    if "IVF" in key:
        assert m.build["nlist"] == 64 and m.build["train_size"] == 5_000 and m.build["nprobe"] == 16
    s = IndexStore.open(tmp_path / "ann", mmap=True)
    _, rows = s.search(q, 10, **search_kw)
    assert rows.shape == (200, 10)
    assert _recall_at(rows, truth) >= min_recall
    assert (rows >= 0).all()
    if "IVF" in key:  # nprobe matters: 1 list of 64 finds fewer neighbours than 16
        _, rows1 = s.search(q, 10, nprobe=1)
        assert _recall_at(rows1, truth) < _recall_at(rows, truth)
    np.testing.assert_allclose(s.vector("img9"), x[9], atol=2e-3)


def test_ann_chosen_automatically_under_budget(tmp_path, ann_data):
    x, q, truth = ann_data
    budget = 5_000 * 64 * 4 - 1  # flat does not fit, nor HNSW
    m = write(tmp_path / "auto", x, meta(5_000), memory_budget_bytes=budget)
    assert m.index_key == choose_index_key(5_000, 64, budget) and "PQ" in m.index_key
    assert m.build["memory_budget_bytes"] == budget
    s = IndexStore.open(tmp_path / "auto")
    _, rows = s.search(q, 10, nprobe=s.manifest.build["nlist"])
    assert _recall_at(rows, truth) >= 0.5


def test_gpu_search_falls_back_to_cpu_or_is_refused_without_gpu(tmp_path):
    from retrieval.index import faiss_gpu_count

    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((50, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    write_index(tmp_path / "g", vecs, [{"id": f"i{j}"} for j in range(50)], encoder_identity={"model": "m"},
                encoder_label="m")
    auto = IndexStore.open(tmp_path / "g", gpu=None)
    assert auto.on_gpu == (faiss_gpu_count() > 0)
    scores, rows = auto.search(vecs[:3], 1)
    assert scores[:, 0] == pytest.approx(1.0, abs=1e-5)
    assert rows[:, 0].tolist() == [0, 1, 2]
    if faiss_gpu_count() == 0:
        with pytest.raises(BadInput, match="no GPU"):
            IndexStore.open(tmp_path / "g", gpu=True)


def test_flat_scan_of_one_or_two_queries_matches_the_index_search():
    """IndexStore.search scans a Flat index itself for 1-2 queries (faiss's index.search was 3-4x slower there):
    the same scores and rows as faiss, ties by lower row, k larger than the index."""
    import faiss

    from retrieval.index.faiss_ops import flat_scan

    rng = np.random.default_rng(3)
    xb = rng.standard_normal((500, 24)).astype(np.float32)
    xb[7] = xb[3]  # a tie
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(24)
    index.add(xb)
    queries = np.ascontiguousarray(np.stack([xb[3], rng.standard_normal(24).astype(np.float32)]))
    for nq, k in ((1, 10), (2, 10), (2, 600)):
        got_s, got_r = flat_scan(index, queries[:nq], k)
        want_s, want_r = index.search(queries[:nq], min(k, 500))
        np.testing.assert_allclose(got_s, want_s, atol=1e-5)
        for i in range(nq):  # faiss orders ties as it likes: compare with its hits in (score, row) order
            order = np.lexsort((want_r[i], -np.round(want_s[i], 5)))
            assert list(got_r[i]) == list(want_r[i][order])
    assert list(flat_scan(index, queries[:1], 2)[1][0]) == [3, 7]
    assert flat_scan(faiss.IndexFlatL2(24), queries[:1], 2) is None
