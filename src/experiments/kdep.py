"""KDEP (`main_kdep.py`, docs/REFERENCE.md §3): pre-train a student by distilling a teacher's pooled pre-ReLU
features (SVD-aligned, PTS-scaled) on (a subset of) the upstream split, then fine-tune it on each downstream
dataset next to baseline initialisations (`scratch`: the student's random init; `supervised`: a labelled
pre-trained model) and report the LAST-epoch accuracy of each.

Stages (each ends in `<run_dir>/stages/<stage>/row.json`, written last; a rerun in the same run dir skips finished
stages, and an unfinished one resumes from its own trainer checkpoint `checkpoints/<stage>/`):
  distill                         -> stages/distill/{student/, row.json}; kdep_basis.safetensors (mu, V, S)
  finetune_<downstream>_<init>    -> stages/finetune_<downstream>_<init>/row.json   (init: kdep, scratch, ...)
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Dict

import torch
from omegaconf import DictConfig, OmegaConf

from ..data import build_dataset, build_loader, training_split
from ..data.dense import DENSE_BUILDERS, TASKS, build_dense_loader, check_dense_split
from ..engine import collect, predict, rows_by_id
from ..errors import UserError, check, closest
from ..io_utils import load_state_dict, save_safetensors
from ..methods import build_method
from ..methods.base import CrossEntropy
from ..methods.dense import Detection, Segmentation
from ..methods.kdep import check_dims, svd_basis
from ..metrics import accuracy
from ..models.dense import DETECTORS, HEADS, build_detector, build_segmenter
from ..models.hooks import PreActivation, pre_activation_dim
from ..schema import DatasetConfig, as_dict
from .context import Context, ModelRef, run_context
from .preflight import check_model_spec, preflight
from .resolve import resolve_model
from .stage import Stages
from .zoo import train_zoo_entry

log = logging.getLogger("kt")

BASELINES = ("scratch", "supervised")
BASIS_FILE = "kdep_basis.safetensors"
FINETUNE_GROUPS = ("trainer", "optimizer", "scheduler", "loader")
# what each downstream task reports (percent) and the one the kdep - baseline differences are taken on
TASK_METRICS = {"classification": ("acc",), "segmentation": ("miou", "pixel_acc"), "detection": ("map", "ap50")}
DENSE_KEYS = ("task", "name", "train_split", "eval_split", "dataset", "fraction", "per_class", "seed", "finetune",
              "head", "detector", "stages", "fpn_width", "detector_kwargs")


# ------------------------------------------------------------------------------------------------ validation
def finetune_cfg(cfg: DictConfig, group: str, d=None):
    """The run's `<group>` config with `finetune.<group>` merged on top, then a downstream entry's own
    `finetune.<group>` (dense entries: their own length, batch size, lr); typed: a bad key fails here."""
    own = (d.get("finetune") or {}).get(group) if d is not None else None
    try:
        return OmegaConf.merge(cfg[group], cfg.finetune.get(group) or {}, own or {})
    except Exception as e:  # omegaconf's ValidationError / ConfigKeyError: one line naming the key
        msg = str(e).splitlines()[0]
        where = f"downstream {d.name}: its finetune.{group}" if own else f"finetune.{group}"
        raise UserError(f"{where} does not fit the {group} schema ({msg}): use the keys of "
                        f"config/{group}/*.yaml") from e


def entry_task(d) -> str:
    return str(d.get("task") or "classification")


def check_entry_task(d, cfg: DictConfig) -> None:
    """A downstream entry's task and, for a dense one, its dataset name, head / detector and own finetune node
    (the dataset itself, its classes and the backbone's fit are checked by `check_dense_entry`)."""
    task = entry_task(d)
    check(task in TASKS, f"downstream {d.name}: task={task} is unknown{closest(task, TASKS)}: use one of "
                         f"{list(TASKS)}")
    for g in FINETUNE_GROUPS:
        finetune_cfg(cfg, g, d)
    if task == "classification":
        return
    bad = [k for k in d if k not in DENSE_KEYS]
    check(not bad, f"downstream {d.name}: key {bad[0] if bad else ''} is unknown for a {task} entry: use "
                   f"{', '.join(DENSE_KEYS)}")
    name = str((d.get("dataset") or {}).get("name"))
    check(name in DENSE_BUILDERS, f"downstream {d.name}: task={task} needs a segmentation / detection dataset, "
                                  f"got dataset.name={name}{closest(name, DENSE_BUILDERS)}: use one of "
                                  f"{sorted(DENSE_BUILDERS)}")
    head, det = str(d.get("head") or "fcn"), str(d.get("detector") or "faster_rcnn")
    check(task != "segmentation" or head in HEADS, f"downstream {d.name}: head={head} is unknown"
                                                   f"{closest(head, HEADS)}: use one of {list(HEADS)}")
    check(task != "detection" or det in DETECTORS, f"downstream {d.name}: detector={det} is unknown"
                                                   f"{closest(det, DETECTORS)}: use one of {list(DETECTORS)}")


def validate(cfg: DictConfig) -> None:
    """KDEP's own keys, checked before any dataset, zoo or training work (one UserError each)."""
    preflight(cfg)  # the shared ranges first (finite numbers, full keys), then this family's own keys
    import timm

    if not OmegaConf.is_dict(cfg.student):  # `student=resnet8`, the form the other scripts take
        raise UserError(f"student={cfg.student}: KDEP distils into a fresh model, given by its architecture: use "
                        f"student.arch={cfg.student} (and student.kwargs.<k>=... for its options)")
    arch = str(cfg.student.get("arch"))
    if not timm.is_model(arch):
        from ..models import nets

        raise UserError(f"unknown student.arch '{arch}'{closest(arch, timm.list_models() + nets.OUR_MODELS)}: "
                        f"use a timm name or one of ours (resnet8, resnet20, wrn_16_1, ...)")
    if cfg.get("basis"):
        check(Path(cfg.basis).is_file(), f"basis={cfg.basis} does not exist: give a {BASIS_FILE} written by an "
                                         f"earlier run (its run dir) or basis=null to compute it")
        check_basis(load_state_dict(cfg.basis, what="basis"), cfg.basis)
    bad = [b for b in cfg.baselines if b not in BASELINES]
    check(not bad, f"baselines={list(cfg.baselines)}: '{bad[0] if bad else ''}' is unknown, use a subset of "
                   f"{list(BASELINES)}")
    if "supervised" in cfg.baselines:
        check(bool(cfg.get("supervised")), "baselines has 'supervised' but supervised=null: give a model "
                                           "(zoo name, timm name, checkpoint folder) or drop it from baselines")
        check_model_spec(str(cfg.supervised), cfg, "supervised")
    check(len(cfg.downstream) > 0, "downstream=[] is empty: give at least one {name, train_split, eval_split}")
    names = [str(d.get("name")) for d in cfg.downstream]
    check(len(set(names)) == len(names), f"downstream names {names} repeat: give each entry its own name")
    for d in cfg.downstream:
        for k in ("name", "train_split", "eval_split"):
            check(bool(d.get(k)), f"downstream entry {as_dict(d)} has no {k}: each needs name, train_split and "
                                  f"eval_split")
        fr, pc = d.get("fraction"), d.get("per_class")
        check(fr is None or 0 < fr <= 1, f"downstream {d.name}: fraction={fr} is outside (0, 1]: use e.g. 0.2")
        check(pc is None or pc > 0, f"downstream {d.name}: per_class={pc} must be > 0: use e.g. 10")
        check_entry_task(d, cfg)
    for g in FINETUNE_GROUPS:
        finetune_cfg(cfg, g)
    ft = finetune_cfg(cfg, "trainer")
    check(ft.max_steps is not None or ft.epochs > 0, f"finetune.trainer.epochs={ft.epochs} must be > 0")


def check_basis(b: dict, path) -> None:
    """A basis file's tensors: mu (D,), V (D, k) with k >= 1, both finite (one line naming what is wrong)."""
    fix = f"give a {BASIS_FILE} written by main_kdep.py, or basis=null to compute it"
    check({"mu", "V"} <= set(b), f"basis={path} holds no mu/V: {fix}")
    mu, v = b["mu"], b["V"]
    check(mu.ndim == 1 and v.ndim == 2 and v.shape[0] == mu.shape[0] and v.shape[1] >= 1,
          f"basis={path} has mu of shape {tuple(mu.shape)} and V of shape {tuple(v.shape)}, expected (D,) and "
          f"(D, k): {fix}")
    check(bool(mu.isfinite().all() and v.isfinite().all()), f"basis={path} holds non-finite values: {fix}")


def downstream_dataset_cfg(d) -> DictConfig:
    """A downstream entry's own dataset node, resolved in place (its `${paths.data}/dtd` refers to the run's
    config: merged out of it first, the interpolation had no root and failed at the fine-tuning stage); a dense
    entry's task is its dataset's (which targets to read)."""
    own = OmegaConf.to_container(d.dataset, resolve=True)
    if entry_task(d) != "classification":
        own["task"] = entry_task(d)
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), own)


