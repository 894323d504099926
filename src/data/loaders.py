"""Loaders yield `src.batch.Batch`es on the device: `inputs` float images in [0, 1] (N, C, H, W) (in
channels_last memory format when the loader is built with `channels_last=True`, the trainer's
`trainer.channels_last`), `targets` int64 labels (N,), `ids` int64 (N,) = the sample ids within their split (the
output caches' key).

Semantics shared by every backend
- `shuffle`: a fresh permutation every epoch, drawn from `seed + epoch`; the order of epoch e is the same in every
  run with the same seed, which is what makes resume exact.
- `drop_last`: drop the last incomplete batch of an epoch (training); evaluation loaders never drop.
- `iter_epoch(epoch, start_batch)`: resumes inside an epoch without loading the skipped batches.
- Distributed: with `world_size > 1` every rank takes a disjoint, equal-sized share of each epoch's order
  (padded by repetition like torch's DistributedSampler when needed).
Backends: `tensor` (the split as one uint8 tensor on the device; crop+flip is one uint8 gather from a padded and
mirrored copy, then one conversion; the epoch's random parameters are drawn at its start, one per position of
its order, and sharded like it; the default for data that fits in memory), `torch` (DataLoader, workers,
torchvision transforms; ImageFolder scale), `ffcv` (.beton files, see `ffcv_loader.py`).
"""
from __future__ import annotations

import logging
import math
from typing import Dict, Iterator, Optional

import torch
import torch.nn.functional as F

