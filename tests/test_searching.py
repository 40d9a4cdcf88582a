"""One search after the query vector is known (service.searching), on hand-built indexes whose answers are known:
filters, pages, thresholds, date sort, hybrid (reciprocal-rank fusion), query arithmetic, relevance."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.calibration import Calibration
from retrieval.errors import BadInput, BadQuery
from retrieval.filter_spec import MetaFilter
from retrieval.index import IndexStore, write_index
from service.query import SearchSpec, Term
from service.searching import RRF_K, Limits, Page, combine, hit_metadata, run_search, run_searches

D = 8
IDENT = {"backend": "test", "dim": D}


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> IndexStore:
    """20 rows: row i has cosine ``1 - i/40`` (roughly) to the query e0, so the vector ranking is row order.
    Dates: row i taken in year 2000 + (i * 7) % 20 (all distinct), rows 3 and 11 undated. Captions: rows 15-19
    say "red kayak" (the keyword search's favourites), the rest "a photo"."""
    rng = np.random.default_rng(0)
    e0 = np.zeros(D, np.float32)
    e0[0] = 1
    rows, meta = [], []
    for i in range(20):
        cos = 1 - i / 40
        other = _unit(rng.standard_normal(D - 1).astype(np.float32))
        v = np.concatenate([[cos], np.sqrt(1 - cos**2) * other]).astype(np.float32)
        rows.append(v)
        meta.append({
            "id": f"{'a' if i < 10 else 'b'}/r{i:02d}.jpg",
            "captions": ["a red kayak on a lake" if i >= 15 else "a photo"],
            "taken_at": None if i in (3, 11) else f"{2000 + (i * 7) % 20}-06-01T10:00:00",
            "camera_make": "Canon" if i % 2 else "Sony", "camera_model": "X", "width": 100 + i, "height": 50,
        })
    path = tmp_path_factory.mktemp("s") / "idx"
    write_index(path, _unit(np.stack(rows)), meta, encoder_identity=IDENT, encoder_label="t")
    return IndexStore.open(path)


E0 = np.eye(D, dtype=np.float32)[0]


def ids(page) -> list[str]:
    return [h.id for h in page.hits]


def row_ids(rows) -> list[str]:
    return [f"{'a' if i < 10 else 'b'}/r{i:02d}.jpg" for i in rows]


def test_vector_ranking_and_pages(store):
    first = run_search(store, SearchSpec(k=6), E0)
    assert ids(first) == row_ids(range(6)) and first.next_offset == 6
    assert [h.rank for h in first.hits] == [1, 2, 3, 4, 5, 6]
    pages, offset = [], 0
    while offset is not None:
        page = run_search(store, SearchSpec(k=6, offset=offset), E0)
        pages += ids(page)
        offset = page.next_offset
    assert pages == row_ids(range(20))  # pages partition the whole answer, in order
    last = run_search(store, SearchSpec(k=6, offset=18), E0)
    assert ids(last) == row_ids([18, 19]) and last.next_offset is None and last.hits[0].rank == 19
    assert run_search(store, SearchSpec(k=5, offset=15), E0).next_offset is None  # exactly the end


def test_filters_and_exclusion(store):
    page = run_search(store, SearchSpec(k=4, filter=MetaFilter(path_prefix="b/")), E0)
    assert ids(page) == row_ids([10, 11, 12, 13]) and page.next_offset == 4
    page = run_search(store, SearchSpec(k=20, filter=MetaFilter(camera="canon", taken_after="2010-01-01T00:00:00")), E0)
    want = [i for i in range(20) if i % 2 and i not in (3, 11) and 2000 + (i * 7) % 20 >= 2010]
    assert ids(page) == row_ids(want)
    spec = SearchSpec(k=3, exclude=(row_ids([0])[0],), filter=MetaFilter(exclude_ids=tuple(row_ids([1]))))
    page = run_search(store, spec, E0)
    assert ids(page) == row_ids([2, 3, 4])
    page = run_search(store, SearchSpec(k=3, filter=MetaFilter(text="kayak")), E0)
    assert ids(page) == row_ids([15, 16, 17])
    assert run_search(store, SearchSpec(k=3, filter=MetaFilter(path_prefix="zzz/")), E0).hits == []


def test_min_score_cuts_and_next_offset_respects_it(store):
    cut = 1 - 4.5 / 40  # rows 0..4 pass
    page = run_search(store, SearchSpec(k=3, min_score=cut), E0)
    assert ids(page) == row_ids([0, 1, 2]) and page.next_offset == 3
    page = run_search(store, SearchSpec(k=3, offset=3, min_score=cut), E0)
    assert ids(page) == row_ids([3, 4]) and page.next_offset is None


def test_date_sort_orders_the_hits_that_pass_the_threshold(store):
    cut = 1 - 9.5 / 40  # rows 0..9 pass; 3 is undated
    years = {i: 2000 + (i * 7) % 20 for i in range(10) if i != 3}
    newest = [*sorted(years, key=lambda i: -years[i]), 3]
    oldest = [*sorted(years, key=lambda i: years[i]), 3]
    got = run_search(store, SearchSpec(k=20, min_score=cut, sort="date_desc"), E0)
    assert ids(got) == row_ids(newest) and got.next_offset is None
    assert ids(run_search(store, SearchSpec(k=20, min_score=cut, sort="date_asc"), E0)) == row_ids(oldest)
    p1 = run_search(store, SearchSpec(k=4, min_score=cut, sort="date_desc"), E0)
    p2 = run_search(store, SearchSpec(k=4, offset=4, min_score=cut, sort="date_desc"), E0)
    p3 = run_search(store, SearchSpec(k=4, offset=8, min_score=cut, sort="date_desc"), E0)
    assert ids(p1) + ids(p2) + ids(p3) == row_ids(newest) and (p1.next_offset, p3.next_offset) == (4, None)
    # without a threshold: the max_sort_candidates best hits, by date
    capped = run_search(store, SearchSpec(k=20, sort="date_asc"), E0, limits=Limits(max_sort_candidates=5))
    assert set(ids(capped)) == set(row_ids(range(5))) and ids(capped)[-1] == row_ids([3])[0]


def test_hybrid_is_reciprocal_rank_fusion(store):
    page = run_search(store, SearchSpec(terms=(Term("red kayak"),), k=20, mode="hybrid"), E0,
                      limits=Limits(hybrid_pool=20))
    # vector ranking: rows 0..19 in order; keyword ranking: rows 15..19 (equal BM25: FTS5 returns them by rowid)
    text_rank = {r: n for n, r in enumerate(range(15, 20), 1)}
    fused = {r: 1 / (RRF_K + r + 1) + (1 / (RRF_K + text_rank[r]) if r in text_rank else 0) for r in range(20)}
    want = sorted(fused, key=lambda r: (-fused[r], r))
    assert ids(page) == row_ids(want)
    assert [h.fused_score for h in page.hits] == pytest.approx([fused[r] for r in want])
    assert page.hits[0].score == pytest.approx(1 - 15 / 40, abs=1e-5)  # the cosine stays the cosine
    # a keyword hit outside the vector pool still gets its cosine
    small = run_search(store, SearchSpec(terms=(Term("kayak"),), k=3, mode="hybrid"), E0, limits=Limits(hybrid_pool=2))
    assert {h.id for h in small.hits} >= set(row_ids([15]))
    assert all(h.score == pytest.approx(1 - int(h.id[-6:-4]) / 40, abs=1e-5) for h in small.hits)


def test_hybrid_needs_words_and_respects_filters(store):
    with pytest.raises(BadInput, match="mode"):
        run_search(store, SearchSpec(terms=(Term("x", -1.0),), mode="hybrid"), E0)
    page = run_search(store, SearchSpec(terms=(Term("kayak"),), k=20, mode="hybrid",
                                        filter=MetaFilter(camera="sony")), E0)
    assert all(int(h.id[-6:-4]) % 2 == 0 for h in page.hits) and len(page.hits) == 10


def test_relevance_from_the_calibration(store):
    cal = Calibration("platt", {"a": 40.0, "b": -36.0})  # relevance 0.5 at cosine 0.9
    page = run_search(store, SearchSpec(k=20), E0, calibration=cal)
    assert [h.relevance for h in page.hits] == pytest.approx([float(cal(h.score)) for h in page.hits])
    cut = run_search(store, SearchSpec(k=20, min_relevance=0.5), E0, calibration=cal)
    assert ids(cut) == [h.id for h in page.hits if h.relevance >= 0.5] and 3 <= len(cut.hits) <= 5
    assert run_search(store, SearchSpec(k=3), E0).hits[0].relevance is None
    with pytest.raises(BadInput, match="min_relevance"):
        run_search(store, SearchSpec(k=3, min_relevance=0.5), E0)


def test_combine_is_the_normalized_weighted_sum():
    t = np.eye(3, dtype=np.float32)
    v = combine(t[:2], [1.0, -0.5])
    np.testing.assert_allclose(v, _unit(np.array([1, -0.5, 0], np.float32)))
    v = combine(t[:1], [2.0], image_vector=t[2], image_weight=1.0)
    np.testing.assert_allclose(v, _unit(np.array([2, 0, 1], np.float32)))
    np.testing.assert_allclose(combine(np.zeros((0, 3)), [], image_vector=t[1]), t[1])
    with pytest.raises(BadQuery, match="cancel"):
        combine(np.stack([t[0], t[0]]), [1.0, -1.0])
    with pytest.raises(BadQuery):
        combine(np.zeros((0, 3)), [])


def test_negative_term_pushes_results_away(store):
    """'e0 - e1' ranks rows with a negative e1 component above those with a positive one."""
    e1 = np.eye(D, dtype=np.float32)[1]
    vecs = store.vectors(np.arange(20))
    q = combine(np.stack([E0, e1]), [1.0, -1.0])
    page = run_search(store, SearchSpec(k=20), q)
    got = [int(h.id[-6:-4]) for h in page.hits]
    assert got == sorted(range(20), key=lambda r: -float(vecs[r] @ q))


def test_hit_metadata_shape():
    m = hit_metadata({"id": "x/y/z.jpg", "path": "x/y/z.jpg", "captions": ["c"], "camera_make": "Canon",
                      "camera_model": "EOS", "content_hash": "sha256:..", "taken_at": "2020-01-01T00:00:00"})
    assert m == {"path": "x/y/z.jpg", "folder": "x/y", "captions": ["c"], "camera": "Canon EOS",
                 "taken_at": "2020-01-01T00:00:00"}
    assert hit_metadata({"id": "top.jpg"})["folder"] == "" and hit_metadata({"id": "top.jpg"})["camera"] is None


def test_searches_sharing_one_index_search_answer_as_each_alone(store):
    """The search stage runs a micro-batch's unfiltered vector searches as one index search (one query streams
    the whole Flat index); every page must be what the spec gets alone, whatever the mix of pages, filters, sorts,
    thresholds and modes, and a failing spec only fails its own slot."""
    rng = np.random.default_rng(1)
    queries = _unit(np.vstack([E0, rng.standard_normal((7, D))]).astype(np.float32))
    specs = [
        SearchSpec(terms=(Term("q"),), k=5),
        SearchSpec(terms=(Term("q"),), k=3, offset=4),
        SearchSpec(terms=(Term("q"),), k=10, min_score=0.9),
        SearchSpec(terms=(Term("q"),), k=4, sort="date_desc"),
        SearchSpec(terms=(Term("q"),), k=4, filter=MetaFilter(path_prefix="b/")),
        SearchSpec(terms=(Term("q"),), k=3, exclude=("a/r00.jpg",)),
        SearchSpec(terms=(Term("red kayak"),), k=5, mode="hybrid"),
        SearchSpec(terms=(Term("q"),), k=2, min_relevance=0.5),  # no calibration: BadInput in its slot
    ]
    together = run_searches(store, specs, queries)
    for spec, q, got in zip(specs, queries, together, strict=True):
        if spec.min_relevance is not None:
            assert isinstance(got, BadInput)
            continue
        alone = run_search(store, spec, q)
        assert isinstance(got, Page) and ids(got) == ids(alone) and got.next_offset == alone.next_offset
        assert [h.score for h in got.hits] == pytest.approx([h.score for h in alone.hits], abs=1e-6)
