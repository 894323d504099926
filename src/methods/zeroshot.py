"""Zero-shot knowledge transfer by adversarial belief matching (Micaelli & Storkey 2019, docs/REFERENCE.md §4.2,
§4.3), and the few-shot KD+AT baseline (§4.4).

How the adversarial loop runs in the shared Trainer (checkpoint/resume/preemption/AMP for free):
- `src.data.NoiseBatches` is the "loader": one *epoch* is one pseudo-batch = `n_g + n_s` Trainer steps, all on the same
  z batch (z ~ N(0, I), seeded by (seed, pseudo-batch index), so a resumed run draws the same z). Batches are
  `Batch(inputs=z, extra={"phase", "pseudo_batch"})`; `trainer.epochs` = number of pseudo-batches.
- `ZeroShot.loss` does phase `< n_g`: a generator step, loss = -KL(teacher || student) on G(z) with gradients
  through both nets into the generator; the student's parameters are excluded from autograd for that step, so
  the optimiser (which skips parameters without a gradient) updates only the generator. Phases `>= n_g`: a
  student step on G(z) regenerated after the generator's update (detached), loss = KL + beta * AT, with the
  teacher's logits / attention maps computed once per pseudo-batch.
- One Adam with two parameter groups (student: optimizer.lr, generator: method.generator_lr) is two Adams
  (Adam's state is per parameter); grad-norm clipping (trainer.grad_clip) applies to the one net that has
  gradients in a step; the cosine schedule anneals both over all steps of all pseudo-batches.
- Logged train values are scaled by steps-per-pseudo-batch / steps-of-their-phase (and are 0 in the other
  phase), so the Trainer's averages (taken over whole pseudo-batches) are per-phase means.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError, check
from .base import Method
from .kd import KL


def kl_mean(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) at T = 1, averaged over all B x K elements (the paper's
    `F.kl_div(log_softmax(s), softmax(t))` with its default 'mean' reduction), i.e. batch-mean KL / K."""
    pt = teacher_logits.float().softmax(1)
    log_ps = F.log_softmax(student_logits.float(), dim=1)
    return (torch.special.xlogy(pt, pt) - pt * log_ps).mean()


def attention_map(x: torch.Tensor) -> torch.Tensor:
    """a(x): the channel mean of x^2, flattened and L2-normalised per sample: (B, H*W)."""
    return F.normalize(x.float().pow(2).mean(1).flatten(1), dim=1)


def attention_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor],
                   beta: float) -> torch.Tensor:
    """beta * sum over stages of mean((a(s) - a(t))^2)."""
    check(len(student_feats) == len(teacher_feats),
          f"attention transfer needs as many student stages as teacher stages ({len(student_feats)} vs "
          f"{len(teacher_feats)}): set method.beta=0")
    return beta * sum((attention_map(s) - attention_map(t)).pow(2).mean()
                      for s, t in zip(student_feats, teacher_feats))


