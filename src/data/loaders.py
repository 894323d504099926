"""Loaders yield `(x, y, index)` batches: x float in [0, 1] (N, C, H, W) on the device, y int64, index = the
sample id within its split (cache key).

Semantics shared by every backend
- `shuffle`: a fresh permutation every epoch, drawn from `seed + epoch`; the order of epoch e is the same in every
  run with the same seed, which is what makes resume exact.
- `drop_last`: drop the last incomplete batch of an epoch (training); evaluation loaders never drop.
- `iter_epoch(epoch, start_batch)`: resumes inside an epoch without loading the skipped batches.
- Distributed: with `world_size > 1` every rank takes a disjoint, equal-sized share of each epoch's order
  (padded by repetition like torch's DistributedSampler when needed).
Backends: `tensor` (the split as one uint8 tensor on the device; batched crop/flip there; the default for data
that fits in memory), `torch` (DataLoader, workers, torchvision transforms; ImageFolder scale), `ffcv`
(.beton files, see `ffcv_loader.py`).
"""
from __future__ import annotations

import math
from typing import Iterator, Tuple

import torch
import torch.nn.functional as F

from ..errors import UserError, check
from .datasets import Split

Batch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def resolve_device(name: str = "auto") -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available: use device=cpu or device=auto")
    return torch.device(name)


def mix_seed(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x9E3779B9 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class _OrderMixin:
    """Per-epoch sample order, rank sharding and batch slicing (shared by the tensor and torch backends)."""

    n: int
    batch_size: int
    shuffle: bool
    drop_last: bool
    seed: int
    rank: int
    world_size: int

    def _per_rank(self) -> int:
        return math.ceil(self.n / self.world_size) if not self.drop_last or self.world_size == 1 else \
            self.n // self.world_size

    def __len__(self) -> int:
        m = self._per_rank()
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    @property
    def num_samples(self) -> int:
        return self.n

    def order(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        if self.world_size > 1:
            m = self._per_rank()
            total = m * self.world_size
            if total > self.n:
                order = torch.cat([order, order[: total - self.n]])
            order = order[self.rank:total:self.world_size]
        return order

    def batch_positions(self, epoch: int, start_batch: int = 0):
        order = self.order(epoch)
        for b in range(start_batch, len(self)):
            yield b, order[b * self.batch_size:(b + 1) * self.batch_size]


# --------------------------------------------------------------------------------------- batched augmentation


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip of a whole batch, on its device, no Python per sample."""
    b, c, h, w = x.shape
    if padding > 0:
        xp = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=g)
        ox = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=g)
        rows = (oy[:, None] + torch.arange(h, device=x.device)[None])  # (b, h)
        cols = (ox[:, None] + torch.arange(w, device=x.device)[None])  # (b, w)
        if flip:
            do = torch.rand(b, device=x.device, generator=g) < 0.5
            cols = torch.where(do[:, None], cols.flip(1), cols)
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(c, device=x.device)[None, :, None, None]
        return xp[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
    if flip:
        do = torch.rand(b, device=x.device, generator=g) < 0.5
        return torch.where(do[:, None, None, None], x.flip(3), x)
    return x


def random_resized_crop_flip(x: torch.Tensor, size: int, flip: bool, g: torch.Generator,
                             scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Inception-style random resized crop (+ flip) of a batch with one affine grid_sample."""
    b = x.shape[0]
    dev = x.device
    area = torch.empty(b, device=dev).uniform_(scale[0], scale[1], generator=g)
    logr = torch.empty(b, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    r = torch.exp(logr)
    sw = torch.sqrt(area * r).clamp(max=1.0)  # crop width / image width
    sh = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(b, device=dev, generator=g) * 2 - 1) * (1 - sw)
    cy = (torch.rand(b, device=dev, generator=g) * 2 - 1) * (1 - sh)
    sx = sw
    if flip:
        sx = torch.where(torch.rand(b, device=dev, generator=g) < 0.5, -sw, sw)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sh, cy
    grid = F.affine_grid(theta, (b, x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# ------------------------------------------------------------------------------------------------- backends


class TensorLoader(_OrderMixin):
    """The whole split as one uint8 tensor on the device; batches are sliced, converted and augmented there."""

    def __init__(self, split: Split, batch_size: int, shuffle: bool, drop_last: bool, augment: str = "none",
                 crop_padding: int = 0, flip: bool = False, seed: int = 0, device="cpu", dtype=torch.float32,
                 rank: int = 0, world_size: int = 1):
        if split.images is None:
            split = split.materialize()
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.ids = split.ids.to(self.device)
        self.n, self.batch_size, self.shuffle, self.drop_last = len(split), batch_size, shuffle, drop_last
        self.augment, self.crop_padding, self.flip = augment, crop_padding, flip
        self.seed, self.dtype, self.rank, self.world_size = seed, dtype, rank, world_size
        self.image_size = int(self.images.shape[-1])

    @property
    def augmented(self) -> bool:
        return self.augment != "none"

    def iter_epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[Batch]:
        for b, pos in self.batch_positions(epoch, start_batch):
            pos = pos.to(self.device)
            x = self.images.index_select(0, pos).float().div_(255.0)  # augmented in fp32, then cast
            if self.augmented:
                g = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, epoch, b, 7))
                if self.augment == "crop_flip":
                    x = random_crop_flip(x, self.crop_padding, self.flip, g)
                elif self.augment == "rrc_flip":
                    x = random_resized_crop_flip(x, self.image_size, self.flip, g)
                else:
                    raise UserError(f"loader.augment='{self.augment}' is unknown: use none, crop_flip or rrc_flip")
            yield x.to(self.dtype), self.labels.index_select(0, pos), self.ids.index_select(0, pos)

    def __iter__(self):
        return self.iter_epoch(0)


class _TorchDataset(torch.utils.data.Dataset):
    def __init__(self, split: Split, transform):
        self.split, self.transform = split, transform
        self.info = split.info

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        s = self.split
        if s.images is not None:
            img = s.images[i]
        else:
            from PIL import Image

            with Image.open(s.files[i]) as im:
                img = im.convert("L" if self.info.channels == 1 else "RGB")
                img.load()
        return self.transform(img), s.labels[i], s.ids[i]


class _ListSampler(torch.utils.data.Sampler):
    def __init__(self, positions):
        self.positions = positions

    def __iter__(self):
        return iter(self.positions.tolist())

    def __len__(self):
        return len(self.positions)


def torchvision_transform(info, augment: str, crop_padding: int, flip: bool, train: bool):
    from torchvision.transforms import v2 as T

    size = info.image_size
    ops = [T.ToImage()]
    if train and augment == "rrc_flip":
        ops.append(T.RandomResizedCrop(size, antialias=True))
    elif train and augment == "crop_flip":
        ops += [T.Resize(size, antialias=True), T.CenterCrop(size), T.RandomCrop(size, padding=crop_padding)]
    else:
        ops += [T.Resize(int(math.floor(size / info.crop_pct)), antialias=True), T.CenterCrop(size)]
    if train and augment != "none" and flip:
        ops.append(T.RandomHorizontalFlip())
    ops.append(T.ToDtype(torch.float32, scale=True))
    return T.Compose(ops)


class TorchLoader(_OrderMixin):
    """torch DataLoader with workers and torchvision transforms (file-backed data, ImageFolder/ImageNet)."""

    def __init__(self, split: Split, batch_size: int, shuffle: bool, drop_last: bool, augment: str = "none",
                 crop_padding: int = 0, flip: bool = False, seed: int = 0, device="cpu", num_workers: int = 0,
                 pin_memory: bool = True, train: bool = True, dtype=torch.float32, rank: int = 0,
                 world_size: int = 1):
        self.split = split
        self.n, self.batch_size, self.shuffle, self.drop_last = len(split), batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device, self.dtype = torch.device(device), dtype
        self.augment = augment if train else "none"
        self.dataset = _TorchDataset(split, torchvision_transform(split.info, self.augment, crop_padding, flip,
                                                                  train))
        self.num_workers = num_workers
        self.pin_memory = pin_memory and self.device.type == "cuda"

    @property
    def augmented(self) -> bool:
        return self.augment != "none"

    def iter_epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[Batch]:
        order = self.order(epoch)[start_batch * self.batch_size:len(self) * self.batch_size]
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, start_batch, 11))
        dl = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=_ListSampler(order), num_workers=self.num_workers,
            pin_memory=self.pin_memory, drop_last=False, generator=g,
            persistent_workers=False)
        for x, y, idx in dl:
            yield (x.to(self.device, self.dtype, non_blocking=True), y.to(self.device, non_blocking=True),
                   idx.to(self.device, non_blocking=True))

    def __iter__(self):
        return self.iter_epoch(0)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def loader_dtype(name: str) -> torch.dtype:
    """The torch dtype of `loader.dtype` (the dtype batches are delivered in; models normalise in their own)."""
    check(name in DTYPES, f"loader.dtype='{name}' is unknown: use {', '.join(DTYPES)}")
    return DTYPES[name]


