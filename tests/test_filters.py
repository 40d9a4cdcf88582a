"""Filters fused with the vector search: the metadata database (meta.sqlite), SQL -> id selector -> FAISS, and
exactness against brute force over the filtered subset for every index type."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval.errors import BadInput, IndexCorrupt
from retrieval.index import IndexStore, write_index
from retrieval.index import filters as filters_mod
from retrieval.index.filters import brute_force, filtered_search, score_rows
from retrieval.index.metadata import MetaDB, MetaFilter, fts_terms, normalize_datetime, write_meta_db

IDENT = {"backend": "test", "dim": 32}


def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((40, d)).astype(np.float32)
    x = c[rng.integers(0, 40, n)] + 0.7 * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def photo_meta(n: int) -> list[dict]:
    """Rows with folders, dates, cameras and captions that the tests can predict."""
    rows = []
    for i in range(n):
        folder = ["beach", "beach/2019", "city", "snow"][i % 4]
        rows.append({
            "id": f"{folder}/p{i:05d}.jpg", "path": f"{folder}/p{i:05d}.jpg",
            "captions": [f"a {'dog' if i % 3 == 0 else 'cat'} picture number {i}"],
            "taken_at": f"{2010 + i % 10}-{1 + i % 12:02d}-15T12:00:00" if i % 7 else None,
            "camera_make": "Canon" if i % 2 else "NIKON CORPORATION", "camera_model": f"Model {i % 5}",
            "width": 640, "height": 480, "bytes": 1000 + i, "split": "test",
        })
    return rows


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("meta") / "meta.sqlite"
    write_meta_db(photo_meta(200), path)
    return MetaDB.open(path)


def _expect(rows: list[dict], pred) -> list[int]:
    return [i for i, r in enumerate(rows) if pred(r)]


# ---------------------------------------------------------------------------------------------------------------
# The database
# ---------------------------------------------------------------------------------------------------------------


def test_rows_round_trip(db):
    rows = photo_meta(200)
    assert db.count == 200 and db.ids() == [r["id"] for r in rows]
    got = db.get_many([5, 0, 199])
    for g, want in zip(got, [rows[5], rows[0], rows[199]], strict=True):
        assert g == {k: v for k, v in want.items() if v is not None}
    assert db.all_rows()[17] == {k: v for k, v in rows[17].items() if v is not None}
    assert db.column("taken_at", [1, 7]) == [rows[1]["taken_at"], None]


@pytest.mark.parametrize(("flt", "pred"), [
    (MetaFilter(path_prefix="beach/"), lambda r: r["path"].startswith("beach/")),
    (MetaFilter(path_prefix="beach"), lambda r: r["path"].startswith("beach")),
    (MetaFilter(path_prefix="snow/p0001"), lambda r: r["path"].startswith("snow/p0001")),
    (MetaFilter(taken_after="2015-01-01T00:00:00"), lambda r: r["taken_at"] and r["taken_at"] >= "2015-01-01"),
    (MetaFilter(taken_before="2012-06-01T00:00:00"), lambda r: r["taken_at"] and r["taken_at"] < "2012-06-01"),
    (MetaFilter(taken_after="2011-01-01T00:00:00", taken_before="2011-12-31T00:00:00"),
     lambda r: r["taken_at"] and "2011-01-01" <= r["taken_at"] < "2011-12-31"),
    (MetaFilter(camera="canon"), lambda r: r["camera_make"] == "Canon"),
    (MetaFilter(camera="nikon corporation model 3"), lambda r: r["camera_make"].startswith("NIKON")
     and r["camera_model"] == "Model 3"),
    (MetaFilter(camera="50%_"), lambda r: False),  # LIKE wildcards are literal
    (MetaFilter(text="dog"), lambda r: "dog" in r["captions"][0]),
    (MetaFilter(text="DOG Number 33"), lambda r: r["captions"][0].endswith(" 33")),
    (MetaFilter(text="city"), lambda r: r["path"].startswith("city")),  # words of the path count
    (MetaFilter(ids=("city/p00002.jpg", "snow/p00003.jpg", "nope")), lambda r: r["id"] in
     ("city/p00002.jpg", "snow/p00003.jpg")),
    (MetaFilter(exclude_ids=("beach/p00000.jpg",)), lambda r: r["id"] != "beach/p00000.jpg"),
    (MetaFilter(path_prefix="beach/", text="cat", camera="canon", taken_after="2013-01-01T00:00:00"),
     lambda r: r["path"].startswith("beach/") and "cat" in r["captions"][0] and r["camera_make"] == "Canon"
     and r["taken_at"] and r["taken_at"] >= "2013"),
])
def test_select_matches_a_python_predicate(db, flt, pred):
    want = _expect(photo_meta(200), pred)
    got = db.select(flt)
    assert got.dtype == np.int64 and got.tolist() == want


def test_empty_filter_means_every_row(db):
    assert db.select(MetaFilter()) is None


def test_text_with_no_words_is_refused(db):
    with pytest.raises(BadInput, match=r"filter\.text"):
        db.select(MetaFilter(text=" !? "))


def test_fts_terms_are_quoted():
    assert fts_terms('dog "OR" NEAR(x) -cat') == ['"dog"', '"or"', '"near"', '"x"', '"cat"']


def test_text_rank_is_bm25_best_first(db):
    ranked = db.text_rank("picture number 33", 5)
    assert ranked[0][0] == 33  # the only row with all the words, and the rare "33"
    assert [s for _, s in ranked] == sorted(s for _, s in ranked)  # bm25: lower is better
    inside = db.text_rank("dog", 100, MetaFilter(path_prefix="city/"))
    assert inside and all(photo_meta(200)[r]["path"].startswith("city/") for r, _ in inside)
    assert db.text_rank("???", 5) == []


def test_folders_and_date_range(db):
    assert db.folders() == [("beach", 50), ("beach/2019", 50), ("city", 50), ("snow", 50)]
    lo, hi = db.date_range()
    assert lo.startswith("2010") and hi.startswith("2019")


@pytest.mark.parametrize(("value", "want"), [
    ("2019-07-04", "2019-07-04T00:00:00"), ("2019-07-04T18:22:10.5+02:00", "2019-07-04T18:22:10"),
    ("2019-07-04T18:22:10Z", "2019-07-04T18:22:10"), (None, None)])
def test_normalize_datetime(value, want):
    assert normalize_datetime(value) == want


@pytest.mark.parametrize(("row", "match"), [
    ({"id": "a", "width": "640"}, "width must be an integer"),
    ({"id": "a", "taken_at": "yesterday"}, "taken_at"),
    ({"id": "a", "captions": "one"}, "captions must be a list"),
    ({"id": "a", "mtime": True}, "mtime must be a number"),
    ({"id": "a", "camera_make": 3}, "camera_make must be a string"),
    ({"id": "a", "x": float("nan")}, "JSON values"),
])
def test_bad_rows_are_refused(tmp_path, row, match):
    with pytest.raises(BadInput, match=match):
        write_meta_db([row], tmp_path / "m.sqlite")


def test_a_swapped_out_snapshot_keeps_reading_its_file(tmp_path):
    """The database file is opened at open time: deleting or replacing it later does not change what a reader
    that holds it sees (the publish swaps folders and deletes the old one)."""
    path = tmp_path / "m.sqlite"
    write_meta_db(photo_meta(10), path)
    db = MetaDB.open(path)
    path.unlink()
    write_meta_db(photo_meta(3), path)
    assert db.count == 10 and len(db.ids()) == 10 and db.select(MetaFilter(text="dog")).tolist() == [0, 3, 6, 9]
    assert MetaDB.open(path).count == 3


def test_legacy_meta_jsonl_folder_is_read_with_a_hint(tmp_path, caplog):
    x = unit(12, 32)
    write_index(tmp_path / "idx", x, photo_meta(12), encoder_identity=IDENT, encoder_label="t")
    rows = MetaDB.open(tmp_path / "idx" / "meta.sqlite").all_rows()
    (tmp_path / "idx" / "meta.sqlite").unlink()
    (tmp_path / "idx" / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = IndexStore.open(tmp_path / "idx")
    assert "python -m indexer migrate" in caplog.text
    assert store.get(4) == rows[4] and store.meta.select(MetaFilter(path_prefix="beach/2")).tolist() == [1, 5, 9]


def test_missing_schema_table_is_corrupt(tmp_path):
    import sqlite3

    sqlite3.connect(tmp_path / "m.sqlite").execute("CREATE TABLE x(a)").connection.commit()
    with pytest.raises(IndexCorrupt):
        MetaDB.open(tmp_path / "m.sqlite")


# ---------------------------------------------------------------------------------------------------------------
# Filtered search = brute force over the subset
# ---------------------------------------------------------------------------------------------------------------

N = 3000


@pytest.fixture(scope="module", params=["Flat", "HNSW32", "IVF32,Flat", "IVF32,PQ8x4"])
def index_of(request, tmp_path_factory):
    x = unit(N, 32, seed=3)
    path = tmp_path_factory.mktemp("idx") / request.param.replace(",", "_")
    write_index(path, x, photo_meta(N), encoder_identity=IDENT, encoder_label="t", index_key=request.param)
    return request.param, IndexStore.open(path), x


def _subset(fraction: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(N, max(1, int(N * fraction)), replace=False)).astype(np.int64)


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.1, 0.5])
def test_filtered_top_k_equals_brute_force_on_the_subset(index_of, fraction, monkeypatch):
    key, store, x = index_of
    # force the selector path for every subset larger than the brute-force cut-off used here
    monkeypatch.setattr(filters_mod, "BRUTE_FORCE_MAX_ROWS", 16)
    monkeypatch.setattr(filters_mod, "IVF_BRUTE_FORCE_MAX_ROWS", 16)
    rows = _subset(fraction)
    q = unit(8, 32, seed=9)
    k = 10
    exact = q @ x[rows].T
    nlist = store.manifest.build.get("nlist")
    # the index's search effort at its maximum (IVF: every list; HNSW: the whole graph): then it is exact
    scores, got = filtered_search(store, q, k, rows, nprobe=nlist, ef_search=N)
    assert got.shape == (8, min(k, len(rows)))
    assert np.isin(got, rows).all(), "a row outside the filter came back"
    # filter(rank(all)) == rank(filter): the index's own full ranking, restricted to the subset
    full_s, full_r = store.search(q, N, nprobe=nlist, ef_search=N)
    for i in range(len(q)):
        inside = np.isin(full_r[i], rows)
        if len(rows) > k:
            np.testing.assert_allclose(scores[i], full_s[i][inside][:k], rtol=1e-5, atol=1e-5)
        else:
            assert set(got[i]) == set(rows)
        if "PQ" in key:  # scores of PQ codes, not of the vectors: the brute force below does not apply
            continue
        want = rows[np.argsort(-exact[i], kind="stable")[: min(k, len(rows))]]
        np.testing.assert_allclose(scores[i], np.sort(exact[i])[::-1][: len(want)], rtol=1e-4, atol=1e-4)
        assert set(got[i]) == set(want) or np.allclose(exact[i][np.searchsorted(rows, got[i])], scores[i], atol=1e-5)


def test_post_filtering_would_return_too_few(tmp_path):
    """What the selector avoids: the unfiltered top-k holds almost none of a 1% subset."""
    write_index(tmp_path / "i", unit(N, 32, seed=3), photo_meta(N), encoder_identity=IDENT, encoder_label="t")
    store = IndexStore.open(tmp_path / "i")
    rows = _subset(0.01)
    q = unit(4, 32, seed=9)
    _, plain = store.search(q, 10)
    assert np.isin(plain, rows).sum() < 10
    _, fused = filtered_search(store, q, 10, rows)
    assert (fused >= 0).all() and np.isin(fused, rows).all()


@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.5])
def test_filtered_recall_with_default_effort_matches_the_index(index_of, fraction, monkeypatch):
    """With the index's own nprobe / efSearch the filtered search is as good as its unfiltered search."""
    _key, store, x = index_of
    monkeypatch.setattr(filters_mod, "BRUTE_FORCE_MAX_ROWS", 16)
    monkeypatch.setattr(filters_mod, "IVF_BRUTE_FORCE_MAX_ROWS", 16)
    rows = _subset(fraction, seed=2)
    q = unit(100, 32, seed=4)

    def recall(got: np.ndarray, subset: np.ndarray) -> float:
        ex = q @ x[subset].T
        return float(np.mean([len(set(got[i]) & set(subset[np.argsort(-ex[i])[:10]])) / 10 for i in range(len(q))]))

    _, plain = store.search(q, 10)
    _, fused = filtered_search(store, q, 10, rows)
    assert recall(fused, rows) >= min(0.9, recall(plain, np.arange(N)) - 0.05)


