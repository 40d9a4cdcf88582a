"""Retrieval evaluation of an encoder (optionally with a head checkpoint) on a split or a captions file.

Runs the same projection the indexer and service run (``EncoderSpec(heads=...)`` -> ``Encoder.project_*``) on
cached raw features, then writes ``metrics.json`` (T→I and I→T R@K, P@K, F1@K, mAP, median/mean rank, the
Recall@K curve for K = 1..50, P/R/F1 at K = 1, 5, 10, 20, 50, alignment and uniformity, and, for an encoder that
carries a calibration, its reliability on this split), ``recall_at_k.png``, ``prf_at_k.png``, ``embedding_map.png``
(UMAP / t-SNE of images and captions), ``reliability.png`` and ``results_grid.png`` (top-5 images of a few
queries). With ``class_data`` (a class-labelled set such as Caltech-101 dev) its class-prompt retrieval metrics
are added under ``classes``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.atomic import atomic_write_text
from retrieval.calibration import Calibration
from retrieval.datasets import load_dataset
from retrieval.encoders import Encoder, EncoderSpec, build_encoder, parse_spec
from retrieval.errors import DatasetError
from retrieval.metrics import retrieval_metrics
from trainer import analysis, plots
from trainer.analysis import MapMethod
from trainer.features import FeatureCache, SplitFeatures, split_features
from trainer.priors import ClassDevSet, class_metrics

CURVE_K = 50


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    curve: dict[str, list[float]]
    image_emb: np.ndarray
    text_emb: np.ndarray
    features: SplitFeatures


def recall_curve(
    image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray, k_max: int = CURVE_K
) -> dict[str, list[float]]:
    """``{"t2i": [R@1..R@k_max], "i2t": [...]}`` (percent)."""
    k_max = max(1, min(k_max, image_emb.shape[0]))
    m = retrieval_metrics(image_emb, text_emb, text_image, ks=tuple(range(1, k_max + 1)))
    return {d: [m[d][f"R@{k}"] for k in range(1, k_max + 1)] for d in ("t2i", "i2t")}


def evaluate_features(encoder: Encoder, feats: SplitFeatures, tta_flip: bool = False) -> EvalResult:
    """Project cached raw features with ``encoder``'s heads and score them."""
    img = encoder.project_image(torch.from_numpy(feats.image_view(tta_flip)))
    txt = encoder.project_text(torch.from_numpy(feats.texts))
    metrics = retrieval_metrics(img, txt, feats.text_image)
    return EvalResult(metrics, recall_curve(img, txt, feats.text_image), img, txt, feats)


def load_split(data: str, captions: str | None, split: str | None) -> list[Any]:
    """Records of ``split`` (``None``/``all``: every captioned image)."""
    records = load_dataset(data, captions=captions, split=None if split in (None, "all") else split)
    records = [r for r in records if r.captions]
    if not records:
        raise DatasetError(f"no captioned images in {data} (split {split!r})")
    return records


def grid_queries(
    res: EvalResult, n: int = 6, k: int = 5, seed: int = 0
) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """``n`` random captions, the paths of their top-``k`` images, and which of those is the right one."""
    rng = np.random.default_rng(seed)
    f = res.features
    picks = rng.choice(len(f.captions), size=min(n, len(f.captions)), replace=False)
    sims = res.text_emb[picks] @ res.image_emb.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    queries = [f.captions[i] for i in picks]
    paths = [[f.paths[j] for j in row] for row in top]
    correct = [[int(j) == int(f.text_image[q]) for j in row] for q, row in zip(picks, top, strict=True)]
    return queries, paths, correct


