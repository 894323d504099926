"""Logit distillation of Fantastic Gains (docs/REFERENCE.md §1.3-§1.6): KL, XE-KL, KL+DP and its partition
ablations, MCL.

Source followed: ExplainableML/FantasticGains (`main_distillation.py: xe_kl_distill`, `dist_utils.py:
get_flip_masks`, `CRDloss.py: DistillKL`, configs `*_dist.yaml`). Conventions: KL(p_target^T || p_student^T) per
sample, scaled by T^2 (Hinton), averaged over the batch (the selected samples for MCL); `alpha` weighs it against
cross-entropy. Routing for data partitioning uses T = 1 probabilities.

Named fixes vs. the public code (docs/REFERENCE.md §1.15; kept, not optional: no paper number depends on the bug):
- CE on logits: the public code feeds softmax outputs to `CrossEntropyLoss` (XE-KL, MCL).
- No gradient through the neutral target of `neutral_avg`: the public code averages the teacher's logits with
  the *current student's* undetached logits, so the KL also pulls the target towards the student."""
from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError, check, closest
from .base import Method

PARTITIONS = ("most-conf", "most-conf_u", "pos_flips", "neg_flips", "neutral_avg", "self")
FLIP_SOURCES = ("current", "frozen")
NEUTRAL_TARGETS = ("logit_avg_current", "prob_avg_frozen")


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


def flip_masks(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
               labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) flip masks: teacher right & student wrong, teacher wrong & student right (top-1).
    Neutral = neither."""
    t_ok, s_ok = teacher_logits.argmax(1) == labels, student_logits.argmax(1) == labels
    return t_ok & ~s_ok, ~t_ok & s_ok


def check_partition(partition: str, choices=PARTITIONS) -> None:
    """`method.partition` among `choices`, the closest ones suggested."""
    if partition not in choices:
        raise UserError(f"method.partition='{partition}' is unknown{closest(str(partition), choices)}: use one of "
                        f"{', '.join(choices)}")


def check_flip_source(flip_source: str) -> None:
    check(flip_source in FLIP_SOURCES, f"method.flip_source='{flip_source}' is unknown: use one of "
          f"{', '.join(FLIP_SOURCES)}")


def dp_route(teacher_logits: torch.Tensor, frozen_logits: torch.Tensor, labels: Optional[torch.Tensor],
             partition: str, flip_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample weight of the teacher in the KL target (1 = teacher, 0 = frozen initial student).

    most-conf:   teacher where its softmax probability of the true label is higher (supervised, KL+DP)
    most-conf_u: teacher where its max softmax probability is higher (unsupervised, no labels)
    pos_flips:   teacher only on positive flips (teacher right, student wrong), frozen student elsewhere
    neg_flips:   frozen student only on negative flips (student right, teacher wrong), teacher elsewhere
    neutral_avg: teacher on positive flips, frozen student on negative flips, 0.5 on the rest (the neutral
                 target itself is chosen by `KLDP.neutral_target`)
    self:        always the frozen student (self-distillation)
    The flips are those of `flip_logits` (the public code: the current student) against the teacher; default
    `frozen_logits`. Ties go to the frozen student."""
    check_partition(partition)
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
    pos, neg = flip_masks(teacher_logits, frozen_logits if flip_logits is None else flip_logits, labels)
    pos, neg = pos.float(), neg.float()
    if partition == "pos_flips":
        return pos
    if partition == "neg_flips":
        return 1.0 - neg
    return pos + 0.5 * (1.0 - pos - neg)  # neutral_avg