def test_default_params_still_fill_k_for_ivf_and_hnsw(index_of):
    """With the index's own (small) nprobe / efSearch a short answer falls back to brute force: never < k."""
    _, store, _ = index_of
    rows = _subset(0.02)
    _, got = filtered_search(store, unit(16, 32, seed=5), 10, rows)
    assert (got >= 0).all() and got.shape == (16, 10) and np.isin(got, rows).all()


def test_edge_cases(index_of):
    _, store, _x = index_of
    q = unit(2, 32, seed=1)
    s, r = filtered_search(store, q, 5, np.zeros(0, np.int64))
    assert s.shape == r.shape == (2, 0)
    s, r = filtered_search(store, q, 5, np.array([7], np.int64))
    assert r.tolist() == [[7], [7]]
    _s_all, r_all = filtered_search(store, q, 5, None)
    _s_ref, r_ref = store.search(q, 5)
    np.testing.assert_array_equal(r_all, r_ref)
    with pytest.raises(BadInput):
        filtered_search(store, q, 5, np.array([N + 1]))
    with pytest.raises(BadInput):
        filtered_search(store, q, 0, None)


def test_brute_force_and_score_rows_agree(index_of):
    key, store, x = index_of
    rows = _subset(0.05)
    q = unit(3, 32, seed=2)
    tol = 2e-3 if "IVF" in key else 1e-5  # IVF folders keep float16 vectors
    np.testing.assert_allclose(score_rows(store, q, rows), q @ x[rows].T, atol=tol)
    s, r = brute_force(store, q, 4, rows)
    assert np.isin(r, rows).all() and (np.diff(s, axis=1) <= 0).all()


