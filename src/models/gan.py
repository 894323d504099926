"""Generators of distillation data (gnosis' synthetic augmentation, docs/REFERENCE.md §5.3) and their checkpoints.

- `CondGenerator`: a class-conditional DCGAN generator, (z, y) -> image in [0, 1] (sigmoid output, raw input
  space like every dataset here): z ++ embed(y) -> Linear to (2w) x (s/4) x (s/4) -> BN, ReLU ->
  2 x [upsample x2, conv3x3, BN, ReLU] (w, then w/2 channels) -> conv3x3 to the image channels -> sigmoid.
- `SNDiscriminator`: SN-GAN's discriminator shape: convolutions with spectral norm (LeakyReLU 0.1), global sum
  pooling, a minibatch-std feature, a spectrally normalised linear output plus the projection term <embed(y), h> (Miyato & Koyama 2018).
- A *source* is what distillation samples from: `source.sample(n, rng) -> images (n, C, s, s)`, all randomness
  drawn on the CPU from the torch.Generator `rng` (the same images on any device). `GANSource` samples
  uniform classes; `ZeroShotSource` wraps the zero-shot generator of main_zeroshot.py (its output lives in the
  teacher's normalised space and is de-normalised with that teacher's statistics, as `ZeroShot.images` does).
- Checkpoints: `<folder>/model.safetensors` + `meta.json` with `kind: generator`, the generator type
  (`gan` | `zeroshot`), its constructor arguments and the image shape; loading never unpickles anything.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm

from ..errors import UserError, check
from ..io_utils import file_hash, load_state_dict, save_safetensors, write_json
from .generator import Generator

KIND = "generator"


class CondGenerator(nn.Module):
    def __init__(self, z_dim: int = 32, img_size: int = 8, channels: int = 1, num_classes: int = 10,
                 width: int = 64):
        super().__init__()
        check(img_size % 4 == 0 and img_size >= 4,
              f"dataset.image_size={img_size}: the GAN generator upsamples x4, so it needs a multiple of 4")
        check(z_dim > 0 and width >= 2, f"generator z_dim={z_dim} and width={width} must be > 0 (and width >= 2)")
        self.z_dim, self.img_size, self.channels = int(z_dim), int(img_size), int(channels)
        self.num_classes, self.width = int(num_classes), int(width)
        self.s0 = img_size // 4
        self.embed = nn.Embedding(num_classes, z_dim)
        self.fc = nn.Linear(2 * z_dim, 2 * width * self.s0 ** 2)
        self.net = nn.Sequential(
            nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Upsample(scale_factor=2), nn.Conv2d(width, width // 2, 3, 1, 1), nn.BatchNorm2d(width // 2),
            nn.ReLU(), nn.Conv2d(width // 2, channels, 3, 1, 1), nn.Sigmoid())

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.embed(y)], 1)).view(z.shape[0], 2 * self.width, self.s0, self.s0)
        return self.net(h)

    def inputs(self, n: int, rng: torch.Generator):
        """(z, y) for n samples, drawn on the CPU from `rng`: z ~ N(0, I), y uniform over the classes."""
        z = torch.randn(n, self.z_dim, generator=rng)
        y = torch.randint(0, self.num_classes, (n,), generator=rng)
        return z, y

    def config(self) -> dict:
        return {"z_dim": self.z_dim, "img_size": self.img_size, "channels": self.channels,
                "num_classes": self.num_classes, "width": self.width}


class SNDiscriminator(nn.Module):
    def __init__(self, img_size: int = 8, channels: int = 1, num_classes: int = 10, width: int = 64):
        super().__init__()
        sn = spectral_norm
        self.body = nn.Sequential(
            sn(nn.Conv2d(channels, width, 3, 1, 1)), nn.LeakyReLU(0.1),
            sn(nn.Conv2d(width, 2 * width, 4, 2, 1)), nn.LeakyReLU(0.1),
            sn(nn.Conv2d(2 * width, 2 * width, 3, 1, 1)), nn.LeakyReLU(0.1),
            sn(nn.Conv2d(2 * width, 4 * width, 4, 2, 1)), nn.LeakyReLU(0.1))
        self.out = sn(nn.Linear(4 * width + 1, 1))
        self.embed = sn(nn.Embedding(num_classes, 4 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.body(x).sum((2, 3))
        # minibatch standard deviation (Karras et al. 2018): the batch's mean feature std as one more input of
        # the output layer, so that a generator that ignores z (one image per class) is easy to tell apart
        spread = h.std(0, unbiased=False).mean().expand(h.shape[0], 1) if h.shape[0] > 1 else h[:, :1] * 0
        return self.out(torch.cat([h, spread], 1)).squeeze(1) + (self.embed(y) * h).sum(1)


# ------------------------------------------------------------------------------------------------ sources
class GANSource(nn.Module):
    """Samples of a CondGenerator with uniformly drawn classes (the class is not used as a label: the teacher
    labels every synthetic image). Always in eval mode (BN running statistics)."""

    def __init__(self, generator: CondGenerator):
        super().__init__()
        self.generator = generator
        self.img_size, self.channels = generator.img_size, generator.channels

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def sample(self, n: int, rng: torch.Generator, with_classes: bool = False):
        """n images (and their conditioning classes); the generator runs in eval mode (also while it trains)."""
        g = self.generator
        z, y = g.inputs(n, rng)
        dev = next(g.parameters()).device
        was = g.training
        g.eval()
        x = g(z.to(dev), y.to(dev))
        g.train(was)
        return (x, y.to(dev)) if with_classes else x


class ZeroShotSource(nn.Module):
    """The zero-shot generator (main_zeroshot.py) as a source: G(z) * std + mean with the statistics of the teacher
    it was trained against (raw images that teacher normalises back to exactly G(z))."""

    def __init__(self, generator: Generator, mean, std):
        super().__init__()
        self.generator = generator
        self.img_size, self.channels = generator.img_size, generator.channels
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def sample(self, n: int, rng: torch.Generator):
        z = torch.randn(n, self.generator.z_dim, generator=rng).to(self.mean.device)
        return self.generator(z) * self.std + self.mean


# ------------------------------------------------------------------------------------------------ checkpoints
def save_generator(generator: nn.Module, folder, meta: dict) -> dict:
    """`generator` (a CondGenerator or the zero-shot Generator) -> folder/{model.safetensors, meta.json}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(generator.state_dict(), folder / "model.safetensors")
    if isinstance(generator, CondGenerator):
        kind, args = "gan", generator.config()
    else:
        kind = "zeroshot"
        args = {"z_dim": generator.z_dim, "img_size": generator.img_size, "channels": generator.channels}
    meta = {**meta, "kind": KIND, "generator": kind, "args": args,
            "image_shape": [args["channels"], args["img_size"], args["img_size"]],
            "hash": file_hash(folder / "model.safetensors"), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json(folder / "meta.json", meta)
    return meta


def generator_folder(path) -> Optional[Path]:
    """The generator folder named by `path`: the folder itself, its model.safetensors file, or a run dir holding
    `generator/` (main_zeroshot.py, main_pretrain.py name=<generator>); None when there is none."""
    p = Path(path)
    if p.suffix == ".safetensors":
        p = p.parent
    for cand in (p, p / "generator"):
        if (cand / "meta.json").is_file() and (cand / "model.safetensors").is_file():
            return cand
    return None


def read_generator_meta(path) -> Optional[dict]:
    folder = generator_folder(path)
    if folder is None:
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{folder / 'meta.json'} is corrupt ({e}): delete {folder} to retrain the generator") from e
    return {**meta, "folder": str(folder)}


def load_generator(path, image_size: Optional[int] = None, channels: Optional[int] = None,
                   what: str = "method.synth_source") -> tuple[nn.Module, dict]:
    """(source, meta) of the generator saved under `path` (see `generator_folder`), checked against the dataset's
    image shape. Every failure is one UserError naming `what`."""
    meta = read_generator_meta(path)
    if meta is None:
        raise UserError(f"{what}={path} holds no generator (model.safetensors + meta.json): use a zoo generator "
                        f"name or a main_zeroshot.py run dir")
    if meta.get("kind") != KIND or meta.get("generator") not in ("gan", "zeroshot"):
        found = f"a {meta.get('arch')} classifier" if meta.get("arch") else f"kind={meta.get('kind')}"
        raise UserError(f"{what}={path} is not a generator ({found}): use a zoo generator name (zoo.generators) "
                        f"or a main_zeroshot.py run dir")
    c, s = meta["args"]["channels"], meta["args"]["img_size"]
    if (channels is not None and c != channels) or (image_size is not None and s != image_size):
        raise UserError(f"{what}={path} makes {c}x{s}x{s} images but the dataset has {channels}x{image_size}x"
                        f"{image_size}: train a generator on this dataset (python main_pretrain.py name=gan)")
    try:
        sd = load_state_dict(Path(meta["folder"]) / "model.safetensors")
    except Exception as e:
        raise UserError(f"{what}={path}: model.safetensors is unreadable ({type(e).__name__}): delete "
                        f"{meta['folder']} to retrain the generator") from e
    if meta["generator"] == "gan":
        gen = CondGenerator(**meta["args"])
        source = GANSource(gen)
    else:
        gen = Generator(**meta["args"])
        check("mean" in meta and "std" in meta, f"{what}={path}: meta.json lacks the teacher's mean/std")
        source = ZeroShotSource(gen, meta["mean"], meta["std"])
    try:
        gen.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"{what}={path}: its weights do not fit a {meta['generator']} generator with "
                        f"{meta['args']} ({str(e).splitlines()[0]}): delete {meta['folder']} to retrain it") from e
    for p in source.parameters():
        p.requires_grad_(False)
    return source.eval(), meta
