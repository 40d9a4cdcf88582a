"""What the evaluation report measures beyond Recall@K: the geometry of the embedding space, precision/recall/F1
curves, calibrated relevance and its reliability, and a 2-D map of images and captions.

- Alignment and uniformity (Wang and Isola, ICML 2020): ``alignment`` = mean squared distance between matching
  image and caption embeddings (lower is better, 0..4); ``uniformity`` = ``log mean exp(-2 ||x - y||^2)`` over
  pairs of embeddings of one modality (lower = spread more evenly over the sphere, >= -4).
- P/R/F1@K for K in :data:`CURVE_KS`, both directions (definitions in :mod:`retrieval.metrics`).
- Relevance pairs: the (cosine score, relevant?) pairs of every caption query's top-``k`` images, what a search
  returns; :func:`fit_relevance` fits the calibration (Platt and isotonic, :mod:`retrieval.calibration`) on a dev
  split and keeps the one with the lower Brier score.
- The 2-D map: UMAP (``umap-learn``) when installed, else t-SNE (scikit-learn), else PCA (numpy).

Embeddings are L2-normalised float32 ``(n, d)``; scores are cosines.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np

from retrieval.calibration import Calibration, fit_isotonic, fit_platt, reliability
from retrieval.metrics import retrieval_metrics

log = logging.getLogger(__name__)

CURVE_KS = (1, 5, 10, 20, 50)
#: Hits per caption query that calibration is fitted and checked on (a search's page of results).
RELEVANCE_TOP_K = 20


def alignment(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray) -> float:
    """Mean ``||image - caption||^2`` over matching pairs (each caption with its image)."""
    diff = text_emb - image_emb[text_image]
    return float(np.mean(np.sum(diff * diff, axis=1)))


def uniformity(emb: np.ndarray, t: float = 2.0, max_points: int = 2000, seed: int = 0) -> float:
    """``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` over (at most ``max_points`` sampled) embeddings."""
    if emb.shape[0] > max_points:
        emb = emb[np.random.default_rng(seed).choice(emb.shape[0], max_points, replace=False)]
    sq = np.clip(2.0 - 2.0 * (emb @ emb.T), 0.0, None)  # unit vectors: ||x - y||^2 = 2 - 2 x.y
    iu = np.triu_indices(emb.shape[0], k=1)
    vals = -t * sq[iu]
    top = vals.max()
    return float(top + np.log(np.mean(np.exp(vals - top))))


def geometry(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray) -> dict[str, float]:
    """Alignment, per-modality uniformity, and the mean cosine of matching vs random pairs."""
    rng = np.random.default_rng(0)
    pos = np.sum(text_emb * image_emb[text_image], axis=1)
    neg = np.sum(text_emb * image_emb[rng.integers(0, image_emb.shape[0], text_emb.shape[0])], axis=1)
    return {"alignment": alignment(image_emb, text_emb, text_image), "uniformity_image": uniformity(image_emb),
            "uniformity_text": uniformity(text_emb), "mean_cos_matching": float(pos.mean()),
            "mean_cos_random": float(neg.mean())}


def prf_curves(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray) -> dict[str, Any]:
    """``{"ks": [...], "t2i": {"R": [...], "P": [...], "F1": [...]}, "i2t": {...}}`` (percent)."""
    ks = tuple(k for k in CURVE_KS if k <= image_emb.shape[0]) or (1,)
    m = retrieval_metrics(image_emb, text_emb, text_image, ks=ks)
    return {"ks": list(ks), **{d: {s: [m[d][f"{s}@{k}"] for k in ks] for s in ("R", "P", "F1")}
                               for d in ("t2i", "i2t")}}


def relevance_pairs(
    image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray, k: int = RELEVANCE_TOP_K
) -> tuple[np.ndarray, np.ndarray]:
    """Scores ``(n_txt * k,)`` float64 of each caption's top-``k`` images and labels (1 = the caption's image)."""
    k = min(k, image_emb.shape[0])
    scores, labels = [], []
    for s in range(0, text_emb.shape[0], 2048):
        sim = text_emb[s:s + 2048] @ image_emb.T
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        scores.append(np.take_along_axis(sim, top, axis=1).ravel())
        labels.append((top == text_image[s:s + 2048, None]).ravel())
    return np.concatenate(scores).astype(np.float64), np.concatenate(labels).astype(np.float64)


def fit_relevance(scores: np.ndarray, labels: np.ndarray) -> tuple[Calibration, dict[str, float]]:
    """Fit Platt and isotonic maps; return the one with the lower Brier score (on the fitting data) and both
    scores. Isotonic fits the data more closely; Platt is smoother: the choice is recorded with the numbers."""
    fits = {"platt": fit_platt(scores, labels), "isotonic": fit_isotonic(scores, labels)}
    brier = {k: float(np.mean((c(scores) - labels) ** 2)) for k, c in fits.items()}
    best = min(brier, key=lambda name: brier[name])
    return fits[best], brier


def reliability_report(cal: Calibration, scores: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Reliability diagram data of ``cal`` on (score, label) pairs, plus the Brier score."""
    probs = cal(scores)
    rel = reliability(probs, labels, bins=bins)
    return {**rel, "ece": rel["ece"][0], "brier": float(np.mean((probs - labels) ** 2)), "bins": bins,
            "base_rate": float(labels.mean()), "kind": cal.kind}


MapMethod = Literal["auto", "umap", "tsne", "pca"]


def project_2d(points: np.ndarray, method: MapMethod = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """``(n, d)`` -> ``(n, 2)`` float32 and the method used. ``auto``: UMAP if ``umap-learn`` is installed (its
    first call compiles with numba: ~1 min), else t-SNE if scikit-learn is, else PCA."""
    if method in ("auto", "umap"):
        try:
            import umap

            reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed, n_neighbors=15, min_dist=0.1)
            return np.asarray(reducer.fit_transform(points), np.float32), "UMAP"
        except ImportError:
            if method == "umap":
                raise
    if method in ("auto", "tsne"):
        try:
            from sklearn.manifold import TSNE

            perplexity = float(min(30, max(2, (points.shape[0] - 1) // 3)))
            tsne = TSNE(n_components=2, metric="cosine", init="pca", random_state=seed, perplexity=perplexity)
            return np.asarray(tsne.fit_transform(points), np.float32), "t-SNE"
        except ImportError:
            if method == "tsne":
                raise
    centred = points - points.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return (centred @ vt[:2].T).astype(np.float32), "PCA"


def map_sample(text_image: np.ndarray, n_images: int, n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``n`` random images and of one caption of each (the first), for the 2-D map."""
    rng = np.random.default_rng(seed)
    first = np.full(n_images, -1)
    for row in range(len(text_image) - 1, -1, -1):
        first[text_image[row]] = row
    have = np.flatnonzero(first >= 0)
    imgs = np.sort(rng.choice(have, min(n, len(have)), replace=False))
    return imgs, first[imgs]
