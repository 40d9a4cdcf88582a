"""Calibrated relevance: a monotone map from a cosine score to the probability that a hit is relevant.

Fitted on labelled (score, relevant) pairs from a dev split (the trainer does it), stored as a plain dict inside the
head checkpoint (``extra["calibration"]``) and recorded in the index manifest, applied by the searcher:

- ``platt``: ``p = 1 / (1 + exp(-(a * score + b)))`` (logistic regression on the score, fitted by Newton steps);
- ``isotonic``: the pool-adjacent-violators fit, stored as increasing breakpoints ``x`` with values ``y`` and
  applied by linear interpolation (flat beyond the ends).

Both are monotone non-decreasing in the score, so ranking by relevance equals ranking by score.
numpy only; scores are float cosines, probabilities float64 in [0, 1].
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from retrieval.errors import BadInput

Kind = Literal["platt", "isotonic"]


@dataclass(frozen=True)
class Calibration:
    """A fitted score -> probability map (see the module docstring for the kinds)."""

    kind: Kind
    params: dict[str, Any] = field(default_factory=dict)

    def __call__(self, scores: np.ndarray | float) -> np.ndarray:
        """Probabilities (float64, same shape as ``scores``)."""
        s = np.asarray(scores, dtype=np.float64)
        if self.kind == "platt":
            z = np.clip(self.params["a"] * s + self.params["b"], -60.0, 60.0)
            return 1.0 / (1.0 + np.exp(-z))
        x = np.asarray(self.params["x"], dtype=np.float64)
        y = np.asarray(self.params["y"], dtype=np.float64)
        return np.interp(s, x, y)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """Inverse of :meth:`to_dict`; :class:`BadInput` for anything malformed."""
        try:
            kind = data["kind"]
            params = dict(data["params"])
            if kind == "platt":
                params = {"a": float(params["a"]), "b": float(params["b"])}
            elif kind == "isotonic":
                x = [float(v) for v in params["x"]]
                y = [float(v) for v in params["y"]]
                if not x or len(x) != len(y) or any(b < a for a, b in itertools.pairwise(x)):
                    raise ValueError("x must be non-empty, increasing and as long as y")
                params = {"x": x, "y": y}
            else:
                raise ValueError(f"unknown kind {kind!r}")
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"invalid calibration {data!r}: {exc}") from exc
        return cls(kind, params)


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if s.shape != y.shape or s.size == 0:
        raise BadInput(f"need as many labels as scores (> 0), got {s.size} and {y.size}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise BadInput("labels must be 0 or 1")
    return s, y


def fit_platt(scores: np.ndarray, labels: np.ndarray, *, iters: int = 100) -> Calibration:
    """Logistic regression of ``labels`` (0/1) on ``scores`` (Newton's method with Platt's target smoothing)."""
    s, y = _check(scores, labels)
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    t = np.where(y > 0, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))  # Platt (1999): avoids infinite weights
    a, b = 0.0, float(np.log((n_pos + 1) / (n_neg + 1)))
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(a * s + b, -60, 60)))
        w = np.maximum(p * (1 - p), 1e-12)
        g = np.array([np.dot(p - t, s), np.sum(p - t)])
        h = np.array([[np.dot(w * s, s), np.sum(w * s)], [np.sum(w * s), np.sum(w)]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(h, g)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-10:
            break
    return Calibration("platt", {"a": float(a), "b": float(b)})


def fit_isotonic(scores: np.ndarray, labels: np.ndarray, *, max_points: int = 256) -> Calibration:
    """Pool-adjacent-violators fit of ``labels`` on ``scores``, kept as at most ``max_points`` breakpoints."""
    s, y = _check(scores, labels)
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    # blocks: (sum of labels, count, mean score); merge while a block's mean label falls below its predecessor's
    sums: list[float] = []
    counts: list[int] = []
    xs: list[float] = []
    for si, yi in zip(s, y, strict=True):
        sums.append(float(yi))
        counts.append(1)
        xs.append(float(si))
        while len(sums) > 1 and sums[-2] / counts[-2] >= sums[-1] / counts[-1]:
            total = counts[-2] + counts[-1]
            xs[-2] = (xs[-2] * counts[-2] + xs[-1] * counts[-1]) / total
            sums[-2] += sums[-1]
            counts[-2] = total
            sums.pop()
            counts.pop()
            xs.pop()
    x = np.asarray(xs)
    v = np.asarray(sums) / np.asarray(counts)
    if len(x) > max_points:
        keep = np.unique(np.linspace(0, len(x) - 1, max_points).round().astype(int))
        x, v = x[keep], v[keep]
    return Calibration("isotonic", {"x": x.tolist(), "y": v.tolist()})


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict[str, list[float]]:
    """Reliability diagram data: per equal-width probability bin, mean predicted, observed frequency, count; plus
    the expected calibration error (``ece``, count-weighted mean |predicted - observed|)."""
    p, y = _check(probs, labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    pred, obs, cnt = [], [], []
    for b in range(bins):
        m = idx == b
        cnt.append(float(m.sum()))
        pred.append(float(p[m].mean()) if m.any() else float("nan"))
        obs.append(float(y[m].mean()) if m.any() else float("nan"))
    c = np.asarray(cnt)
    gap = np.abs(np.nan_to_num(np.asarray(pred)) - np.nan_to_num(np.asarray(obs)))
    return {"predicted": pred, "observed": obs, "count": cnt, "ece": [float((gap * c).sum() / c.sum())]}
