"""PNG reports with matplotlib (Agg backend, no display): Recall@K curves and query result grids."""

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
