"""Logit distillation of Fantastic Gains (REFERENCE §1): KL, XE-KL, KL+DP and its partition ablations, MCL.

Conventions: KL(p_target^T || p_student^T) per sample, scaled by T^2 (Hinton), averaged over the batch;
`alpha` weighs it against cross-entropy on the student's *logits* (the public code applied CE to softmax
outputs: a bug we do not repeat). Routing for data partitioning uses T = 1 probabilities."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError, check
from .base import Method

PARTITIONS = ("most-conf", "most-conf_u", "pos_flips", "neg_flips", "neutral_avg", "self")


def kl_to_target(student_logits: torch.Tensor, target_probs: torch.Tensor, T: float) -> torch.Tensor:
    """Per-sample T^2 * KL(target || softmax(student/T)); 0 * log 0 terms are 0."""
    log_ps = F.log_softmax(student_logits.float() / T, dim=1)
    ent = torch.special.xlogy(target_probs, target_probs).sum(1)
    return (ent - (target_probs * log_ps).sum(1)) * (T * T)


def topk_restrict(teacher_logits: torch.Tensor, student_logits: torch.Tensor, k: int):
    """Both logits restricted to the teacher's top-k classes (k <= 0 or >= K: unchanged)."""
    if k <= 0 or k >= teacher_logits.shape[1]:
        return teacher_logits, student_logits
    idx = teacher_logits.topk(k, dim=1).indices
    return teacher_logits.gather(1, idx), student_logits.gather(1, idx)


def dp_route(teacher_logits: torch.Tensor, frozen_logits: torch.Tensor, labels: Optional[torch.Tensor],
             partition: str) -> torch.Tensor:
    """Per-sample weight of the teacher in the KL target (1 = teacher, 0 = frozen initial student).

    most-conf:   teacher where its softmax probability of the true label is higher (supervised, KL+DP)
    most-conf_u: teacher where its max softmax probability is higher (unsupervised, no labels)
    pos_flips:   teacher only on positive flips (teacher right, student wrong), frozen student elsewhere
    neg_flips:   frozen student only on negative flips (student right, teacher wrong), teacher elsewhere
    neutral_avg: teacher on positive flips, frozen student on negative flips, the average on the rest
    self:        always the frozen student (self-distillation)
    Ties go to the frozen student."""
    if partition not in PARTITIONS:
        raise UserError(f"method.partition='{partition}' is unknown: use one of {', '.join(PARTITIONS)}")
    pt, ps = teacher_logits.float().softmax(1), frozen_logits.float().softmax(1)
    if partition == "most-conf_u":
        return (pt.max(1).values > ps.max(1).values).float()
    if partition == "self":
        return torch.zeros(pt.shape[0], device=pt.device)
    if labels is None:
        raise UserError(f"method.partition='{partition}' needs labels: use most-conf_u for unsupervised transfer")
    if partition == "most-conf":
        y = labels.view(-1, 1)
        return (pt.gather(1, y) > ps.gather(1, y)).view(-1).float()
    t_ok, s_ok = pt.argmax(1) == labels, ps.argmax(1) == labels
    pos, neg = (t_ok & ~s_ok).float(), (~t_ok & s_ok).float()
    if partition == "pos_flips":
        return pos
    if partition == "neg_flips":
        return 1.0 - neg
    return pos + 0.5 * (1.0 - pos - neg)  # neutral_avg


