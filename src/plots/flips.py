"""Figures of the prediction-flips family (docs/REFERENCE.md §1.1): the N x N heatmap of positive flips, positive flips
against the accuracy difference with their lower envelope (the paper's Figure 1), and the per-class
distribution of one pair's flips."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def flip_heatmap(matrix, names: Sequence[str], path, title: str = "positive flips (% of samples)",
                 annotate: Optional[bool] = None) -> Path:
    """Heatmap of an N x N matrix [teacher (rows), student (columns)]."""
    m = np.asarray(matrix, dtype=float)
    n = len(names)
    size = min(20.0, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(m, cmap="viridis")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if n <= 40:
        ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
    if annotate if annotate is not None else n <= 15:
        hi = np.nanmax(m) if np.isfinite(m).any() else 0.0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="black" if m[i, j] > 0.6 * hi else "white")
    ax.set_xlabel("student")
    ax.set_ylabel("teacher")
    ax.set_title(title)
    return _save(fig, path)


def flips_vs_acc_diff(acc_diff, pos_pct, path, envelope=None, title: Optional[str] = None) -> Path:
    """Positive flips (% of samples) of every pair against the accuracy difference teacher - student (points),
    with the minimum per accuracy-difference bin (the envelope) and the bound pos >= max(0, diff)."""
    x, y = np.asarray(acc_diff, dtype=float), np.asarray(pos_pct, dtype=float)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter(x, y, s=14, alpha=0.6, label="pairs")
    if envelope is not None and len(envelope[0]):
        ax.plot(np.asarray(envelope[0]), np.asarray(envelope[1]), "r-", lw=2, label="minimum (envelope)")
    if x.size:
        xs = np.linspace(min(x.min(), 0.0), max(x.max(), 0.0), 50)
        ax.plot(xs, np.maximum(xs, 0.0), "k--", lw=1, label="bound max(0, diff)")
    ax.set_xlabel("accuracy difference teacher - student (%)")
    ax.set_ylabel("positive flips (% of samples)")
    ax.set_title(title or "complementary knowledge vs. accuracy difference")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def per_class_flips_plot(pos_per_class, neg_per_class, class_names: Sequence[str], path, title: str = "",
                         max_classes: int = 50) -> Path:
    """Positive (and negative) flips per class of one pair, classes sorted by positive flips."""
    pos, neg = np.asarray(pos_per_class, dtype=float), np.asarray(neg_per_class, dtype=float)
    order = np.argsort(-pos, kind="stable")[:max_classes]
    k = len(order)
    fig, ax = plt.subplots(figsize=(min(16.0, 3 + 0.3 * k), 4.2))
    xs = np.arange(k)
    ax.bar(xs - 0.2, pos[order], width=0.4, label="positive flips")
    ax.bar(xs + 0.2, neg[order], width=0.4, label="negative flips")
    names = [str(class_names[i]) if i < len(class_names) else str(i) for i in order]
    ax.set_xticks(xs, names, rotation=60 if k > 12 else 0, ha="right" if k > 12 else "center", fontsize=8)
    ax.set_xlabel("class" + (f" (top {k} of {len(pos)} by positive flips)" if k < len(pos) else ""))
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)