def logits_and_stages(model: nn.Module, x: torch.Tensor, stages: bool) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Logits of a Normalized model on raw input x, and (with `stages`) its stage outputs from the same pass."""
    if not stages:
        return model(x), []
    if not model.has_intermediates:
        raise UserError(f"model '{getattr(model, 'arch', '?')}' exposes no intermediate stages for attention "
                        f"transfer: set method.beta=0")
    return model.logits_and_intermediates(x)


@contextmanager
def no_param_grads(module: nn.Module):
    """Parameters of `module` get no gradient inside (gradients still flow through it to its input)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class ZeroShot(Method):
    """The adversarial belief-matching loop (see the module docstring). `teacher` and `student` are Normalized
    models (raw [0, 1] input); `generator` maps z to images in the teacher's normalised input space."""

    needs = frozenset({"teacher", "generator"})

    def __init__(self, student: nn.Module, teacher: nn.Module, generator: nn.Module, n_g: int = 1, n_s: int = 10,
                 beta: float = 250.0, generator_lr: float = 1e-3):
        super().__init__(student, teacher)
        ZeroShot.check(n_g=n_g, n_s=n_s, beta=beta, generator_lr=generator_lr)  # base.HPARAM_RULES
        self.generator = generator
        self.n_g, self.n_s, self.beta, self.generator_lr = int(n_g), int(n_s), float(beta), float(generator_lr)
        self._target = None  # (pseudo-batch index, images, teacher logits, teacher stages): once per z batch

    @property
    def steps_per_batch(self) -> int:
        return self.n_g + self.n_s

    def param_groups(self):
        return [{"params": list(self.student.parameters())},
                {"params": list(self.generator.parameters()), "lr": self.generator_lr}]

    def images(self, z: torch.Tensor) -> torch.Tensor:
        """G(z) de-normalised with the teacher's statistics: raw images that the teacher normalises back to
        exactly the generator output (the paper feeds G(z) to the teacher as a normalised input); a student with
        other statistics sees the same image in its own normalisation."""
        t = self.teacher.model
        return self.generator(z) * t.std.to(z.dtype) + t.mean.to(z.dtype)

    def teacher_outputs(self, x):
        return logits_and_stages(self.teacher.model, x, self.beta > 0)

    def loss(self, batch):
        z, phase, index = batch.inputs, batch.extra["phase"], batch.extra["pseudo_batch"]
        zero = torch.zeros((), device=z.device)
        if int(phase) < self.n_g:
            self._target = None
            x = self.images(z)
            with no_param_grads(self.student):
                zt, _ = logits_and_stages(self.teacher.model, x, False)
                zs = self.student(x)
            kl = kl_mean(zs, zt)
            w = self.steps_per_batch / self.n_g
            return -kl, {"generator_kl": kl.detach() * w, "student_kl": zero, "attention": zero}
        if self._target is None or self._target[0] != int(index):
            with torch.no_grad():
                x = self.images(z)
                zt, at = self.teacher_outputs(x)
            self._target = (int(index), x, zt, at)
        _, x, zt, at_t = self._target
        zs, at_s = logits_and_stages(self.student, x, self.beta > 0)
        kl = kl_mean(zs, zt)
        at = attention_loss(at_s, at_t, self.beta) if self.beta > 0 else zero
        w = self.steps_per_batch / self.n_s
        return kl + at, {"generator_kl": zero, "student_kl": kl.detach() * w, "attention": at.detach() * w}


class KDAT(KL):
    """Few-shot KD + attention transfer (Zagoruyko & Komodakis; the zero-shot paper's baseline):
    alpha * T^2 KL(p_t^T || p_s^T) + (1 - alpha) CE(y, z_s) + beta * AT over the 3 stages (alpha 0.9, T 4,
    beta 1000)."""

    modalities = frozenset({"image"})  # attention maps of image stages (KL's own loss would handle text)

    def __init__(self, student, teacher, temperature: float = 4.0, alpha: float = 0.9, beta: float = 1000.0,
                 **kw):
        super().__init__(student, teacher, temperature=temperature, alpha=alpha, **kw)
        KDAT.check(beta=beta)  # base.HPARAM_RULES
        self.beta = float(beta)

    def loss(self, batch):
        x, y = batch.inputs, batch.targets
        with torch.no_grad():
            zt, at_t = logits_and_stages(self.teacher.model, x, self.beta > 0)
        zs, at_s = logits_and_stages(self.student, x, self.beta > 0)
        loss, logs = self.combine(self.per_sample_kl(zs, zt), zs, y, False)
        if self.beta > 0:
            at = attention_loss(at_s, at_t, self.beta)
            loss = loss + at
            logs["attention"] = at.detach()
        return loss, logs


def stage_shapes(model: nn.Module, channels: int, size: int) -> Optional[List[Tuple[int, ...]]]:
    """Spatial shapes of the model's stage outputs on a dummy input (None: it exposes no stages)."""
    net = getattr(model, "net", model)
    if not hasattr(net, "forward_intermediates"):
        return None
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            dev = next(model.parameters()).device
            inter = model.intermediates(torch.zeros(2, channels, size, size, device=dev))
    except Exception:  # noqa: BLE001  (a timm model without the API in this form)
        return None
    finally:
        model.train(was)
    return [tuple(t.shape[-2:]) for t in inter]
