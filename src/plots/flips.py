"""Figures of the prediction-flips family (docs/REFERENCE.md §1.1): the N x N heatmap of positive flips, positive flips
against the accuracy difference with their lower envelope (the paper's Figure 1), and the per-class
distribution of one pair's flips; the CKA heatmap of the penultimate features."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from .base import heatmap, plt, save


def masked_self_pairs(matrix) -> np.ndarray:
    """A copy of an N x N pair matrix with its diagonal (a model against itself: no pair) set to NaN."""
    m = np.array(matrix, dtype=float)
    np.fill_diagonal(m, np.nan)
    return m


def flip_heatmap(matrix, names: Sequence[str], path, title: str = "positive flips (% of samples)",
                 annotate: Optional[bool] = None, mask_diagonal: bool = True) -> Path:
    """Heatmap of an N x N matrix [teacher (rows), student (columns)]; self-pairs blank ('-') unless
    mask_diagonal=False."""
    m = masked_self_pairs(matrix) if mask_diagonal else np.asarray(matrix, dtype=float)
    n = len(names)
    size = min(20.0, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = heatmap(ax, m, names, annotate if annotate is not None else n <= 15)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title)
    return save(fig, path)


def cka_heatmap(mats: Dict[str, np.ndarray], names: Sequence[str], path, samples: Optional[int] = None) -> Path:
    """CKA of the penultimate features of every pair of models, one panel per kernel (`mats`: kernel -> N x N,
    symmetric, ones on the diagonal), on a shared 0-1 scale."""
    n = len(names)
    size = min(14.0, 2.5 + 0.45 * n)
    fig, axes = plt.subplots(1, len(mats), figsize=((size + 1.0) * len(mats), size), squeeze=False)
    im = None
    for k, (ax, (kernel, m)) in enumerate(zip(axes[0], mats.items())):
        im = heatmap(ax, m, names, n <= 15, fmt="{:.2f}", vmin=0.0, vmax=1.0, xlabel="model",
                     ylabel="model" if k == 0 else "")
        ax.set_title(f"CKA ({kernel} kernel)")
    fig.colorbar(im, ax=list(axes[0]), fraction=0.046 / len(mats), pad=0.04)
    fig.suptitle("representation similarity of the penultimate features" +
                 (f" ({samples} samples)" if samples else ""), fontsize=10)
    return save(fig, path)


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
    return save(fig, path)


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
    return save(fig, path)
