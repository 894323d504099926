"""LogME (You, Liu, Wang, Long; ICML 2021; docs/REFERENCE.md §2.4): the log marginal evidence of a Bayesian
linear model on fixed features, maximised over its prior precision alpha and noise precision beta, as a
transferability score. Pure torch, float64.

Per class c, with one-hot targets y_c (N,) and features F (N x D):
    w ~ N(0, I / alpha),  y_c | F, w ~ N(F w, I / beta)
    log p(y_c | F, alpha, beta) = D/2 log alpha + N/2 log beta - N/2 log 2 pi - beta/2 ||y_c - F m||^2
                                  - alpha/2 ||m||^2 - 1/2 log det(alpha I + beta F^T F)
with the posterior mean m = beta (alpha I + beta F^T F)^-1 F^T y_c. MacKay's fixed point updates
    gamma = sum_i sigma_i / (sigma_i + alpha/beta),  alpha = gamma / ||m||^2,  beta = (N - gamma) / ||y - F m||^2
(sigma_i: eigenvalues of F^T F) run on the spectrum of F, vectorised over classes. The score is the mean over classes
of the evidence per sample; `weights` are the posterior means (D x C), which B-Tuning uses as linear heads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch

EPS = 1e-12  # guards the updates against division by zero (the reference adds 1e-5, which biases alpha)


@dataclass
class LogMEResult:
    score: float  # mean over classes of the log evidence per sample
    weights: torch.Tensor  # (D, C) posterior mean weights, float64
    evidence: torch.Tensor  # (C,) log evidence per sample of each class
    alpha: torch.Tensor  # (C,)
    beta: torch.Tensor  # (C,)
    iterations: int


def _as64(x) -> torch.Tensor:
    return (torch.from_numpy(np.asarray(x)) if not torch.is_tensor(x) else x.detach().cpu()).to(torch.float64)


def _targets(labels, num_classes=None) -> torch.Tensor:
    y = _as64(labels)
    if y.ndim == 2:  # already one column per target
        return y
    y = y.long()
    c = int(num_classes if num_classes is not None else int(y.max()) + 1)
    return torch.nn.functional.one_hot(y, c).to(torch.float64)


def spectrum(f: torch.Tensor, rel_tol: float = 1e-10) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u, sigma, v) of F = u diag(sqrt(sigma)) v^T keeping the k directions with sigma > rel_tol * max sigma
    (directions of zero variance add nothing to the fit). N >> D goes through the D x D Gram matrix."""
    n, d = f.shape
    if n > 2 * d:
        sigma, v = torch.linalg.eigh(f.T @ f)
        keep = sigma > rel_tol * sigma.max().clamp_min(1e-300)
        sigma, v = sigma[keep], v[:, keep]
        u = (f @ v) / sigma.sqrt()
    else:
        u, s, vh = torch.linalg.svd(f, full_matrices=False)
        sigma = s ** 2
        keep = sigma > rel_tol * sigma.max().clamp_min(1e-300)
        u, sigma, v = u[:, keep], sigma[keep], vh[keep].T
    return u, sigma, v


def _terms(sigma, x2, res_x2, alpha, beta):
    """gamma, ||m||^2 and ||y - F m||^2 per class from the spectrum (sigma (k,), x2 = (u^T y)^2 (k, C))."""
    t = (alpha / beta)[None]
    gamma = (sigma[:, None] / (sigma[:, None] + t)).sum(0)
    m2 = (sigma[:, None] * x2 / (sigma[:, None] + t) ** 2).sum(0)
    res2 = (x2 / (1 + sigma[:, None] / t) ** 2).sum(0) + res_x2
    return gamma, m2, res2


def _evidence(n, d, sigma, m2, res2, alpha, beta) -> torch.Tensor:
    """Log evidence per sample; the D - k zero eigenvalues of F^T F contribute log(alpha) each to log det."""
    logdet = torch.log(alpha[None] + beta[None] * sigma[:, None]).sum(0) + (d - sigma.numel()) * torch.log(alpha)
    ev = (d / 2 * torch.log(alpha) + n / 2 * torch.log(beta) - n / 2 * math.log(2 * math.pi)
          - beta / 2 * res2 - alpha / 2 * m2 - logdet / 2)
    return ev / n


def log_evidence(features, labels, alpha, beta, num_classes=None) -> torch.Tensor:
    """Log evidence per sample (C,) of each class at fixed alpha, beta (scalars or (C,)), through the spectrum."""
    f, y = _as64(features), _targets(labels, num_classes)
    n, d = f.shape
    u, sigma, _ = spectrum(f)
    x = u.T @ y
    x2 = x ** 2
    res_x2 = (y ** 2).sum(0) - x2.sum(0)
    c = y.shape[1]
    alpha = _as64(alpha).expand(c).clone()
    beta = _as64(beta).expand(c).clone()
    _, m2, res2 = _terms(sigma, x2, res_x2, alpha, beta)
    return _evidence(n, d, sigma, m2, res2, alpha, beta)


def logme(features, labels, num_classes=None, max_iter: int = 1000, tol: float = 1e-6) -> LogMEResult:
    """LogME of `features` (N x D) for integer `labels` (N,) (or targets N x C): fixed-point iteration of alpha,
    beta per class from alpha = beta = 1 until alpha/beta changes by less than `tol` (relative)."""
    f, y = _as64(features), _targets(labels, num_classes)
    n, d = f.shape
    u, sigma, v = spectrum(f)
    x = u.T @ y  # (k, C)
    x2 = x ** 2
    res_x2 = ((y ** 2).sum(0) - x2.sum(0)).clamp_min(0)
    c = y.shape[1]
    alpha = torch.ones(c, dtype=torch.float64)
    beta = torch.ones(c, dtype=torch.float64)
    it = 0
    for it in range(1, max_iter + 1):
        t = alpha / beta
        gamma, m2, res2 = _terms(sigma, x2, res_x2, alpha, beta)
        alpha = gamma / (m2 + EPS)
        beta = (n - gamma) / (res2 + EPS)
        if ((alpha / beta - t).abs() / t).max() <= tol:
            break
    _, m2, res2 = _terms(sigma, x2, res_x2, alpha, beta)
    ev = _evidence(n, d, sigma, m2, res2, alpha, beta)
    t = (alpha / beta)[None]
    m = v @ (sigma.sqrt()[:, None] / (sigma[:, None] + t) * x)  # (D, C) posterior means
    return LogMEResult(float(ev.mean()), m, ev, alpha, beta, it)