from ..batch import Batch
from ..errors import UserError, check
from ..seeding import mix_seed  # noqa: F401  (re-exported: src.data.loaders.mix_seed)
from .datasets import Split

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available: use device=cpu or device=auto")
    return torch.device(name)


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

    def _positions(self) -> int:
        """Positions in one epoch's global order, before sharding (n, or padded/truncated to ranks x share)."""
        return self.n if self.world_size == 1 else self._per_rank() * self.world_size

    def __len__(self) -> int:
        m = self._per_rank()
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    @property
    def num_samples(self) -> int:
        return self.n

    def shard(self, per_position: torch.Tensor) -> torch.Tensor:
        """This rank's share of a tensor indexed by global epoch position (length `_positions()`)."""
        if self.world_size == 1:
            return per_position
        return per_position[self.rank:self._positions():self.world_size]

    def order(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        total = self._positions()
        if total > self.n:
            order = torch.cat([order, order[: total - self.n]])
        return self.shard(order)

    def batch_positions(self, epoch: int, start_batch: int = 0):
        order = self.order(epoch)
        for b in range(start_batch, len(self)):
            yield b, order[b * self.batch_size:(b + 1) * self.batch_size]


# --------------------------------------------------------------------------------------- batched augmentation
# The tensor loader draws every random parameter of an epoch at its start, from one generator seeded with
# (seed, epoch), one value per global epoch position, sharded like the order: batch b of any resume point and
# any rank split gets exactly the augmentation it gets in one uninterrupted single-process epoch.


def image_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A batch of images in the memory format the trainer's models run in: channels_last for a 4-D batch when
    asked (`trainer.channels_last`), else unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


def to_unit(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 images -> `dtype` in [0, 1] (x / 255 computed in float32 precision, then rounded to `dtype`)."""
    if dtype == torch.float32:
        return torch.div(x, 255.0)  # one pass: the division promotes uint8 to float32
    return x.to(dtype).div_(255.0)  # uint8 values are exact in bf16/fp16; the division is computed in fp32


def crop_flip(x: torch.Tensor, padding: int, oy: torch.Tensor, ox: torch.Tensor,
              mirror: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Crop of every sample of a batch (any dtype, uint8 included) zero-padded by `padding`, at offsets (oy, ox)
    in [0, 2 * padding] of the padded image, then mirrored horizontally where `mirror` (bool (b,)) is set.

    The padded batch is viewed (no copy) as every (2p + 1)^2 window of every sample, and one advanced index
    [sample, oy, ox] copies the chosen windows: a single gather pass over the uint8 data."""
    b, c, h, w = x.shape
    if padding > 0:
        p = padding
        xp = F.pad(x, (p, p, p, p))
        s0, s1, s2, s3 = xp.stride()
        windows = xp.as_strided((b, 2 * p + 1, 2 * p + 1, c, h, w), (s0, s2, s3, s1, s2, s3))
        x = windows[torch.arange(b, device=x.device), oy, ox]
    if mirror is not None:
        x = torch.where(mirror.view(b, 1, 1, 1), x.flip(3), x)
    return x


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip of a whole batch, on its device, no Python per sample."""
    b = x.shape[0]
    oy = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=g)
    ox = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=g)
    mirror = torch.rand(b, device=x.device, generator=g) < 0.5 if flip else None
    return crop_flip(x, padding, oy, ox, mirror)


class CropStore:
    """A split prepared once for crop+flip: zero-padded by `padding` and, with `flip`, also stored mirrored,
    as one uint8 tensor (1 or 2, n, C, H + 2p, W + 2p). A batch's crops are then ONE gather from it (the
    `index_select` of a strided view whose rows are all (C, H, W) windows at every linear offset): no per-batch
    pad, flip or second pass. Costs (1 + flip) x (1 + 2p/H)(1 + 2p/W) x the split's memory."""

    def __init__(self, images: torch.Tensor, padding: int, flip: bool):
        n, c, h, w = images.shape
        p = padding
        self.padding, self.shape = p, (c, h, w)
        self.data = torch.zeros((1 + bool(flip), n, c, h + 2 * p, w + 2 * p), dtype=torch.uint8,
                                device=images.device)
        self.data[0, :, :, p:p + h, p:p + w] = images
        if flip:
            self.data[1, :, :, p:p + h, p:p + w] = images.flip(3)
        s = self.data.stride()
        self.strides = s
        last = (c - 1) * s[2] + (h - 1) * s[3] + (w - 1)  # offset of a window's last element from its first
        self.windows = self.data.as_strided((self.data.numel() - last, c, h, w), (1, s[2], s[3], 1))

    @staticmethod
    def nbytes(images: torch.Tensor, padding: int, flip: bool) -> int:
        n, c, h, w = images.shape
        return (1 + bool(flip)) * n * c * (h + 2 * padding) * (w + 2 * padding)

    def crops(self, pos: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor,
              mirror: Optional[torch.Tensor] = None) -> torch.Tensor:
        """uint8 (b, C, H, W): sample pos[i] cropped at (oy[i], ox[i]) of its padded image, then mirrored where
        `mirror` is set (the mirror of the crop at ox is the crop at 2p - ox of the mirrored image)."""
        s = self.strides
        off = pos * s[1] + oy * s[3]
        if mirror is not None:
            off = off + torch.where(mirror, 2 * self.padding - ox, ox) + mirror.long() * s[0]
        else:
            off = off + ox
        return self.windows.index_select(0, off)


def _interpolation(scale: torch.Tensor, centre: torch.Tensor, out: int, size: int) -> torch.Tensor:
    """(b, out, size) float32 bilinear weights mapping an axis of `size` pixels onto `out` pixels: output pixel j
    samples the normalised coordinate scale * g_j + centre (g_j the pixel centres in [-1, 1], align_corners=False),
    clamped to the image (grid_sample's reflection padding for a box inside the image)."""
    b = scale.shape[0]
    g = (2 * torch.arange(out, device=scale.device, dtype=torch.float32) + 1) / out - 1
    u = ((scale[:, None] * g + centre[:, None]) + 1) * (size / 2) - 0.5
    u = u.clamp(0, size - 1)
    i0 = u.floor()
    w1 = u - i0
    i0 = i0.long()
    i1 = (i0 + 1).clamp(max=size - 1)
    m = torch.zeros(b, out, size, device=scale.device)
    m.scatter_add_(2, i0[..., None], (1 - w1)[..., None])
    m.scatter_add_(2, i1[..., None], w1[..., None])
    return m


def resized_crop_flip(x: torch.Tensor, size: int, sw: torch.Tensor, sh: torch.Tensor, cx: torch.Tensor,
                      cy: torch.Tensor, mirror: Optional[torch.Tensor] = None, dtype=torch.float32
                      ) -> torch.Tensor:
    """Bilinear resize of the box (centre cx, cy; half-extent sw, sh in normalised [-1, 1] coordinates) of every
    sample to size x size, mirrored where `mirror` is set, as two batched matmuls with per-sample interpolation
    matrices (separable: rows, then columns). `x` may be uint8 (converted to [0, 1] first) or float in [0, 1]."""
    sx = sw if mirror is None else torch.where(mirror, -sw, sw)
    mx = _interpolation(sx, cx, size, x.shape[3])  # (b, S, W)
    my = _interpolation(sh, cy, size, x.shape[2])  # (b, S, H)
    b, c, h, w = x.shape
    xf = to_unit(x) if x.dtype == torch.uint8 else x.float()
    cols = torch.bmm(xf.reshape(b, c * h, w), mx.transpose(1, 2))  # (b, C*H, S): columns resampled
    cols = cols.view(b, c, h, size).transpose(1, 2).reshape(b, h, c * size)
    out = torch.bmm(my, cols).view(b, size, c, size).transpose(1, 2)  # (b, C, S, S): rows resampled
    return out.to(dtype).contiguous()


def rrc_parameters(n: int, g: torch.Generator, device, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Inception-style random resized crop boxes (sw, sh, cx, cy) of n samples, in normalised coordinates."""
    area = torch.empty(n, device=device).uniform_(scale[0], scale[1], generator=g)
    logr = torch.empty(n, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    r = torch.exp(logr)
    sw = torch.sqrt(area * r).clamp(max=1.0)  # crop width / image width
    sh = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(n, device=device, generator=g) * 2 - 1) * (1 - sw)
    cy = (torch.rand(n, device=device, generator=g) * 2 - 1) * (1 - sh)
    return sw, sh, cx, cy


def random_resized_crop_flip(x: torch.Tensor, size: int, flip: bool, g: torch.Generator,
                             scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Inception-style random resized crop (+ flip) of a batch (see `resized_crop_flip`)."""
    b = x.shape[0]
    box = rrc_parameters(b, g, x.device, scale, ratio)
    mirror = torch.rand(b, device=x.device, generator=g) < 0.5 if flip else None
    return resized_crop_flip(x, size, *box, mirror=mirror, dtype=x.dtype if x.is_floating_point() else
                             torch.float32)


# ------------------------------------------------------------------------------------------------- backends


class TensorLoader(_OrderMixin):
    """The whole split as one uint8 tensor on the device; batches are sliced, converted and augmented there."""

    STORE_MAX_BYTES = 4 << 30  # larger splits crop per batch (pad + gather + mirror): slower, no extra memory

    def __init__(self, split: Split, batch_size: int, shuffle: bool, drop_last: bool, augment: str = "none",
                 crop_padding: int = 0, flip: bool = False, seed: int = 0, device="cpu", dtype=torch.float32,
                 rank: int = 0, world_size: int = 1, channels_last: bool = False):
        if split.images is None:
            split = split.materialize()
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.ids = split.ids.to(self.device)
        self.n, self.batch_size, self.shuffle, self.drop_last = len(split), batch_size, shuffle, drop_last
        self.augment, self.crop_padding, self.flip = augment, crop_padding, flip
        self.seed, self.dtype, self.rank, self.world_size = seed, dtype, rank, world_size
        self.channels_last = bool(channels_last)
        self.image_size = int(self.images.shape[-1])
        self.store: Optional[CropStore] = None
        if augment == "crop_flip" and (crop_padding > 0 or flip) and \
                CropStore.nbytes(self.images, crop_padding, flip) <= self.STORE_MAX_BYTES:
            self.store = CropStore(self.images, crop_padding, flip)

    @property
    def augmented(self) -> bool:
        return self.augment != "none"

    def epoch_parameters(self, epoch: int) -> Dict[str, torch.Tensor]:
        """This rank's random augmentation parameters of epoch `epoch`, one row per position of its order, drawn
        at once from one generator seeded with (seed, epoch) on the loader's device."""
        if not self.augmented:
            return {}
        if self.augment not in ("crop_flip", "rrc_flip"):
            raise UserError(f"loader.augment='{self.augment}' is unknown: use none, crop_flip or rrc_flip")
        n, dev = self._positions(), self.device
        g = torch.Generator(device=dev).manual_seed(mix_seed(self.seed, epoch, 7))
        if self.augment == "crop_flip":
            hi = 2 * self.crop_padding + 1
            out = {"oy": torch.randint(0, hi, (n,), device=dev, generator=g),
                   "ox": torch.randint(0, hi, (n,), device=dev, generator=g)}
        else:
            out = dict(zip(("sw", "sh", "cx", "cy"), rrc_parameters(n, g, dev)))
        if self.flip:
            out["mirror"] = torch.rand(n, device=dev, generator=g) < 0.5
        return {k: self.shard(v) for k, v in out.items()}

    def iter_epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[Batch]:
        params = self.epoch_parameters(epoch)
        bs = self.batch_size
        for b, pos in self.batch_positions(epoch, start_batch):
            pos = pos.to(self.device, non_blocking=True)
            pb = {k: v[b * bs:b * bs + len(pos)] for k, v in params.items()}
            if self.store is not None:  # one uint8 gather: slice + crop + mirror, then one conversion
                x = to_unit(self.store.crops(pos, pb["oy"], pb["ox"], pb.get("mirror")), self.dtype)
            elif self.augment == "crop_flip":  # uint8: crop and flip before converting (4x less traffic)
                x = self.images.index_select(0, pos)
                x = to_unit(crop_flip(x, self.crop_padding, pb["oy"], pb["ox"], pb.get("mirror")), self.dtype)
            elif self.augment == "rrc_flip":
                x = resized_crop_flip(self.images.index_select(0, pos), self.image_size, pb["sw"], pb["sh"],
                                      pb["cx"], pb["cy"], pb.get("mirror"), self.dtype)
            else:
                x = to_unit(self.images.index_select(0, pos), self.dtype)
            yield Batch(image_layout(x, self.channels_last), self.labels.index_select(0, pos),
                        self.ids.index_select(0, pos))

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
                 world_size: int = 1, channels_last: bool = False):
        self.split = split
        self.n, self.batch_size, self.shuffle, self.drop_last = len(split), batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device, self.dtype = torch.device(device), dtype
        self.channels_last = bool(channels_last)
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
        for x, y, idx in dl:  # the DataLoader collates _TorchDataset's (image, label, id) samples
            yield Batch(image_layout(x.to(self.device, self.dtype, non_blocking=True), self.channels_last),
                        y.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True))

    def __iter__(self):
        return self.iter_epoch(0)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def loader_dtype(name: str) -> torch.dtype:
    """The torch dtype of `loader.dtype` (the dtype batches are delivered in; models normalise in their own)."""
    check(name in DTYPES, f"loader.dtype='{name}' is unknown: use {', '.join(DTYPES)}")
    return DTYPES[name]


