"""Trainer: losses, training loop, checkpoints/resume, feature cache, evaluation. Synthetic features or the tiny
random open_clip model only (no network, no real backbone): the whole file runs in well under a minute."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.encoders import EncoderSpec, build_encoder, registered_encoder_config
from retrieval.heads import load_heads
from tests.conftest import make_images
from trainer.config import TrainerSettings
from trainer.evaluate import evaluate_features, recall_curve, summary_table
from trainer.features import FeatureCache, SplitFeatures
from trainer.losses import ContrastiveLoss, contrastive_loss, triplet_loss
from trainer.train import TensorSplit, Trainer, TrainModel, dev_score, epoch_batches

# ----------------------------------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------------------------------


def synthetic_split(n: int, d_img: int = 48, d_txt: int = 24, caps: int = 3, noise: float = 0.3, seed: int = 0,
                    mapping_seed: int = 123) -> SplitFeatures:
    """Images ~ N(2, 1) (raw, not centred); each caption = a fixed random linear map of its image + noise."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(mapping_seed).normal(size=(d_img, d_txt)) / np.sqrt(d_img)
    images = rng.normal(loc=2.0, size=(n, d_img)).astype(np.float32)
    owner = np.repeat(np.arange(n), caps)
    centred = images - 2.0
    texts = (centred[owner] @ w + noise * rng.normal(size=(n * caps, d_txt))).astype(np.float32)
    flip = (images + 0.05 * rng.normal(size=images.shape)).astype(np.float32)
    return SplitFeatures(ids=[f"i{i}" for i in range(n)], paths=[f"i{i}.jpg" for i in range(n)], images=images,
                         texts=texts, text_image=owner.astype(np.int64), captions=[f"c{j}" for j in range(n * caps)],
                         images_flip=flip)


def cfg_for(tmp: Path, **kw) -> TrainerSettings:
    base = dict(out=str(tmp), epochs=4, batch_size=32, lr=3e-3, warmup_steps=2, hidden=64, out_dim=32, seed=0,
                threads=1, patience=50, dropout=0.1, weight_decay=0.05)
    base.update(kw)
    return TrainerSettings(**base)


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------


def test_losses_prefer_matching_pairs() -> None:
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    other = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    assert contrastive_loss(x, x, 20.0) < contrastive_loss(x, other, 20.0)
    assert triplet_loss(x, x, 0.2) < triplet_loss(x, other, 0.2)
    assert float(triplet_loss(x, x, 0.01)) == pytest.approx(0.0, abs=1e-6)


def test_same_image_pairs_are_not_negatives() -> None:
    # rows 0 and 1 are two captions of the same image: identical embeddings would be a hard negative unless masked
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    groups = torch.tensor([0, 0, 1, 2])
    masked = contrastive_loss(img, img, 10.0, groups)
    unmasked = contrastive_loss(img, img, 10.0)
    assert masked < unmasked
    assert float(triplet_loss(img, img, 0.2, groups)) == pytest.approx(0.0, abs=1e-6)


def test_temperature_is_learnable_only_for_clip() -> None:
    assert isinstance(ContrastiveLoss("clip").log_scale, torch.nn.Parameter)
    assert not isinstance(ContrastiveLoss("infonce").log_scale, torch.nn.Parameter)
    assert ContrastiveLoss("infonce", temperature=0.05).temperature == pytest.approx(0.05)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["clip", "infonce", "triplet"])
def test_loss_decreases(tmp_path: Path, loss: str) -> None:
    tr = Trainer(cfg_for(tmp_path, loss=loss, epochs=6), synthetic_split(128), None)
    result = tr.fit()
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < 0.7 * losses[0], losses


def test_easy_mapping_reaches_high_recall(tmp_path: Path) -> None:
    train, dev = synthetic_split(512, seed=0), synthetic_split(200, seed=1)
    cfg = cfg_for(tmp_path, head="linear", epochs=25, batch_size=64, lr=1e-2, dropout=0.0)
    tr = Trainer(cfg, train, dev)
    before = dev_score(_metrics_of(tr, dev))
    result = tr.fit()
    m = result.best_metrics
    assert m is not None
    assert m["t2i"]["R@1"] > 90 and m["i2t"]["R@1"] > 90, m
    assert result.best_score > before + 40


