"""PNG reports with matplotlib (Agg backend, no display): Recall@K curves, P/R/F1@K curves, reliability diagrams,
2-D embedding maps and query result grids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.atomic import atomic_path


def _plt():  # imported lazily: matplotlib is an optional dependency (extra "train") and slow to import
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def recall_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, title: str = "") -> Path:
    """Plot Recall@K for K = 1..len(curve), one line per (run, direction).

    ``curves``: ``{run label: {"t2i": [R@1, R@2, ...], "i2t": [...]}}`` (percent). Returns ``path``.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, direction, name in zip(axes, ("t2i", "i2t"), ("text → image", "image → text"), strict=True):
        for label, c in curves.items():
            ys = list(c.get(direction, []))
            if ys:
                ax.plot(np.arange(1, len(ys) + 1), ys, label=label, lw=1.8)
        for k in (1, 5, 10):
            ax.axvline(k, color="0.85", lw=0.8, zorder=0)
        ax.set_xscale("log")
        ax.set_xticks([1, 2, 5, 10, 20, 50])
        ax.set_xticklabels(["1", "2", "5", "10", "20", "50"])
        ax.set_xlabel("K")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("Recall@K (%)")
    axes[1].legend(loc="lower right", fontsize=8)
    return _save(plt, fig, path, title, dpi=110)


def result_grid(
    queries: Sequence[str],
    top_paths: Sequence[Sequence[str]],
    correct: Sequence[Sequence[bool]],
    path: str | Path,
    title: str = "",
) -> Path:
    """One row per text query: the query, then its top-k images; the correct image gets a green frame.

    ``top_paths[i]`` are the image files ranked for ``queries[i]``; ``correct[i][j]`` marks the relevant one(s).
    """
    from PIL import Image

    plt = _plt()
    n = len(queries)
    k = max((len(p) for p in top_paths), default=1)
    fig, axes = plt.subplots(n, k, figsize=(2.2 * k, 2.5 * n + 0.4), squeeze=False)
    for i in range(n):
        for j in range(k):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(top_paths[i]):
                ax.axis("off")
                continue
            try:
                with Image.open(top_paths[i][j]) as im:
                    ax.imshow(np.asarray(im.convert("RGB").resize((160, 160))))
            except OSError:
                ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
            hit = correct[i][j]
            for spine in ax.spines.values():
                spine.set_edgecolor("#1a9850" if hit else "0.7")
                spine.set_linewidth(5 if hit else 1)
            ax.set_xlabel(f"#{j + 1}" + (" ✓" if hit else ""), fontsize=9, color="#1a9850" if hit else "black")
        q = queries[i]
        axes[i][0].set_title(q if len(q) <= 110 else q[:107] + "...", loc="left", fontsize=9)
    return _save(plt, fig, path, title, dpi=90, fontsize=11)


def prf_curves(curves: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """Recall, Precision and F1 at K (one panel each), text→image and image→text lines.

    ``curves``: :func:`trainer.analysis.prf_curves` output (``ks`` and per direction ``R``/``P``/``F1`` in percent).
    """
    plt = _plt()
    ks = list(curves["ks"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, stat, name in zip(axes, ("R", "P", "F1"), ("Recall@K", "Precision@K", "F1@K"), strict=True):
        for direction, label, style in (("t2i", "text → image", "-o"), ("i2t", "image → text", "--s")):
            ax.plot(ks, curves[direction][stat], style, label=label, lw=1.6, ms=4)
        ax.set_xscale("log")
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("K")
        ax.set_ylabel(f"{name} (%)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 100 if stat == "R" else None)
    axes[0].legend(loc="lower right", fontsize=8)
    return _save(plt, fig, path, title, dpi=110)


def reliability_diagram(rel: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """Predicted probability vs observed frequency per bin (with the diagonal), and the bin counts below.

    ``rel``: :func:`trainer.analysis.reliability_report` output.
    """
    plt = _plt()
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.2, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    pred = np.asarray(rel["predicted"], float)
    obs = np.asarray(rel["observed"], float)
    cnt = np.asarray(rel["count"], float)
    ok = cnt > 0
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
    ax.plot(pred[ok], obs[ok], "-o", color="#2b83ba", label=f"{rel.get('kind', '')} (ECE {rel['ece']:.3f})")
    ax.set_ylabel("observed frequency of relevant")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    edges = np.linspace(0, 1, len(cnt) + 1)
    ax_n.bar(edges[:-1], cnt, width=np.diff(edges), align="edge", color="0.7", edgecolor="0.4")
    ax_n.set_yscale("log")
    ax_n.set_xlabel("predicted relevance")
    ax_n.set_ylabel("hits")
    return _save(plt, fig, path, title, dpi=110)


def embedding_map(
    image_xy: np.ndarray, text_xy: np.ndarray, path: str | Path, title: str = "", method: str = "", links: int = 40
) -> Path:
    """Images (dots) and their captions (crosses) in 2-D; the first ``links`` pairs joined by a line.

    ``image_xy``, ``text_xy``: ``(n, 2)``, row ``i`` of each is a matching pair.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 6.4))
    for i in range(min(links, len(image_xy))):
        ax.plot([image_xy[i, 0], text_xy[i, 0]], [image_xy[i, 1], text_xy[i, 1]], color="0.75", lw=0.7, zorder=0)
    ax.scatter(image_xy[:, 0], image_xy[:, 1], s=9, c="#d7191c", label="images", alpha=0.75)
    ax.scatter(text_xy[:, 0], text_xy[:, 1], s=12, c="#2b83ba", marker="x", label="captions", alpha=0.75)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{method} 1" if method else "")
    ax.set_ylabel(f"{method} 2" if method else "")
    ax.legend(loc="best", fontsize=8)
    return _save(plt, fig, path, title, dpi=110)


def _save(plt: Any, fig: Any, path: str | Path, title: str, *, dpi: int, fontsize: float | None = None) -> Path:
    """Title, lay out, write ``path`` (creating its folder) and close the figure."""
    if title:
        fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
