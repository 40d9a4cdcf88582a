"""Keeping what the backbone knows (anchored heads, class distillation, class dev sets), partial unfreezing, and
the evaluation report's analysis (geometry, P/R/F1 curves, calibration, 2-D map). Synthetic features, except the
partial-unfreezing round trip, which runs the packaged EfficientNet-Lite0 on generated images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from retrieval.datasets import ImageRecord
from retrieval.encoders import EncoderSpec, build_encoder
from retrieval.encoders.effnet import EffnetImage
from retrieval.heads import AnchoredHead, HeadConfig, HeadPair, load_heads, save_heads
from retrieval.metrics import query_metrics
from tests.conftest import make_images
from trainer import analysis
from trainer.config import TrainerSettings
from trainer.priors import ClassDevSet, ClassPrior, class_distillation_loss
from trainer.train import TensorSplit, Trainer

# ----------------------------------------------------------------------------------------------------------------
# Synthetic "classifier world": K classes, image features carry the class, captions and prompts name it
# ----------------------------------------------------------------------------------------------------------------

K, D_IMG, D_TXT = 12, 40, 24


def world(n: int = 240, seed: int = 0) -> tuple[TensorSplit, ClassPrior, ClassDevSet]:
    g = torch.Generator().manual_seed(seed)
    fc = torch.randn(K, D_IMG, generator=torch.Generator().manual_seed(99))
    prompts = F.normalize(torch.randn(K, D_TXT, generator=torch.Generator().manual_seed(98)), dim=-1)
    cls = torch.randint(0, K, (n,), generator=g)
    images = 2.0 * fc[cls] + 0.5 * torch.randn(n, D_IMG, generator=g)
    texts = prompts[cls] + 0.2 * torch.randn(n, D_TXT, generator=g)
    split = TensorSplit(images, None, texts, torch.arange(n))
    prior = ClassPrior(fc, torch.zeros(K), prompts)
    rel = [np.flatnonzero(cls.numpy() == k) for k in range(K)]
    keep = [k for k in range(K) if len(rel[k])]
    dev = ClassDevSet(images.numpy(), prompts.numpy()[keep], [rel[k] for k in keep], [f"c{k}" for k in keep])
    return split, prior, dev


def cfg(tmp: Path, **kw) -> TrainerSettings:
    base = dict(out=str(tmp), epochs=3, batch_size=48, lr=3e-3, warmup_steps=2, hidden=32, seed=0, threads=1,
                patience=50, dropout=0.0, weight_decay=0.0, head="anchored", flip_aug=False)
    base.update(kw)
    return TrainerSettings(**base)


# ----------------------------------------------------------------------------------------------------------------
# Anchored heads
# ----------------------------------------------------------------------------------------------------------------


def anchored_pair(prior: ClassPrior) -> HeadPair:
    heads = HeadPair(HeadConfig(kind="anchored", image_in=D_IMG, text_in=D_TXT, out_dim=D_TXT, hidden=16,
                                classes=K))
    img = heads.image
    assert isinstance(img, AnchoredHead)
    with torch.no_grad():
        img.fc.weight.copy_(prior.fc_weight)
        img.fc.bias.copy_(prior.fc_bias)
        img.class_embeddings.copy_(prior.class_embeddings())
    return heads.eval()


def test_untrained_anchored_heads_are_the_label_bridge() -> None:
    _, prior, _ = world()
    heads = anchored_pair(prior)
    x = torch.randn(5, D_IMG)
    bridge = F.normalize(torch.softmax(prior.logits(x), -1) @ prior.class_embeddings(), dim=-1)
    assert torch.allclose(heads.image(x), bridge, atol=1e-6)
    t = torch.randn(5, D_TXT)
    assert torch.allclose(heads.text(t), F.normalize(t, dim=-1), atol=1e-6)


def test_anchored_heads_round_trip_and_trace(tmp_path: Path) -> None:
    _, prior, _ = world()
    heads = anchored_pair(prior)
    with torch.no_grad():
        heads.image.mlp.proj.weight.normal_()  # type: ignore[union-attr]
    path = tmp_path / "h.pt"
    save_heads(heads, path)
    loaded, _ = load_heads(path)
    x = torch.randn(4, D_IMG)
    assert torch.allclose(loaded.image(x), heads.image(x), atol=1e-6)
    # fixed shapes, no Python branches on data: a trace replays exactly on other inputs
    traced = torch.jit.trace(loaded.image, torch.randn(2, D_IMG))
    y = torch.randn(7, D_IMG)
    assert torch.allclose(traced(y), loaded.image(y), atol=1e-5)


def test_concatenated_parts_score_as_a_weighted_mix() -> None:
    _, prior, _ = world()
    w = 0.4
    heads = HeadPair(HeadConfig(kind="anchored", image_in=D_IMG, text_in=D_TXT, out_dim=D_TXT + 8, hidden=16,
                                classes=K, anchor_weight=w)).eval()
    img = heads.image
    assert isinstance(img, AnchoredHead)
    with torch.no_grad():
        img.fc.weight.copy_(prior.fc_weight)
        img.class_embeddings.copy_(prior.class_embeddings())
    x, t = torch.randn(6, D_IMG), torch.randn(6, D_TXT)
    a, b = heads.image(x), heads.text(t)
    assert a.shape == (6, D_TXT + 8) and torch.allclose(a.norm(dim=-1), torch.ones(6), atol=1e-5)
    cos_anchor = (img.anchor(x) * heads.text.anchor(t)).sum(-1)  # type: ignore[operator]
    la = F.normalize(img.mlp((x - img.mean) / img.std), dim=-1)
    lt = F.normalize(heads.text.mlp(t), dim=-1)  # type: ignore[operator]
    assert torch.allclose((a * b).sum(-1), w * cos_anchor + (1 - w) * (la * lt).sum(-1), atol=1e-5)


def test_text_side_anchored_head_needs_matching_dims() -> None:
    with pytest.raises(ValueError, match="in_dim == anchor dim"):
        AnchoredHead(D_TXT, D_TXT + 1, 8, 0.0, classes=0, anchor_dim=D_TXT + 1)


# ----------------------------------------------------------------------------------------------------------------
# Class metrics and distillation
# ----------------------------------------------------------------------------------------------------------------


def test_query_metrics_on_a_hand_built_ranking() -> None:
    cands = np.eye(4, dtype=np.float32)
    # query 0 ranks candidates 0 > 1 > 2 > 3, relevant {0, 2}: AP = (1/1 + 2/3) / 2
    q = np.array([[0.9, 0.5, 0.3, 0.1]], np.float32)
    m = query_metrics(q, cands, [np.array([0, 2])], ks=(1, 2))
    assert m["R@1"] == 100.0 and m["P@2"] == 50.0
    assert m["mAP"] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_distillation_loss_is_smallest_when_student_matches_teacher() -> None:
    prompts = F.normalize(torch.randn(K, 8), dim=-1)
    img = prompts[:3]
    teacher = 50.0 * img @ prompts.T
    matched = class_distillation_loss(img, prompts, teacher, 1.0, 50.0)
    other = class_distillation_loss(prompts[3:6], prompts, teacher, 1.0, 50.0)
    assert float(matched) < 1e-5 < float(other)


def test_distillation_keeps_class_retrieval(tmp_path: Path) -> None:
    """Captions that carry no class signal would wash the bridge out; the class distillation holds it."""
    split, prior, dev = world()
    perm = torch.randperm(split.texts.shape[0], generator=torch.Generator().manual_seed(1))
    noisy = TensorSplit(split.images, None, split.texts[perm], split.text_image)  # captions unrelated to images
    scores = {}
    for distill in (0.0, 2.0):
        t = Trainer(cfg(tmp_path / f"d{distill}", distill=distill, epochs=6, lr=1e-2), noisy, noisy, prior=prior,
                    class_dev=dev)
        t.fit()
        scores[distill] = t.history[-1]["class_mAP"]
    assert scores[2.0] > scores[0.0] + 5


def test_select_both_mixes_caption_and_class_scores(tmp_path: Path) -> None:
    split, prior, dev = world()
    t = Trainer(cfg(tmp_path, select="both", epochs=1), split, split, prior=prior, class_dev=dev)
    t.fit()
    row = t.history[-1]
    assert row["dev_score"] == pytest.approx((row["caption_dev_score"] + row["class_mAP"]) / 2)


def test_anchored_heads_need_a_prior(tmp_path: Path) -> None:
    split, _, _ = world()
    with pytest.raises(ValueError, match="class prior"):
        Trainer(cfg(tmp_path), split, split)


# ----------------------------------------------------------------------------------------------------------------
# Analysis
# ----------------------------------------------------------------------------------------------------------------


def test_alignment_and_uniformity_extremes() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert analysis.alignment(x, x, np.arange(300)) == pytest.approx(0.0, abs=1e-6)
    collapsed = np.repeat(x[:1], 300, axis=0)
    assert analysis.uniformity(collapsed) == pytest.approx(0.0, abs=1e-6)
    assert analysis.uniformity(x) < -2.0  # spread points: far below the collapsed value


def test_prf_curves_and_relevance_calibration() -> None:
    rng = np.random.default_rng(1)
    img = rng.normal(size=(60, 8)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    owner = np.repeat(np.arange(60), 2)
    txt = img[owner] + 0.6 * rng.normal(size=(120, 8)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    curves = analysis.prf_curves(img, txt, owner)
    assert curves["ks"] == [1, 5, 10, 20, 50]
    assert curves["t2i"]["R"] == sorted(curves["t2i"]["R"])
    scores, labels = analysis.relevance_pairs(img, txt, owner, k=10)
    assert scores.shape == labels.shape == (1200,) and labels.sum() <= 120
    cal, brier = analysis.fit_relevance(scores, labels)
    rep = analysis.reliability_report(cal, scores, labels)
    assert set(brier) == {"platt", "isotonic"} and rep["ece"] < 0.1
    # monotone: ranking by relevance equals ranking by score
    grid = np.linspace(-1, 1, 50)
    assert np.all(np.diff(cal(grid)) >= -1e-12)


def test_map_projection_shape() -> None:
    pts = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    for method, name in (("pca", "PCA"), ("tsne", "t-SNE")):  # UMAP's first call compiles for ~1 min: not here
        xy, used = analysis.project_2d(pts, method)  # type: ignore[arg-type]
        assert xy.shape == (40, 2) and used == name
    imgs, caps = analysis.map_sample(np.repeat(np.arange(10), 3), 10, n=4)
    assert len(imgs) == 4 and np.all(caps == imgs * 3)


# ----------------------------------------------------------------------------------------------------------------
# Partial unfreezing with the real EfficientNet-Lite0
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_partial_unfreezing_round_trip(tmp_path: Path) -> None:
    """Tail training on cached activations -> a checkpoint whose tuned blocks the factory loads, so the encoder's
    image features are the trained tail's, and the feature cache keys them apart from the plain backbone's."""
    from trainer.activations import activation_split
    from trainer.features import FeatureCache, backbone_identity
    from trainer.prepare import EffnetTail

    paths = make_images(tmp_path / "imgs", 24, size=(80, 64))
    records = [ImageRecord(p.name, p, captions=(f"picture number {i}",)) for i, p in enumerate(paths)]
    plain = tmp_path / "plain.pt"  # any heads: spares building the label bridge (1,000 class prompts)
    save_heads(HeadPair(HeadConfig(kind="linear", image_in=1280, text_in=384, out_dim=16)), plain)
    spec = EncoderSpec(backend="dual", model="efficientnet-lite0", precision="fp32", device="cpu", heads=str(plain))
    enc = build_encoder(spec)
    net = enc.image_backbone
    assert isinstance(net, EffnetImage)
    pixels = torch.stack([enc.image_transform(Image.open(p)) for p in paths[:3]])
    with torch.no_grad():
        assert torch.allclose(net.features_from(net.features_until(pixels, 14), 14), net(pixels), atol=1e-4)

    cache = FeatureCache(tmp_path / "cache")
    split = activation_split(enc, records, cache, cut=14, workers=0)
    assert split.acts.shape == (24, 192, 7, 7) and split.acts.dtype == np.float16
    base = TensorSplit.of(split.feats)
    train = TensorSplit(torch.from_numpy(np.array(split.acts)), None, base.texts, base.text_image,
                        pooled=base.images)
    tail = EffnetTail(enc, 14)
    settings = cfg(tmp_path / "run", epochs=1, batch_size=8, unfreeze_from=14, tail_lr=1e-2, hidden=16, head="mlp",
                   out_dim=16)
    trainer = Trainer(settings, train, None, tail=tail)
    before = {k: v.clone() for k, v in tail.state().items()}
    result = trainer.fit()
    after = tail.state()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the tail trained

    tuned = build_encoder(spec.model_copy(update={"heads": str(result.last_path)}))
    assert tuned.image_tuned
    with torch.no_grad():
        expected = tail(torch.from_numpy(np.array(split.acts[:3])).float())
    assert torch.allclose(tuned.image_features(pixels), expected, atol=2e-2)
    assert backbone_identity(tuned, "image") != backbone_identity(enc, "image")
    assert backbone_identity(tuned, "text") == backbone_identity(enc, "text")


# ----------------------------------------------------------------------------------------------------------------
# Calibration: fitted on dev, carried by the checkpoint, recorded in the index manifest
# ----------------------------------------------------------------------------------------------------------------


def test_best_checkpoint_carries_a_dev_calibration_and_the_manifest_records_it(tmp_path: Path) -> None:
    from indexer.pipeline import build_params
    from indexer.settings import IndexerSettings
    from retrieval.calibration import Calibration

    split, prior, dev = world()
    result = Trainer(cfg(tmp_path, epochs=2), split, split, prior=prior, class_dev=dev).fit()
    heads, _ = load_heads(result.best_path)
    cal = Calibration.from_dict(heads.extra["calibration"])
    fit = heads.extra["calibration_fit"]
    assert fit["split"] == "dev" and fit["pairs"] == 240 * 20 and 0 < fit["base_rate"] <= 1 / 20
    probs = cal(np.linspace(-1, 1, 21))
    assert np.all((probs >= 0) & (probs <= 1)) and np.all(np.diff(probs) >= -1e-12) and probs[-1] > probs[0]
    spec = EncoderSpec(backend="dual", model="efficientnet-lite0", heads=str(result.best_path))
    params = build_params(spec, IndexerSettings(), tmp_path)
    assert params["calibration"] == heads.extra["calibration"]
    assert build_params(spec.model_copy(update={"heads": None}), IndexerSettings(), tmp_path)["calibration"] is None


# ----------------------------------------------------------------------------------------------------------------
# The shipped default on real photos
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_encoder_still_finds_everyday_objects(caltech101_dev: Path) -> None:
    """The previous default (caption heads alone) lost ImageNet's objects; the gated default keeps them."""
    import json

    from retrieval.encoders import parse_spec
    from retrieval.images import load_image

    rows = [json.loads(line) for line in (caltech101_dev / "captions.jsonl").read_text().splitlines()]
    by_class: dict[str, list[dict]] = {}
    for r in rows:
        by_class.setdefault(r["label"], []).append(r)
    picked = [r for label in sorted(by_class)[::8] for r in by_class[label][:4]]  # 13 classes x 4 photos
    images = [load_image(caltech101_dev / "images" / r["image"]) for r in picked]
    labels = np.array([r["label"] for r in picked])
    prompts = sorted({r["captions"][0] for r in picked})
    prompt_label = {r["captions"][0]: r["label"] for r in picked}
    relevant = [np.flatnonzero(labels == prompt_label[p]) for p in prompts]

    def class_map(name: str) -> float:
        enc = build_encoder(parse_spec(name, precision="bf16", device="cpu"))
        return query_metrics(enc.encode_text(prompts), enc.encode_images(images), relevant)["mAP"]

    assert class_map("default") > class_map("caption-heads") + 15


