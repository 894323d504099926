"""Feature-based transfer baselines of Fantastic Gains: CD (in-batch similarity distributions) and CRD
(contrastive representation distillation with memory banks, Tian et al. 2020)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError, check
from .base import Method
from .kd import kl_to_target


def similarity_kl(fs: torch.Tensor, ft: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean over anchors of KL(P_t || P_s), P = softmax over the other batch samples of cosine similarity / gamma
    (the diagonal is excluded)."""
    b = fs.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=fs.device)
    ss = (F.normalize(fs.float(), dim=1) @ F.normalize(fs.float(), dim=1).T / gamma).masked_fill(eye, -1e9)
    st = (F.normalize(ft.float(), dim=1) @ F.normalize(ft.float(), dim=1).T / gamma).masked_fill(eye, -1e9)
    pt = st.softmax(1)
    return (torch.special.xlogy(pt, pt) - pt * ss.log_softmax(1)).masked_fill(eye, 0).sum(1).mean()


def logit_terms(loss, logs, zs, zt, y, T: float, kd_weight: float, ce_weight: float):
    """Add the optional logit terms of the feature methods: kd_weight * T^2 KL(p_t || p_s) + ce_weight * CE."""
    if kd_weight:
        kd = kl_to_target(zs, (zt / T).softmax(1), T).mean()
        loss = loss + kd_weight * kd
        logs["kl"] = kd.detach()
    if ce_weight:
        ce = F.cross_entropy(zs.float(), y)
        loss = loss + ce_weight * ce
        logs["ce"] = ce.detach()
    return loss, logs


class CD(Method):
    """beta * KL between the in-batch feature-similarity distributions of teacher and student (temperature
    gamma), plus `kd_weight` * logit KL and `ce_weight` * CE (both 0 by default)."""

    def __init__(self, student, teacher, beta: float = 10.0, gamma: float = 0.1, kd_weight: float = 0.0,
                 ce_weight: float = 0.0, temperature: float = 1.0, **kw):
        super().__init__(student, teacher, **kw)
        check(gamma > 0, f"method.gamma={gamma} must be > 0")
        check(temperature > 0, f"method.temperature={temperature} must be > 0")
        self.beta, self.gamma, self.kd_w, self.ce_w, self.T = beta, gamma, kd_weight, ce_weight, temperature

    def loss(self, batch):
        x, y, idx = batch
        x, mixed = self.mix(x)
        ft, zt = self.teacher.features_and_logits(x, idx, use_cache=not mixed)  # frozen first (KL.three_logits)
        fs, zs = self.student.features_and_logits(x)
        cd = similarity_kl(fs, ft, self.gamma)
        return logit_terms(self.beta * cd, {"cd": cd.detach()}, zs, zt, y, self.T, self.kd_w, self.ce_w)


class _Embed(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x):
        return F.normalize(self.fc(x.float()), dim=1)


class CRD(Method):
    """Contrastive representation distillation: student and teacher penultimate features embedded to
    `feat_dim` (128) and contrasted against `num_negatives` (4096) memory-bank entries with NCE (temperature
    nce_t 0.07, bank momentum 0.5), in both directions; plus `kd_weight` * T^2 KL at T = 4 and `ce_weight` * CE.
    Memory banks hold one entry per training sample (`num_samples`, from the batch's sample index)."""

    def __init__(self, student, teacher, num_samples: int, feat_dim: int = 128, num_negatives: int = 4096,
                 nce_t: float = 0.07, momentum: float = 0.5, temperature: float = 4.0, crd_weight: float = 0.8,
                 kd_weight: float = 1.0, ce_weight: float = 0.0, **kw):
        super().__init__(student, teacher, **kw)
        check(num_samples > 0, "CRD needs the number of training samples (num_samples)")
        check(num_negatives > 0, f"method.num_negatives={num_negatives} must be > 0")
        check(nce_t > 0 and temperature > 0, "method.nce_t and method.temperature must be > 0")
        check(0 <= momentum < 1, f"method.momentum={momentum} must be in [0, 1)")
        if self.mixup_alpha > 0:
            raise UserError("CRD contrasts per-sample memory entries: mixup_alpha must be 0")
        if self.synth_ratio > 0:
            raise UserError("CRD contrasts per-sample memory entries: method.synth_ratio must be 0")
        self.n, self.k, self.nce_t, self.m = int(num_samples), int(num_negatives), nce_t, momentum
        self.T, self.crd_w, self.kd_w, self.ce_w = temperature, crd_weight, kd_weight, ce_weight
        self.embed_s = _Embed(student.num_features, feat_dim)
        self.embed_t = _Embed(teacher.num_features, feat_dim)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("memory_s", torch.rand(self.n, feat_dim, generator=g).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(self.n, feat_dim, generator=g).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        self._z_ready = {}

    def _nce(self, anchor, memory, idx, neg_idx, z):
        """NCE loss of `anchor` against memory rows [idx, neg_idx...]; sets the normalisation constant z on the
        first call (CRD: mean(exp(.)) * n_data)."""
        rows = torch.cat([idx[:, None], neg_idx], 1)  # (B, K+1)
        w = memory[rows]  # (B, K+1, D)
        out = torch.exp(torch.bmm(w, anchor[:, :, None]).squeeze(2) / self.nce_t)
        if not self._z_ready.get(id(z), False):  # one host sync per bank until z is set (or restored)
            if z.item() < 0:
                z.fill_((out.mean() * self.n).detach().item())
            self._z_ready[id(z)] = True
        out = out / z
        pn = 1.0 / self.n
        eps = 1e-7
        p_pos = out[:, 0]
        log_d1 = torch.log(p_pos / (p_pos + self.k * pn + eps))
        p_neg = out[:, 1:]
        log_d0 = torch.log((self.k * pn) / (p_neg + self.k * pn + eps))
        return -(log_d1.sum() + log_d0.sum()) / anchor.shape[0]

    def loss(self, batch):
        x, y, idx = batch
        ft, zt = self.teacher.features_and_logits(x, idx)  # frozen first (KL.three_logits)
        fs, zs = self.student.features_and_logits(x)
        vs, vt = self.embed_s(fs), self.embed_t(ft)
        neg = torch.randint(0, self.n, (x.shape[0], self.k), device=x.device)
        crd = self._nce(vs, self.memory_t, idx, neg, self.z_s) + self._nce(vt, self.memory_s, idx, neg, self.z_t)
        with torch.no_grad():
            for mem, v in ((self.memory_s, vs), (self.memory_t, vt)):
                mem[idx] = F.normalize(mem[idx] * self.m + v.detach() * (1 - self.m), dim=1)
        return logit_terms(self.crd_w * crd, {"crd": crd.detach()}, zs, zt, y, self.T, self.kd_w, self.ce_w)