def _metrics_of(tr: Trainer, split: SplitFeatures) -> dict:
    from trainer.train import evaluate_model

    return evaluate_model(tr.model, TensorSplit.of(split))


def test_early_stopping_stops(tmp_path: Path) -> None:
    # the captions of the dev split do not depend on its images: nothing to learn, the score cannot keep improving
    train, dev = synthetic_split(64), synthetic_split(64, seed=1, mapping_seed=999)
    tr = Trainer(cfg_for(tmp_path, epochs=60, patience=2), train, dev)
    result = tr.fit()
    assert result.stopped_early and len(result.history) < 60
    assert result.best_path is not None and result.best_path.is_file()


def test_resume_gives_the_same_next_steps(tmp_path: Path) -> None:
    train, dev = synthetic_split(96), synthetic_split(40, seed=1)
    full = Trainer(cfg_for(tmp_path / "full", epochs=3), train, dev)
    full.fit()

    first = Trainer(cfg_for(tmp_path / "split", epochs=3), train, dev)
    first.fit(stop_after_epochs=1)
    resumed = Trainer(cfg_for(tmp_path / "split", epochs=3, seed=0), train, dev)
    resumed.load_state(tmp_path / "split" / "last.pt")
    assert resumed.epoch == 1 and resumed.step == first.step
    resumed.fit()

    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in full.history], abs=1e-6)
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert resumed.step == full.step


def test_training_is_reproducible(tmp_path: Path) -> None:
    train = synthetic_split(64)
    a = Trainer(cfg_for(tmp_path / "a", epochs=2), train, None)
    b = Trainer(cfg_for(tmp_path / "b", epochs=2), train, None)
    assert [r["loss"] for r in a.fit().history] == [r["loss"] for r in b.fit().history]


def test_sampled_batches_hold_distinct_images() -> None:
    split = TensorSplit.of(synthetic_split(50, caps=5))
    cfg = TrainerSettings(batch_size=16)
    batches = epoch_batches(split, cfg, epoch=0)
    assert len(batches) == 50 // 16
    for imgs, caps, _ in batches:
        assert len(set(imgs.tolist())) == len(imgs)
        assert torch.equal(split.text_image[caps], imgs)
    assert not torch.equal(batches[0][1], epoch_batches(split, cfg, epoch=1)[0][1])


