"""Prediction flips between two models and the transfer metrics of Fantastic Gains (docs/REFERENCE.md §1.1,
§1.9, §1.10)."""
from __future__ import annotations

from typing import Dict, Sequence

import torch

from .classification import accuracy, agreement, ece, kl_divergence, nll


def _pred(x: torch.Tensor) -> torch.Tensor:
    return x.argmax(1) if x.ndim == 2 else x


def flips(teacher, student, labels) -> Dict[str, float]:
    """Positive flips (student wrong, teacher right: the teacher's complementary knowledge) and negative flips
    (student right, teacher wrong), as counts and % of samples. Accepts logits or predicted labels."""
    t, s = _pred(teacher) == labels, _pred(student) == labels
    n = labels.numel()
    pos, neg = int((t & ~s).sum()), int((~t & s).sum())
    return {"positive_flips": pos, "negative_flips": neg, "positive_flips_pct": 100.0 * pos / max(1, n),
            "negative_flips_pct": 100.0 * neg / max(1, n)}


def entropy(counts: torch.Tensor) -> float:
    """Shannon entropy (nats) of a count vector's distribution; 0 for an all-zero vector."""
    tot = counts.sum()
    if tot <= 0:
        return 0.0
    p = counts.float() / tot
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def per_class_flips(teacher, student, labels, num_classes: int) -> Dict[str, object]:
    t, s = _pred(teacher) == labels, _pred(student) == labels
    pos = torch.bincount(labels[t & ~s], minlength=num_classes)
    neg = torch.bincount(labels[~t & s], minlength=num_classes)
    return {"pos_per_class": pos, "neg_per_class": neg, "pos_class_mean": pos.float().mean().item(),
            "pos_class_std": pos.float().std(unbiased=False).item(), "neg_class_mean": neg.float().mean().item(),
            "neg_class_std": neg.float().std(unbiased=False).item(), "pos_class_entropy": entropy(pos),
            "neg_class_entropy": entropy(neg)}


def _classes_for(pos_per_class: torch.Tensor, p: float) -> int:
    """The smallest number of classes (most positive flips first) that together hold >= p% of the positive
    flips; 0 if there are none."""
    tot = pos_per_class.sum().item()
    if tot <= 0:
        return 0
    c = torch.sort(pos_per_class.float(), descending=True).values.cumsum(0)
    return int(torch.searchsorted(c, tot * p / 100.0 - 1e-9).item()) + 1


def class_concentration(pos_per_class: torch.Tensor, ps: Sequence[float] = (2, 5, 20, 50)) -> Dict[str, int]:
    """For each p: the smallest number of classes that together hold p% of the positive flips (0 if none)."""
    return {f"classes_for_{p:g}pct": _classes_for(pos_per_class, p) for p in ps}


def top_classes(pos_per_class: torch.Tensor, p: float, public_extra_class: bool = False) -> torch.Tensor:
    """The classes that hold p% of the positive flips: the smallest set of classes, most positive flips first
    (ties: lower class index first), whose flips reach p% of all of them (empty when there are none).

    Follows the public `get_dist_improvement` / `get_top_p_percent_classes` (ExplainableML/FantasticGains
    `flip_study.py`), with one named fix: its loop counts one class too many (it increments k after the share
    already reached p%). `public_extra_class=True` reproduces that (for comparing with the paper's numbers)."""
    k = _classes_for(pos_per_class, p)
    if public_extra_class and k:
        k = min(k + 1, pos_per_class.numel())
    return torch.argsort(pos_per_class, descending=True, stable=True)[:k]


def ensemble_accuracy(logits_a, logits_b, labels) -> float:
    """Accuracy when each sample takes the prediction of the more confident (max softmax) model."""
    pa, pb = logits_a.float().softmax(1), logits_b.float().softmax(1)
    ca, cb = pa.max(1), pb.max(1)
    pred = torch.where(ca.values >= cb.values, ca.indices, cb.indices)
    return (pred == labels).float().mean().item()


