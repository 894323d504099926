"""Figures of the multi-teacher family (docs/REFERENCE.md §1.11): the student's accuracy before, after each stage and
at the end of a run against each teacher, their ensemble and the best single-teacher transfer; over runs, each
mode's accuracy (mean ± std over seeds) against the best single teacher's transfer of the same seed."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .base import bars, plt, save, short

Bar = Tuple[str, float, float, str]  # label, mean, std, kind (student | stage | final | single | teacher)
COLORS = {"student": "0.6", "stage": "C0", "final": "C2", "single": "C1", "teacher": "C4"}


def best_single_transfer(summary: dict) -> Optional[Tuple[str, float]]:
    """(teacher, accuracy %) of the best single-teacher distillation the run itself holds: a soup's members (each
    distilled from the initial student by one teacher), or the one stage of a one-teacher run; else None."""
    stages = summary.get("stages") or []
    singles = stages if summary.get("mode") == "soup" else \
        stages if len(summary.get("teachers", [])) == 1 and summary.get("mode") != "ensemble" else []
    if not singles:
        return None
    best = max(singles, key=lambda r: r["student_acc_after"])
    return str(best["teacher"]), float(best["student_acc_after"])


def run_bars(summary: dict) -> List[Bar]:
    """The bars of one run's figure, in order: the student before, after each stage (sequential, soup), the final
    student, the best single-teacher transfer when the run holds one, each teacher, the teachers' ensemble."""
    mode = summary["mode"]
    out: List[Bar] = [("student before", summary["student_acc_before"], 0.0, "student")]
    stages = summary.get("stages") or []
    if mode in ("sequential", "soup") and len(stages) > 1:
        what = "after stage {k}: {t}" if mode == "sequential" else "soup member: {t}"
        out += [(what.format(k=r["stage"], t=short(r["teacher"], 24)), r["student_acc_after"], 0.0, "stage")
                for r in stages]
    out.append((f"final ({mode})", summary["student_acc_after"], 0.0, "final"))
    single = best_single_transfer(summary)
    if single is not None:
        out.append((f"best single teacher: {short(single[0], 24)}", single[1], 0.0, "single"))
    out += [(f"teacher {short(t, 24)}", summary[f"vs_{t}/teacher_acc"], 0.0, "teacher") for t in summary["teachers"]
            if f"vs_{t}/teacher_acc" in summary]
    if "vs_ensemble/teacher_acc" in summary:
        out.append(("ensemble of teachers", summary["vs_ensemble/teacher_acc"], 0.0, "teacher"))
    return out


def _panel(ax, rows: Sequence[Bar], title: str, ref: Optional[Tuple[str, float]] = None):
    b = bars(ax, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], ylabel="test accuracy %",
             title=title, colors=[COLORS[r[3]] for r in rows])
    if ref is not None:
        ax.axhline(ref[1], color=COLORS["single"], ls="--", lw=1, label=ref[0])
        ax.legend(fontsize=7, loc="lower right")
    return b


def run_figure(summary: dict, path) -> Path:
    """One run: the bars of `run_bars`, the best single-teacher transfer also as a dashed line."""
    rows = run_bars(summary)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.75 * len(rows) + 2), 4.2))
    single = [r for r in rows if r[3] == "single"]
    teachers = ", ".join(short(t, 24) for t in summary["teachers"])
    title = f"{summary['mode']} ({summary.get('method', '?')}): {teachers} -> {short(summary['student'], 24)}"
    _panel(ax, rows, title, (single[0][0], single[0][1]) if single else None)
    return save(fig, path)


def aggregate_figure(groups: Dict[str, List[Bar]], path) -> Path:
    """One panel per (student, teachers) group: each mode's final accuracy and the references, mean ± std over
    seeds (`groups`: title -> bars as in `run_bars`)."""
    n = len(groups)
    width = max(max(len(v) for v in groups.values()) * 0.8 + 2, 5.0)
    fig, axes = plt.subplots(n, 1, figsize=(width, 4.0 * n), squeeze=False)
    for ax, (title, rows) in zip(axes[:, 0], groups.items()):
        single = [r for r in rows if r[3] == "single"]
        _panel(ax, rows, title, (single[0][0], single[0][1]) if single else None)
    fig.suptitle("multi-teacher transfer vs. the best single teacher (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    return save(fig, path)