def dense_model(student: torch.nn.Module, d, info) -> torch.nn.Module:
    """The entry's segmentation / detection model on (a reference to) `student` (src/models/dense.py)."""
    size, c = int(info.image_size), int(info.channels)
    if info.task == "segmentation":
        return build_segmenter(student, info.num_classes, str(d.get("head") or "fcn"), c, size)
    return build_detector(student, info.num_classes, str(d.get("detector") or "faster_rcnn"),
                          int(d.get("stages") or 3), c, size, int(d.get("fpn_width") or 256),
                          **as_dict(d.get("detector_kwargs")))


def check_dense_entry(ctx: Context, d, student: torch.nn.Module) -> dict:
    """Before stage 1: the dense entry's dataset builds (folders, class count), its splits exist and hold
    targets (boxes; masks with ids in range), and its model builds on the student (stages, weights carried);
    returns the entry's data (built once)."""
    try:
        dc = downstream_dataset_cfg(d)
    except Exception as e:
        raise UserError(f"downstream {d.name}: its dataset node does not resolve ({type(e).__name__}: "
                        f"{str(e).splitlines()[0]}): fix downstream entry {d.name}'s dataset") from None
    ds = build_dataset(dc, ctx.settings.paths)
    data = downstream_data(ctx, d, ds)
    for k in ("train", "eval"):
        check_dense_split(data[k], ds.info.task)
    dense_model(copy.deepcopy(student).cpu(), d, ds.info)
    return data