class KL(Method):
    """alpha * T^2 KL(p_t || p_s) + (1 - alpha) * CE(y, z_s); `topk` restricts the KL to the teacher's top-k
    classes. KL: alpha = 1; XE-KL: alpha = 0.5."""

    def __init__(self, student, teacher, temperature: float = 1.0, alpha: float = 1.0, topk: int = 0, **kw):
        super().__init__(student, teacher, **kw)
        check(temperature > 0, f"method.temperature={temperature} must be > 0: use e.g. 1.0")
        check(0 <= alpha <= 1, f"method.alpha={alpha} must be in [0, 1]")
        check(topk >= 0, f"method.topk={topk} must be >= 0 (0 = all classes)")
        self.T, self.alpha, self.topk = float(temperature), float(alpha), int(topk)

    def targets(self, x, y, idx, mixed: bool):
        """(target probabilities at T, per-sample teacher weight or None). Subclasses change the target."""
        return None, None

    def per_sample_kl(self, zs, zt):
        zt_k, zs_k = topk_restrict(zt, zs, self.topk)
        return kl_to_target(zs_k, (zt_k.float() / self.T).softmax(1), self.T)

    def loss(self, batch):
        x, y, idx = batch
        x, mixed = self.mix(x)
        zt = self.teacher.logits(x, idx, use_cache=not mixed)  # frozen forwards first: see three_logits
        zs = self.student(x)
        kl = self.per_sample_kl(zs, zt)
        return self.combine(kl, zs, y, mixed)

    def three_logits(self, batch):
        """Student, teacher and frozen-student logits of one (possibly mixed) batch; frozen outputs come from
        the per-sample caches unless the inputs were mixed. The frozen (no-grad) forwards run before the student's:
        then the student's saved activations are not pushed out of the CPU caches by them before its backward
        (a KL+DP step was 17% slower than the sum of its parts in the other order, scripts/benchmark.py), and
        their buffers are freed before the student's graph is built (lower peak memory on GPU)."""
        x, _, idx = batch
        x, mixed = self.mix(x)
        zt = self.teacher.logits(x, idx, use_cache=not mixed)
        zf = self.frozen_student.logits(x, idx, use_cache=not mixed)
        zs = self.student(x)
        return zs, zt, zf, mixed

    def combine(self, kl, zs, y, mixed, mask=None):
        logs = {"kl": kl.detach().mean()}
        if mask is None:
            loss = self.alpha * kl.mean()
        else:
            loss = self.alpha * (kl * mask).sum() / mask.sum().clamp(min=1.0)
        if self.alpha < 1 and not mixed:
            ce = F.cross_entropy(zs.float(), y, reduction="none")
            ce = ce.mean() if mask is None else (ce * mask).sum() / mask.sum().clamp(min=1.0)
            loss = loss + (1 - self.alpha) * ce
            logs["ce"] = ce.detach()
        return loss, logs


class KLDP(KL):
    """KL+DP, the Fantastic Gains method: per sample, the KL target is the teacher's distribution where the
    teacher is more confident (`most-conf`: true-label probability; `most-conf_u`: max probability, no labels),
    else the frozen initial student's. Ablations: pos_flips, neg_flips, neutral_avg, self (see `dp_route`)."""

    def __init__(self, student, teacher, frozen_student, partition: str = "most-conf", **kw):
        if frozen_student is None:
            raise UserError("KL+DP needs the frozen initial student (frozen_student)")
        super().__init__(student, teacher, frozen_student=frozen_student, **kw)
        if partition not in PARTITIONS:
            raise UserError(f"method.partition='{partition}' is unknown: use one of {', '.join(PARTITIONS)}")
        self.partition = partition

    def loss(self, batch):
        y = batch[1]
        zs, zt, zf, mixed = self.three_logits(batch)
        w = dp_route(zt, zf, None if (mixed or self.partition == "most-conf_u") else y,
                     "most-conf_u" if mixed and self.partition == "most-conf" else self.partition)
        target = w[:, None] * (zt / self.T).softmax(1) + (1 - w[:, None]) * (zf / self.T).softmax(1)
        kl = kl_to_target(zs, target, self.T)
        loss, logs = self.combine(kl, zs, y, mixed)
        logs["dp_share_teacher"] = w.mean()
        return loss, logs


class MCL(KL):
    """Continual-learning baseline: XE-KL (alpha 0.68, top-k 100) on the samples that are not negative flips
    (frozen student right, teacher wrong), plus slow EMA weights (tau 0.9999, updated every `ema_every` = 2
    steps) that are evaluated."""

    def __init__(self, student, teacher, frozen_student, alpha: float = 0.68, topk: int = 100,
                 ema_tau: float = 0.9999, ema_every: int = 2, **kw):
        super().__init__(student, teacher, alpha=alpha, topk=topk, frozen_student=frozen_student, **kw)
        check(0 <= ema_tau < 1, f"method.ema_tau={ema_tau} must be in [0, 1)")
        check(ema_every >= 1, f"method.ema_every={ema_every} must be >= 1")
        self.tau, self.every = float(ema_tau), int(ema_every)
        self.slow = copy.deepcopy(student)
        for p in self.slow.parameters():
            p.requires_grad_(False)

    def loss(self, batch):
        y = batch[1]
        zs, zt, zf, mixed = self.three_logits(batch)
        neg = (zf.argmax(1) == y) & (zt.argmax(1) != y)
        mask = (~neg).float()
        loss, logs = self.combine(self.per_sample_kl(zs, zt), zs, y, mixed, mask=mask)
        logs["mcl_kept"] = mask.mean()
        return loss, logs

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if step % self.every:
            return
        for s, f in zip(self.slow.parameters(), self.student.parameters()):
            s.lerp_(f.detach(), 1.0 - self.tau)
        for s, f in zip(self.slow.buffers(), self.student.buffers()):
            if s.is_floating_point():  # BN running statistics follow the slow weights, not the fast ones
                s.lerp_(f, 1.0 - self.tau)
            else:
                s.copy_(f)

    def eval_model(self) -> nn.Module:
        return self.slow

    def train(self, mode: bool = True):
        super().train(mode)
        self.slow.eval()
        return self
