"""The composed-query fusion head: learns a known composition on synthetic triplets, round-trips through its
checkpoint, refuses another encoder's space; the trainer CLI on a FashionIQ-shaped folder; the service uses it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retrieval.errors import EncoderUnavailable, IndexEncoderMismatch
from retrieval.fusion import AdditiveAttentionFusion, FusionConfig, load_fusion, save_fusion
from trainer.fusion import FusionSettings, TripletFeatures, baselines, recall_at, train_fusion

D, GROUPS, VALUES = 32, 3, 8


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def synthetic(n_train: int = 3000, n_test: int = 400, seed: int = 0) -> tuple[TripletFeatures, TripletFeatures]:
    """Images are the sum of one attribute vector per group (8^3 = 512 images). A change text "value a -> value b"
    is a *rotated* copy of ``e_b - e_a`` (another space, as a text tower's is), so the target is known exactly:
    the reference with ``a`` swapped for ``b``. Adding the text to the image does not find it; a trained head can."""
    rng = np.random.default_rng(seed)
    attr = _unit(rng.standard_normal((GROUPS, VALUES, D)))
    rot, _ = np.linalg.qr(rng.standard_normal((D, D)))
    combos = np.stack(np.meshgrid(*[np.arange(VALUES)] * GROUPS, indexing="ij"), -1).reshape(-1, GROUPS)
    gallery = _unit(np.stack([attr[np.arange(GROUPS), c].sum(0) for c in combos]))
    index = {tuple(c): i for i, c in enumerate(combos)}

    def triplets(n: int) -> TripletFeatures:
        ref = rng.integers(0, len(combos), n)
        group = rng.integers(0, GROUPS, n)
        new = (combos[ref, group] + rng.integers(1, VALUES, n)) % VALUES
        target = []
        text = []
        for r, g, b in zip(ref, group, new, strict=True):
            c = combos[r].copy()
            a, c[g] = c[g], b
            target.append(index[tuple(c)])
            text.append(rot @ (attr[g, b] - attr[g, a]) + 0.05 * rng.standard_normal(D))
        return TripletFeatures(ref=gallery[ref], text=_unit(np.array(text)), target=np.array(target),
                               ref_idx=ref.astype(np.int64), gallery=gallery, gallery_ids=[str(i) for i in index])

    return triplets(n_train), triplets(n_test)


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is faster than two fighting over a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_head_learns_a_known_composition(one_thread):
    train, test = synthetic(n_train=2000)
    cfg = FusionSettings(epochs=10, batch_size=128, lr=5e-3, hidden=64, temperature=0.05, seed=0)
    head, history = train_fusion(train, cfg, dev=test)
    learned = recall_at(head.compose(test.ref, test.text), test)
    base = baselines(test)
    assert learned["R@1"] >= 70, (learned, base)
    assert learned["R@1"] > base["sum"]["R@1"] + 40 and learned["R@1"] > base["image only"]["R@1"] + 40
    assert history[-1]["loss"] < history[0]["loss"]


def test_an_untrained_head_returns_the_image():
    head = AdditiveAttentionFusion(FusionConfig(dim=8, hidden=4)).eval()
    v = _unit(np.random.default_rng(0).standard_normal((3, 8)))
    t = _unit(np.random.default_rng(1).standard_normal((3, 8)))
    np.testing.assert_allclose(head.compose(v, t), v, atol=1e-6)
    _, _, a = head.attention(torch.from_numpy(v), torch.from_numpy(t))
    np.testing.assert_allclose(a.sum(1).detach().numpy(), 1.0, atol=1e-6)


def test_checkpoint_round_trip_and_encoder_check(tmp_path):
    head = AdditiveAttentionFusion(FusionConfig(dim=8, hidden=4, encoder={"model": "a", "dim": 8}))
    torch.nn.init.normal_(head.text_proj.weight)
    save_fusion(head, tmp_path / "f.pt", extra={"dev": {"R@10": 1.0}})
    again, extra = load_fusion(tmp_path / "f.pt", expected_encoder={"model": "a", "dim": 8})
    v, t = np.eye(8, dtype=np.float32)[:2], np.eye(8, dtype=np.float32)[2:4]
    np.testing.assert_allclose(again.compose(v, t), head.eval().compose(v, t), atol=1e-6)
    assert extra == {"dev": {"R@10": 1.0}}
    with pytest.raises(IndexEncoderMismatch, match="model"):
        load_fusion(tmp_path / "f.pt", expected_encoder={"model": "b", "dim": 8})
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(EncoderUnavailable):
        load_fusion(tmp_path / "bad.pt")
    with pytest.raises(EncoderUnavailable):
        load_fusion(tmp_path / "missing.pt")


def test_trainer_cli_on_a_fashioniq_folder(tmp_path, tiny_clip_spec):
    from test_readers_vg_fashioniq import fashioniq_folder

    from trainer.cli import main

    root = fashioniq_folder(tmp_path / "fiq")
    out = tmp_path / "run"
    code = main(["fusion", "--data", str(root), "--encoder", f"open_clip:{tiny_clip_spec.model}", "--precision",
                 "fp32", "--out", str(out), "--epochs", "2", "--batch-size", "2", "--categories", "dress"])
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["train_triplets"] == 2 and report["dev_triplets"] == 1 and "R@10" in report["dev"]
    assert set(report["dev_baselines"]) == {"image only", "text only", "sum"}
    head, _ = load_fusion(out / "best.pt")
    assert head.config.dim == 32 and head.config.encoder["model"] == tiny_clip_spec.model


@pytest.mark.anyio
async def test_the_service_composes_image_and_text_with_the_head(tmp_path, tiny_encoder):
    from service_support import build_test_index, running_app

    from service.settings import ServiceSettings

    ids = build_test_index(tiny_encoder, tmp_path / "idx", tmp_path / "imgs", n=10)
    head = AdditiveAttentionFusion(FusionConfig(dim=32, hidden=8, encoder=tiny_encoder.identity()))
    torch.manual_seed(1)
    torch.nn.init.normal_(head.text_proj.weight, std=0.5)
    save_fusion(head, tmp_path / "fusion.pt")
    settings = ServiceSettings(index_dir=tmp_path / "idx", warmup=False, fusion_head=tmp_path / "fusion.pt")
    body = {"image_id": ids[2], "query": "in the snow", "top_k": 9}
    async with running_app(settings, tiny_encoder) as (_, c):
        fused = (await c.post("/api/search", json=body)).json()
        summed = (await c.post("/api/search", json={**body, "compose": "sum"})).json()
        assert (await c.get("/api/stats")).json()["fusion"] is True
    from retrieval.index import IndexStore

    store = IndexStore.open(tmp_path / "idx")
    q = head.eval().compose(store.vector(ids[2]), tiny_encoder.encode_text(["in the snow"]))[0]
    vecs = store.vectors(np.arange(store.count))
    want = [store.ids[r] for r in np.argsort(-(vecs @ q)) if store.ids[r] != ids[2]]
    assert fused["compose"] == "fusion" and [h["id"] for h in fused["results"]] == want
    assert summed["compose"] == "sum" and [h["id"] for h in summed["results"]] != want
    async with running_app(ServiceSettings(index_dir=tmp_path / "idx", warmup=False), tiny_encoder) as (_, c):
        r = await c.post("/api/search", json={**body, "compose": "fusion"})
        assert r.status_code == 422 and "compose" in r.json()["detail"]
        assert (await c.post("/api/search", json=body)).json()["compose"] == "sum"


@pytest.fixture
def anyio_backend():
    return "asyncio"
