"""Model resolution: a zoo name (trained on demand through `Context.train_missing`), a checkpoint folder/file
written by this suite, `arch@weights_file`, a timm name (its pretrained hub weights) or a model config node."""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..errors import UserError
from ..io_utils import content_hash
from ..models import create_model, load_checkpoint, read_meta, zoo_dir
from ..schema import as_dict
from .context import Context, ModelRef
from .preflight import check_model_spec, zoo_names, zoo_seed

log = logging.getLogger("kt")


def zoo_folder(cfg, dataset_name: str, name: str) -> Path:
    """Checkpoint folder of zoo entry `name`; draw k > 0 of the zoo (zoo.seed=k) lives under zoo_seed<k>/."""
    k = zoo_seed(cfg)
    return zoo_dir(cfg.paths.checkpoints, dataset_name if k == 0 else f"{dataset_name}/zoo_seed{k}", name)


def hash_index(cfg) -> Path:
    """Where content hashes of weight files are remembered across runs (by path, size and mtime)."""
    return Path(cfg.paths.cache) / "content_hashes.json"


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
            key = f"{spec.arch}-{content_hash(spec.checkpoint, hash_index(cfg))}"
        elif spec.get("pretrained"):
            key = f"timm-{spec.arch}"
        return ModelRef(spec.get("name") or spec.arch, m, key, {})
    name = str(spec)
    check_model_spec(name, cfg, role)  # unknown names and missing weight files fail here, before any loading
    if name in zoo_names(cfg):
        folder = zoo_folder(cfg, info.name, name)
        meta = read_meta(folder)
        if meta is None:
            if not cfg.zoo.get("train_missing", False) or ctx.train_missing is None:
                raise UserError(f"zoo model '{name}' has no checkpoint in {folder}: train it with "
                                f"`python main_pretrain.py name={name}` or set zoo.train_missing=true")
            log.info("zoo model '%s' is missing: training it now (zoo.train_missing=true)", name)
            ctx.train_missing(name, ctx)
        model, meta = load_checkpoint(folder, info.num_classes, info.channels, hash_index(cfg))
        return ModelRef(name, model, meta["hash"], meta)
    if "@" in name:
        arch, path = name.split("@", 1)
        m = create_model(arch, info.num_classes, info.channels, info.mean, info.std, checkpoint=path,
                         img_size=info.image_size, reinit_head=not role.startswith("teacher"))
        return ModelRef(name, m, f"{arch}-{content_hash(path, hash_index(cfg))}", {"arch": arch, "checkpoint": path})
    p = Path(name)
    if p.exists():
        model, meta = load_checkpoint(p, info.num_classes, info.channels, hash_index(cfg))
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
