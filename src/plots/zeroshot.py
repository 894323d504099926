"""Figures of the zero-shot family (docs/REFERENCE.md §4.5): mean transition curves of a student and its teacher
(one figure per student, and one grid with a panel per student), the generator's pseudo-images labelled with the
teacher's prediction, and over runs each student's accuracy and MTE (mean ± std over seeds)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from matplotlib.ticker import MaxNLocator

from .base import bars, image_grid, plt, save, short


def _curves(ax, p_student, p_teacher, mte_steps: Optional[int] = None, legend: bool = True) -> None:
    s, t = np.asarray(p_student, dtype=float), np.asarray(p_teacher, dtype=float)
    steps = np.arange(s.shape[0])
    for p, label, color in ((s, "student", "C0"), (t, "teacher", "C1")):
        mean, std = p.mean(1), p.std(1)
        ax.plot(steps, mean, color=color, lw=2, label=f"p_j under the {label}")
        ax.fill_between(steps, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color=color, alpha=0.15)
    if mte_steps:
        ax.axvline(min(mte_steps, s.shape[0]) - 1, color="k", ls="--", lw=1, label=f"MTE window ({mte_steps} steps)")
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def transition_plot(p_student, p_teacher, path, title: str = "", mte: Optional[float] = None,
                    mte_steps: Optional[int] = None) -> Path:
    """Mean p_j (over images and target classes j) at each adversarial step under the student (which the steps
    attack) and under the teacher, with a band of +-1 standard deviation; `mte_steps` marks the MTE window."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    _curves(ax, p_student, p_teacher, mte_steps)
    ax.set_xlabel("adversarial step on the input (towards class j, on the student)")
    ax.set_ylabel("p_j")
    ax.set_title(title + (f"  MTE {mte:.3f}" if mte is not None else ""))
    return save(fig, path)


def transition_grid(curves: Dict[str, dict], path, teacher: str = "teacher", mte_steps: Optional[int] = None) -> Path:
    """One panel per student (`curves`: name -> {"student", "teacher": steps x walks p_j, "mte", "images"}), shared
    axes, the MTE in each panel's title: how closely each student's decision boundaries follow the teacher's."""
    n = len(curves)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.4 * rows), squeeze=False, sharex=True, sharey=True)
    for k, (ax, (name, c)) in enumerate(zip(axes.flat, curves.items())):
        _curves(ax, c["student"], c["teacher"], mte_steps, legend=k == 0)
        mte = c.get("mte")
        ax.set_title(f"{name}" + (f": MTE {mte:.3f}" if mte is not None else "") +
                     (f" ({c['images']} image{'s' * (c['images'] != 1)})" if c.get("images") else ""), fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("adversarial step (towards class j)")
    for ax in axes[:, 0]:
        ax.set_ylabel("p_j")
    fig.suptitle(f"transition curves: each student vs. teacher {short(teacher)}", fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def pseudo_image_grid(images, predicted: Sequence[int], confidence: Sequence[float], class_names: Sequence[str],
                      rows: int, path, teacher: str = "teacher") -> Path:
    """The generator's images (N x C x H x W in [0, 1]), one row per pseudo-batch, each titled with the teacher's
    predicted class and its probability."""
    title = f"generator's pseudo-images; label: teacher {short(teacher)}'s class (probability)"
    names = [str(class_names[c]) if c < len(class_names) else str(c) for c in predicted]
    labels = [f"{n[:10]} ({100 * p:.0f}%)" for n, p in zip(names, confidence)]
    cols = math.ceil(len(images) / rows)
    return image_grid(images, rows, cols, path, title=title, row_labels=[f"batch {r + 1}" for r in range(rows)],
                      labels=labels)


def aggregate_figure(rows: List[dict], path) -> Path:
    """Over runs (the aggregator's zero-shot table): each student's accuracy and MTE, mean ± std over seeds; the
    teacher's accuracy as a line. Students: zeroshot (no real data), kd_at and scratch (few-shot)."""
    order = {"zeroshot": 0, "kd_at": 1, "scratch": 2}
    rows = sorted(rows, key=lambda r: (r["teacher"], r["student"], order.get(r["student_kind"], 9), r["student_kind"]))
    pairs = list(dict.fromkeys((r["teacher"], r["student"]) for r in rows))
    label = lambda r: r["student_kind"] if len(pairs) == 1 else f"{r['student_kind']}\n{r['teacher']}->{r['student']}"
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8.0, 1.6 * len(rows) + 3), 4.0))
    bars(a1, [label(r) for r in rows], [r["acc"]["mean"] for r in rows], [r["acc"]["std"] for r in rows],
         ylabel="test accuracy %", title="accuracy: zero-shot vs. few-shot",
         colors=[f"C{order.get(r['student_kind'], 3)}" for r in rows])
    t_acc = [r["teacher_acc"]["mean"] for r in rows if r.get("teacher_acc", {}).get("n")]
    if t_acc:
        t = float(np.mean(t_acc))
        lo, hi = a1.get_ylim()
        a1.set_ylim(lo, max(hi, t + 0.08 * (t - lo)))
        a1.axhline(t, color="k", ls="--", lw=1)
        a1.text(-0.4, t, f"teacher {t:.2f}%", va="bottom", fontsize=8)
    with_mte = [r for r in rows if r.get("mte", {}).get("n")]
    bars(a2, [label(r) for r in with_mte], [r["mte"]["mean"] for r in with_mte],
         [r["mte"]["std"] for r in with_mte], ylabel="MTE (lower: closer to the teacher)",
         title="MTE", colors=[f"C{order.get(r['student_kind'], 3)}" for r in with_mte], fmt="{:.3f}", ymin=0.0)
    fig.suptitle("zero-shot KT (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    return save(fig, path)