def build_loader(cfg, split: Split, train: bool, seed: int = 0, device=None, rank: int = 0,
                 world_size: int = 1, channels_last: bool = False):
    """A loader for `split` from a loader config node. Train loaders shuffle/augment/drop_last as configured;
    eval loaders never do (loader.* ranges are checked once, by the config's preflight). `channels_last`: image
    batches come in channels_last memory format (pass `trainer.channels_last`: the format its models run in)."""
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
                  dtype=loader_dtype(cfg.get("dtype", "float32")), channels_last=bool(channels_last))
    if cfg.augment not in ("none", "crop_flip", "rrc_flip"):
        raise UserError(f"loader.augment='{cfg.augment}' is unknown: use none, crop_flip or rrc_flip")
    if split.texts is not None:  # text: raw strings in batches, whichever image backend is configured
        return _text_loader(cfg, split, common)
    if cfg.backend == "tensor":
        return TensorLoader(split, **common)
    if cfg.backend == "torch":
        return TorchLoader(split, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory, train=train, **common)
    if cfg.backend == "ffcv":
        from .ffcv_loader import FFCVLoader

        return FFCVLoader(cfg, split, train=train, **common)
    raise UserError(f"loader.backend='{cfg.backend}' is unknown: use tensor, torch or ffcv")


