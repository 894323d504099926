"""Pretraining / fine-tuning of zoo models (`main_pretrain.py`): `name=<entry>|all` trains zoo entries with their
recipes (src/experiments/zoo.py), `name=null` trains the `model` config with the run's own groups."""
from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from ..models import read_meta, save_checkpoint, zoo_dir
from ..models.gan import read_generator_meta
from ..schema import as_dict
from .context import Context, run_context
from .preflight import zoo_names, zoo_seed
from .resolve import zoo_folder
from .zoo import generator_names, train_classifier, train_generator, train_zoo_entry

log = logging.getLogger("kt")


def train_model_config(ctx: Context, cfg: DictConfig) -> dict:
    """name=null: the `model` config trained with the run's own optimizer / scheduler / trainer; saved to the zoo
    folder as `save_as`, else to <run_dir>/model/. Returns {display name: row}."""
    r = OmegaConf.create({"arch": cfg.model.arch, "kwargs": cfg.model.get("kwargs") or {},
                          "pretrained": cfg.model.get("pretrained", False), "checkpoint": cfg.model.get("checkpoint"),
                          "freeze_backbone": cfg.get("freeze_backbone", False)})
    res, model = train_classifier(ctx, r, ctx.run_dir, cfg.model.arch)
    name = cfg.save_as or cfg.model.arch
    folder = zoo_dir(cfg.paths.checkpoints, ctx.info.name, cfg.save_as) if cfg.save_as else ctx.run_dir / "model"
    meta = {**ctx.student_meta(name, res["test_acc"], kwargs=as_dict(r.kwargs)), **res}
    if ctx.rank == 0:
        save_checkpoint(model, folder, meta)
    return {name: {"test_acc": res["test_acc"], "val_acc": res["val_acc"], "path": str(folder)}}


def train_zoo(ctx: Context, cfg: DictConfig, names: list) -> dict:
    """The zoo entries `names` (classifiers and generators), each trained unless it exists and skip_existing;
    returns {name: row} (a generator's row holds its sample quality)."""
    rows = {}
    for n in names:
        folder = zoo_folder(ctx.settings, ctx.info.name, n)
        if n in generator_names(cfg.get("zoo")):
            meta = read_generator_meta(folder)
            if meta is None or not cfg.skip_existing:
                meta = train_generator(n, ctx, ctx.run_dir)
            else:
                log.info("exists: %s (%s): skipped; retrain it with skip_existing=false", n, folder)
            rows[n] = {"kind": "generator", "judge_acc": meta.get("judge_acc"), "fid": meta.get("fid"),
                       "fid_real": meta.get("fid_real"), "path": str(folder)}
            continue
        meta = read_meta(folder)
        if meta is not None and cfg.skip_existing:
            log.info("exists: %s (%s): skipped; retrain it with skip_existing=false", n, folder)
        else:
            meta = train_zoo_entry(n, ctx, ctx.run_dir / n if len(names) > 1 else ctx.run_dir)
        rows[n] = {"test_acc": meta["test_acc"], "val_acc": meta.get("val_acc"), "path": str(folder)}
    return rows


def print_rows(summary: dict, run_dir) -> None:
    print(f"{'model':<16}{'test acc':>10}  checkpoint")
    for n, row in summary["models"].items():
        if row.get("kind") == "generator":
            q = (f"judge acc {row['judge_acc']:.1f}%, FID {row['fid']:.2f} (real {row['fid_real']:.2f})"
                 if row.get("fid") is not None else "no judge")
            print(f"{n:<16}{'GAN':>10}  {row['path']}  samples: {q}")
            continue
        print(f"{n:<16}{row['test_acc']:>9.2f}%  {row['path']}")
    print(f"run dir: {run_dir}")


def run(cfg: DictConfig, run_dir=None) -> dict:
    with run_context(cfg, run_dir, "pretrain", train_missing=train_zoo_entry) as ctx:
        if cfg.name is None:
            rows = train_model_config(ctx, cfg)
        else:
            rows = train_zoo(ctx, cfg, zoo_names(cfg) if cfg.name == "all" else [cfg.name])
        return ctx.report({"task": "pretrain", "dataset": ctx.info.name, "models": rows, "acc_unit": "percent",
                           "seed": cfg.trainer.seed, "zoo_seed": zoo_seed(cfg)}, print_rows)