def check_downstream_dataset(d, loader=None) -> None:
    """Before stage 1: the entry's dataset node resolves; for an ImageFolder, its folders exist and hold as many
    class folders as its num_classes; with `loader` ffcv, the .beton of each split it reads exists (each was found
    at stage 5 of 13 before, after the distillation)."""
    try:
        dc = downstream_dataset_cfg(d)
    except Exception as e:  # an unresolvable interpolation, a key the dataset schema lacks
        raise UserError(f"downstream {d.name}: its dataset node does not resolve ({type(e).__name__}: "
                        f"{str(e).splitlines()[0]}): fix downstream entry {d.name}'s dataset") from None
    if dc.name in ("imagefolder", "imagenet") or dc.get("root"):
        root = Path(str(dc.root)) if dc.root else None
        for sub in (dc.train_dir, dc.val_dir):
            folder = root / sub if root else None
            if folder is None or not folder.is_dir():
                raise UserError(f"downstream {d.name}: folder {folder} not found (dataset.root={dc.root}): set "
                                f"downstream entry {d.name}'s dataset.root, or paths.data=<the folder holding it>")
            n = sum(1 for c in folder.iterdir() if c.is_dir())
            check(n == dc.num_classes, f"downstream {d.name}: {folder} has {n} class folders but its "
                                       f"dataset.num_classes={dc.num_classes}: fix one of them")
    if loader is not None and loader.get("backend") == "ffcv":
        from ..data.datasets import data_source
        from ..data.ffcv_loader import beton_path

        for split in (d.train_split, d.eval_split):
            path = beton_path(loader.get("ffcv_dir"), dc.name, str(split), data_source(dc))
            check(path.is_file(), f"downstream {d.name}: loader=ffcv reads {path}, which does not exist: write it "
                                  f"with `python scripts/write_ffcv.py dataset={dc.name} dataset.root={dc.root} "
                                  f"dataset.num_classes={dc.num_classes} --splits {split} --out-dir {path.parent}`")


