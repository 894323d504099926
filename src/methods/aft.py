"""Adaptive Feature Transfer (Qiu et al. 2024) and its baselines, as Methods (docs/REFERENCE.md §2.2-§2.4).

Every method here trains the downstream model ("student") with cross-entropy plus `prec` (beta) times a
regulariser towards fixed per-sample features phi of one or more pretrained models, looked up by the batch's sample
index in a `FeatureTable` (the pretrained models' pooled penultimate features on the training split, concatenated
along dim 1; computed once without augmentation). Standard transfer learning (`init`) is plain CE
(`src.methods.base.CrossEntropy`).

- `AFT`: phi scaled per dimension by sigmoid(s) (s learnable, init 0, own param group with lr `prior_lr`), both
  feature sets centred over the batch and row-normalised; R = sqrt(mean((K_f - K_phi)^2) + 1e-8) with linear (or RBF
  exp(-||x_i - x_j||^2)) kernels, or (kernel=none) the MSE of a learned linear map f -> phi; scales=dense replaces
  sigmoid(s) by a learned d_phi x d_phi matrix, initialised randn / sqrt(d_phi) (global RNG, seeded by the trainer).
  Source followed: amazon-science/adaptive-feature-transfer `prior.py` (KernelPrior: kernel, kernel_rbf,
  kernel_dense; KDPrior; BTunePrior).
- `FeatureKD`: a linear layer predicts phi from f; MSE.
- `BTuning`: LogME posterior weights m_i and scores of each pretrained model; target = sum_i softmax(score/T)_i *
  phi_i m_i (no gradient), prediction f m_down with m_down from LogME on the downstream model's initial features.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import check
from ..metrics.logme import logme
from .base import Method

KERNELS = ("linear", "rbf", "none")
SCALES = ("diag", "dense")


@dataclass
class FeatureTable:
    """Per-sample features of the pretrained models over the training split, rows indexed by sample id."""

    phi: torch.Tensor  # (N_full, d_phi): the models' features side by side (rows of absent ids are zero)
    dims: List[int]  # width of each model's block in phi
    names: List[str]  # the models, in block order
    ids: torch.Tensor  # ids of the training split's samples (LogME fits on these rows only)
    labels: torch.Tensor  # (N_full,) labels by sample id
    student: Optional[torch.Tensor] = None  # (N_full, d_f) the downstream model's initial features (B-Tuning)

    def blocks(self, rows: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        phi = self.phi if rows is None else self.phi[rows]
        return list(torch.split(phi, self.dims, dim=1))


def centre_normalise(x: torch.Tensor) -> torch.Tensor:
    """Centre each dimension over the batch, then L2-normalise each row."""
    return F.normalize(x - x.mean(0, keepdim=True), dim=1)


def kernel_matrix(x: torch.Tensor, kind: str) -> torch.Tensor:
    """B x B kernel of centred, row-normalised features: linear x x^T or RBF exp(-||x_i - x_j||^2) (bandwidth as the
    public `prior.py`, no 1/2)."""
    k = x @ x.T
    if kind == "rbf":  # ||x_i - x_j||^2 = |x_i|^2 + |x_j|^2 - 2 x_i.x_j (rows are unit, or 0 if centred to 0)
        sq = k.diagonal()
        return torch.exp(-(sq[:, None] + sq[None, :] - 2 * k).clamp_min(0))
    return k


def kernel_distance(f: torch.Tensor, phi: torch.Tensor, kind: str = "linear") -> torch.Tensor:
    """R = sqrt(mean((K_f - K_phi)^2) + 1e-8) of the centred, row-normalised batches f (B x d_f), phi (B x d_phi)."""
    kf = kernel_matrix(centre_normalise(f.float()), kind)
    kp = kernel_matrix(centre_normalise(phi.float()), kind)
    return torch.sqrt(((kf - kp) ** 2).mean() + 1e-8)


class _FeatureMethod(Method):
    """CE + prec * regulariser(f, phi[idx]); the feature table stays out of the state dict (it is an input)."""

    name = "features"
    needs = frozenset({"feature_table"})
    modalities = frozenset({"image", "text"})  # pooled features, logits and the table rows by id only

    def __init__(self, student: nn.Module, features: FeatureTable, prec: float = 10.0, **kw):
        super().__init__(student, **kw)
        _FeatureMethod.check(prec=prec)  # base.HPARAM_RULES
        self.prec = float(prec)
        self.table = features
        self.phi_table = features.phi.float()
        self.d_f = int(getattr(student, "num_features"))
        self.d_phi = int(self.phi_table.shape[1])

    def _phi(self, idx: torch.Tensor) -> torch.Tensor:
        if self.phi_table.device != idx.device:
            self.phi_table = self.phi_table.to(idx.device)
        return self.phi_table.index_select(0, idx)

    def regulariser(self, f, idx) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, batch):
        y, idx = batch.targets, batch.ids
        f, z = self.student.features_and_logits(batch.inputs)
        ce = F.cross_entropy(z.float(), y)
        with torch.autocast(f.device.type, enabled=False):  # kernels / LogME heads in fp32 under bf16/fp16 AMP
            reg = self.regulariser(f.float(), idx)
        return ce + self.prec * reg, {"ce": ce.detach(), "reg": reg.detach(),
                                      "acc": 100 * (z.detach().argmax(1) == y).float().mean()}  # %


class AFT(_FeatureMethod):
    """CE + prec * kernel distance between the downstream features and the adaptively scaled pretrained ones."""

    name = "aft"

    def __init__(self, student: nn.Module, features: FeatureTable, prec: float = 10.0, kernel: str = "linear",
                 scales: str = "diag", learn_scales: bool = True, prior_lr: float = 1e-2, **kw):
        super().__init__(student, features, prec, **kw)
        AFT.check(kernel=kernel, scales=scales, prior_lr=prior_lr)  # prior_lr: base.HPARAM_RULES
        self.kernel, self.scales, self.prior_lr = kernel, scales, float(prior_lr)
        self.learn_scales = bool(learn_scales)
        if scales == "diag":  # sigmoid(0) = 0.5: every pretrained dimension starts with the same weight
            self.s = nn.Parameter(torch.zeros(self.d_phi), requires_grad=self.learn_scales)
        else:  # a random start, as the public kernel_dense prior
            self.s = nn.Parameter(torch.randn(self.d_phi, self.d_phi) / self.d_phi ** 0.5,
                                  requires_grad=self.learn_scales)
        self.map = nn.Linear(self.d_f, self.d_phi) if kernel == "none" else None

    @classmethod
    def check(cls, **hp) -> None:
        """(A None value counts as not given: main_aft's early validation shares these rules.)"""
        super().check(**hp)
        kernel, scales = hp.get("kernel"), hp.get("scales")
        if kernel is not None:
            check(kernel in KERNELS, f"method.kernel='{kernel}' is unknown: use one of {', '.join(KERNELS)}")
        if scales is not None:
            check(scales in SCALES, f"method.scales='{scales}' is unknown: use one of {', '.join(SCALES)}")

    def scaled_phi(self, phi: torch.Tensor) -> torch.Tensor:
        return phi * torch.sigmoid(self.s) if self.scales == "diag" else phi @ self.s

    def regulariser(self, f, idx):
        phi = self.scaled_phi(self._phi(idx))
        if self.kernel == "none":
            return ((self.map(centre_normalise(f)) - centre_normalise(phi)) ** 2).sum(1).mean()
        return kernel_distance(f, phi, self.kernel)

    def param_groups(self) -> List[Dict]:
        rest = [p for n, p in self.named_parameters() if n != "s"]
        return [{"params": rest}, {"params": [self.s], "lr": self.prior_lr, "weight_decay": 0.0}]

    def scale_summary(self) -> Dict[str, float]:
        """sigmoid(s) (diag), or the norm of each pretrained dimension's column of the matrix (dense)."""
        w = torch.sigmoid(self.s.detach()) if self.scales == "diag" else self.s.detach().norm(dim=1)
        return {"scales_mean": float(w.mean()), "scales_min": float(w.min()), "scales_max": float(w.max())}


class FeatureKD(_FeatureMethod):
    """Feature distillation baseline: CE + prec * MSE(W f + b, phi), W a learned linear layer."""

    name = "kd"

    def __init__(self, student: nn.Module, features: FeatureTable, prec: float = 10.0, **kw):
        super().__init__(student, features, prec, **kw)
        self.map = nn.Linear(self.d_f, self.d_phi)

    def regulariser(self, f, idx):
        return F.mse_loss(self.map(f), self._phi(idx))


class BTuning(_FeatureMethod):
    """B-Tuning (You et al. 2022): CE + prec * MSE(f m_down, sum_i w_i phi_i m_i), w = softmax(LogME score / T).
    The LogME fits (per pretrained model, and on the downstream model's initial features) run once here."""

    name = "btune"
    needs = frozenset({"feature_table", "student_features"})  # the table holds the student's initial features

    def __init__(self, student: nn.Module, features: FeatureTable, prec: float = 10.0, temperature: float = 0.1,
                 **kw):
        super().__init__(student, features, prec, **kw)
        BTuning.check(temperature=temperature)  # base.HPARAM_RULES
        check(features.student is not None, "B-Tuning needs the downstream model's initial features")
        ids = features.ids.long()
        y = features.labels[ids]
        c = int(getattr(student, "num_classes"))
        fits = [logme(b, y, c) for b in features.blocks(ids)]
        self.scores = torch.tensor([r.score for r in fits], dtype=torch.float64)
        self.model_weights = torch.softmax(self.scores / temperature, 0)
        target = sum(w * (b.double() @ r.weights)
                     for w, b, r in zip(self.model_weights, features.blocks(), fits))
        self.target_table = target.float()  # (N_full, C), fixed: no gradient into the target
        self.register_buffer("m_down", logme(features.student[ids], y, c).weights.float())

    def regulariser(self, f, idx):
        if self.target_table.device != idx.device:
            self.target_table = self.target_table.to(idx.device)
        return F.mse_loss(f @ self.m_down, self.target_table.index_select(0, idx))
