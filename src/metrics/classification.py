from __future__ import annotations

import torch
import torch.nn.functional as F


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    return (logits.argmax(1) == labels).float().mean().item()


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true label (per sample, correctly indexed)."""
    return F.cross_entropy(logits.float(), labels).item()


def ece(logits: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error with `bins` equal-width confidence bins (lo, hi], as gnosis bins them: a
    confidence exactly on an edge k/bins belongs to the bin below it (0.5 of 10 bins: (0.4, 0.5]). Named fix
    (docs/REFERENCE.md §5.8): gnosis' float32 bounds (`linspace(1/K, 1, K)`, lower = upper - 1/K) leave gaps at
    some edges (0.5 then lands in no bin and drops out of the sum); here every sample is in exactly one bin."""
    p = logits.float().softmax(1)
    conf, pred = p.max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1, dtype=conf.dtype, device=conf.device)
    # right=False: edges[b-1] < conf <= edges[b], i.e. (lo, hi] bins 0..bins-1 (a confidence is > 0)
    b = torch.bucketize(conf, edges[1:-1], right=False).cpu()
    conf, correct = conf.cpu(), correct.cpu()
    n = conf.numel()
    tot = torch.zeros(bins).index_add_(0, b, torch.ones(n))
    sc = torch.zeros(bins).index_add_(0, b, conf)
    sa = torch.zeros(bins).index_add_(0, b, correct)
    mask = tot > 0
    return ((sc[mask] - sa[mask]).abs().sum() / n).item()


def agreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """Top-1 agreement: fraction of samples with the same argmax."""
    return (logits_a.argmax(1) == logits_b.argmax(1)).float().mean().item()


def kl_divergence(logits_teacher: torch.Tensor, logits_student: torch.Tensor, T: float = 1.0) -> float:
    """Mean predictive KL(p_teacher || p_student) at temperature T."""
    lt = F.log_softmax(logits_teacher.float() / T, 1)
    ls = F.log_softmax(logits_student.float() / T, 1)
    return (lt.exp() * (lt - ls)).sum(1).mean().item()
