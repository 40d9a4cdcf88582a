"""Retrieval metrics: ranks, Recall@K, Precision@K, F1@K, mAP for text→image and image→text.

Conventions
- Scores are inner products of L2-normalised float32 embeddings (cosine similarity).
- Ranks are 0-based internally (:func:`rank_of_first_relevant`) and reported 1-based (``median_rank``,
  ``mean_rank``).
- **Ties are optimistic**: a relevant item's position counts only the *non-relevant* candidates with a strictly
  greater score (and the relevant ones ranked before it). A relevant item tied with a non-relevant one is ranked
  ahead of it. This is what ``(scores > score_of_relevant).sum()`` gives, the usual implementation.
- ``R@K`` is the literature's recall (a hit rate): the percentage of queries with *at least one* relevant item in
  the top K. For text→image exactly one image is relevant; for image→text all the image's captions are (5 for
  Flickr/COCO) and the rank is that of its best caption.
- ``P@K`` = mean over queries of (relevant items in the top K) / K; ``F1@K`` = mean over queries of the harmonic
  mean of that precision and the query's *fractional* recall (relevant items in the top K / relevant items).
  With one relevant item per query the fractional recall equals the hit rate, so ``P@K = R@K / K`` for t2i.
- ``mAP`` = mean over queries of average precision over all of the query's relevant items.
- ``R@K``, ``P@K``, ``F1@K`` and ``mAP`` are percentages (0-100).

Similarities are computed in row blocks (``block_bytes`` of scores at a time), so 8k images x 40k captions need
a few hundred MB at most.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from retrieval.errors import BadInput

__all__ = [
    "f1_at_k",
    "precision_at_k",
    "query_metrics",
    "rank_of_first_relevant",
    "recall_at_k",
    "relevant_positions",
    "retrieval_metrics",
]

#: Padding in position arrays: larger than any K.
_PAD = np.iinfo(np.int64).max // 2

_DEFAULT_BLOCK_BYTES = 128 << 20


def _as_relevance(relevant: Sequence[np.ndarray] | np.ndarray, n_queries: int, n_cand: int) -> np.ndarray:
    """Relevant candidate indices as a padded (n_queries, m) int64 array, pad -1."""
    if isinstance(relevant, np.ndarray) and relevant.ndim == 1:
        rel = relevant.astype(np.int64).reshape(-1, 1)
    elif isinstance(relevant, np.ndarray) and relevant.ndim == 2:
        rel = relevant.astype(np.int64)
    else:
        lists = [np.asarray(r, dtype=np.int64).reshape(-1) for r in relevant]
        m = max((len(r) for r in lists), default=0)
        rel = np.full((len(lists), max(m, 1)), -1, dtype=np.int64)
        for i, r in enumerate(lists):
            rel[i, : len(r)] = r
    if rel.shape[0] != n_queries:
        raise BadInput(f"relevance given for {rel.shape[0]} queries, but sim has {n_queries} rows")
    valid = rel >= 0
    if not valid.any(axis=1).all():
        raise BadInput("every query needs at least one relevant candidate")
    if (rel[valid] >= n_cand).any():
        raise BadInput(f"relevant index out of range (there are {n_cand} candidates)")
    return rel


def _positions_block(sim: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """Optimistic 0-based positions of each query's relevant items, ascending, padded with ``_PAD``.

    ``sim`` (b, n_cand); ``rel`` (b, m) int64, -1 = padding. Returns (b, m) int64.
    """
    b, m = rel.shape
    valid = rel >= 0
    rows = np.arange(b)[:, None]
    rel_scores = np.where(valid, sim[rows, np.where(valid, rel, 0)], -np.inf)  # (b, m)
    # candidates (all) strictly above each relevant score
    above = np.empty((b, m), dtype=np.int64)
    for j in range(m):
        above[:, j] = (sim > rel_scores[:, j : j + 1]).sum(axis=1)
    # relevant ones strictly above each relevant score (padding is -inf: never above)
    rel_above = (rel_scores[:, None, :] > rel_scores[:, :, None]).sum(axis=2)
    nonrel_above = np.where(valid, above - rel_above, _PAD)
    nonrel_above.sort(axis=1)
    # the i-th best relevant item sits after i relevant items and its non-relevant betters
    positions = nonrel_above + np.arange(m, dtype=np.int64)[None, :]
    positions[nonrel_above == _PAD] = _PAD
    return positions


def relevant_positions(sim: np.ndarray, relevant: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """0-based positions (optimistic ties) of every relevant candidate of each query, ascending.

    ``sim`` (n_queries, n_candidates) scores; ``relevant`` either (n_queries,) int (one relevant candidate each),
    (n_queries, m) int padded with -1, or a sequence of index arrays (any number >= 1 each).
    Returns (n_queries, max_relevant) int64, padded with a value larger than any K.
    """
    sim = np.asarray(sim)
    if sim.ndim != 2:
        raise BadInput(f"sim must be 2-D, got shape {sim.shape}")
    rel = _as_relevance(relevant, sim.shape[0], sim.shape[1])
    return _positions_block(sim, rel)


def rank_of_first_relevant(sim: np.ndarray, relevant: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """0-based rank of each query's best relevant candidate: the number of candidates scoring strictly higher.

    ``sim`` (n_queries, n_candidates); ``relevant`` (n_queries,) int or a sequence of index arrays. Returns
    (n_queries,) int64. Ties are optimistic (see the module docstring).
    """
    return relevant_positions(sim, relevant)[:, 0]


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Percentage of queries whose best relevant item has 0-based rank < k."""
    ranks = np.asarray(ranks)
    return float(100.0 * np.mean(ranks < k)) if ranks.size else float("nan")


