"""Figures of the AFT family (docs/REFERENCE.md §2): over runs (the aggregator's `aft` table), the student's test
accuracy after each method, mean ± std over seeds, beside the pretrained student it started from."""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

from .base import bars, plt, save

ORDER = ("aft", "aft_kd", "aft_btune", "aft_init")
SHOWN = {"aft_init": "aft_init (STL)", "init": "init (STL)"}


def method_bars(rows: List[dict]) -> List[Tuple[str, float, float]]:
    """(label, mean, std) per table row in the order aft, aft_kd, aft_btune, aft_init (STL), others; then the start
    (student accuracy before fine-tuning: mean after - mean delta of the first row's runs)."""
    rank = lambda r: (ORDER.index(r["method"]) if r["method"] in ORDER else len(ORDER), r["method"])  # noqa: E731
    rows = sorted(rows, key=rank)
    many = len({r["student"] for r in rows}) > 1 or len({r["features"] for r in rows if r["features"]}) > 1
    out = [(SHOWN.get(r["method"], r["method"]) + (f"\n{r['student']} <- {r['features'] or '-'}" if many else ""),
            r["student_acc_after"]["mean"], r["student_acc_after"]["std"]) for r in rows]
    if rows:
        r = rows[0]
        out.append(("start (pretrained student)", r["student_acc_after"]["mean"] - r["transfer_delta"]["mean"], 0.0))
    return out


def aggregate_figure(rows: List[dict], path) -> Path:
    b = method_bars(rows)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(b) + 1.5), 4.0))
    bars(ax, [x[0] for x in b], [x[1] for x in b], [x[2] for x in b], ylabel="student test accuracy %",
         title="Adaptive Feature Transfer: accuracy per method (mean ± std over seeds)",
         colors=[f"C{k}" for k in range(len(b) - 1)] + ["0.6"])
    return save(fig, path)