def check_downstream_splits(ctx: Context, cfg: DictConfig) -> None:
    """Every classification downstream entry's splits exist, and every other dataset resolves and has its folders
    (run right after setup, before the distillation; dense entries: `check_dense_entry`)."""
    for d in cfg.downstream:
        if entry_task(d) != "classification":
            continue
        if d.get("dataset"):
            check_downstream_dataset(d, ctx.settings.loader)
            continue  # its splits: checked when it is built
        for k in ("train_split", "eval_split"):
            if str(d[k]) not in ctx.ds.splits:
                raise UserError(f"downstream {d.name}: {k}={d[k]} is not a split of dataset '{ctx.info.name}'"
                                f"{closest(str(d[k]), ctx.ds.splits)}; its splits are {sorted(ctx.ds.splits)}")


# ---------------------------------------------------------------------------------------------- distillation
def teacher_outputs(ctx: Context, teacher: ModelRef, split) -> Dict[str, torch.Tensor]:
    """Pooled pre-ReLU features ('features') and logits of the frozen teacher on `split`, computed once without
    augmentation and cached on disk by the shared output cache (key: teacher hash, dataset, split, 'prerelu')."""
    return ctx.cache.get(PreActivation(teacher.model.to(ctx.device)), teacher.key,
                         f"{ctx.inputs_key}-prerelu", split, ctx.eval_loader(split),
                         features=True, amp=ctx.settings.amp, label=f"{teacher.name} (pre-ReLU)")


def basis_for(cfg: DictConfig, features: torch.Tensor, run_dir: Path, teacher: str) -> tuple:
    """(basis dict, path): the SVD basis of the teacher's features, computed here and saved to
    `<run_dir>/kdep_basis.safetensors`, or read back from `cfg.basis` (e.g. the 10% subset's basis reused for a
    full-data run). The one place that writes and reads basis files."""
    if cfg.get("basis"):
        path = Path(cfg.basis)
        b = load_state_dict(path, what="basis")
        check_basis(b, path)
        check(b["mu"].numel() == features.shape[1],
              f"basis={path} is for {b['mu'].numel()}-d teacher features but teacher {teacher} has "
              f"{features.shape[1]}: use the basis of this teacher or basis=null")
        log.info("re-using the SVD basis %s", path)
        return b, path
    path = run_dir / BASIS_FILE
    b = svd_basis(features)
    save_safetensors(b, path, metadata={"teacher": str(teacher), "num_samples": str(features.shape[0])})
    log.info("SVD basis of %s over %d samples -> %s", teacher, features.shape[0], path)
    return b, path


