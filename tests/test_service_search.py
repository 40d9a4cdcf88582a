"""The search contract over HTTP: filters, pages, sort, hybrid, query arithmetic, combined image + text queries,
calibrated relevance; POST, GET, batch, upload and similar take the same fields; bad fields get a 422 naming them."""

from __future__ import annotations

import json

import pytest
from service_support import build_test_index, running_app

from service.settings import ServiceSettings

pytestmark = pytest.mark.anyio

N = 16
FOLDERS = ["trips", "trips/2019", "home", "home"]


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


def _meta(i: int) -> dict:
    return {"taken_at": None if i == 5 else f"{2010 + i}-03-0{1 + i % 5}T08:00:00",
            "camera_make": "Canon" if i % 2 else "FUJIFILM", "camera_model": f"M{i % 3}", "width": 640, "height": 480,
            "folder_hint": FOLDERS[i % 4]}


@pytest.fixture(scope="module")
def index(tiny_encoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    ids = build_test_index(tiny_encoder, root / "idx", root / "imgs", n=N,
                           meta_override={i: _meta(i) for i in range(N)})
    return root, ids


@pytest.fixture(scope="module")
async def client(index, tiny_encoder):
    root, _ = index
    settings = ServiceSettings(index_dir=root / "idx", warmup=False, max_top_k=50, max_offset=40)
    async with running_app(settings, tiny_encoder) as (_, c):
        yield c


async def _post(client, body: dict) -> dict:
    r = await client.post("/api/search", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _ids(body: dict) -> list[str]:
    return [h["id"] for h in body["results"]]


async def test_filters_post_get_and_batch_agree(client, index):
    _, ids = index
    flt = {"taken_after": "2014-01-01", "taken_before": "2022-06-30T00:00:00", "camera": "canon"}
    post = await _post(client, {"query": "a dog", "top_k": 50, "filter": flt})
    want = [ids[i] for i in range(N) if i != 5 and 2010 + i >= 2014 and i % 2 == 1
            and f"{2010 + i}-03-0{1 + i % 5}T08:00:00" < "2022-06-30"]
    assert sorted(_ids(post)) == sorted(want)
    get = await client.get("/api/search", params={"q": "a dog", "top_k": 50, **flt})
    assert get.status_code == 200, get.text and _ids(get.json()) == _ids(post)
    assert _ids(get.json()) == _ids(post)
    batch = await client.post("/api/search/batch", json={"queries": ["a dog", "a cat"], "top_k": 50, "filter": flt})
    assert batch.status_code == 200 and _ids(batch.json()["results"][0]) == _ids(post)
    assert sorted(_ids(batch.json()["results"][1])) == sorted(want)


async def test_a_date_taken_before_covers_that_whole_day(client, index):
    _, ids = index
    body = await _post(client, {"query": "x", "top_k": 50, "filter": {"taken_after": "2012-03-03",
                                                                      "taken_before": "2012-03-03"}})
    assert _ids(body) == [ids[2]]  # taken 2012-03-03T08:00


async def test_ids_and_exclude_ids(client, index):
    _, ids = index
    body = await _post(client, {"query": "x", "top_k": 50, "filter": {"ids": ids[:4], "exclude_ids": [ids[1]]}})
    assert sorted(_ids(body)) == sorted([ids[0], ids[2], ids[3]])
    get = await client.get("/api/search", params=[("q", "x"), ("top_k", 50), ("ids", ids[0]), ("ids", ids[3])])
    assert sorted(_ids(get.json())) == sorted([ids[0], ids[3]])


async def test_pages_partition_the_answer(client):
    whole = await _post(client, {"query": "a red square", "top_k": N})
    seen, offset = [], 0
    while offset is not None:
        page = await _post(client, {"query": "a red square", "top_k": 5, "offset": offset})
        assert [h["rank"] for h in page["results"]] == list(range(offset + 1, offset + 1 + len(page["results"])))
        seen += _ids(page)
        offset = page["next_offset"]
    assert seen == _ids(whole) and len(seen) == N


async def test_date_sort(client):
    body = await _post(client, {"query": "a dog", "top_k": 50, "sort": "date_desc"})
    dates = [h["metadata"]["taken_at"] for h in body["results"]]
    assert dates[-1] is None and dates[:-1] == sorted(dates[:-1], reverse=True)
    asc = await _post(client, {"query": "a dog", "top_k": 50, "sort": "date_asc", "min_score": -1})
    assert [h["metadata"]["taken_at"] for h in asc["results"]][:-1] == sorted(dates[:-1])


async def test_hybrid_brings_caption_matches_up(client, index):
    _, ids = index
    vec = await _post(client, {"query": "surfer wave", "top_k": 5})
    hyb = await _post(client, {"query": "surfer wave", "top_k": 5, "mode": "hybrid"})
    surfers = {ids[i] for i in range(N) if i % 12 == 6}  # captions "a surfer on a wave"
    assert surfers <= set(_ids(hyb)) and all(h["fused_score"] > 0 for h in hyb["results"])
    assert vec["results"][0]["fused_score"] is None and hyb["mode"] == "hybrid"


async def test_query_arithmetic_is_parsed_and_echoed(client):
    body = await _post(client, {"query": "dog on a beach -people 2:sunset +boat"})
    assert body["terms"] == [{"text": "dog on a beach", "weight": 1.0}, {"text": "people", "weight": -1.0},
                             {"text": "sunset", "weight": 2.0}, {"text": "boat", "weight": 1.0}]
    weighted = await _post(client, {"terms": [{"text": "dog on a beach", "weight": 1},
                                              {"text": "people", "weight": -0.5}], "top_k": 3})
    assert weighted["query"] is None and len(weighted["terms"]) == 2 and len(weighted["results"]) == 3
    same = await _post(client, {"query": "dog on a beach - 0.5:people", "top_k": 3})
    assert _ids(same) == _ids(weighted)


async def test_a_negative_term_changes_the_ranking(client):
    plain = await _post(client, {"query": "a dog", "top_k": N})
    minus = await _post(client, {"query": "a dog - 2:a dog", "top_k": N})  # -1 x "a dog": the reverse order
    assert _ids(minus) == _ids(plain)[::-1]


async def test_combined_image_id_and_text(client, index):
    _, ids = index
    alone = await _post(client, {"image_id": ids[3], "top_k": N})
    assert ids[3] not in _ids(alone) and len(alone["results"]) == N - 1 and alone["image_id"] == ids[3]
    sim = await client.get(f"/api/search/similar/{ids[3]}", params={"top_k": N})
    assert _ids(sim.json()) == _ids(alone)
    mixed = await _post(client, {"image_id": ids[3], "query": "in the snow", "image_weight": 0.3, "top_k": N})
    assert _ids(mixed) != _ids(alone) and ids[3] not in _ids(mixed)
    sim_q = await client.get(f"/api/search/similar/{ids[3]}", params={"top_k": N, "q": "in the snow",
                                                                       "image_weight": 0.3})
    assert _ids(sim_q.json()) == _ids(mixed)
    filtered = await client.get(f"/api/search/similar/{ids[3]}", params={"top_k": N, "camera": "fuji"})
    assert all(int(i[4:8]) % 2 == 0 for i in _ids(filtered.json()))


async def test_upload_with_text_and_options(client, index):
    root, ids = index
    data = (root / "imgs" / ids[4]).read_bytes()
    files = {"file": ("x.jpg", data, "image/jpeg")}
    alone = await client.post("/api/search/image", files=files, params={"top_k": 3})
    assert _ids(alone.json())[0] == ids[4]
    req = {"query": "a city at night", "image_weight": 0.2, "top_k": 5, "filter": {"camera": "canon"},
           "sort": "date_desc"}
    mixed = await client.post("/api/search/image", files=files, data={"request": json.dumps(req)})
    assert mixed.status_code == 200, mixed.text
    body = mixed.json()
    assert body["terms"] == [{"text": "a city at night", "weight": 1.0}] and body["sort"] == "date_desc"
    assert all(int(i[4:8]) % 2 == 1 for i in _ids(body))
    bad = await client.post("/api/search/image", files=files, data={"request": '{"top_k": "x"}'})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "request", "top_k"]
    bad = await client.post("/api/search/image", files=files, data={"request": "{not json"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][:2] == ["body", "request"]


@pytest.mark.parametrize(("body", "loc"), [
    ({"query": "x", "filter": {"taken_after": "last tuesday"}}, ["body", "filter", "taken_after"]),
    ({"query": "x", "filter": {"taken_after": "2020-01-02", "taken_before": "2020-01-01"}}, ["body", "filter"]),
    ({"query": "x", "filter": {"path_prefix": ""}}, ["body", "filter", "path_prefix"]),
    ({"query": "x", "filter": {"camera": 7}}, ["body", "filter", "camera"]),
    ({"query": "x", "filter": {"text": "?!"}}, ["body", "filter", "text"]),
    ({"query": "x", "filter": {"ids": ["a"] * 1001}}, ["body", "filter", "ids"]),
    ({"query": "x", "filter": {"colour": "red"}}, ["body", "filter", "colour"]),
    ({"terms": [{"text": "x", "weight": 100}]}, ["body", "terms", 0, "weight"]),
    ({"terms": [{"text": " ", "weight": 1}]}, ["body", "terms", 0, "text"]),
    ({"terms": [{"text": "x", "weight": "heavy"}]}, ["body", "terms", 0, "weight"]),
    ({"terms": [{"text": "x"}] * 17}, ["body", "terms"]),
    ({"query": "dog -"}, ["body", "query"]),
    ({"query": "20:dog"}, ["body", "query"]),
    ({"query": "x", "sort": "random"}, ["body", "sort"]),
    ({"query": "x", "mode": "magic"}, ["body", "mode"]),
    ({"query": "x", "offset": -1}, ["body", "offset"]),
    ({"query": "x", "offset": 10**6}, ["body", "offset"]),
    ({"query": "x", "min_relevance": 2}, ["body", "min_relevance"]),
    ({"query": "x", "image_weight": float("inf")}, None),
])
async def test_bad_fields_get_a_422_naming_them(client, body, loc):
    r = await client.post("/api/search", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    if loc is not None:
        assert r.json()["detail"][0]["loc"][: len(loc)] == loc, r.json()


@pytest.mark.parametrize(("params", "loc"), [
    ({"q": "x", "taken_after": "someday"}, ["query", "taken_after"]),
    ({"q": "x", "taken_after": "2020-02-02", "taken_before": "2020-01-01"}, ["query"]),
    ({"q": "x", "sort": "up"}, ["query", "sort"]),
    ({"q": "dog -"}, ["query", "q"]),
    ({"q": "x", "terms": "2:"}, ["query", "terms", 0]),
    ({"q": "x", "offset": "two"}, ["query", "offset"]),
    ({"q": "x", "colour": "red"}, ["query", "colour"]),
])
async def test_bad_get_fields_get_a_422_naming_them(client, params, loc):
    r = await client.get("/api/search", params=params)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][: len(loc)] == loc, r.json()


@pytest.mark.parametrize(("body", "words"), [
    ({"query": "x", "min_relevance": 0.5}, "min_relevance"),  # this encoder has no calibration
    ({"query": "x", "offset": 41}, "offset"),  # over the configured max_offset
    ({"image_id": "no-such-id.jpg"}, "image_id"),
    ({"query": "a dog - a dog"}, "cancel"),
    ({"query": "x", "mode": "hybrid", "terms": [{"text": "only", "weight": -1}], "image_id": None}, None),
])
async def test_bad_requests_the_engine_refuses_name_the_field(client, body, words):
    r = await client.post("/api/search", json=body)
    if words is None:  # hybrid with a negative-only term still has positive words from the query "x"
        assert r.status_code == 200
        return
    assert r.status_code in (404, 422), r.text
    assert words in r.json()["detail"]


async def test_relevance_with_a_calibrated_encoder(tmp_path, tiny_clip_spec):
    from retrieval.calibration import Calibration
    from retrieval.encoders import build_encoder
    from retrieval.heads import HeadConfig, HeadPair, save_heads

    ckpt = tmp_path / "heads.pt"
    save_heads(HeadPair(HeadConfig(kind="residual", image_in=32, text_in=32, out_dim=32)), ckpt,
               extra={"calibration": Calibration("platt", {"a": 8.0, "b": 0.0}).to_dict()})
    encoder = build_encoder(tiny_clip_spec.model_copy(update={"heads": str(ckpt)}))
    build_test_index(encoder, tmp_path / "idx", tmp_path / "imgs", n=10)
    async with running_app(ServiceSettings(index_dir=tmp_path / "idx", warmup=False), encoder) as (_, c):
        body = (await c.post("/api/search", json={"query": "a dog", "top_k": 10})).json()
        rel = [h["relevance"] for h in body["results"]]
        assert all(0 <= r <= 1 for r in rel) and rel == sorted(rel, reverse=True)
        for h in body["results"]:
            assert h["relevance"] == pytest.approx(1 / (1 + 2.718281828 ** (-8 * h["score"])), abs=1e-5)
        levels = sorted(set(rel))  # the response rounds relevance to 6 places: cut between two shown values
        cut = (levels[len(levels) // 2 - 1] + levels[len(levels) // 2]) / 2
        kept = (await c.post("/api/search", json={"query": "a dog", "top_k": 10, "min_relevance": cut})).json()
        assert [h["id"] for h in kept["results"]] == [h["id"] for h in body["results"] if h["relevance"] >= cut]
        stats = (await c.get("/api/stats")).json()
        assert stats["calibrated"] is True