def run_eval(
    data: str,
    encoder: str | EncoderSpec = "zero-shot",
    heads: str | None = None,
    split: str | None = "test",
    captions: str | None = None,
    out: str | Path | None = None,
    cache_dir: str | None = None,
    tta_flip: bool = False,
    workers: int = 2,
    grid: int = 6,
    label: str | None = None,
    class_data: str | None = None,
    map_method: MapMethod = "auto",
) -> dict[str, Any]:
    """Evaluate and (with ``out``) write ``metrics.json`` and the PNGs; returns the report dict."""
    t0 = time.perf_counter()
    spec = encoder if isinstance(encoder, EncoderSpec) else parse_spec(encoder, heads=heads)
    if heads is not None and isinstance(encoder, EncoderSpec):
        spec = spec.model_copy(update={"heads": heads})
    enc = build_encoder(spec)
    records = load_split(data, captions, split)
    feats = split_features(enc, records, FeatureCache(cache_dir), flip=tta_flip, workers=workers)
    res = evaluate_features(enc, feats, tta_flip)
    name = label or ("zero-shot" if spec.heads is None else f"heads {Path(spec.heads).name}")
    extras = analyse(res, enc.calibration, map_method)
    report = {
        "label": name,
        "encoder": spec.label(),
        "identity": enc.identity(),
        "data": str(data),
        "split": split,
        "captions": captions,
        "tta_flip": tta_flip,
        "n_images": len(feats.ids),
        "n_texts": len(feats.captions),
        "metrics": res.metrics,
        "recall_curve": res.curve,
        **{k: v for k, v in extras.items() if k != "map"},
        "map": extras["map"]["method"],
    }
    if class_data:
        cls = ClassDevSet.of(split_features(enc, load_split(class_data, None, "all"), FeatureCache(cache_dir),
                                            workers=workers))
        img = enc.project_image(torch.from_numpy(cls.images))
        report["classes"] = {"data": str(class_data), **class_metrics(
            img, enc.project_text(torch.from_numpy(cls.queries)), cls.relevant)}
    report["seconds"] = time.perf_counter() - t0
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "metrics.json", json.dumps(report, indent=2))
        plots.recall_curves({name: res.curve}, out / "recall_at_k.png", title=f"{spec.label()} — {split}")
        write_analysis_plots(extras, out, f"{name} — {split}")
        if grid > 0:
            q, p, c = grid_queries(res, n=grid)
            plots.result_grid(q, p, c, out / "results_grid.png", title=f"{name}: top-5 images (green = correct)")
    return report


def analyse(res: EvalResult, calibration: Calibration | None, map_method: MapMethod = "auto") -> dict[str, Any]:
    """Geometry, P/R/F1 curves, the reliability of ``calibration`` (if any) and the 2-D map coordinates."""
    tx = res.features.text_image
    out: dict[str, Any] = {"geometry": analysis.geometry(res.image_emb, res.text_emb, tx),
                           "prf_curves": analysis.prf_curves(res.image_emb, res.text_emb, tx)}
    if calibration is not None:
        scores, labels = analysis.relevance_pairs(res.image_emb, res.text_emb, tx)
        out["reliability"] = {"top_k": analysis.RELEVANCE_TOP_K,
                              **analysis.reliability_report(calibration, scores, labels)}
    imgs, caps = analysis.map_sample(tx, res.image_emb.shape[0])
    xy, method = analysis.project_2d(np.concatenate([res.image_emb[imgs], res.text_emb[caps]]), map_method)
    out["map"] = {"method": method, "image_xy": xy[: len(imgs)], "text_xy": xy[len(imgs):]}
    return out


def write_analysis_plots(extras: dict[str, Any], out: Path, title: str) -> None:
    """``prf_at_k.png``, ``embedding_map.png`` and (with a calibration) ``reliability.png`` under ``out``."""
    plots.prf_curves(extras["prf_curves"], out / "prf_at_k.png", title=title)
    m = extras["map"]
    plots.embedding_map(m["image_xy"], m["text_xy"], out / "embedding_map.png", method=m["method"],
                        title=f"{title}: {m['method']} of {len(m['image_xy'])} images and one caption each")
    if "reliability" in extras:
        plots.reliability_diagram(extras["reliability"], out / "reliability.png", title=f"{title}: reliability")


def summary_table(reports: list[dict[str, Any]]) -> str:
    """Markdown table of T→I and I→T R@1/5/10 (and median rank) for several reports."""
    lines = ["| run | T→I R@1 | R@5 | R@10 | medR | I→T R@1 | R@5 | R@10 | medR |", "|---|" + "---:|" * 8]
    for r in reports:
        m = r["metrics"]
        cells = [f"{m[d][k]:.1f}" for d in ("t2i",) for k in ("R@1", "R@5", "R@10")]
        cells.append(f"{m['t2i']['median_rank']:.0f}")
        cells += [f"{m['i2t'][k]:.1f}" for k in ("R@1", "R@5", "R@10")]
        cells.append(f"{m['i2t']['median_rank']:.0f}")
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