def distill(ctx: Context, cfg: DictConfig, teacher: ModelRef, student: ModelRef, tracker) -> dict:
    """Stage 1: distil `teacher` into `student` (in place) on the upstream split; returns the stage's row."""
    split = training_split(ctx.ds, cfg.upstream_split, cfg.dataset.subset)
    out = teacher_outputs(ctx, teacher, split)
    f_t = out["features"]
    probe = next(iter(ctx.eval_loader(split).iter_epoch(0))).inputs
    d_s, d_t = pre_activation_dim(student.model, probe), f_t.shape[1]
    check_dims(d_s, d_t, d_t, teacher.name, student.name)  # before the SVD: the public code's MobileNetV2 bug
    basis, basis_path = basis_for(cfg, f_t, ctx.run_dir, teacher.name)
    check_dims(d_s, d_t, basis["V"].shape[1], teacher.name, student.name)
    loader = ctx.train_loader(split)
    cache = None
    if not loader.augmented:
        cache = {"prerelu": rows_by_id(out, split.full_size, "features").to(ctx.device),
                 "logits": rows_by_id(out, split.full_size, "logits").to(ctx.device)}
        log.info("distillation inputs are not augmented: teacher features come from the cache")
    method = build_method(cfg.method, modality=ctx.info.modality, student=student.model, teacher=teacher.model,
                          teacher_cache=cache)
    method.set_basis(basis["mu"], basis["V"][:, :d_s])
    method.to(ctx.device)
    target_table = rows_by_id(out, split.full_size, "features")
    eval_loader = ctx.eval_loader(split)

    def evaluate(model) -> Dict[str, float]:
        o = predict(PreActivation(model), eval_loader, features=True, amp=cfg.trainer.amp)
        f_s = o["features"].to(ctx.device)
        with torch.no_grad():
            loss = method.feature_loss(f_s, target_table[o["ids"]].to(ctx.device))
        return {"eval/distill_loss": loss.item()}

    start = evaluate(student.model)["eval/distill_loss"]
    if tracker is not None:
        tracker.log({"eval/distill_loss": start, "epoch": 0.0}, 0)
    trainer = ctx.trainer(method, loader, evaluate, "distill", tracker=tracker)
    last = trainer.fit() or evaluate(student.model)
    return {"distill_loss_start": start, "distill_loss_end": last["eval/distill_loss"], "steps": trainer.total_steps,
            "d_teacher": int(d_t), "d_student": int(d_s), "basis": str(basis_path),
            "basis_reused": bool(cfg.get("basis")), "upstream_split": str(cfg.upstream_split),
            "upstream_size": len(split), "teacher_features_cached": cache is not None}


# ------------------------------------------------------------------------------------------------ fine-tuning
def downstream_data(ctx: Context, d, ds=None) -> dict:
    """A downstream entry's dataset (`ds`; else the run's own, or `d.dataset` built with the same paths) and
    splits."""
    ds = ds or ctx.ds
    if d.get("dataset") and ds is ctx.ds:
        ds = build_dataset(downstream_dataset_cfg(d), ctx.settings.paths)
    sub = OmegaConf.create({"fraction": d.get("fraction"), "per_class": d.get("per_class"),
                            "seed": int(d.get("seed") or 0)})
    return {"ds": ds, "train": training_split(ds, d.train_split, sub), "eval": ds.split(d.eval_split)}


def finetune(ctx: Context, cfg: DictConfig, init: torch.nn.Module, data: dict, name: str, tracker) -> dict:
    """Full fine-tuning of a copy of `init` with a new head on the downstream data (plain CE); returns the
    last-epoch accuracy on the eval split."""
    ft = {g: finetune_cfg(cfg, g) for g in FINETUNE_GROUPS}
    model = copy.deepcopy(init)
    torch.manual_seed(cfg.trainer.seed)
    model.reset_classifier(data["ds"].info.num_classes)
    method = CrossEntropy(model).to(ctx.device)
    loader = ctx.train_loader(data["train"], loader_cfg=ft["loader"], channels_last=ft["trainer"].channels_last)
    eval_loader = build_loader(ft["loader"], data["eval"], train=False, device=ctx.device,
                               channels_last=bool(ft["trainer"].channels_last))

    def evaluate(m) -> Dict[str, float]:
        o = predict(m, eval_loader, amp=ft["trainer"].amp)
        return {"eval/acc": 100 * accuracy(o["logits"], o["labels"])}

    trainer = ctx.trainer(method, loader, evaluate, name, tracker=tracker, trainer_cfg=ft["trainer"],
                          optimizer_cfg=ft["optimizer"], scheduler_cfg=ft["scheduler"])
    last = trainer.fit() or evaluate(model)
    return {"acc": last["eval/acc"], "steps": trainer.total_steps, "train_size": len(data["train"]),
            "eval_size": len(data["eval"])}


DENSE_METHODS = {"segmentation": Segmentation, "detection": Detection}