def _text_loader(cfg, split: Split, common: dict):
    """The loader of a text split: `TextLoader`. Image augmentation does not apply to text (said once); the tensor
    (default) and torch backends both read it, ffcv (image .beton files) cannot."""
    check(cfg.backend in ("tensor", "torch"), f"loader.backend={cfg.backend} reads images; text datasets use "
                                              f"loader.backend=tensor")
    if common["augment"] != "none" and not _SAID["augment"]:
        _SAID["augment"] = True
        log.info("loader.augment=%s is an image augmentation: text batches are not augmented", common["augment"])
    return TextLoader(split, **common)


_SAID = {"augment": False}  # what the text loader has said once in this process


class TextLoader(_OrderMixin):
    """Batches of raw texts (`Batch.inputs`: a list of str; each model tokenises for itself) with their labels and
    ids, in the seeded order of the tensor loader (shuffle, ranks, resume from a batch). Nothing is augmented, so
    frozen models' outputs are cached by id."""

    augmented = False

    def __init__(self, split: Split, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0, device="cpu",
                 rank: int = 0, world_size: int = 1, **_):
        self.texts, self.device = split.texts, torch.device(device)
        self.labels, self.ids = split.labels.to(self.device), split.ids.to(self.device)
        self.n, self.batch_size, self.shuffle, self.drop_last = len(split), batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def iter_epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[Batch]:
        for _, pos in self.batch_positions(epoch, start_batch):
            p = pos.tolist()
            pos = pos.to(self.device)
            yield Batch([self.texts[i] for i in p], self.labels.index_select(0, pos), self.ids.index_select(0, pos))

    def __iter__(self):
        return self.iter_epoch(0)


class NoiseBatches:
    """The Trainer's loader for zero-shot KT: one epoch = one pseudo-batch = `steps` Batches sharing one
    z ~ N(0, I) of shape (batch_size, z_dim) as `inputs` (no targets, no ids: every z is new), with
    `extra={"phase": step within the pseudo-batch, "pseudo_batch": its index}`; z is drawn on the CPU from a
    generator seeded by (seed, pseudo-batch index): the same z on any device and after a resume."""

    augmented = True  # no per-sample output caches (every z is new)

    def __init__(self, batch_size: int, z_dim: int, steps: int, seed: int = 0, device="cpu"):
        self.batch_size, self.z_dim, self.steps, self.seed = int(batch_size), int(z_dim), int(steps), int(seed)
        self.device = torch.device(device)
        self.num_samples = self.batch_size

    def __len__(self) -> int:
        return self.steps

    def z(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, index, 11))
        return torch.randn(self.batch_size, self.z_dim, generator=g).to(self.device)

    def iter_epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[Batch]:
        z = self.z(epoch)
        for phase in range(start_batch, self.steps):
            yield Batch(z, extra={"phase": phase, "pseudo_batch": epoch})
