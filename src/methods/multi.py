"""Multiple teachers (Fantastic Gains, docs/REFERENCE.md §1.11; ensembles, docs/REFERENCE.md §5.2).

- `MultiKLDP`: parallel KL+DP. Per sample, the KL target is the distribution of the most confident of
  {frozen student, teacher_1..M}: true-label probability (`most-conf`) or, without labels, max probability
  (`most-conf_u`). Vectorised: logits stacked (M+1, B, K), argmax of confidence over sources per sample, targets
  gathered. Ties go to the frozen student (then to the earlier teacher).
- `EnsembleTeacher`: M models behind one module whose logits are log(mean softmax), so the single-teacher
  methods (KL, KL+DP) distil an ensemble unchanged.
- `uniform_soup` / `recompute_bn_stats`: a uniform weight average of students distilled from each teacher
  separately, and batch-norm statistics recomputed on data after averaging.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from ..batch import Batch
from ..errors import UserError, check
from .base import FrozenOutputs
from .kd import KL, PARTITIONS, check_partition, kl_to_target

MULTI_PARTITIONS = ("most-conf", "most-conf_u")


def mean_softmax_logits(logits: torch.Tensor) -> torch.Tensor:
    """(M, B, K) member logits -> (B, K) log of the mean of the members' softmax (a valid logit vector: its
    softmax is the mean softmax)."""
    return torch.logsumexp(logits.float().log_softmax(-1), dim=0) - math.log(logits.shape[0])


def multi_route(teacher_logits: torch.Tensor, frozen_logits: torch.Tensor, labels: Optional[torch.Tensor],
                partition: str = "most-conf") -> torch.Tensor:
    """Per sample, the index of the KL target's source: 0 = frozen student, i = teacher i (1-based).

    teacher_logits: (M, B, K) (or a list of M (B, K)); frozen_logits: (B, K). `most-conf` compares the softmax
    probability of the true label, `most-conf_u` the max softmax probability (no labels). Ties go to the lower
    index, i.e. the frozen student first (as in `dp_route`)."""
    if partition not in MULTI_PARTITIONS:
        raise UserError(f"partition='{partition}' is not available with several teachers: use one of "
                        f"{', '.join(MULTI_PARTITIONS)}")
    if isinstance(teacher_logits, (list, tuple)):
        teacher_logits = torch.stack(list(teacher_logits))
    probs = torch.cat([frozen_logits[None].float(), teacher_logits.float()]).softmax(-1)  # (M+1, B, K)
    if partition == "most-conf_u":
        conf = probs.max(-1).values
    else:
        if labels is None:
            raise UserError("partition='most-conf' needs labels: use most-conf_u for unsupervised transfer")
        idx = labels.view(1, -1, 1).expand(probs.shape[0], -1, 1)
        conf = probs.gather(-1, idx).squeeze(-1)  # (M+1, B)
    return conf.argmax(0)  # first maximum: ties go to the frozen student


def route_shares(source: torch.Tensor, num_teachers: int) -> torch.Tensor:
    """Share (0-1) of samples routed to each source: (M+1,), index 0 = frozen student."""
    return torch.bincount(source, minlength=num_teachers + 1).float() / max(1, source.numel())


class MultiKLDP(KL):
    """Parallel multi-teacher KL+DP: per sample, T^2 KL(p_source^T || p_student^T) where the source is the most
    confident of the frozen student and the teachers (see `multi_route`). Logs the share of each batch sent to the
    frozen student and to each teacher (`route_<name>`)."""

    _FROZEN = KL._FROZEN + ("teachers.",)
    needs = frozenset({"teachers", "frozen_student"})

    def __init__(self, student, teachers: Sequence[nn.Module], frozen_student, partition: str = "most-conf",
                 teacher_caches: Optional[Sequence[Optional[Dict[str, torch.Tensor]]]] = None,
                 frozen_student_cache=None, names: Optional[Sequence[str]] = None, **kw):
        if frozen_student is None:
            raise UserError("multi-teacher KL+DP needs the frozen initial student (frozen_student)")
        teachers = list(teachers)
        check(len(teachers) >= 1, "multi-teacher KL+DP needs at least one teacher")
        MultiKLDP.check(partition=partition)
        super().__init__(student, None, frozen_student=frozen_student, frozen_student_cache=frozen_student_cache,
                         **kw)
        MultiKLDP.check(topk=self.topk)
        caches = list(teacher_caches) if teacher_caches is not None else [None] * len(teachers)
        check(len(caches) == len(teachers), f"{len(caches)} teacher caches for {len(teachers)} teachers")
        self.teachers = nn.ModuleList([FrozenOutputs(t, c) for t, c in zip(teachers, caches)])
        self.partition = partition
        self.names = list(names) if names is not None else [f"teacher{i + 1}" for i in range(len(teachers))]
        check(len(self.names) == len(teachers), f"{len(self.names)} names for {len(teachers)} teachers")

    @classmethod
    def check(cls, **hp) -> None:
        super().check(**hp)
        p = hp.get("partition", MULTI_PARTITIONS[0])
        if p in PARTITIONS and p not in MULTI_PARTITIONS:  # a single-teacher partition: say so
            raise UserError(f"method.partition='{p}' is not available with several teachers: use one of "
                            f"{', '.join(MULTI_PARTITIONS)}")
        check_partition(p, MULTI_PARTITIONS)  # otherwise unknown: the closest multi-teacher ones
        # stricter than the table's topk >= 0: `loss` takes the KL over all classes, a topk would be ignored
        check(hp.get("topk", 0) == 0, "method.topk is not supported by multi-teacher KL+DP: remove it")

    def frozen_modules(self) -> List[FrozenOutputs]:
        return [*self.teachers, self.frozen_student]

    def loss(self, batch):
        y, idx = batch.targets, batch.ids
        x, mixed = self.mix(batch)
        zt = torch.stack([t.logits(x, idx, use_cache=not mixed) for t in self.teachers])  # (M, B, K)
        zf = self.frozen_student.logits(x, idx, use_cache=not mixed)
        zs = self.student(x)  # after the frozen forwards (see KL.three_logits)
        partition = "most-conf_u" if mixed else self.partition  # mixed inputs have no single label
        src = multi_route(zt, zf, None if partition == "most-conf_u" else y, partition)
        cand = torch.cat([zf[None], zt])  # (M+1, B, K)
        chosen = cand[src, torch.arange(cand.shape[1], device=cand.device)]  # (B, K)
        kl = kl_to_target(zs, (chosen.float() / self.T).softmax(1), self.T)
        loss, logs = self.combine(kl, zs, y, mixed)
        shares = route_shares(src, len(self.teachers))
        logs["route_student"] = shares[0]
        for i, n in enumerate(self.names):
            logs[f"route_{n}"] = shares[i + 1]
        return loss, logs


class EnsembleTeacher(nn.Module):
    """An ensemble of classifiers as one teacher: `forward` returns log of the members' mean softmax, so its
    softmax at T = 1 is the ensemble's predictive distribution. `features_and_logits` concatenates the members'
    penultimate features (for feature-based methods)."""

    def __init__(self, members: Iterable[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(list(members))
        check(len(self.members) >= 1, "an ensemble needs at least one member")

    @property
    def num_classes(self) -> int:
        return int(getattr(self.members[0], "num_classes"))

    @property
    def num_features(self) -> int:
        return sum(int(getattr(m, "num_features")) for m in self.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mean_softmax_logits(torch.stack([m(x).float() for m in self.members]))

    def features_and_logits(self, x: torch.Tensor):
        fz = [m.features_and_logits(x) for m in self.members]
        return (torch.cat([f.float() for f, _ in fz], 1),
                mean_softmax_logits(torch.stack([z.float() for _, z in fz])))


# ------------------------------------------------------------------------------------------------ model soups


@torch.no_grad()
def uniform_soup(models: Sequence[nn.Module]) -> Dict[str, torch.Tensor]:
    """State dict of the uniform average of `models` (same architecture). Floating-point entries (weights, BN
    running statistics) are averaged; integer buffers (num_batches_tracked) are taken from the first model."""
    check(len(models) >= 1, "a soup needs at least one model")
    states = [m.state_dict() for m in models]
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if list(s) != keys or any(s[k].shape != states[0][k].shape for k in keys):
            raise UserError(f"soup member {i} does not have the architecture of member 0: a soup averages "
                            f"students of one architecture")
    out = {}
    for k in keys:
        v = states[0][k]
        out[k] = (torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point()
                  else v.clone())
    return out


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable) -> int:
    """Reset every batch-norm layer's running statistics and re-estimate them as exact averages (momentum None)
    over `batches` (`src.batch.Batch`es, e.g. a loader's `iter_epoch(0)`, or input tensors) with the model in
    train mode; returns the number of samples seen. Weights are unchanged. Averaged weights change the
    activations' statistics, so a soup needs this."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    was = model.training
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average = exact mean over the batches
    model.train()
    n = 0
    for batch in batches:
        if isinstance(batch, Batch):
            model(batch.inputs)
            n += len(batch)
        else:
            model(batch)
            n += batch.shape[0]
    for bn, m in zip(bns, saved):
        bn.momentum = m
    model.train(was)
    return n
