"""Feature-based transfer baselines of Fantastic Gains: CD (in-batch similarity distributions) and CRD
(contrastive representation distillation with memory banks, Tian et al. 2020); docs/REFERENCE.md §1.7, §1.8.

Source followed: ExplainableML/FantasticGains `main_distillation.py: contrastive_distill` (total loss
`gamma * CE + alpha * KL + beta * feature loss`; here `ce_weight`, `kd_weight`, `beta` / `crd_weight`),
`SimpleContrastloss.py`, `CRDloss.py`, `data.py: get_cls_pos_neg / get_contrast_idx` and the configs
`cd_dist.yaml` (alpha 0, beta 10, gamma 0.1), `crd_dist.yaml` (alpha 0, beta 0.8, gamma 1); CRD's NCE maths and
memory bank are HobbitLong/RepDistiller's."""
from __future__ import annotations

import math
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError, check
from .base import Method
from .kd import kl_to_target


def similarity_kl(fs: torch.Tensor, ft: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Sum over anchors i and samples j of P_t[i, j] log(P_t[i, j] / P_s[i, j]), P[i] = softmax over *all* batch
    samples j (the self-similarity diagonal included) of cosine similarity / temperature (public code: no
    temperature, i.e. 1; `F.kl_div(..., reduction='sum')`)."""
    ns, nt = F.normalize(fs.float(), dim=1), F.normalize(ft.float(), dim=1)
    log_ps = (ns @ ns.T / temperature).log_softmax(1)
    log_pt = (nt @ nt.T / temperature).log_softmax(1)
    return (log_pt.exp() * (log_pt - log_ps)).sum()


def logit_terms(loss, logs, zs, zt, y, T: float, kd_weight: float, ce_weight: float):
    """Add the optional logit terms of the feature methods: kd_weight * T^2 KL(p_t || p_s) + ce_weight * CE (on
    logits, mean over the batch)."""
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
    """ce_weight (0.1) * CE + beta (10) * CD + kd_weight (0) * T^2 KL(p_t || p_s), CD = `similarity_kl` of the
    penultimate features (summed over anchors, diagonal kept, similarity temperature `sim_temperature` 1), as
    the public `contrastive_distill` with `cd_dist.yaml` (its gamma 0.1 is the CE weight, not a temperature)."""

    needs = frozenset({"teacher", "features"})  # the teacher's cached outputs hold its features
    modalities = frozenset({"image", "text"})  # pooled (B, D) features and logits only

    def __init__(self, student, teacher, beta: float = 10.0, ce_weight: float = 0.1, kd_weight: float = 0.0,
                 temperature: float = 1.0, sim_temperature: float = 1.0, **kw):
        super().__init__(student, teacher, **kw)
        CD.check(sim_temperature=sim_temperature, temperature=temperature)  # temperature: base.HPARAM_RULES
        self.beta, self.kd_w, self.ce_w, self.T = beta, kd_weight, ce_weight, temperature
        self.sim_T = float(sim_temperature)

    @classmethod
    def check(cls, **hp) -> None:
        super().check(**hp)
        if "sim_temperature" in hp:  # CD's own key (cosine similarities / T): not in base.HPARAM_RULES
            check(hp["sim_temperature"] > 0, f"method.sim_temperature={hp['sim_temperature']} must be > 0: use 1.0 "
                                             f"(public code)")

    def loss(self, batch):
        y = batch.targets
        x, mixed = self.mix(batch)
        ft, zt = self.teacher.features_and_logits(x, batch.ids, use_cache=not mixed)  # frozen first (KL.three_logits)
        fs, zs = self.student.features_and_logits(x)
        cd = similarity_kl(fs, ft, self.sim_T)
        return logit_terms(self.beta * cd, {"cd": cd.detach()}, zs, zt, y, self.T, self.kd_w,
                           0.0 if mixed else self.ce_w)


class NegativeSampler(nn.Module):
    """Draws CRD negatives as the public `get_contrast_idx`: per anchor, `k` sample ids uniformly with
    replacement from the training samples of the *other* classes (never the anchor's class, so never the
    positive). Vectorised: the ids are sorted by class; a uniform position in [0, n - n_c) skips the block of
    class c."""

    def __init__(self, sample_labels: torch.Tensor):
        super().__init__()
        labels = torch.as_tensor(sample_labels, dtype=torch.long)
        ids = torch.nonzero(labels >= 0).flatten()
        cls = labels[ids]
        order = torch.argsort(cls, stable=True)
        c = int(cls.max()) + 1 if cls.numel() else 1
        count = torch.bincount(cls, minlength=c)
        check(int((count > 0).sum()) >= 2, "CRD draws negatives from other classes: the training split needs at "
              "least two classes")
        self.register_buffer("ids_by_class", ids[order], persistent=False)
        self.register_buffer("start", torch.cumsum(count, 0) - count, persistent=False)
        self.register_buffer("count", count, persistent=False)
        self.register_buffer("labels", labels, persistent=False)

    @property
    def n(self) -> int:
        return int(self.ids_by_class.numel())

    def forward(self, idx: torch.Tensor, k: int) -> torch.Tensor:
        """(B, k) negative sample ids for the anchors `idx` (sample ids)."""
        c = self.labels[idx]
        n_c, s_c = self.count[c][:, None], self.start[c][:, None]
        u = torch.rand(idx.shape[0], k, device=idx.device, dtype=torch.float64)
        r = torch.minimum((u * (self.n - n_c)).long(), self.n - n_c - 1)  # guard against rounding up to the bound
        pos = torch.where(r < s_c, r, r + n_c)
        return self.ids_by_class[pos]


class _Embed(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x):
        return F.normalize(self.fc(x.float()), dim=1)


class CRD(Method):
    """ce_weight (1) * CE + crd_weight (0.8) * CRD + kd_weight (0) * T^2 KL at T = 4 (unused at weight 0), as the
    public `contrastive_distill` with `crd_dist.yaml`. CRD: student and teacher penultimate features embedded to
    `feat_dim` (128) and contrasted with NCE (temperature nce_t 0.07, bank momentum 0.5), in both directions,
    against the positive's memory-bank entry and `num_negatives` (4096) entries drawn uniformly with replacement
    from the training samples of *other classes* (`NegativeSampler`, public `get_contrast_idx`). Memory banks hold
    one entry per sample id; `sample_labels` (N_full,) gives each training sample's label by id (-1: not in the
    training split); the NCE constants use n_data = the number of training samples."""

    needs = frozenset({"teacher", "sample_labels", "features"})
    modalities = frozenset({"image", "text"})  # pooled (B, D) features, logits and per-id memory banks only

    def __init__(self, student, teacher, sample_labels: torch.Tensor, feat_dim: int = 128,
                 num_negatives: int = 4096, nce_t: float = 0.07, momentum: float = 0.5, temperature: float = 4.0,
                 crd_weight: float = 0.8, kd_weight: float = 0.0, ce_weight: float = 1.0, **kw):
        super().__init__(student, teacher, **kw)
        check(sample_labels is not None and len(sample_labels) > 0,
              "CRD needs the training labels by sample id (sample_labels)")
        CRD.check(num_negatives=num_negatives, nce_t=nce_t, temperature=temperature, momentum=momentum,
                  feat_dim=feat_dim, mixup_alpha=self.mixup_alpha, synth_ratio=self.synth_ratio)
        self.negatives = NegativeSampler(sample_labels)
        size = len(sample_labels)
        self.n, self.k, self.nce_t, self.m = self.negatives.n, int(num_negatives), nce_t, momentum
        self.T, self.crd_w, self.kd_w, self.ce_w = temperature, crd_weight, kd_weight, ce_weight
        self.embed_s = _Embed(student.num_features, feat_dim)
        self.embed_t = _Embed(teacher.num_features, feat_dim)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("memory_s", torch.rand(size, feat_dim, generator=g).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(size, feat_dim, generator=g).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        self._z_ready = {}

    @classmethod
    def check(cls, **hp) -> None:
        super().check(**hp)  # num_negatives, nce_t, temperature, momentum, feat_dim: base.HPARAM_RULES
        # stricter than the table's mixup_alpha / synth_ratio >= 0: CRD's memory banks hold one entry per real
        # sample id, so mixed or synthetic inputs have no entry to contrast with
        if (hp.get("mixup_alpha") or 0) > 0:
            raise UserError("CRD contrasts per-sample memory entries: mixup_alpha must be 0")
        if (hp.get("synth_ratio") or 0) > 0:
            raise UserError("CRD contrasts per-sample memory entries: method.synth_ratio must be 0")

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
        x, y, idx = batch.inputs, batch.targets, batch.ids
        ft, zt = self.teacher.features_and_logits(x, idx)  # frozen first (KL.three_logits)
        fs, zs = self.student.features_and_logits(x)
        vs, vt = self.embed_s(fs), self.embed_t(ft)
        neg = self.negatives(idx, self.k)
        crd = self._nce(vs, self.memory_t, idx, neg, self.z_s) + self._nce(vt, self.memory_s, idx, neg, self.z_t)
        with torch.no_grad():
            for mem, v in ((self.memory_s, vs), (self.memory_t, vt)):
                mem[idx] = F.normalize(mem[idx] * self.m + v.detach() * (1 - self.m), dim=1)
        return logit_terms(self.crd_w * crd, {"crd": crd.detach()}, zs, zt, y, self.T, self.kd_w, self.ce_w)