def dense_evaluator(ctx: Context, loader, task: str, num_classes: int, amp: str):
    """evaluate(model) -> {'eval/<metric>': %}: one pass of `collect` whose callback adds each batch to the
    task's metric state (mIoU confusion matrix / COCO AP), keeping no predictions."""
    cls = DENSE_METHODS[task]

    def evaluate(m) -> Dict[str, float]:
        state, was = cls.metric(num_classes), m.training
        m.eval()
        try:
            collect(lambda b: cls.update(m, b, state), loader, amp=amp, device=ctx.device)
        finally:
            m.train(was)
        r = state.compute()
        return {f"eval/{k}": float(r[k]) for k in TASK_METRICS[task]}

    return evaluate


def finetune_dense(ctx: Context, cfg: DictConfig, d, init: torch.nn.Module, data: dict, name: str,
                   tracker) -> dict:
    """Full fine-tuning of a copy of `init` as the backbone of the entry's segmentation / detection model
    (torchvision head or detector, checked to carry the init's weights); returns the last-epoch metrics."""
    ft = {g: finetune_cfg(cfg, g, d) for g in FINETUNE_GROUPS}
    info = data["ds"].info
    torch.manual_seed(cfg.trainer.seed)
    model = dense_model(copy.deepcopy(init), d, info)
    method = DENSE_METHODS[info.task](model).to(ctx.device)
    cl = bool(ft["trainer"].channels_last)
    loader = build_dense_loader(ft["loader"], data["train"], info.task, train=True, seed=ctx.settings.seed,
                                device=ctx.device, rank=ctx.rank, world_size=ctx.world_size, channels_last=cl)
    eval_loader = build_dense_loader(ft["loader"], data["eval"], info.task, train=False, device=ctx.device,
                                     channels_last=cl)
    evaluate = dense_evaluator(ctx, eval_loader, info.task, info.num_classes, ft["trainer"].amp)
    trainer = ctx.trainer(method, loader, evaluate, name, tracker=tracker, trainer_cfg=ft["trainer"],
                          optimizer_cfg=ft["optimizer"], scheduler_cfg=ft["scheduler"])
    last = trainer.fit() or evaluate(model)
    return {**{k: last[f"eval/{k}"] for k in TASK_METRICS[info.task]}, "steps": trainer.total_steps,
            "train_size": len(data["train"]), "eval_size": len(data["eval"])}


# --------------------------------------------------------------------------------------------------- the run
METRIC_NAMES = {"acc": "acc %", "miou": "mIoU %", "pixel_acc": "pixel acc %", "map": "mAP %", "ap50": "AP50 %"}


def print_dense_rows(s: dict) -> None:
    """One row per metric of each dense downstream (kdep - scratch on the task's first metric)."""
    inits = s["inits"]
    for name, r in s["downstream"].items():
        if "task" not in r:
            continue
        for k, m in enumerate(TASK_METRICS[r["task"]]):
            delta = r.get("delta_vs_scratch") if k == 0 else None
            print(f"{name + ' ' + METRIC_NAMES[m]:<30}" + "".join(f"{r[f'{i}/{m}']:>12.2f}" for i in inits) +
                  (f"{delta:>+14.2f}" if delta is not None else f"{'':>14}"))


def print_table(s: dict, run_dir) -> None:
    print(f"\nKDEP: {s['teacher']} ({s['d_teacher']}-d pre-ReLU) -> {s['student']} ({s['d_student']}-d), "
          f"distillation loss {s['distill_loss_start']:.4f} -> {s['distill_loss_end']:.4f} "
          f"on {s['upstream_size']} {s['upstream_split']} images")
    inits = s["inits"]
    print(f"{'downstream (last epoch acc %)':<30}" + "".join(f"{i:>12}" for i in inits) + f"{'kdep-scratch':>14}")
    for name, r in s["downstream"].items():
        if "task" in r:
            continue
        delta = r.get("delta_vs_scratch")
        print(f"{name:<30}" + "".join(f"{r[i]:>12.2f}" for i in inits) +
              (f"{delta:>+14.2f}" if delta is not None else f"{'':>14}"))
    print_dense_rows(s)
    print(f"basis: {s['basis']}\noutputs: {run_dir} (summary.json, metrics.jsonl, stages/, checkpoints/)")


