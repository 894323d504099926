"""Transition curves and the mean transition error (MTE) of Micaelli & Storkey 2019 (docs/REFERENCE.md §4.5).
Pure functions: the models come in as callables (input -> logits); nothing else from the suite is imported.

For each image (on which student and teacher agree) and each class j other than its TRUE label, K plain gradient
steps (lr 1) on the input minimise CE(student(x), j); p_j under the student and under the teacher is recorded at every step (step 0
is the original image). MTE = mean |p_j^student - p_j^teacher| over images, classes and the first `mte_steps`
steps. All N x (C-1) inputs are one batch (or chunks of `chunk` inputs: a loop over chunks, never over images).

Source followed: polo5/ZeroShotKnowledgeTransfer `utils/transition_curves.py`: targets (y + 1 .. y + C-1) mod C of
the true label y (here in ascending order; MTE is a mean, so the order does not matter), and the N images are the
first N agreeing ones of a seeded shuffle of the split (not the first N in split order, biased when a split is
sorted by class)."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

Logits = Callable[[torch.Tensor], torch.Tensor]


def agreeing(student_logits: torch.Tensor, teacher_logits: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Positions of `n` samples on which student and teacher predict the same class: the first n of them in a
    random order of the samples drawn with `seed` (fewer if fewer agree)."""
    perm = torch.randperm(student_logits.shape[0], generator=torch.Generator().manual_seed(int(seed)))
    same = (student_logits.argmax(1) == teacher_logits.argmax(1)).cpu()[perm]
    return perm[same][:n].to(student_logits.device)


def transition_batch(x: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Every (image, class other than its true label) pair as one batch: inputs (N*(C-1), ...), targets
    (N*(C-1),), image index (N*(C-1),). Pair order: image-major, classes ascending without the image's label."""
    n = x.shape[0]
    classes = torch.arange(num_classes, device=labels.device).expand(n, num_classes)
    keep = classes != labels.view(-1, 1)
    targets = classes[keep]  # (N*(C-1),) row-major: image-major
    image = torch.arange(n, device=labels.device).view(-1, 1).expand(n, num_classes)[keep]
    return x.index_select(0, image.to(x.device)), targets, image


def _curves(student: Logits, teacher: Logits, x: torch.Tensor, targets: torch.Tensor, steps: int, lr: float):
    x = x.detach().clone()
    ps, pt = [], []
    col = targets.view(-1, 1)
    for _ in range(steps):
        x.requires_grad_(True)
        zs = student(x)
        with torch.no_grad():
            pt.append(teacher(x).float().softmax(1).gather(1, col).squeeze(1))
        ps.append(zs.detach().float().softmax(1).gather(1, col).squeeze(1))
        # sum, not mean: each input takes its own plain gradient step of CE(student(x_i), j_i) with step size lr
        grad, = torch.autograd.grad(F.cross_entropy(zs.float(), targets, reduction="sum"), x)
        x = (x - lr * grad).detach()
    return torch.stack(ps), torch.stack(pt)


def transition_curves(student: Logits, teacher: Logits, x: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      steps: int = 200, lr: float = 1.0, chunk: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """{'student': (steps, N*(C-1)) p_j under the student, 'teacher': the same under the teacher, 'targets',
    'image'} for the images `x` with their true labels `labels` (the targets are every other class). The models
    must be in eval mode (no batch statistics: inputs do not interact)."""
    xs, targets, image = transition_batch(x, labels, num_classes)
    m = xs.shape[0]
    chunk = m if not chunk or chunk <= 0 else int(chunk)
    parts = [_curves(student, teacher, xs[i:i + chunk], targets[i:i + chunk].to(xs.device), steps, lr)
             for i in range(0, m, chunk)]
    return {"student": torch.cat([p[0] for p in parts], 1).cpu(), "teacher": torch.cat([p[1] for p in parts], 1).cpu(),
            "targets": targets.cpu(), "image": image.cpu()}


def mean_transition_error(p_student: torch.Tensor, p_teacher: torch.Tensor, mte_steps: int = 100) -> float:
    """MTE: mean |p_j^s - p_j^t| over the first `mte_steps` steps (rows) and all (image, class) pairs (columns)."""
    k = min(int(mte_steps), p_student.shape[0])
    return float((p_student[:k] - p_teacher[:k]).abs().mean())