@pytest.mark.slow
def test_the_pages_default_threshold_keeps_what_captions_describe(flickr8k: Path) -> None:
    """The page hides hits below ``default_min_relevance``. The shipped calibration is P(the photo a caption was
    written for), low even for good hits; a default of 0.5 hid nearly every hit of ordinary queries (an empty page).
    For the captions of 100 Flickr8k dev photos, the caption's own photo must pass the default in at least 85% of
    cases (all 5,000 dev captions: 90% at the default 0.005; 0% at 0.5)."""
    import json

    from retrieval.images import load_image
    from service.settings import ServiceSettings

    rows = [json.loads(line) for line in (flickr8k / "captions.jsonl").read_text().splitlines()]
    dev = set((flickr8k / "Flickr_8k.devImages.txt").read_text().split())
    picked = [r for r in rows if r["image"] in dev][:100]
    assert len(picked) == 100
    enc = build_encoder("default")
    assert enc.calibration is not None
    images = enc.encode_images([load_image(flickr8k / "images" / r["image"]) for r in picked])
    captions = [(i, c) for i, r in enumerate(picked) for c in r["captions"]]
    texts = enc.encode_text([c for _, c in captions])
    own = enc.calibration((images[[i for i, _ in captions]] * texts).sum(1))
    kept = float((own >= ServiceSettings().default_min_relevance).mean())
    assert kept >= 0.85, (kept, np.percentile(own, [10, 50, 90]))