def test_ranking_ignores_stopwords_unless_nothing_else_is_left(db):
    assert fts_terms("a dog on the beach", drop_stopwords=True) == ['"dog"', '"beach"']
    assert fts_terms("the a", drop_stopwords=True) == ['"the"', '"a"']
    assert fts_terms("dog dog") == ['"dog"']
    assert db.text_rank("a picture of the number 33", 3)[0][0] == 33


@pytest.mark.parametrize("mmap", [True, False])
def test_stored_matrix_is_the_index_vectors(tmp_path, mmap):
    from retrieval.index.filters import stored_matrix

    x = unit(50, 32)
    for key in ("Flat", "HNSW8", "IVF2,Flat"):
        write_index(tmp_path / key, x, photo_meta(50), encoder_identity=IDENT, encoder_label="t", index_key=key)
        store = IndexStore.open(tmp_path / key, mmap=mmap)
        m = stored_matrix(store.index)
        if key == "IVF2,Flat":
            assert m is None
        else:
            np.testing.assert_array_equal(m, x)


@pytest.mark.parametrize(("after", "before"), [("2013-01-01T00:00:00", None), (None, "2012-06-15T12:00:00"),
                                               ("2011-02-15T12:00:00", "2017-12-15T12:00:00"),
                                               ("2030-01-01T00:00:00", None)])
def test_the_date_index_agrees_with_sql(db, after, before):
    from retrieval.index.metadata import where_clause

    flt = MetaFilter(taken_after=after, taken_before=before)
    where, params = where_clause(flt)
    sql = np.sort(db._rows_of(f"SELECT group_concat(row) FROM items WHERE {where}", params))
    assert db.select(flt).tolist() == sql.tolist()
    with_text = MetaFilter(taken_after=after, taken_before=before, text="dog")
    where, params = where_clause(with_text)
    sql = np.sort(db._rows_of(f"SELECT group_concat(row) FROM items WHERE {where}", params))
    assert db.select(with_text).tolist() == sql.tolist()


def test_small_subsets_of_ivf_indexes_are_scored_exactly(index_of):
    """Below IVF_BRUTE_FORCE_MAX_ROWS an IVF index answers from its stored vectors: the exact top-k (what its
    nprobe would miss for a small subset)."""
    _, store, _ = index_of
    rows = _subset(0.3, seed=7)
    q = unit(5, 32, seed=11)
    _, got = filtered_search(store, q, 10, rows)
    exact = q @ store.vectors(rows).T
    for i in range(len(q)):
        assert set(got[i]) == set(rows[np.argsort(-exact[i])[:10]])
