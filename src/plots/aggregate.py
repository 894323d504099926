"""Figures of the results aggregator: transfer delta against the teacher - student accuracy gap, one series per
method (each point one run: a pair and a seed)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

from .base import plt, save


def delta_vs_gap(series: Dict[str, List[Tuple[float, float]]], path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in sorted(series.items()):
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, alpha=0.7, label=f"{name} ({len(pts)})")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("teacher acc - student acc before (points)")
    ax.set_ylabel("transfer delta (points)")
    ax.legend(fontsize=8)
    return save(fig, Path(path))
