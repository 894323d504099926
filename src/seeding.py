"""Seeds, one home below every package (data, methods and engine all draw from them): `mix_seed` hashes integers
into one 63-bit seed for a torch.Generator (per epoch, per draw, per pseudo-batch), `seed_everything` seeds the
global Python, numpy and torch generators of a run."""
from __future__ import annotations

import random

import numpy as np
import torch


def mix_seed(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x9E3779B9 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
