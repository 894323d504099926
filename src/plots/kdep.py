"""Figures of the KDEP family (docs/REFERENCE.md §3): over runs (the aggregator's `kdep` table), the downstream
metric of each initialisation (kdep, scratch, supervised), mean ± std over seeds, one panel per downstream set
(accuracy for classification; mIoU and pixel accuracy for segmentation; mAP and AP50 for detection)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Tuple

from .base import bars, plt, save

ORDER = ("kdep", "scratch", "supervised")
METRIC = {"acc": "accuracy"}  # the table names the others as the papers do: mIoU, pixel acc, mAP, AP50


def panels(rows: List[dict]) -> Dict[Tuple[str, str], List[dict]]:
    """(downstream, metric) -> its table rows, inits in the order kdep, scratch, supervised, others."""
    out: Dict[Tuple[str, str], List[dict]] = {}
    for r in rows:
        out.setdefault((str(r["downstream"]), str(r.get("metric", "acc"))), []).append(r)
    rank = lambda r: (ORDER.index(r["init"]) if r["init"] in ORDER else len(ORDER), r["init"])  # noqa: E731
    return {k: sorted(v, key=rank) for k, v in out.items()}


def aggregate_figure(rows: List[dict], path) -> Path:
    ps = panels(rows)
    cols = min(len(ps), 3)
    n_rows = math.ceil(len(ps) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 3.8 * n_rows), squeeze=False)
    for ax, ((downstream, metric), rs) in zip(axes.flat, ps.items()):
        many = len({(r["teacher"], r["student"]) for r in rs}) > 1
        labels = [r["init"] + (f"\n{r['teacher']}->{r['student']}" if many else "") for r in rs]
        colors = [f"C{ORDER.index(r['init']) if r['init'] in ORDER else 3}" for r in rs]
        name = METRIC.get(metric, metric)
        bars(ax, labels, [r["value"]["mean"] for r in rs], [r["value"]["std"] for r in rs], ylabel=f"{name} %",
             title=f"{downstream} ({name})", colors=colors)
    for ax in list(axes.flat)[len(ps):]:
        ax.set_visible(False)
    fig.suptitle("KDEP: downstream result per initialisation (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    return save(fig, path)