class KL(Method):
    """alpha * T^2 KL(p_t || p_s) + (1 - alpha) * CE(y, z_s); `topk` restricts the KL to the teacher's top-k
    classes. KL: alpha = 1; XE-KL: alpha = 0.5."""

    needs = frozenset({"teacher"})
    modalities = frozenset({"image", "text"})  # logits, labels and ids only (mixing refuses text itself)

    def __init__(self, student, teacher, temperature: float = 1.0, alpha: float = 1.0, topk: int = 0, **kw):
        super().__init__(student, teacher, **kw)
        KL.check(temperature=temperature, alpha=alpha, topk=topk)  # their ranges: base.HPARAM_RULES
        self.T, self.alpha, self.topk = float(temperature), float(alpha), int(topk)

    def per_sample_kl(self, zs, zt):
        zt_k, zs_k = topk_restrict(zt, zs, self.topk)
        return kl_to_target(zs_k, (zt_k.float() / self.T).softmax(1), self.T)

    def loss(self, batch):
        x, mixed = self.mix(batch)
        zt = self.teacher.logits(x, batch.ids, use_cache=not mixed)  # frozen forwards first: see three_logits
        zs = self.student(x)
        kl = self.per_sample_kl(zs, zt)
        return self.combine(kl, zs, batch.targets, mixed)

    def three_logits(self, batch):
        """Student, teacher and frozen-student logits of one (possibly mixed) batch; frozen outputs come from
        the per-sample caches unless the inputs were mixed. The frozen (no-grad) forwards run before the student's:
        then the student's saved activations are not pushed out of the CPU caches by them before its backward
        (a KL+DP step was 17% slower than the sum of its parts in the other order, scripts/benchmark.py), and
        their buffers are freed before the student's graph is built (lower peak memory on GPU)."""
        idx = batch.ids
        x, mixed = self.mix(batch)
        zt = self.teacher.logits(x, idx, use_cache=not mixed)
        zf = self.frozen_student.logits(x, idx, use_cache=not mixed)
        zs = self.student(x)
        return zs, zt, zf, mixed

    def combine(self, kl, zs, y, mixed, mask=None):
        """alpha * KL (mean over the batch, or over the samples where `mask` is 1) + (1 - alpha) * CE on the
        logits of *every* sample (MCL masks only its KL term, as the public code)."""
        logs = {"kl": kl.detach().mean()}
        if mask is None:
            loss = self.alpha * kl.mean()
        else:
            loss = self.alpha * (kl * mask).sum() / mask.sum().clamp(min=1.0)
        if self.alpha < 1 and not mixed:
            ce = F.cross_entropy(zs.float(), y)
            loss = loss + (1 - self.alpha) * ce
            logs["ce"] = ce.detach()
        return loss, logs


class KLDP(KL):
    """KL+DP, the Fantastic Gains method: per sample, the KL target is the teacher's distribution where the
    teacher is more confident (`most-conf`: true-label probability; `most-conf_u`: max probability, no labels),
    else the frozen initial student's. Ablations: pos_flips, neg_flips, neutral_avg, self (see `dp_route`).

    Follows the public `xe_kl_distill` (strategies flip-st / flip-t / flip-avg / self-dist):
    - `flip_source='current'` (default, public code): the flips of the flip partitions are those of the
      *current* student against the teacher; `'frozen'`: of the frozen initial student (our earlier variant;
      both agree at step 0 and drift apart as the student learns).
    - `neutral_target` of `neutral_avg` on neutral samples: `'logit_avg_current'` (default, public code)
      softmax((z_teacher + z_student) / 2T) with the current student's logits *detached* (named fix: the public
      code lets the gradient flow into the target); `'prob_avg_frozen'`: the mean of the teacher's and the frozen
      student's probabilities (our earlier variant)."""

    needs = frozenset({"teacher", "frozen_student"})

    def __init__(self, student, teacher, frozen_student, partition: str = "most-conf", flip_source: str = "current",
                 neutral_target: str = "logit_avg_current", **kw):
        if frozen_student is None:
            raise UserError("KL+DP needs the frozen initial student (frozen_student)")
        super().__init__(student, teacher, frozen_student=frozen_student, **kw)
        KLDP.check(partition=partition, flip_source=flip_source, neutral_target=neutral_target)
        self.partition, self.flip_source, self.neutral_target = partition, flip_source, neutral_target

    @classmethod
    def check(cls, **hp) -> None:
        super().check(**hp)
        if "partition" in hp:
            check_partition(hp["partition"])
        if "flip_source" in hp:
            check_flip_source(hp["flip_source"])
        if "neutral_target" in hp:
            check(hp["neutral_target"] in NEUTRAL_TARGETS, f"method.neutral_target='{hp['neutral_target']}' is "
                  f"unknown: use one of {', '.join(NEUTRAL_TARGETS)}")

    def loss(self, batch):
        y = batch.targets
        zs, zt, zf, mixed = self.three_logits(batch)
        labels = None if (mixed or self.partition == "most-conf_u") else y
        partition = "most-conf_u" if mixed and self.partition == "most-conf" else self.partition
        flip_logits = zs.detach() if self.flip_source == "current" else zf
        w = dp_route(zt, zf, labels, partition, flip_logits=flip_logits)[:, None]
        pt, pf = (zt / self.T).softmax(1), (zf / self.T).softmax(1)
        target = w * pt + (1 - w) * pf
        if partition == "neutral_avg":
            pos, neg = flip_masks(zt, flip_logits, labels)
            neutral = ~(pos | neg)
            if self.neutral_target == "logit_avg_current":
                avg = ((zt.float() + zs.detach().float()) / (2 * self.T)).softmax(1)
            else:
                avg = 0.5 * (pt + pf)
            target = torch.where(neutral[:, None], avg, target)
        kl = kl_to_target(zs, target, self.T)
        loss, logs = self.combine(kl, zs, y, mixed)
        logs["dp_share_teacher"] = w.mean()
        return loss, logs


