"""Figures of the zero-shot family (docs/REFERENCE.md §4.5): mean transition curves of a student and its
teacher."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .flips import _save, plt


def transition_plot(p_student, p_teacher, path, title: str = "", mte: Optional[float] = None,
                    mte_steps: Optional[int] = None) -> Path:
    """Mean p_j (over images and target classes j) at each adversarial step under the student (which the steps
    attack) and under the teacher, with a band of +-1 standard deviation; `mte_steps` marks the MTE window."""
    s, t = np.asarray(p_student, dtype=float), np.asarray(p_teacher, dtype=float)
    steps = np.arange(s.shape[0])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for p, label, color in ((s, "student", "C0"), (t, "teacher", "C1")):
        mean, std = p.mean(1), p.std(1)
        ax.plot(steps, mean, color=color, lw=2, label=f"p_j under the {label}")
        ax.fill_between(steps, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color=color, alpha=0.15)
    if mte_steps:
        ax.axvline(min(mte_steps, s.shape[0]) - 1, color="k", ls="--", lw=1, label=f"MTE window ({mte_steps} steps)")
    ax.set_xlabel("adversarial step on the input (towards class j, on the student)")
    ax.set_ylabel("p_j")
    ax.set_ylim(0, 1)
    ax.set_title(title + (f"  MTE {mte:.3f}" if mte is not None else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
