"""Wiring shared by every family: run dir, device and ranks, dataset, model resolution (zoo name, checkpoint,
timm name), output cache, loaders, tracker. No maths here."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ..data import build_dataset, build_loader, resolve_device
from ..data.datasets import Dataset, Split
from ..engine import OutputCache, digest, seed_everything
from ..errors import UserError, closest
from ..io_utils import file_hash
from ..models import Normalized, create_model, load_checkpoint, read_meta, zoo_dir
from ..tracking import Tracker

log = logging.getLogger("kt")


def run_dir_from_hydra(run_dir=None) -> Path:
    if run_dir is not None:
        return Path(run_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def as_dict(node) -> dict:
    """A plain dict from a config node, a dict or None."""
    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def dist_info():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def init_distributed(device_name: str):
    rank, world, local = dist_info()
    dev = resolve_device(device_name)
    if world > 1:
        import torch.distributed as dist

        if dev.type == "cuda":
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


@dataclass
class ModelRef:
    name: str
    model: Normalized
    key: Optional[str]  # content key for output caches (None: do not cache)
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    cfg: DictConfig
    run_dir: Path
    device: torch.device
    ds: Dataset
    dataset_key: str
    tracker: Optional[Tracker]
    cache: OutputCache
    rank: int = 0
    world_size: int = 1

    @property
    def info(self):
        return self.ds.info

    def eval_loader(self, split: Split):
        return build_loader(self.cfg.loader, split, train=False, device=self.device)

    def train_loader(self, split: Split, loader_cfg=None, seed: Optional[int] = None):
        return build_loader(loader_cfg or self.cfg.loader, split, train=True,
                            seed=self.cfg.trainer.seed if seed is None else seed, device=self.device,
                            rank=self.rank, world_size=self.world_size)

    def outputs(self, ref: ModelRef, split: Split, features: bool = False) -> Dict[str, torch.Tensor]:
        return self.cache.get(ref.model.to(self.device), ref.key, self.dataset_key, split, self.eval_loader(split),
                              features=features, amp=self.cfg.trainer.amp, label=ref.name)


def dataset_key(dcfg) -> str:
    parts = OmegaConf.to_container(dcfg, resolve=True)
    parts.pop("subset", None)
    for k in ("pretrain_split", "transfer_split", "val_split", "test_split"):
        parts.pop(k, None)
    return f"{dcfg.name}-{dcfg.image_size}px-{digest(sorted(parts.items()))}"


def setup(cfg: DictConfig, run_dir=None, job_type: str = "train", tracker: bool = True) -> Context:
    run_dir = run_dir_from_hydra(run_dir)
    rank, world, device = init_distributed(cfg.trainer.device)
    seed_everything(cfg.trainer.seed)
    if cfg.trainer.seed < 0:
        raise UserError(f"trainer.seed={cfg.trainer.seed} must be >= 0")
    ds = build_dataset(cfg.dataset, cfg.paths)
    trk = None
    if tracker:
        trk = Tracker(run_dir, cfg.wandb, OmegaConf.to_container(cfg, resolve=True), rank=rank, job_type=job_type)
    cache = OutputCache(Path(cfg.paths.cache) / "outputs", enabled=bool(cfg.get("use_cache", True)))
    return Context(cfg, run_dir, device, ds, dataset_key(cfg.dataset), trk, cache, rank, world)


# ------------------------------------------------------------------------------------------ model resolution


def zoo_names(cfg) -> list:
    z = cfg.get("zoo")
    return list(z.models.keys()) if z is not None and z.get("models") else []


def resolve_model(spec, ctx: Context, role: str = "model") -> ModelRef:
    """A model from a zoo name, a checkpoint folder/file written by this suite, `arch@weights_file`, a timm name
    (pretrained hub weights), or a model config node {arch, pretrained, checkpoint, kwargs}."""
    info, cfg = ctx.info, ctx.cfg
    if isinstance(spec, (DictConfig, dict)):
        spec = OmegaConf.create(spec) if isinstance(spec, dict) else spec
        m = create_model(spec.arch, info.num_classes, info.channels, info.mean, info.std,
                         pretrained=bool(spec.get("pretrained", False)), checkpoint=spec.get("checkpoint"),
                         kwargs=as_dict(spec.get("kwargs")), img_size=info.image_size)
        key = None
        if spec.get("checkpoint"):
            key = f"{spec.arch}-{file_hash(spec.checkpoint)}"
        elif spec.get("pretrained"):
            key = f"timm-{spec.arch}"
        return ModelRef(spec.get("name") or spec.arch, m, key, {})
    name = str(spec)
    if name in zoo_names(cfg):
        folder = zoo_dir(cfg.paths.checkpoints, info.name, name)
        meta = read_meta(folder)
        if meta is None:
            if not cfg.zoo.get("train_missing", False):
                raise UserError(f"zoo model '{name}' has no checkpoint in {folder}: train it with "
                                f"`python main_pretrain.py name={name}` or set zoo.train_missing=true")
            from .pretrain import train_zoo_entry

            log.info("zoo model '%s' is missing: training it now (zoo.train_missing=true)", name)
            train_zoo_entry(name, ctx)
        model, meta = load_checkpoint(folder, info.num_classes, info.channels)
        return ModelRef(name, model, meta["hash"], meta)
    if "@" in name:
        arch, path = name.split("@", 1)
        if not Path(path).is_file():
            raise UserError(f"weights file {path} (from '{name}') does not exist: check the path")
        m = create_model(arch, info.num_classes, info.channels, info.mean, info.std, checkpoint=path,
                         img_size=info.image_size)
        return ModelRef(name, m, f"{arch}-{file_hash(path)}", {"arch": arch, "checkpoint": path})
    p = Path(name)
    if p.exists():
        model, meta = load_checkpoint(p, info.num_classes, info.channels)
        return ModelRef(meta.get("name", p.name), model, meta["hash"], meta)
    import timm

    if timm.is_model(name):
        try:
            m = create_model(name, info.num_classes, info.channels, info.mean, info.std, pretrained=True)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"could not load pretrained weights for timm model '{name}' ({type(e).__name__}); "
                            f"offline, use '{name}@/path/to/weights.safetensors' or pre-fill the HF cache") from e
        tag = getattr(m.net, "pretrained_cfg", {}).get("tag") or ""
        return ModelRef(name, m, f"timm-{name}-{tag}", {"arch": name})
    raise UserError(f"unknown {role} '{name}'{closest(name, zoo_names(cfg) + timm.list_models())}: use a zoo name "
                    f"({', '.join(zoo_names(cfg)) or 'none configured'}), a timm model name, a checkpoint folder "
                    f"or arch@weights_file")