def _hits(positions: np.ndarray, k: int) -> np.ndarray:
    return (np.asarray(positions) < k).sum(axis=1)


def precision_at_k(positions: np.ndarray, k: int) -> float:
    """Percentage: mean over queries of (relevant items in the top k) / k. ``positions`` from
    :func:`relevant_positions`."""
    positions = np.asarray(positions)
    if positions.shape[0] == 0:
        return float("nan")
    return float(100.0 * np.mean(_hits(positions, k) / k))


def f1_at_k(positions: np.ndarray, k: int) -> float:
    """Percentage: mean over queries of the F1 of precision@k and fractional recall@k."""
    positions = np.asarray(positions)
    if positions.shape[0] == 0:
        return float("nan")
    hits = _hits(positions, k)
    n_rel = (positions != _PAD).sum(axis=1)
    p = hits / k
    r = hits / n_rel
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(p, dtype=np.float64), where=denom > 0)
    return float(100.0 * np.mean(f1))


def mean_average_precision(positions: np.ndarray) -> float:
    """Percentage: mean over queries of the average precision over all their relevant items."""
    positions = np.asarray(positions)
    if positions.shape[0] == 0:
        return float("nan")
    valid = positions != _PAD
    ordinal = np.cumsum(valid, axis=1)  # 1-based index among relevant
    prec = np.where(valid, ordinal / np.where(valid, positions + 1, 1), 0.0)
    return float(100.0 * np.mean(prec.sum(axis=1) / valid.sum(axis=1)))


def _direction_metrics(positions: np.ndarray, ks: Sequence[int]) -> dict[str, Any]:
    first = positions[:, 0]
    out: dict[str, Any] = {}
    for k in ks:
        out[f"R@{k}"] = recall_at_k(first, k)
    for k in ks:
        out[f"P@{k}"] = precision_at_k(positions, k)
    for k in ks:
        out[f"F1@{k}"] = f1_at_k(positions, k)
    out["mAP"] = mean_average_precision(positions)
    out["median_rank"] = float(np.median(first + 1)) if first.size else float("nan")
    out["mean_rank"] = float(np.mean(first + 1)) if first.size else float("nan")
    out["n_queries"] = int(first.size)
    return out