def test_folded_checkpoint_takes_raw_features(tmp_path: Path) -> None:
    """The saved heads (standardisation folded in) give what the training model gives on raw features."""
    train = synthetic_split(64)
    tr = Trainer(cfg_for(tmp_path, epochs=1), train, None)
    tr.fit()
    heads, _ = load_heads(tmp_path / "best.pt")
    model: TrainModel = tr.model.eval()
    x_img, x_txt = torch.from_numpy(train.images[:5]), torch.from_numpy(train.texts[:5])
    with torch.no_grad():
        got = torch.nn.functional.normalize(heads.image(x_img), dim=-1)
        got_t = torch.nn.functional.normalize(heads.text(x_txt), dim=-1)
        assert torch.allclose(got, model.embed_image(x_img), atol=1e-5)
        assert torch.allclose(got_t, model.embed_text(x_txt), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation on a hand-built ranking
# ----------------------------------------------------------------------------------------------------------------


class _IdentityEncoder:
    """project_* = L2-normalise (no head)."""

    def project_image(self, x: torch.Tensor) -> np.ndarray:
        return torch.nn.functional.normalize(x.float(), dim=-1).numpy()

    project_text = project_image


def test_eval_metrics_on_hand_built_ranking() -> None:
    # 3 images on the axes; captions: c0 -> image 0 (rank 1), c1 -> image 1 but closer to image 0 (rank 2),
    # c2 -> image 2 but it is the farthest (rank 3).
    images = np.eye(3, dtype=np.float32)
    texts = np.array([[1, 0.1, 0], [1, 0.5, 0], [0.6, 0.5, 0.1]], np.float32)
    feats = SplitFeatures(ids=["a", "b", "c"], paths=["a", "b", "c"], images=images, texts=texts,
                          text_image=np.array([0, 1, 2]), captions=["x", "y", "z"])
    res = evaluate_features(_IdentityEncoder(), feats)  # type: ignore[arg-type]
    t2i = res.metrics["t2i"]
    assert t2i["R@1"] == pytest.approx(100 / 3)
    assert t2i["R@5"] == pytest.approx(100.0)
    assert t2i["median_rank"] == 2 and t2i["mean_rank"] == pytest.approx(2.0)
    assert t2i["P@1"] == pytest.approx(100 / 3)
    # image -> text (normalised captions): image 0 ranks c0 first; image 1 prefers c2 (0.635) to its c1 (0.447):
    # rank 2; image 2 ranks c2 first (0.127 vs 0)
    i2t = res.metrics["i2t"]
    assert i2t["R@1"] == pytest.approx(200 / 3) and i2t["R@5"] == pytest.approx(100.0)
    assert i2t["median_rank"] == 1 and i2t["mean_rank"] == pytest.approx(4 / 3)
    assert res.curve["t2i"] == pytest.approx([100 / 3, 200 / 3, 100.0])
    assert "| run |" in summary_table([{"label": "x", "metrics": res.metrics}])


def test_recall_curve_is_monotone() -> None:
    rng = np.random.default_rng(0)
    img = rng.normal(size=(60, 8)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = img[np.repeat(np.arange(60), 2)] + 0.8 * rng.normal(size=(120, 8)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    curve = recall_curve(img, txt, np.repeat(np.arange(60), 2))
    assert len(curve["t2i"]) == 50
    assert all(b >= a for a, b in zip(curve["t2i"], curve["t2i"][1:], strict=False))


# ----------------------------------------------------------------------------------------------------------------
# Feature cache (tiny random open_clip model)
# ----------------------------------------------------------------------------------------------------------------


def test_feature_cache_hits_and_invalidates(tmp_path: Path, tiny_encoder) -> None:
    paths = make_images(tmp_path / "imgs", 6)
    cache = FeatureCache(tmp_path / "cache")
    first, ok = cache.image_features(tiny_encoder, paths, workers=0)
    assert ok.all() and cache.last.computed == 6 and cache.last.hits == 0
    second, _ = cache.image_features(tiny_encoder, paths, workers=0)
    assert cache.last.computed == 0 and cache.last.hits == 6
    np.testing.assert_array_equal(first, second)

    # a changed file (new content, new mtime) is recomputed, and only it
    make_images(tmp_path / "other", 1, seed=7)[0].replace(paths[2])
    os.utime(paths[2], ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    third, _ = cache.image_features(tiny_encoder, paths, workers=0)
    assert cache.last.computed == 1 and cache.last.hits == 5
    assert not np.allclose(third[2], first[2])
    np.testing.assert_array_equal(third[[0, 1, 3, 4, 5]], first[[0, 1, 3, 4, 5]])

    # flipped view is a separate cache entry
    cache.image_features(tiny_encoder, paths, view="flip", workers=0)
    assert cache.last.computed == 6

    texts = ["a dog", "a cat", "a dog"]
    t1 = cache.text_features(tiny_encoder, texts)
    assert cache.last.computed == 2
    t2 = cache.text_features(tiny_encoder, texts)
    assert cache.last.computed == 0
    np.testing.assert_array_equal(t1, t2)


def test_unreadable_image_is_skipped(tmp_path: Path, tiny_encoder) -> None:
    paths = make_images(tmp_path / "imgs", 3)
    paths[1].write_bytes(b"not an image")
    cache = FeatureCache(tmp_path / "cache")
    _, ok = cache.image_features(tiny_encoder, paths, workers=0)
    assert ok.tolist() == [True, False, True]
    assert cache.last.failed == [str(paths[1])]


# ----------------------------------------------------------------------------------------------------------------
# End to end through the CLI (tiny encoder): train -> heads usable by EncoderSpec -> eval writes JSON + PNGs
# ----------------------------------------------------------------------------------------------------------------


def test_cli_train_then_eval(tmp_path: Path, image_folder: Path, tiny_clip_spec: EncoderSpec) -> None:
    from trainer.cli import main

    with registered_encoder_config("tiny-trainer-test", tiny_clip_spec):
        _train_then_eval(tmp_path, image_folder, tiny_clip_spec, main)


def _train_then_eval(tmp_path: Path, image_folder: Path, tiny_clip_spec: EncoderSpec, main) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    rc = main(["train", "--data", str(image_folder), "--encoder", "tiny-trainer-test", "--train-split", "all",
               "--dev-split", "all", "--epochs", "2", "--batch-size", "4", "--workers", "0", "--warmup-steps", "1",
               "--out", str(out), "--cache-dir", str(cache)])
    assert rc == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["head"]["kind"] == "residual" and report["best_sha256"]
    _, sha = load_heads(out / "best.pt")
    assert sha == report["best_sha256"]

    # the checkpoint plugs into the encoder exactly as the indexer/service use it
    enc = build_encoder(tiny_clip_spec.model_copy(update={"heads": str(out / "best.pt")}))
    assert enc.identity()["heads_sha256"] == sha

    ev = tmp_path / "eval"
    rc = main(["eval", "--data", str(image_folder), "--split", "all", "--encoder", "tiny-trainer-test", "--heads",
               str(out / "best.pt"), "--out", str(ev), "--cache-dir", str(cache), "--workers", "0", "--grid", "2",
               "--map", "tsne"])
    assert rc == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["n_images"] == 12 and metrics["n_texts"] == 24
    assert set(metrics["metrics"]["t2i"]) >= {"R@1", "R@5", "R@10", "P@5", "F1@5", "median_rank", "mean_rank"}
    assert len(metrics["recall_curve"]["i2t"]) == 12  # K capped at the number of images
    assert metrics["prf_curves"]["ks"] == [1, 5, 10]  # K capped at the number of images
    assert set(metrics["geometry"]) >= {"alignment", "uniformity_image", "uniformity_text"}
    assert metrics["map"] == "t-SNE"
    for png in ("recall_at_k.png", "results_grid.png", "prf_at_k.png", "embedding_map.png"):
        assert (ev / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_settings_from_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.cli import _parser, settings_from_args

    monkeypatch.setenv("TRAINER_LR", "0.0003")
    monkeypatch.setenv("TRAINER_LOSS", "triplet")
    ns = _parser().parse_args(["train", "--batch-size", "64", "--loss", "infonce", "--no-flip-aug"])
    cfg = settings_from_args(ns)
    assert cfg.lr == pytest.approx(3e-4)  # environment
    assert (cfg.batch_size, cfg.loss, cfg.flip_aug) == (64, "infonce", False)  # flags win over environment
    assert cfg.spec().heads is None


def test_feature_cache_onnx_engine_matches_torch(tmp_path: Path, tiny_encoder) -> None:
    """``python -m trainer features --engine onnx`` fills the same cache rows torch would, faster."""
    paths = make_images(tmp_path / "imgs", 4)
    texts = ["a dog", "two children play in a fountain", "a cat"]
    ref = FeatureCache(tmp_path / "torch")
    img_t, _ = ref.image_features(tiny_encoder, paths, workers=0)
    txt_t = ref.text_features(tiny_encoder, texts)
    fast = FeatureCache(tmp_path / "onnx", engine="onnx")
    img_o, ok = fast.image_features(tiny_encoder, paths, workers=0)
    txt_o = fast.text_features(tiny_encoder, texts)
    assert ok.all() and fast.last.computed == 3
    for a, b in ((img_t, img_o), (txt_t, txt_o)):
        assert a.shape == b.shape
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() > 0.9999
    # same key: rows cached by one engine are hits for the other
    ref2 = FeatureCache(tmp_path / "onnx")
    ref2.image_features(tiny_encoder, paths, workers=0)
    assert ref2.last.computed == 0


def test_feature_cache_onnx_engine_needs_float32(tmp_path: Path, tiny_encoder, monkeypatch) -> None:
    import torch

    from retrieval.errors import BadInput

    monkeypatch.setattr(type(tiny_encoder), "dtype", property(lambda self: torch.bfloat16))
    with pytest.raises(BadInput, match="float32"):
        FeatureCache(tmp_path / "c", engine="onnx").text_features(tiny_encoder, ["a dog"])
