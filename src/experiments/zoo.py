"""The zoo's trainers, shared by every family: a zoo entry's recipe, training a classifier from it (also what
`zoo.train_missing=true` runs for a missing teacher or student), and the zoo's GAN generators (trained, scored by a
zoo classifier, resolved as a source of synthetic distillation data). `main_pretrain.py` is the family that runs
them on purpose."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ..data import training_split
from ..engine import predict, seed_everything
from ..errors import UserError, closest
from ..methods import CrossEntropy, GANTraining
from ..metrics import accuracy
from ..metrics.generative import frechet_distance
from ..models import create_model, freeze, save_checkpoint, zoo_dir
from ..models.gan import CondGenerator, GANSource, SNDiscriminator, load_generator, read_generator_meta, save_generator
from ..schema import LoaderConfig, OptimizerConfig, SchedulerConfig, TrainerConfig, as_dict, typed
from .context import Context, RunSettings
from .preflight import zoo_entries
from .resolve import resolve_model, zoo_folder

log = logging.getLogger("kt")

_RECIPE_KEYS = {"arch", "kwargs", "seed", "epochs", "batch_size", "augment", "flip", "crop_padding", "optimizer",
                "scheduler", "label_smoothing", "freeze_backbone", "pretrained", "checkpoint"}


# a generator entry of the zoo (`zoo.generators`): a class-conditional SN-GAN trained on the pretraining split
_GAN_KEYS = {"arch", "kwargs", "seed", "epochs", "batch_size", "optimizer", "scheduler", "d_lr", "judge",
             "n_eval", "eval_every", "diversity"}
_GAN_DEFAULTS = {"arch": "sngan", "kwargs": {}, "seed": 0, "epochs": 100, "batch_size": 64, "d_lr": None,
                 "diversity": 0.0, "judge": None, "n_eval": 1000, "eval_every": 25,
                 "optimizer": {"name": "adam", "lr": 2e-4, "betas": [0.5, 0.999], "weight_decay": 0.0},
                 "scheduler": {"name": "none"}}


def generator_names(zoo) -> list:
    """The generator names of the zoo node `zoo` (None: no zoo)."""
    return list(zoo.generators.keys()) if zoo is not None and zoo.get("generators") else []


def recipe(name: str, s: RunSettings) -> DictConfig:
    """The zoo's shared training recipe merged with entry `name`'s overrides (a generator entry: the GAN
    defaults merged with its keys)."""
    plain = lambda n: OmegaConf.create(OmegaConf.to_container(n, resolve=True) if n is not None else {})
    zoo = s.zoo
    if name in generator_names(zoo):
        r = OmegaConf.merge(OmegaConf.create(_GAN_DEFAULTS), plain(zoo.generators[name]))
        bad = set(r.keys()) - _GAN_KEYS
        if bad or r.arch != "sngan":
            raise UserError(f"zoo generator '{name}' has unknown keys {sorted(bad)} or arch '{r.arch}'; allowed: "
                            f"{sorted(_GAN_KEYS)}, arch: sngan")
        return r
    if name not in zoo_entries(zoo):
        known = zoo_entries(zoo) + generator_names(zoo)
        raise UserError(f"unknown zoo model '{name}'{closest(name, known)}; zoo '{zoo.name}' has "
                        f"{', '.join(known)}")
    r = OmegaConf.merge(plain(zoo.get("train")), plain(zoo.models[name]))
    bad = set(r.keys()) - _RECIPE_KEYS
    if bad:
        raise UserError(f"zoo entry '{name}' has unknown keys {sorted(bad)}; allowed: {sorted(_RECIPE_KEYS)}")
    if s.zoo_seed:  # another draw of the same zoo: every entry's seed shifted by 1000 per draw
        r.seed = int(r.get("seed", s.seed)) + 1000 * s.zoo_seed
    return r


def train_classifier(ctx: Context, r: DictConfig, run_dir: Path, name: str) -> Dict[str, float]:
    """Train one model with cross-entropy from a recipe; returns (val/test accuracies in percent, the model)."""
    s, info = ctx.settings, ctx.info
    d, tr = s.dataset, s.trainer
    loader_cfg = typed(LoaderConfig, s.loader, {k: r[k] for k in ("batch_size", "augment", "flip",
                                                                    "crop_padding") if k in r})
    trainer_cfg = typed(TrainerConfig, tr, {"epochs": r.get("epochs", tr.epochs), "seed": r.get("seed", tr.seed),
                                            # a zoo recipe counts epochs; a plain model run keeps the run's
                                            # trainer.max_steps
                                            "max_steps": None if "epochs" in r else tr.max_steps})
    seed_everything(trainer_cfg.seed)
    model = create_model(r.arch, info, pretrained=bool(r.get("pretrained", False)), checkpoint=r.get("checkpoint"),
                         kwargs=as_dict(r.get("kwargs")))
    if r.get("freeze_backbone", False):  # linear probe: only the classifier trains
        model.freeze_backbone()
    train_split = training_split(ctx.ds, d.pretrain_split, d.subset)
    loader = ctx.train_loader(train_split, loader_cfg, seed=trainer_cfg.seed)
    val_name = d.val_split if d.val_split in ctx.ds.splits else None
    val_loader = ctx.eval_loader(ctx.ds.split(val_name)) if val_name else None

    def evaluate(m):
        if val_loader is None:
            return {}
        out = predict(m, val_loader)
        return {"val/acc": 100 * accuracy(out["logits"], out["labels"])}

    method = CrossEntropy(model, label_smoothing=float(r.get("label_smoothing", 0.0)))
    trainer = ctx.trainer(method, loader, evaluate, name, tracker="run" if run_dir == ctx.run_dir else None,
                          trainer_cfg=trainer_cfg, run_dir=run_dir,
                          optimizer_cfg=typed(OptimizerConfig, r.optimizer) if "optimizer" in r else None,
                          scheduler_cfg=typed(SchedulerConfig, r.scheduler) if "scheduler" in r else None)
    last = trainer.fit()
    test = predict(model, ctx.eval_loader(ctx.ds.split(d.test_split)))
    res = {"val_acc": last.get("val/acc"), "test_acc": 100 * accuracy(test["logits"], test["labels"]),
           "steps": trainer.total_steps}
    return res, model


def train_zoo_entry(name: str, ctx: Context, run_dir: Optional[Path] = None) -> dict:
    """Train zoo entry `name` with its recipe and save it to the zoo folder (checkpoint + meta.json)."""
    s = ctx.settings
    r = recipe(name, s)
    run_dir = Path(run_dir or ctx.run_dir / "zoo" / name)
    res, model = train_classifier(ctx, r, run_dir, name)
    meta = {"name": name, "kwargs": as_dict(r.get("kwargs")),
            "dataset": OmegaConf.to_container(s.dataset, resolve=True), "val_acc": res["val_acc"],
            "test_acc": res["test_acc"], "recipe": OmegaConf.to_container(r, resolve=True), "zoo": s.zoo.name,
            "zoo_seed": s.zoo_seed, "acc_unit": "percent"}
    folder = zoo_folder(s, ctx.info.name, name)
    if ctx.rank == 0:
        meta = save_checkpoint(model, folder, meta)
    log.info("zoo model %-12s test acc %.2f%%  -> %s", name, res["test_acc"], folder)
    return meta


# ------------------------------------------------------------------------------------------------ generators
@torch.no_grad()
def sample_quality(source, judge, n: int, seed: int, real: torch.Tensor, reference: torch.Tensor
                   ) -> Dict[str, float]:
    """Offline sample quality, scored by a zoo classifier (the judge): its accuracy on n class-conditional samples
    labelled by their conditioning class (`judge_acc`, %), and the Frechet distance between its penultimate
    features of the samples and of `real` images (`fid`; `fid_real`: the same distance between the `reference`
    images, e.g. the training split, and `real`: the floor at these sample sizes)."""
    x, y = source.sample(n, torch.Generator().manual_seed(seed), with_classes=True)
    was = judge.training
    judge.eval()
    f_fake, z = judge.features_and_logits(x)
    f_real, _ = judge.features_and_logits(real)
    f_train, _ = judge.features_and_logits(reference)
    judge.train(was)
    return {"judge_acc": 100 * (z.argmax(1) == y).float().mean().item(),
            "fid": frechet_distance(f_fake, f_real), "fid_real": frechet_distance(f_train, f_real)}


def sample_grid(source, path: Path, per_class: int = 8, seed: int = 0, class_names=(), max_classes: int = 20) -> Path:
    """A PNG grid of samples, one row per class (the first `max_classes`) with its name at the row's left."""
    from ..plots.zoo import class_rows

    g = source.generator
    k = min(g.num_classes, max_classes)
    z = torch.randn(per_class * k, g.z_dim, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(k).repeat_interleave(per_class)
    dev = next(g.parameters()).device
    was = g.training
    g.eval()
    with torch.no_grad():
        x = g(z.to(dev), y.to(dev)).float().cpu()
    g.train(was)
    shown = "" if k == g.num_classes else f", the first {k} of {g.num_classes} classes"
    return class_rows(x, list(class_names), per_class, path,
                      title=f"generator samples: one row per conditioning class{shown}")


def train_generator(name: str, ctx: Context, run_dir: Optional[Path] = None) -> dict:
    """Train zoo generator `name` (a class-conditional SN-GAN) on the pretraining split; save it to the zoo folder
    (model.safetensors + meta.json with its sample quality), its losses to metrics.jsonl, a sample grid to
    <run dir>/plots/<name>_samples.png (and wandb)."""
    s, info = ctx.settings, ctx.info
    d = s.dataset
    r = recipe(name, s)
    run_dir = Path(run_dir or ctx.run_dir / "zoo" / name)
    seed_everything(int(r.seed))
    kw = as_dict(r.kwargs)
    gen = CondGenerator(img_size=info.image_size, channels=info.channels, num_classes=info.num_classes, **kw)
    disc = SNDiscriminator(info.image_size, info.channels, info.num_classes, width=int(kw.get("width", 64)))
    method = GANTraining(gen, disc, seed=int(r.seed), d_lr=r.d_lr, diversity=float(r.diversity))
    loader_cfg = typed(LoaderConfig, s.loader, {"batch_size": int(r.batch_size), "augment": "none",
                                                "drop_last": True})
    trainer_cfg = typed(TrainerConfig, s.trainer, {"epochs": r.epochs, "seed": r.seed, "max_steps": None,
                                                    "eval_every": int(r.eval_every), "eval_every_steps": None})
    loader = ctx.train_loader(training_split(ctx.ds, d.pretrain_split, d.subset), loader_cfg, seed=int(r.seed))
    judge = None
    if r.judge is not None:
        judge = resolve_model(str(r.judge), ctx, "judge").model.to(ctx.device)
    real, _ = ctx.eval_images(ctx.ds.split(d.test_split))
    reference, _ = ctx.eval_images(ctx.ds.split(d.pretrain_split))
    source = GANSource(gen)

    def evaluate(_):
        return {} if judge is None else {f"quality/{k}": v for k, v in
                                         sample_quality(source, judge, int(r.n_eval), 0, real, reference).items()}

    trainer = ctx.trainer(method, loader, evaluate, name, tracker="run" if run_dir == ctx.run_dir else None,
                          trainer_cfg=trainer_cfg, optimizer_cfg=typed(OptimizerConfig, r.optimizer),
                          scheduler_cfg=typed(SchedulerConfig, r.scheduler), run_dir=run_dir)
    last = trainer.fit()
    quality = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("quality/")}
    grid = sample_grid(source, run_dir / "plots" / f"{name}_samples.png", class_names=info.classes)
    if ctx.tracker is not None:
        ctx.tracker.log_figure(f"samples/{name}", grid)
    meta = {"name": name, "dataset": OmegaConf.to_container(d, resolve=True),
            "recipe": OmegaConf.to_container(r, resolve=True), "zoo": s.zoo.name, "judge": r.judge,
            "steps": trainer.total_steps, **quality,
            "final_losses": {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("train/")}}
    folder = zoo_dir(s.paths.checkpoints, info.name, name)
    if ctx.rank == 0:
        meta = save_generator(gen, folder, meta)
    log.info("zoo generator %s: judge (%s) acc on samples %s%%, FID %s -> %s (samples: %s)", name, r.judge,
             f"{quality['judge_acc']:.1f}" if quality else "-", f"{quality['fid']:.2f}" if quality else "-",
             folder, grid)
    return {**meta, "grid": str(grid)}


def resolve_generator(spec, ctx: Context, what: str = "method.synth_source"):
    """(source, meta) for a zoo generator name (trained first when missing and zoo.train_missing=true) or a
    folder / run dir holding a generator (main_zeroshot.py, main_pretrain.py name=<generator>)."""
    s, info = ctx.settings, ctx.info
    name, known = str(spec), generator_names(s.zoo)
    if name in known:
        folder = zoo_dir(s.paths.checkpoints, info.name, name)
        if read_generator_meta(folder) is None:
            if not s.zoo.get("train_missing", False):
                raise UserError(f"zoo generator '{name}' has no checkpoint in {folder}: train it with "
                                f"`python main_pretrain.py name={name}` or set zoo.train_missing=true")
            log.info("zoo generator '%s' is missing: training it now (zoo.train_missing=true)", name)
            train_generator(name, ctx)
        return load_generator(folder, info.image_size, info.channels, what)
    if not Path(name).exists():
        raise UserError(f"{what}={name} is neither a zoo generator{closest(name, known)} "
                        f"(zoo.generators: {', '.join(known) or 'none'}) nor an existing folder: "
                        f"use a zoo generator name or a main_zeroshot.py run dir")
    return load_generator(name, info.image_size, info.channels, what)
