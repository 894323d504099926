"""Centered kernel alignment between two representations of the same samples (rows). Inputs are flattened per
sample first (the gnosis implementation averaged the wrong axes)."""
from __future__ import annotations

import torch


def _center(k: torch.Tensor) -> torch.Tensor:
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def _hsic(kx, ky):
    return (_center(kx) * _center(ky)).sum()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    x = x.flatten(1).double()
    y = y.flatten(1).double()
    x, y = x - x.mean(0), y - y.mean(0)
    num = (x.T @ y).pow(2).sum()
    den = (x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()
    return (num / den).item() if den > 0 else 0.0


def _rbf(x: torch.Tensor, sigma_frac: float) -> torch.Tensor:
    d2 = torch.cdist(x, x).pow(2)
    med = d2[d2 > 0].median() if (d2 > 0).any() else torch.tensor(1.0, dtype=x.dtype)
    return torch.exp(-d2 / (2 * sigma_frac ** 2 * med))


def rbf_cka(x: torch.Tensor, y: torch.Tensor, sigma_frac: float = 1.0) -> float:
    """RBF CKA with the median heuristic: bandwidth^2 = sigma_frac^2 * median squared distance."""
    kx, ky = _rbf(x.flatten(1).double(), sigma_frac), _rbf(y.flatten(1).double(), sigma_frac)
    num = _hsic(kx, ky)
    den = (_hsic(kx, kx) * _hsic(ky, ky)).sqrt()
    return (num / den).item() if den > 0 else 0.0


def cka(x, y, kind: str = "linear") -> float:
    return linear_cka(x, y) if kind == "linear" else rbf_cka(x, y)
