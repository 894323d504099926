"""What every figure module shares: matplotlib on the Agg backend, saving a figure, a labelled heatmap, bars of
mean ± std and a grid of images with a label per row or per image."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def short(name, width: int = 40) -> str:
    """A model name that fits a title: a checkpoint path (arch@/a/b/weights.safetensors) keeps its ends."""
    name = str(name)
    if len(name) <= width:
        return name
    half = (width - 3) // 2
    return f"{name[:half]}...{name[-half:]}"


def save(fig, path) -> Path:
    """`fig` as a PNG at `path` (its folder made), then closed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def heatmap(ax, matrix, names: Sequence[str], annotate: bool, fmt: str = "{:.1f}", vmin=None, vmax=None,
            xlabel: str = "student", ylabel: str = "teacher"):
    """An N x N matrix on `ax` (NaN cells blank, annotated '-'); returns the image (its array is what is shown)."""
    m = np.ma.masked_invalid(np.asarray(matrix, dtype=float))
    im = ax.imshow(m, cmap=plt.get_cmap("viridis").with_extremes(bad="white"), vmin=vmin, vmax=vmax)
    n = len(names)
    if n <= 40:
        ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
    if annotate:
        lo, hi = (float(m.min()), float(m.max())) if m.count() else (0.0, 0.0)
        for i in range(n):
            for j in range(n):
                v = m[i, j]
                bright = v is not np.ma.masked and v > lo + 0.6 * (hi - lo)
                ax.text(j, i, "-" if v is np.ma.masked else fmt.format(float(v)), ha="center", va="center",
                        fontsize=7, color="black" if bright or v is np.ma.masked else "white")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return im


def bars(ax, labels: Sequence[str], means, stds=None, ylabel: str = "", title: str = "", colors=None,
         fmt: str = "{:.2f}", ymin: Optional[float] = None):
    """One bar per label with its mean written above it and a ± std error bar (std None or NaN: none); the
    y axis starts at `ymin`, else a little below the smallest bar so that close accuracies stay apart. Returns
    the bars."""
    means = np.asarray(means, dtype=float)
    stds = np.nan_to_num(np.asarray(stds if stds is not None else np.zeros_like(means), dtype=float))
    xs, long = np.arange(len(labels)), max((len(str(v)) for v in labels), default=0) > 8
    b = ax.bar(xs, means, yerr=stds if stds.any() else None, capsize=4,
               color=colors if colors is not None else "C0", alpha=0.85)
    for x, m, s in zip(xs, means, stds):
        ax.text(x, m + s, fmt.format(m), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, labels, rotation=30 if long else 0, ha="right" if long else "center", fontsize=8)
    ok = np.isfinite(means)
    if ok.any():
        lo, hi = float((means[ok] - stds[ok]).min()), float((means[ok] + stds[ok]).max())
        pad = max(0.15 * (hi - lo), 0.05 * abs(hi), 1e-6)
        ax.set_ylim(ymin if ymin is not None else max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return b


def _as_hwc(img) -> np.ndarray:
    """A C x H x W tensor or array in [0, 1] -> H x W (x 3) for imshow."""
    a = np.asarray(img.detach().cpu() if hasattr(img, "detach") else img, dtype=float)
    a = np.clip(a, 0.0, 1.0)
    return a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))


def image_grid(images, rows: int, cols: int, path, title: str = "", row_labels: Optional[Sequence[str]] = None,
               labels: Optional[Sequence[str]] = None) -> Path:
    """`rows` x `cols` images (N x C x H x W in [0, 1], row-major), with a label left of each row and / or above
    each image."""
    cell = 1.1 if labels is None else 1.3
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.0 + (1.2 if row_labels else 0), rows * cell),
                             squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
        if k >= len(images):
            continue
        ax.imshow(_as_hwc(images[k]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if labels is not None:
            ax.set_title(str(labels[k]), fontsize=7, pad=2)
    for r, name in enumerate(row_labels or []):
        axes[r, 0].set_ylabel(str(name), rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path)
