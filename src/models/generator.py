"""The zero-shot KT generator (Micaelli & Storkey 2019, docs/REFERENCE.md §4.1): z in R^100 ~ N(0, I) ->
Linear to 128 x (s/4) x (s/4) -> BN -> 2 x [upsample x2, conv3x3, BN, LeakyReLU 0.2] (128 then 64 channels) ->
conv3x3 to the image channels -> affine BN (no tanh). Output: (B, C, s, s) with s the dataset's image size.

The last BN stands in for input normalisation: the output lives in the *normalised* input space of the teacher
(what the paper's teacher, trained on mean/std-normalised images, sees). Our models take raw [0, 1] images and
normalise themselves, so `src.methods.zeroshot.ZeroShot` de-normalises the output with the teacher's statistics
before feeding both models (the teacher then sees exactly the generator output; see `ZeroShot.images`).

Every BN uses batch statistics only (`track_running_stats=False`): the generator is only ever run on batches in
training mode, as in the paper, so its output is the same, and regenerating images from a z batch (once per
pseudo-batch, and again after a resume) has no side effect on any buffer."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import check


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, track_running_stats=False)


class Generator(nn.Module):
    def __init__(self, z_dim: int = 100, img_size: int = 32, channels: int = 3):
        super().__init__()
        check(img_size % 4 == 0 and img_size >= 4,
              f"dataset.image_size={img_size}: the zero-shot generator upsamples x4, so it needs a multiple of 4")
        check(z_dim > 0, f"generator.z_dim={z_dim} must be > 0: use 100 (the paper)")
        self.z_dim, self.img_size, self.channels = int(z_dim), int(img_size), int(channels)
        self.init_size = img_size // 4
        self.linear = nn.Linear(z_dim, 128 * self.init_size ** 2)
        self.bn0 = _bn(128)
        self.block1 = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(128, 128, 3, 1, 1), _bn(128),
                                    nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(128, 64, 3, 1, 1), _bn(64),
                                    nn.LeakyReLU(0.2))
        self.out = nn.Conv2d(64, channels, 3, 1, 1)
        self.bn_out = _bn(channels)  # affine (the default): learnt scale/shift of the normalised image

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.linear(z.flatten(1)).view(z.shape[0], 128, self.init_size, self.init_size)
        x = self.block2(self.block1(self.bn0(x)))
        return self.bn_out(self.out(x))