class MCL(KL):
    """Continual-learning baseline (public `xe_kl_distill` with loss `xekl_mcl`, on_flip neg: nothing):
    alpha * KL (alpha 0.68, teacher top-k 100, T 1) averaged over the samples that are not negative flips
    (student right, teacher wrong) + (1 - alpha) * CE on *all* samples (on logits: named fix, the public code
    applies it to softmax outputs), plus slow EMA weights (tau 0.9999, updated every `ema_every` = 2 steps)
    that are evaluated. The negative flips are the *current* student's (`flip_source='current'`, public code) or
    the frozen initial student's (`'frozen'`)."""

    def __init__(self, student, teacher, frozen_student=None, alpha: float = 0.68, topk: int = 100,
                 ema_tau: float = 0.9999, ema_every: int = 2, flip_source: str = "current", **kw):
        super().__init__(student, teacher, alpha=alpha, topk=topk, frozen_student=frozen_student, **kw)
        MCL.check(ema_tau=ema_tau, ema_every=ema_every, flip_source=flip_source)
        if flip_source == "frozen" and frozen_student is None:
            raise UserError("MCL with method.flip_source=frozen needs the frozen initial student (frozen_student)")
        self.tau, self.every, self.flip_source = float(ema_tau), int(ema_every), flip_source
        self.slow = copy.deepcopy(student)
        for p in self.slow.parameters():
            p.requires_grad_(False)

    @classmethod
    def needs_for(cls, hparams: dict):
        """The frozen initial student only for the flips of `flip_source='frozen'` (default 'current': none)."""
        needs = super().needs_for(hparams)
        return needs | {"frozen_student"} if hparams.get("flip_source", "current") == "frozen" else needs

    @classmethod
    def check(cls, **hp) -> None:
        super().check(**hp)  # ema_tau, ema_every: base.HPARAM_RULES
        if "flip_source" in hp:
            check_flip_source(hp["flip_source"])

    def loss(self, batch):
        y = batch.targets
        if self.flip_source == "frozen":
            zs, zt, flip_logits, mixed = self.three_logits(batch)
        else:  # no frozen forward needed
            x, mixed = self.mix(batch)
            zt = self.teacher.logits(x, batch.ids, use_cache=not mixed)
            zs = self.student(x)
            flip_logits = zs.detach()
        _, neg = flip_masks(zt, flip_logits, y)
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