def transfer_metrics(now, before, teacher, labels, top_p: float = 20.0) -> Dict[str, float]:
    """Everything main_transfer reports after an evaluation (values in %, except nll/ece/kl).

    now/before/teacher: logits of the current student, the initial student and the teacher on the eval split.
    `gain_in_top<p>pct_classes`: % of the knowledge gain (initial student wrong, now right) whose true class is
    among the classes holding top_p% of the initial student's positive flips (`top_classes`)."""
    n = labels.numel()
    r_now, r_before = _pred(now) == labels, _pred(before) == labels
    gain = r_now & ~r_before
    loss = ~r_now & r_before
    f_now, f_before = flips(teacher, now, labels), flips(teacher, before, labels)
    pc = per_class_flips(teacher, before, labels, teacher.shape[1])
    top = top_classes(pc["pos_per_class"], top_p)
    in_top = torch.isin(labels, top)
    acc_now, acc_before = 100 * accuracy(now, labels), 100 * accuracy(before, labels)
    out = {
        "student_acc": acc_now,
        "transfer_delta": acc_now - acc_before,
        "knowledge_gain": 100.0 * gain.sum().item() / n,
        "knowledge_loss": 100.0 * loss.sum().item() / n,
        "positive_flips": f_now["positive_flips_pct"],
        "negative_flips": f_now["negative_flips_pct"],
        "positive_flips_change": f_now["positive_flips_pct"] - f_before["positive_flips_pct"],
        "negative_flips_change": f_now["negative_flips_pct"] - f_before["negative_flips_pct"],
        f"gain_in_top{top_p:g}pct_classes": (100.0 * (gain & in_top).sum().item() / gain.sum().item()
                                             if gain.any() else 0.0),
        "agreement": 100 * agreement(teacher, now),
        "kl_teacher_student": kl_divergence(teacher, now),
        "nll": nll(now, labels),
        "ece": ece(now, labels),
        "ensemble_acc": 100 * ensemble_accuracy(teacher, now, labels),
    }
    return out


def routing_shares(teacher_weight, teacher, student, labels) -> Dict[str, float]:
    """Where KL+DP's routing sends the eval samples: the share (%) whose KL target is the teacher (the mean of the
    per-sample teacher weight), overall and among the positive / negative flips of (teacher, student); 0 when a
    group is empty (never NaN)."""
    w = teacher_weight.float()
    t_ok, s_ok = _pred(teacher) == labels, _pred(student) == labels
    share = lambda m: 100.0 * w[m].mean().item() if m.any() else 0.0  # noqa: E731
    return {"dp_share_teacher": 100.0 * w.mean().item(), "dp_pos_flips_to_teacher": share(t_ok & ~s_ok),
            "dp_neg_flips_to_teacher": share(~t_ok & s_ok)}


_STUDENT_KEYS = ("student_acc", "transfer_delta", "knowledge_gain", "knowledge_loss", "nll", "ece")


def transfer_report(now, before, refs: Dict[str, torch.Tensor], labels, top_p: float) -> Dict[str, float]:
    """Everything main_transfer reports, for the student `now` against the initial student `before`, with the
    teacher-dependent numbers once per reference model in `refs` (name -> eval logits) as `vs_<name>/<metric>`."""
    out: Dict[str, float] = {"student_acc_before": 100 * accuracy(before, labels)}
    for name, t in refs.items():
        m = transfer_metrics(now, before, t, labels, top_p)
        if "student_acc_after" not in out:
            out.update({("student_acc_after" if k == "student_acc" else k): m[k] for k in _STUDENT_KEYS})
        f0 = flips(t, before, labels)
        out[f"vs_{name}/teacher_acc"] = 100 * accuracy(t, labels)
        out[f"vs_{name}/positive_flips_before"] = f0["positive_flips_pct"]
        out[f"vs_{name}/negative_flips_before"] = f0["negative_flips_pct"]
        out[f"vs_{name}/agreement_before"] = 100 * agreement(t, before)
        out.update({f"vs_{name}/{k}": v for k, v in m.items() if k not in _STUDENT_KEYS})
    return out
