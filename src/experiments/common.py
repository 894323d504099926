"""Wiring shared by every family: run dir, device and ranks, dataset, model resolution (zoo name, checkpoint,
timm name), output cache, loaders, tracker. No maths here."""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ..data import build_dataset, build_loader, resolve_device
from ..data.datasets import Dataset, Split
from ..data.loaders import loader_dtype
from ..engine import OutputCache, digest, seed_everything
from ..errors import UserError, closest
from ..io_utils import file_hash, load_state_dict, write_json
from ..models import Normalized, create_model, load_checkpoint, read_meta, save_checkpoint, zoo_dir
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

    @property
    def inputs_key(self) -> str:
        """The data part of every output-cache key: dataset + how its images are decoded and evaluated."""
        return f"{self.dataset_key}-{input_key(self.cfg)}"

    def outputs(self, ref: ModelRef, split: Split, features: bool = False) -> Dict[str, torch.Tensor]:
        return self.cache.get(ref.model.to(self.device), ref.key, self.inputs_key, split, self.eval_loader(split),
                              features=features, amp=self.cfg.trainer.amp, label=ref.name)

    def report(self, row: Dict[str, Any], printer: Callable[[Dict[str, Any], Path], None]) -> Dict[str, Any]:
        """The end of every family's run: `summary.json` (+ wandb summary) from `row`, then `printer(summary,
        run_dir)` on rank 0; returns the summary."""
        summary = self.tracker.summary(row)
        if self.rank == 0:
            printer(summary, self.run_dir)
        return summary

    def output_path(self, ref: ModelRef, split: Split) -> Optional[Path]:
        """The cache file `outputs(ref, split)` reads and writes (None when it is not cached)."""
        return self.cache.path(ref.key, self.inputs_key, split) if ref.key and self.cache.enabled else None


def dataset_key(dcfg) -> str:
    parts = OmegaConf.to_container(dcfg, resolve=True)
    parts.pop("subset", None)
    for k in ("pretrain_split", "transfer_split", "val_split", "test_split"):
        parts.pop(k, None)
    return f"{dcfg.name}-{dcfg.image_size}px-{digest(sorted(parts.items()))}"


def input_key(cfg) -> str:
    """What decides a model's outputs on a split besides the dataset and the model: how images are decoded (the
    loader backend; for FFCV the .beton folder, whose JPEG settings change pixels), their dtype and the eval
    precision. Part of every output-cache key."""
    ld = cfg.loader
    parts = [str(ld.backend), str(ld.get("dtype", "float32")), f"amp_{cfg.trainer.amp}"]
    if ld.backend == "ffcv":
        parts.append(digest(str(ld.get("ffcv_dir"))))
    return "-".join(parts)


def _num(node, key):
    v = node.get(key) if node is not None and hasattr(node, "get") else None
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def preflight(cfg: DictConfig) -> None:
    """Cheap checks of the values every family shares, run by `setup` before any data, model or training work:
    numeric ranges, temperatures, and the model names in `teacher` / `student` / `teachers` / `models` (so a
    typo fails in a second, not after the zoo models were trained). Each failure is one UserError naming the
    value and the fix. Families with keys of their own add their checks at the top of their `run`."""
    o, ld, t = cfg.get("optimizer"), cfg.get("loader"), cfg.get("trainer")
    rules = [
        (o, "optimizer", "lr", lambda v: v > 0, "must be > 0: use e.g. optimizer.lr=0.1"),
        (o, "optimizer", "weight_decay", lambda v: v >= 0, "must be >= 0: use e.g. optimizer.weight_decay=5e-4"),
        (o, "optimizer", "momentum", lambda v: 0 <= v < 1, "must be in [0, 1): use e.g. optimizer.momentum=0.9"),
        (ld, "loader", "batch_size", lambda v: v > 0, "must be > 0: use e.g. loader.batch_size=128"),
        (ld, "loader", "eval_batch_size", lambda v: v > 0, "must be > 0: use e.g. loader.eval_batch_size=512"),
        (t, "trainer", "max_steps", lambda v: v > 0, "must be > 0 (or null to train for trainer.epochs)"),
        (t, "trainer", "seed", lambda v: v >= 0, "must be >= 0: use e.g. trainer.seed=0"),
        (cfg, "", "top_p", lambda v: 0 < v <= 100, "must be in (0, 100]: use e.g. top_p=20"),
        (cfg, "", "temperature", lambda v: v > 0, "must be > 0: use e.g. temperature=1.0"),
    ]
    if t is not None and t.get("max_steps") is None:
        rules.append((t, "trainer", "epochs", lambda v: v > 0, "must be > 0: use e.g. trainer.epochs=10"))
    sub = cfg.get("dataset", {}).get("subset") if cfg.get("dataset") is not None else None
    rules += [(sub, "dataset.subset", "fraction", lambda v: 0 < v <= 1, "is outside (0, 1]: use e.g. 0.1"),
              (sub, "dataset.subset", "per_class", lambda v: v > 0, "must be > 0: use e.g. 128")]
    for key in cfg:  # method-like nodes (method, parallel_method, ...): temperatures must be positive
        node = cfg.get(key)
        if isinstance(node, DictConfig) and "_target_" in node:
            for k in ("temperature", "nce_t"):
                rules.append((node, str(key), k, lambda v: v > 0, f"must be > 0: use e.g. {key}.{k}=1.0"))
            rules.append((node, str(key), "synth_ratio", lambda v: 0 <= v < 1,
                          "must be in [0, 1): use e.g. 0.2 (1 synthetic : 4 real), 0 disables it"))
    if ld is not None:
        loader_dtype(ld.get("dtype", "float32"))  # an unknown name: one UserError naming it and the choices
    for node, prefix, key, ok, fix in rules:
        v = _num(node, key)
        if v is not None and not ok(v):
            raise UserError(f"{prefix + '.' if prefix else ''}{key}={v} {fix}")
    for role in ("teacher", "student", "teachers", "models"):
        spec = cfg.get(role)
        for i, s in enumerate(spec if OmegaConf.is_list(spec) or isinstance(spec, (list, tuple)) else [spec]):
            if isinstance(s, str):
                check_model_spec(s, cfg, role if role not in ("teachers", "models") else f"{role}[{i}]")