def build_loader(cfg, split: Split, train: bool, seed: int = 0, device=None, rank: int = 0,
                 world_size: int = 1):
    """A loader for `split` from a loader config node. Train loaders shuffle/augment/drop_last as configured;
    eval loaders never do."""
    check(cfg.batch_size > 0, f"loader.batch_size={cfg.batch_size} must be > 0: use e.g. loader.batch_size=128")
    check(cfg.eval_batch_size > 0, f"loader.eval_batch_size={cfg.eval_batch_size} must be > 0")
    check(len(split) > 0, f"split '{split.name}' is empty: check dataset.splits / dataset.subset")
    bs = cfg.batch_size if train else cfg.eval_batch_size
    if train:  # a training batch larger than the split is a typo (or a too small subset), not a setting
        check(bs * world_size <= len(split),
              f"loader.batch_size={bs}{f' x {world_size} ranks' if world_size > 1 else ''} is larger than the "
              f"{len(split)} samples of split '{split.name}': lower loader.batch_size (or enlarge dataset.subset)")
    device = resolve_device(cfg.device) if device is None else torch.device(device)
    common = dict(batch_size=bs, shuffle=cfg.shuffle and train, drop_last=cfg.drop_last and train,
                  augment=cfg.augment if train else "none", crop_padding=cfg.crop_padding, flip=cfg.flip,
                  seed=seed, device=device, rank=rank, world_size=world_size,
                  dtype=loader_dtype(cfg.get("dtype", "float32")))
    if cfg.augment not in ("none", "crop_flip", "rrc_flip"):
        raise UserError(f"loader.augment='{cfg.augment}' is unknown: use none, crop_flip or rrc_flip")
    if cfg.backend == "tensor":
        return TensorLoader(split, **common)
    if cfg.backend == "torch":
        return TorchLoader(split, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory, train=train, **common)
    if cfg.backend == "ffcv":
        from .ffcv_loader import FFCVLoader

        return FFCVLoader(cfg, split, train=train, **common)
    raise UserError(f"loader.backend='{cfg.backend}' is unknown: use tensor, torch or ffcv")
