"""Pretraining / fine-tuning of zoo models (`main_pretrain.py`)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

from omegaconf import DictConfig, OmegaConf

from ..data import training_split
from ..engine import Trainer
from ..errors import UserError, closest
from ..methods import CrossEntropy
from ..metrics import accuracy
from ..models import create_model, freeze, read_meta, save_checkpoint, zoo_dir
from ..schema import LoaderConfig, OptimizerConfig, SchedulerConfig, TrainerConfig, typed
from .common import Context, as_dict, setup, zoo_folder, zoo_names, zoo_seed

log = logging.getLogger("kt")

_RECIPE_KEYS = {"arch", "kwargs", "seed", "epochs", "batch_size", "augment", "flip", "crop_padding", "optimizer",
                "scheduler", "label_smoothing", "freeze_backbone", "pretrained", "checkpoint"}


def recipe(name: str, cfg) -> DictConfig:
    """The zoo's shared training recipe merged with entry `name`'s overrides."""
    if name not in zoo_names(cfg):
        raise UserError(f"unknown zoo model '{name}'{closest(name, zoo_names(cfg))}; zoo '{cfg.zoo.name}' has "
                        f"{', '.join(zoo_names(cfg))}")
    plain = lambda n: OmegaConf.create(OmegaConf.to_container(n, resolve=True) if n is not None else {})
    r = OmegaConf.merge(plain(cfg.zoo.get("train")), plain(cfg.zoo.models[name]))
    bad = set(r.keys()) - _RECIPE_KEYS
    if bad:
        raise UserError(f"zoo entry '{name}' has unknown keys {sorted(bad)}; allowed: {sorted(_RECIPE_KEYS)}")
    if zoo_seed(cfg):  # another draw of the same zoo: every entry's seed shifted by 1000 per draw
        r.seed = int(r.get("seed", cfg.trainer.seed)) + 1000 * zoo_seed(cfg)
    return r


def train_classifier(ctx: Context, r: DictConfig, run_dir: Path, name: str) -> Dict[str, float]:
    """Train one model with cross-entropy from a recipe; returns val/test accuracies and the trained model."""
    cfg, info = ctx.cfg, ctx.info
    loader_cfg = typed(LoaderConfig, cfg.loader, {k: r[k] for k in ("batch_size", "augment", "flip",
                                                                      "crop_padding") if k in r})
    trainer_cfg = typed(TrainerConfig, cfg.trainer, {"epochs": r.get("epochs", cfg.trainer.epochs),
                                                      "seed": r.get("seed", cfg.trainer.seed),
                                                      # a zoo recipe counts epochs; a plain model run keeps
                                                      # the run's trainer.max_steps
                                                      "max_steps": None if "epochs" in r else
                                                      cfg.trainer.max_steps})
    from ..engine import seed_everything

    seed_everything(trainer_cfg.seed)
    model = create_model(r.arch, info.num_classes, info.channels, info.mean, info.std,
                         pretrained=bool(r.get("pretrained", False)), checkpoint=r.get("checkpoint"),
                         kwargs=as_dict(r.get("kwargs")), img_size=info.image_size)
    if r.get("freeze_backbone", False):  # linear probe: only the classifier trains
        freeze(model.net)
        for p in model.net.get_classifier().parameters():
            p.requires_grad_(True)
    train_split = training_split(ctx.ds, cfg.dataset.pretrain_split, cfg.dataset.subset)
    loader = ctx.train_loader(train_split, loader_cfg, seed=trainer_cfg.seed)
    val_name = cfg.dataset.val_split if cfg.dataset.val_split in ctx.ds.splits else None
    val_loader = ctx.eval_loader(ctx.ds.split(val_name)) if val_name else None

    def evaluate(m):
        if val_loader is None:
            return {}
        from ..engine import predict

        out = predict(m, val_loader)
        return {"val/acc": accuracy(out["logits"], out["labels"])}

    method = CrossEntropy(model, label_smoothing=float(r.get("label_smoothing", 0.0)))
    trainer = Trainer(method, loader, trainer_cfg, typed(OptimizerConfig, r.get("optimizer")) if "optimizer" in r
                      else cfg.optimizer, typed(SchedulerConfig, r.get("scheduler")) if "scheduler" in r
                      else cfg.scheduler, run_dir, tracker=ctx.tracker if run_dir == ctx.run_dir else None,
                      evaluate=evaluate, device=ctx.device, name=name, rank=ctx.rank, world_size=ctx.world_size)
    last = trainer.fit()
    from ..engine import predict

    test = predict(model, ctx.eval_loader(ctx.ds.split(cfg.dataset.test_split)))
    res = {"val_acc": last.get("val/acc"), "test_acc": accuracy(test["logits"], test["labels"]),
           "steps": trainer.total_steps}
    return res, model


def train_zoo_entry(name: str, ctx: Context, run_dir: Optional[Path] = None) -> dict:
    """Train zoo entry `name` with its recipe and save it to the zoo folder (checkpoint + meta.json)."""
    cfg = ctx.cfg
    r = recipe(name, cfg)
    run_dir = Path(run_dir or ctx.run_dir / "zoo" / name)
    res, model = train_classifier(ctx, r, run_dir, name)
    meta = {"name": name, "kwargs": as_dict(r.get("kwargs")),
            "dataset": OmegaConf.to_container(cfg.dataset, resolve=True), "val_acc": res["val_acc"],
            "test_acc": res["test_acc"], "recipe": OmegaConf.to_container(r, resolve=True), "zoo": cfg.zoo.name,
            "zoo_seed": zoo_seed(cfg)}
    folder = zoo_folder(cfg, ctx.info.name, name)
    if ctx.rank == 0:
        meta = save_checkpoint(model, folder, meta)
    log.info("zoo model %-12s test acc %.2f%%  -> %s", name, 100 * res["test_acc"], folder)
    return meta


def run(cfg: DictConfig, run_dir=None) -> dict:
    ctx = setup(cfg, run_dir, job_type="pretrain")
    try:
        if cfg.name is None:
            # a model config trained with the run's optimizer/scheduler/trainer
            r = OmegaConf.create({"arch": cfg.model.arch, "kwargs": cfg.model.get("kwargs") or {},
                                  "pretrained": cfg.model.get("pretrained", False),
                                  "checkpoint": cfg.model.get("checkpoint"),
                                  "freeze_backbone": cfg.get("freeze_backbone", False)})
            res, model = train_classifier(ctx, r, ctx.run_dir, cfg.model.arch)
            from ..models import save_checkpoint as save

            meta = {"name": cfg.save_as or cfg.model.arch, "kwargs": as_dict(r.kwargs),
                    "dataset": OmegaConf.to_container(cfg.dataset, resolve=True), **res}
            folder = (zoo_dir(cfg.paths.checkpoints, ctx.info.name, cfg.save_as) if cfg.save_as
                      else ctx.run_dir / "model")
            if ctx.rank == 0:
                save(model, folder, meta)
            rows = {meta["name"]: {"test_acc": res["test_acc"], "val_acc": res["val_acc"], "path": str(folder)}}
        else:
            names = zoo_names(cfg) if cfg.name == "all" else [cfg.name]
            rows = {}
            for n in names:
                folder = zoo_folder(cfg, ctx.info.name, n)
                meta = read_meta(folder)
                if meta is not None and cfg.skip_existing:
                    log.info("zoo model %s exists (%s): skipped (skip_existing=true)", n, folder)
                else:
                    meta = train_zoo_entry(n, ctx, ctx.run_dir / n if len(names) > 1 else ctx.run_dir)
                rows[n] = {"test_acc": meta["test_acc"], "val_acc": meta.get("val_acc"), "path": str(folder)}
        summary = ctx.tracker.summary({"task": "pretrain", "dataset": ctx.info.name, "models": rows,
                                       "seed": cfg.trainer.seed, "zoo_seed": zoo_seed(cfg)})
        if ctx.rank == 0:
            print(f"{'model':<16}{'test acc':>10}  checkpoint")
            for n, row in rows.items():
                print(f"{n:<16}{100 * row['test_acc']:>9.2f}%  {row['path']}")
            print(f"run dir: {ctx.run_dir}")
        return summary
    finally:
        ctx.tracker.finish()