def downstream_row(task: str, res: Dict[str, dict]) -> dict:
    """One downstream's summary: per init its main metric (classification: acc; segmentation: mIoU; detection:
    mAP) under the init's name, and for a dense task every metric as `<init>/<metric>` plus the task; KDEP's
    difference to each baseline on the main metric."""
    main = TASK_METRICS[task][0]
    r = {k: v[main] for k, v in res.items()}
    if task != "classification":
        r.update({f"{k}/{m}": v[m] for k, v in res.items() for m in TASK_METRICS[task]})
    for base in ("scratch", "supervised"):
        if base in res:
            r[f"delta_vs_{base}"] = r["kdep"] - r[base]
    r["train_size"] = res["kdep"]["train_size"]
    if task != "classification":
        r.update(task=task, metric=main)
    return r


def finetune_all(ctx: Context, cfg: DictConfig, stages: Stages, inits: Dict[str, torch.nn.Module],
                 dense: Dict[str, dict]) -> Dict[str, dict]:
    """Every downstream entry fine-tuned from every initialisation (one stage each, `finetune_<name>_<init>`);
    returns per downstream the last-epoch metrics of each init and KDEP's difference to the baselines. `dense`:
    the dense entries' data, built by the checks before stage 1."""
    downstream: Dict[str, dict] = {}
    for d in cfg.downstream:
        data, res, task = dense.get(str(d.name)), {}, entry_task(d)
        for init_name, init in inits.items():
            sname = f"finetune_{d.name}_{init_name}"

            def train(tracker, init=init, sname=sname):
                nonlocal data
                data = data or downstream_data(ctx, d)  # built once per entry, only when a stage runs
                if task != "classification":
                    return None, finetune_dense(ctx, cfg, d, init, data, sname, tracker)
                return None, finetune(ctx, cfg, init, data, sname, tracker)

            res[init_name] = stages.run(sname, train)[1]
        downstream[str(d.name)] = downstream_row(task, res)
    return downstream


def run(cfg: DictConfig, run_dir=None) -> dict:
    with run_context(cfg, run_dir, "kdep", validate=validate, train_missing=train_zoo_entry) as ctx:
        check_downstream_splits(ctx, cfg)
        teacher = resolve_model(cfg.teacher, ctx, "teacher")
        teacher.model.to(ctx.device)
        student = resolve_model(cfg.student, ctx, "student")
        student.model.to(ctx.device)
        dense = {str(d.name): check_dense_entry(ctx, d, student.model) for d in cfg.downstream
                 if entry_task(d) != "classification"}  # before stage 1, on the student the stages fine-tune
        scratch = copy.deepcopy(student.model)  # the same random init, for the `scratch` baseline
        stages = Stages(ctx)
        distilled, drow, _ = stages.run("distill", lambda tracker: (student.model, distill(ctx, cfg, teacher,
                                                                                          student, tracker)),
                                        like=student.model, label=f"{student.name}<-kdep-{teacher.name}",
                                        kwargs=as_dict(cfg.student.get("kwargs")))
        inits = {"kdep": distilled}
        if "scratch" in cfg.baselines:
            inits["scratch"] = scratch
        if "supervised" in cfg.baselines:
            inits["supervised"] = resolve_model(cfg.supervised, ctx, "supervised").model.to(ctx.device)
        downstream = finetune_all(ctx, cfg, stages, inits, dense)
        summary = {
            "status": "ok", "teacher": teacher.name, "student": student.name, "dataset": ctx.info.name,
            "selection": "last epoch", "inits": list(inits),
            **{k: drow[k] for k in ("d_teacher", "d_student", "basis", "basis_reused", "distill_loss_start",
                                    "distill_loss_end", "upstream_split", "upstream_size")},
            "distill_steps": drow["steps"], "downstream": downstream,
            **{f"{n}/{k}": v for n, r in downstream.items() for k, v in r.items()},
            "stages_trained": stages.trained, "method_config": as_dict(cfg.method),
        }
        return ctx.report(summary, print_table)
