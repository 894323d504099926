"""Centered kernel alignment (docs/REFERENCE.md §5.5) between two representations of the same samples (rows).
Inputs are flattened per sample first (the gnosis implementation averaged the wrong axes). Linear CKA and RBF
CKA with the median heuristic (Kornblith et al. 2019); both are 1 for a representation with itself and invariant
to orthogonal transforms and isotropic scaling of either input."""
from __future__ import annotations

from typing import List, Sequence

import torch


def _center(k: torch.Tensor) -> torch.Tensor:
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def _hsic(kx, ky):
    return (_center(kx) * _center(ky)).sum()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    x = x.flatten(1).double()
    y = y.flatten(1).double()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same samples in both inputs, got {x.shape[0]} and {y.shape[0]} rows")
    x, y = x - x.mean(0), y - y.mean(0)
    num = (x.T @ y).pow(2).sum()
    den = (x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()
    return (num / den).item() if den > 0 else 0.0


def _sq_dists(x: torch.Tensor) -> torch.Tensor:
    """Exact squared Euclidean distances (zero diagonal, never negative)."""
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
    d2.fill_diagonal_(0.0)
    return d2


def _rbf(x: torch.Tensor, sigma_frac: float) -> torch.Tensor:
    d2 = _sq_dists(x)
    off = d2[~torch.eye(d2.shape[0], dtype=torch.bool, device=d2.device)]
    med = off.median() if off.numel() and bool((off > 0).any()) else torch.tensor(1.0, dtype=x.dtype)
    return torch.exp(-d2 / (2 * sigma_frac ** 2 * med))


def rbf_cka(x: torch.Tensor, y: torch.Tensor, sigma_frac: float = 1.0) -> float:
    """RBF CKA with the median heuristic: bandwidth^2 = sigma_frac^2 * median squared distance between
    distinct samples."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same samples in both inputs, got {x.shape[0]} and {y.shape[0]} rows")
    kx, ky = _rbf(x, sigma_frac), _rbf(y, sigma_frac)
    num = _hsic(kx, ky)
    den = (_hsic(kx, kx) * _hsic(ky, ky)).sqrt()
    return (num / den).item() if den > 0 else 0.0


def cka(x, y, kind: str = "linear") -> float:
    if kind == "linear":
        return linear_cka(x, y)
    if kind == "rbf":
        return rbf_cka(x, y)
    raise ValueError(f"unknown CKA kind '{kind}': use 'linear' or 'rbf'")


def cka_matrix(features: Sequence[torch.Tensor], kind: str = "linear", sigma_frac: float = 1.0) -> torch.Tensor:
    """(N, N) CKA between every pair of N representations of the same n samples, from their centred,
    normalised n x n kernels: CKA[a, b] = <K_a, K_b> (one matmul of the flattened kernels). Memory N * n^2, so
    pass a sample subset for large n."""
    if kind not in ("linear", "rbf"):
        raise ValueError(f"unknown CKA kind '{kind}': use 'linear' or 'rbf'")
    ks: List[torch.Tensor] = []
    for f in features:
        x = f.flatten(1).double()
        k = x @ x.T if kind == "linear" else _rbf(x, sigma_frac)
        k = _center(k)
        nrm = k.norm()
        ks.append((k / nrm if nrm > 0 else k).flatten())
    if not ks:
        return torch.zeros((0, 0), dtype=torch.float64)
    if len({k.numel() for k in ks}) != 1:
        raise ValueError("cka_matrix needs the same samples for every representation")
    kk = torch.stack(ks)
    return (kk @ kk.T).clamp(-1.0, 1.0)
