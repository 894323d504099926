"""KDEP (He et al., CVPR 2022): knowledge distillation as efficient pre-training. The student regresses the
teacher's pooled pre-ReLU features after a NON-parametric alignment (docs/REFERENCE.md §3.2-§3.4):

- SVD alignment: mu = mean of the teacher's features over the distillation data, V = right singular vectors of
  the centred features; target = (f_t - mu) V[:, :d_student] (no learnable parameter);
- PTS (power temperature scaling) of the projected target only: sign(x) |x / T|^(1/p), T = 0.1, p = 3;
- loss = loss_w * MSE(f_s, PTS(target)) (+ kl_w * KD on logits + ce_w * CE on labels, both 0 by default, so no
  labels are needed).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError, check
from ..models.hooks import pre_activation_features
from .base import Method


def svd_basis(features: torch.Tensor) -> Dict[str, torch.Tensor]:
    """{'mu': (D,), 'V': (D, k) right singular vectors by decreasing singular value, 'S': (k,)}, k = min(N, D),
    from teacher features (N, D); computed in float64."""
    f = features.double()
    mu = f.mean(0)
    _, s, vh = torch.linalg.svd(f - mu, full_matrices=False)
    return {"mu": mu.float(), "V": vh.T.contiguous().float(), "S": s.float()}


def check_dims(d_student: int, d_teacher: int, n_basis: int, teacher: str = "teacher", student: str = "student"):
    """The SVD projection keeps d_student of the teacher's directions: it needs d_student <= d_teacher (and as
    many basis vectors, i.e. at least d_student distillation images)."""
    if d_student > d_teacher:
        raise UserError(f"student {student} has {d_student}-d pre-ReLU features but teacher {teacher} only "
                        f"{d_teacher}: KDEP's SVD projection needs d_student <= d_teacher; pick a wider teacher "
                        f"or a narrower student")
    if d_student > n_basis:
        raise UserError(f"the SVD basis has only {n_basis} directions (fewer distillation images than features) "
                        f"but the student needs {d_student}: use more upstream data (dataset.subset)")


def project(f_t: torch.Tensor, mu: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(f_t - mu) V: teacher features in the student's dimension (v already cut to d_student columns)."""
    return (f_t.float() - mu) @ v


def pts(x: torch.Tensor, temperature: float = 0.1, power: float = 3.0) -> torch.Tensor:
    """Power temperature scaling: sign(x) * |x / T|^(1/p)."""
    return torch.sign(x) * torch.abs(x / temperature).pow(1.0 / power)


class KDEP(Method):
    """Feature distillation onto the student's pooled pre-ReLU features. The teacher's projection basis (mu, V)
    is set with `set_basis` before training (computed once over the distillation data, see experiments/kdep.py);
    teacher features come from the per-sample cache key 'prerelu' when inputs are not augmented."""

    needs = frozenset({"teacher"})

    def __init__(self, student: nn.Module, teacher: nn.Module, loss_w: float = 3.0, pts_t: float = 0.1,
                 pts_p: float = 3.0, kl_w: float = 0.0, ce_w: float = 0.0, kd_t: float = 4.0, **kw):
        super().__init__(student, teacher, **kw)
        KDEP.check(loss_w=loss_w, pts_t=pts_t, pts_p=pts_p, kl_w=kl_w, ce_w=ce_w, kd_t=kd_t)  # base.HPARAM_RULES
        self.loss_w, self.pts_t, self.pts_p = float(loss_w), float(pts_t), float(pts_p)
        self.kl_w, self.ce_w, self.kd_t = float(kl_w), float(ce_w), float(kd_t)
        self.register_buffer("mu", torch.zeros(0), persistent=False)
        self.register_buffer("V", torch.zeros(0, 0), persistent=False)

    @classmethod
    def check(cls, **hp) -> None:
        """One UserError per bad hyper-parameter (also run on the config before any data work); the ranges of
        loss_w, pts_t, pts_p, kl_w, ce_w, kd_t are base.HPARAM_RULES'. main_kdep has no source of synthetic
        images: synth_ratio / synth_source are not KDEP parameters."""
        for k in ("synth_ratio", "synth_source"):
            check(k not in hp, f"method {cls.__name__} has no parameter {k}: remove method.{k}")
        super().check(**hp)

    def set_basis(self, mu: torch.Tensor, v: torch.Tensor) -> "KDEP":
        """mu (D_t,), V (D_t, d_student): the projection of the teacher's features onto the student's width."""
        self.mu, self.V = mu.float().to(self.mu.device), v.float().contiguous().to(self.V.device)
        return self

    def target(self, f_teacher: torch.Tensor) -> torch.Tensor:
        check(self.V.numel() > 0, "KDEP needs its SVD basis: call set_basis(mu, V) before training")
        return pts(project(f_teacher, self.mu, self.V), self.pts_t, self.pts_p)

    def teacher_prerelu(self, x, idx) -> Tuple[torch.Tensor, torch.Tensor]:
        """(teacher pre-ReLU pooled features, teacher logits or None) from the cache or one frozen forward."""
        t = self.teacher
        f = t._cached("prerelu", idx, True)
        z = t._cached("logits", idx, True) if self.kl_w > 0 else None
        if f is None or (self.kl_w > 0 and z is None):
            with torch.no_grad():
                f, z = pre_activation_features(t.model, x)
        return f.float(), (z.float() if z is not None else None)

    def feature_loss(self, f_student: torch.Tensor, f_teacher: torch.Tensor) -> torch.Tensor:
        check(f_student.shape[1] == self.V.shape[1], f"{f_student.shape[1]}-d student features but the basis "
                                                     f"projects to {self.V.shape[1]}: set_basis(mu, V[:, :d_student])")
        return self.loss_w * F.mse_loss(f_student.float(), self.target(f_teacher))

    def loss(self, batch):
        x, y = batch.inputs, batch.targets
        f_t, z_t = self.teacher_prerelu(x, batch.ids)
        f_s, z_s = pre_activation_features(self.student, x)
        feat = self.feature_loss(f_s, f_t)
        loss, logs = feat, {"feat_loss": feat.detach()}
        if self.kl_w > 0:
            kd = F.kl_div(F.log_softmax(z_s.float() / self.kd_t, 1), F.log_softmax(z_t / self.kd_t, 1),
                          log_target=True, reduction="batchmean") * self.kd_t ** 2
            loss, logs["kl"] = loss + self.kl_w * kd, kd.detach()
        if self.ce_w > 0:
            ce = F.cross_entropy(z_s.float(), y)
            loss, logs["ce"] = loss + self.ce_w * ce, ce.detach()
        return loss, logs
