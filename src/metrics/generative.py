"""Sample-quality measures of generators (pure functions on features)."""
from __future__ import annotations

import torch


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N_a, D), (N_b, D):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64 via symmetric eigendecompositions
    (no sqrtm of a non-symmetric product)."""
    a, b = feats_a.double().flatten(1).cpu(), feats_b.double().flatten(1).cpu()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], a.shape[1]), torch.cov(b.T).reshape(b.shape[1], b.shape[1])

    def psd_sqrt(m):
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp(min=0).sqrt()) @ v.T

    r = psd_sqrt(s_a)
    cross = torch.linalg.eigvalsh((r @ s_b @ r + (r @ s_b @ r).T) / 2).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * cross)