def _blocked_positions(queries: np.ndarray, cands: np.ndarray, rel: np.ndarray, block_bytes: int) -> np.ndarray:
    n_q, n_c = queries.shape[0], cands.shape[0]
    m = rel.shape[1]
    # per query row: n_c float32 scores + m * n_c bool comparisons
    per_row = max(1, n_c * (4 + m))
    step = max(1, block_bytes // per_row)
    out = np.empty((n_q, m), dtype=np.int64)
    cands_t = np.ascontiguousarray(cands.T)
    for start in range(0, n_q, step):
        stop = min(n_q, start + step)
        sim = queries[start:stop] @ cands_t
        out[start:stop] = _positions_block(sim, rel[start:stop])
    return out


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    *,
    block_bytes: int = _DEFAULT_BLOCK_BYTES,
) -> dict[str, Any]:
    """Text→image and image→text retrieval metrics over a paired set.

    ``image_emb`` (n_img, d) and ``text_emb`` (n_txt, d): L2-normalised float32; ``text_to_image`` (n_txt,) int:
    the index of each caption's image. Returns ``{"t2i": {...}, "i2t": {...}, "n_images", "n_texts", "rsum"}``;
    each direction holds ``R@K``, ``P@K``, ``F1@K`` for every K in ``ks``, ``mAP`` (percentages), ``median_rank``
    and ``mean_rank`` (1-based) and ``n_queries``. i2t queries are the images with at least one caption.
    ``rsum`` = sum of R@K over both directions. See the module docstring for ties and definitions.
    """
    img = np.ascontiguousarray(image_emb, dtype=np.float32)
    txt = np.ascontiguousarray(text_emb, dtype=np.float32)
    t2i = np.asarray(text_to_image)
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise BadInput(f"embeddings must be (n, d) with the same d, got {img.shape} and {txt.shape}")
    if t2i.shape != (txt.shape[0],) or not np.issubdtype(t2i.dtype, np.integer):
        raise BadInput(f"text_to_image must be ({txt.shape[0]},) integers, got {t2i.shape} {t2i.dtype}")
    n_img, n_txt = img.shape[0], txt.shape[0]
    if n_img == 0 or n_txt == 0:
        raise BadInput("need at least one image and one text")
    t2i = t2i.astype(np.int64)
    if t2i.min() < 0 or t2i.max() >= n_img:
        raise BadInput(f"text_to_image values must lie in [0, {n_img})")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise BadInput("ks must be positive integers")

    # text -> image: one relevant image per caption
    t2i_pos = _blocked_positions(txt, img, t2i.reshape(-1, 1), block_bytes)

    # image -> text: all captions of the image are relevant
    counts = np.bincount(t2i, minlength=n_img)
    queries = np.flatnonzero(counts > 0)
    order = np.argsort(t2i, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    m = int(counts.max())
    rel = np.full((n_img, m), -1, dtype=np.int64)
    col = np.arange(n_txt) - starts[t2i[order]]
    rel[t2i[order], col] = order
    i2t_pos = _blocked_positions(img[queries], txt, rel[queries], block_bytes)

    result: dict[str, Any] = {
        "t2i": _direction_metrics(t2i_pos, ks),
        "i2t": _direction_metrics(i2t_pos, ks),
        "n_images": n_img,
        "n_texts": n_txt,
    }
    result["rsum"] = float(sum(result[d][f"R@{k}"] for d in ("t2i", "i2t") for k in ks))
    return result


def query_metrics(
    query_emb: np.ndarray,
    cand_emb: np.ndarray,
    relevant: Sequence[np.ndarray],
    ks: Sequence[int] = (1, 5, 10),
    *,
    block_bytes: int = _DEFAULT_BLOCK_BYTES,
) -> dict[str, Any]:
    """One-direction metrics for queries with any number of relevant candidates (class retrieval: the query
    "a photo of a piano." and every piano photo).

    ``query_emb`` (n_q, d), ``cand_emb`` (n_c, d): L2-normalised float32; ``relevant[i]``: int indices into the
    candidates (>= 1 each). Returns ``R@K``, ``P@K``, ``F1@K``, ``mAP``, ranks and ``n_queries`` as in
    :func:`retrieval_metrics`.
    """
    q = np.ascontiguousarray(query_emb, dtype=np.float32)
    c = np.ascontiguousarray(cand_emb, dtype=np.float32)
    if q.ndim != 2 or c.ndim != 2 or q.shape[1] != c.shape[1]:
        raise BadInput(f"embeddings must be (n, d) with the same d, got {q.shape} and {c.shape}")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise BadInput("ks must be positive integers")
    rel = _as_relevance(relevant, q.shape[0], c.shape[0])
    return _direction_metrics(_blocked_positions(q, c, rel, block_bytes), ks)
