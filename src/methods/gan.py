"""Training a GAN in the shared Trainer (checkpoint/resume/preemption for free), SN-GAN style: hinge loss, a
spectrally normalised projection discriminator (src/models/gan.py).

One Trainer step is one simultaneous update of both nets from the same state: the loss is
  L_D = mean(relu(1 - D(x, y))) + mean(relu(1 + D(G(z, y'), y')))   (G's output detached)
  L_G = -mean(D(G(z, y'), y'))                                         (D's parameters excluded from autograd)
and the Trainer minimises L_D + L_G: D's parameters get gradients from L_D only, G's from L_G only. One optimiser
with two parameter groups (generator: optimizer.lr; discriminator: `d_lr`) is two optimisers (Adam's state is per
parameter). z ~ N(0, I) and the fake classes y' come from `StepSeeds` (seeded by the run's seed and the step), so
a resumed run is bit-exact.

`diversity` > 0 adds the mode-seeking term of MSGAN (Mao et al. 2019) to L_G: the second half of the fake batch
shares the classes of the first half, and diversity / (mean|G(z1, y) - G(z2, y)| / mean|z1 - z2| + 1e-5) is
added, which punishes a generator that ignores z (one image per class: the collapse a small conditional GAN falls
into on digits)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import check
from .base import Method, StepSeeds
from .zeroshot import no_param_grads


class GANTraining(Method):
    """Built by main_pretrain's generator recipes (the trained "student" is the generator, the discriminator its
    partner), not from a method config: no inputs beyond them."""

    def __init__(self, generator: nn.Module, discriminator: nn.Module, seed: int = 0, d_lr: Optional[float] = None,
                 diversity: float = 0.0):
        super().__init__(generator)  # the "student" is the generator: eval_model() is what gets saved
        self.discriminator = discriminator
        GANTraining.check(d_lr=d_lr, diversity=diversity)
        self.d_lr, self.diversity = d_lr, float(diversity)
        self.draws = StepSeeds(seed, 21)

    @classmethod
    def check(cls, **hp) -> None:
        # its own keys first: they are a zoo recipe's (named so), not a method node's (Method.check: method.<key>)
        d_lr = hp.get("d_lr")
        check(d_lr is None or (d_lr > 0 and math.isfinite(d_lr)),
              f"generator recipe d_lr={d_lr} must be > 0 and finite (or null: optimizer.lr)")
        if "diversity" in hp:
            check(0 <= hp["diversity"] < math.inf,
                  f"generator recipe diversity={hp['diversity']} must be >= 0 and finite (0 disables it)")
        super().check(**hp)

    @property
    def generator(self) -> nn.Module:
        return self.student

    def param_groups(self):
        d = {"params": list(self.discriminator.parameters())}
        if self.d_lr is not None:
            d["lr"] = self.d_lr
        return [{"params": list(self.generator.parameters())}, d]

    def loss(self, batch):
        x, y = batch.inputs, batch.targets
        n = x.shape[0]
        z, yf = self.generator.inputs(n, self.draws.next())
        half = n // 2
        if self.diversity > 0 and half > 0:  # pairs (i, i + half) share a class
            yf = torch.cat([yf[:half], yf[:half], yf[2 * half:]])
        z, yf = z.to(x.device), yf.to(x.device)
        fake = self.generator(z, yf)
        d_real, d_fake = self.discriminator(x.float(), y), self.discriminator(fake.detach(), yf)
        d_loss = F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
        with no_param_grads(self.discriminator):
            g_loss = -self.discriminator(fake, yf).mean()
        logs = {}
        if self.diversity > 0 and half > 0:
            spread = ((fake[:half] - fake[half:2 * half]).abs().mean()
                      / (z[:half] - z[half:2 * half]).abs().mean())
            g_loss = g_loss + self.diversity / (spread + 1e-5)
            logs["spread"] = spread.detach()
        return d_loss + g_loss, {**logs, "d_loss": d_loss.detach(), "g_loss": g_loss.detach(),
                                 "d_real": d_real.detach().mean(), "d_fake": d_fake.detach().mean()}