def check_model_spec(name: str, cfg, role: str = "model") -> None:
    """UserError unless `name` can be resolved by `resolve_model` (without loading or training anything)."""
    import timm

    if name in zoo_names(cfg) or Path(name).exists():
        return
    if "@" in name:
        arch, path = name.split("@", 1)
        if not timm.is_model(arch):
            from ..models import nets

            raise UserError(f"unknown architecture '{arch}' in {role}={name}"
                            f"{closest(arch, timm.list_models() + list(nets.OUR_MODELS))}: use arch@weights_file "
                            f"with a timm name or one of ours")
        if not Path(path).is_file():
            raise UserError(f"weights file {path} (from {role}={name}) does not exist: check the path")
        return
    if timm.is_model(name):
        return
    raise UserError(f"unknown {role} '{name}'{closest(name, zoo_names(cfg) + timm.list_models())}: use a zoo name "
                    f"({', '.join(zoo_names(cfg)) or 'none configured'}), a timm model name, a checkpoint folder "
                    f"or arch@weights_file")


def setup(cfg: DictConfig, run_dir=None, job_type: str = "train", tracker: bool = True) -> Context:
    run_dir = run_dir_from_hydra(run_dir)
    preflight(cfg)
    rank, world, device = init_distributed(cfg.trainer.device)
    if world > 1:  # every rank resumes from and reports into rank 0's run dir (Hydra's default dir has a pid)
        import torch.distributed as dist

        box = [str(run_dir)]
        dist.broadcast_object_list(box, src=0)
        run_dir = Path(box[0])
    seed_everything(cfg.trainer.seed)  # preflight() refused a negative seed
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
    check_model_spec(name, cfg, role)  # unknown names and missing weight files fail here, before any loading
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
        m = create_model(arch, info.num_classes, info.channels, info.mean, info.std, checkpoint=path,
                         img_size=info.image_size, reinit_head=not role.startswith("teacher"))
        return ModelRef(name, m, f"{arch}-{file_hash(path)}", {"arch": arch, "checkpoint": path})
    p = Path(name)
    if p.exists():
        model, meta = load_checkpoint(p, info.num_classes, info.channels)
        return ModelRef(meta.get("name", p.name), model, meta["hash"], meta)
    # what is left is a timm name (check_model_spec accepted it): its pretrained hub weights
    try:
        m = create_model(name, info.num_classes, info.channels, info.mean, info.std, pretrained=True)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"could not load pretrained weights for timm model '{name}' ({type(e).__name__}); "
                        f"offline, use '{name}@/path/to/weights.safetensors' or pre-fill the HF cache") from e
    tag = getattr(m.net, "pretrained_cfg", {}).get("tag") or ""
    return ModelRef(name, m, f"timm-{name}-{tag}", {"arch": name})


# ------------------------------------------------------------------------------------------- stages
# Multi-stage families (multi-teacher, KDEP) keep each finished stage in a folder: the stage's student under
# `student/` (written first) and `row.json` (written last: its presence marks the stage finished).
def read_stage(d: Path, like: Optional[torch.nn.Module] = None, device="cpu"):
    """(model, row, checkpoint meta) of the stage finished earlier in folder `d`, else None. `model` is a copy of
    `like` holding the stage's student weights (model and meta are None when `like` is None)."""
    if not (d / "row.json").is_file():
        return None
    row = json.loads((d / "row.json").read_text())
    if like is None:
        return None, row, None
    meta = read_meta(d / "student")
    if meta is None:
        return None
    model = copy.deepcopy(like)
    model.load_state_dict(load_state_dict(d / "student" / "model.safetensors"))
    return model.to(device), row, meta


def write_stage(d: Path, row: dict, model: Optional[Normalized] = None, meta: Optional[dict] = None,
                rank: int = 0) -> Optional[dict]:
    """Mark stage `d` finished: the student's weights first (if any), the row last. Only rank 0 writes (the other
    ranks hold the same weights); returns the saved checkpoint's meta (with its content hash), else None."""
    if rank != 0:
        return None
    saved = save_checkpoint(model, d / "student", meta or {}) if model is not None else None
    write_json(d / "row.json", row)
    return saved
