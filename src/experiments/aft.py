"""Adaptive Feature Transfer (`main_aft.py`, docs/REFERENCE.md §2): fine-tune a downstream model (the student, from its
pretrained weights) on a downstream split while regularising its penultimate features towards the fixed features
of one or more pretrained models (`features`), with `method` = aft | aft_kd | aft_btune | aft_init (STL).

The pretrained models' features come from the shared output cache (`Context.outputs(ref, split, features=True)`,
keyed by model hash + dataset + eval transform + split): `scripts/save_features.py` fills it with the same function
(`feature_outputs`), and a run computes whatever is missing itself. No maths here: the losses are in
src/methods/aft.py, LogME in src/metrics/logme.py."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from ..data import training_split
from ..data.datasets import Split
from ..engine import predict, rows_by_id
from ..errors import check
from ..methods import build_method, method_choice, method_class, method_hparams
from ..methods.aft import FeatureTable
from ..methods.base import CrossEntropy
from ..metrics import accuracy
from ..schema import as_dict
from .context import Context, ModelRef, run_context
from .preflight import check_model_spec, preflight
from .resolve import resolve_model
from .zoo import train_zoo_entry

log = logging.getLogger("kt")

CHOICES = "method=aft, aft_kd, aft_btune or aft_init"


def in_family(cls) -> bool:
    """This family's methods: the feature methods (they need the feature table) and plain CE (STL)."""
    return "feature_table" in cls.needs or issubclass(cls, CrossEntropy)


def feature_specs(cfg) -> list:
    """The entries of `features`: names (zoo | timm | checkpoint folder | arch@file) or model nodes {arch,
    pretrained, checkpoint, kwargs, name} (e.g. a timm model at another img_size)."""
    spec = cfg.get("features")
    if spec is None:
        return []
    items = list(spec) if OmegaConf.is_list(spec) or isinstance(spec, (list, tuple)) else [spec]
    return [s if isinstance(s, (DictConfig, dict)) else str(s) for s in items]


def check_feature_specs(cfg) -> list:
    """The `features` entries, each name checked (unknown names fail here with the closest valid ones)."""
    specs = feature_specs(cfg)
    check(len(specs) > 0, "features=[] is empty: name at least one pretrained model, e.g. features=[resnet20] "
                          "(or use method=aft_init for plain fine-tuning)")
    for i, s in enumerate(specs):
        if isinstance(s, str):
            check_model_spec(s, cfg, f"features[{i}]")
    return specs


def validate(cfg: DictConfig) -> None:
    """This family's keys, before any dataset, zoo or training work: one UserError naming the value and the fix."""
    preflight(cfg)  # the shared ranges first (finite numbers, full keys), then this family's own keys
    m = cfg.method
    cls = method_class(m, accept=in_family, choices=CHOICES)  # its hyper-parameters: preflight (cls.check)
    feats = "feature_table" in cls.needs_for(method_hparams(m))
    # use_val (true: evaluate on the val split, false: on the test split) is a boolean flag: preflight checks it
    if not feats:
        return
    specs = check_feature_specs(cfg)
    names = [str(s) for s in specs if isinstance(s, str)]
    dup = sorted({n for n in names if names.count(n) > 1})
    check(not dup, f"features lists {dup[0] if dup else ''} twice: give each pretrained model once")
    aug = cfg.loader.augment
    check(aug == "none", f"loader.augment={aug} with a feature method: the pretrained features are computed once per "
                         f"sample without augmentation; use loader.augment=none (or method=aft_init)")


# ------------------------------------------------------------------------------------------------ features


def feature_outputs(ctx: Context, ref: ModelRef, split: Split) -> Tuple[Dict[str, torch.Tensor], Optional[Path]]:
    """The model's pooled penultimate features (+ logits) on `split`, without augmentation, through the shared
    output cache: read from disk when present, else computed once and written. Returns (outputs, cache file)."""
    before = ctx.cache.computed
    out = ctx.outputs(ref, split, features=True)
    path = ctx.output_path(ref, split)
    how = "computed" if ctx.cache.computed > before else "read from the cache"
    log.info("features of %s on %s (%d x %d): %s %s", ref.name, split.name, *out["features"].shape, how,
             path if path is not None else "(not cached: the model has no stable key or use_cache=false)")
    return out, path


def feature_table(ctx: Context, refs: List[ModelRef], split: Split,
                  student: Optional[ModelRef] = None) -> Tuple[FeatureTable, List[str]]:
    """The pretrained models' features on the training split side by side, rows by sample id (+ the student's
    initial features when given)."""
    tables, paths, out = [], [], None
    for ref in refs:
        out, path = feature_outputs(ctx, ref, split)
        tables.append(rows_by_id(out, split.full_size, "features"))
        paths.append(str(path) if path is not None else "")
    stu = rows_by_id(feature_outputs(ctx, student, split)[0], split.full_size, "features") if student else None
    table = FeatureTable(phi=torch.cat(tables, 1), dims=[t.shape[1] for t in tables], names=[r.name for r in refs],
                         ids=out["ids"], labels=rows_by_id(out, split.full_size, "labels"), student=stu)
    return table, paths


def splits(ctx: Context, cfg: DictConfig) -> Tuple[Split, Split]:
    """(training split, evaluation split): the dataset's transfer split (with dataset.subset applied), and its val
    split when use_val else its test split."""
    d = cfg.dataset
    return (training_split(ctx.ds, d.transfer_split, d.subset),
            ctx.ds.split(d.val_split if cfg.use_val else d.test_split))


# ------------------------------------------------------------------------------------------------------ run


def print_table(row: dict, run_dir) -> None:
    src = (f"features of [{', '.join(row['features'])}] (dims {row['feature_dims']})" if row["features"] else
           "no pretrained features (plain fine-tuning)")
    print(f"\n{row['method']}: {src} -> {row['student']} (student), trained on {row['train_split']}, "
          f"eval on {row['eval_split']}")
    print(f"{'':<20}{'start (STL init)':>18}{'final':>10}")
    print(f"{'student acc %':<20}{row['student_acc_before']:>18.2f}{row['student_acc_after']:>10.2f}")
    line = f"transfer delta {row['transfer_delta']:+.2f} after {row['steps']} steps"
    if row.get("scales_mean") is not None:
        line += (f"; learned scales mean {row['scales_mean']:.3f} min {row['scales_min']:.3f} "
                 f"max {row['scales_max']:.3f}")
    print(line)
    print(f"outputs: {run_dir} (summary.json, metrics.jsonl, student/)")


def train(ctx: Context, method, train_split, eval_split, acc0: float) -> Tuple[float, int]:
    """Fine-tune with `method` (its regulariser towards the features included); returns (final accuracy %, steps)."""
    eval_loader = ctx.eval_loader(eval_split)

    def evaluate(model):
        out = predict(model, eval_loader, amp=ctx.settings.amp)
        return {"eval/student_acc": 100 * accuracy(out["logits"], out["labels"])}

    ctx.tracker.log({"eval/student_acc": acc0, "epoch": 0.0}, 0)
    trainer = ctx.trainer(method, ctx.train_loader(train_split), evaluate, "aft")
    last = trainer.fit() or evaluate(method.eval_model())  # {} when resumed from a finished run
    return last["eval/student_acc"], trainer.total_steps


def run(cfg: DictConfig, run_dir=None) -> dict:
    with run_context(cfg, run_dir, "aft", validate=validate, train_missing=train_zoo_entry) as ctx:
        cls = method_class(cfg.method, accept=in_family, choices=CHOICES)
        needs = cls.needs_for(method_hparams(cfg.method))
        name = cfg.get("method_name") or getattr(cls, "name", "init")
        student = resolve_model(cfg.student, ctx, "student")
        student.model.to(ctx.device)
        refs = [resolve_model(s, ctx, f"features[{i}]") for i, s in enumerate(feature_specs(cfg))] \
            if "feature_table" in needs else []
        train_split, eval_split = splits(ctx, cfg)
        s0 = ctx.outputs(student, eval_split)
        table, paths = None, []
        if refs:
            table, paths = feature_table(ctx, refs, train_split, student if "student_features" in needs else None)
        method = build_method(cfg.method, accept=in_family, choices=CHOICES, modality=ctx.info.modality,
                              student=student.model, feature_table=table)
        acc0 = 100 * accuracy(s0["logits"], s0["labels"])
        acc1, steps = train(ctx, method, train_split, eval_split, acc0)
        scales = method.scale_summary() if hasattr(method, "scale_summary") else \
            {"scales_mean": None, "scales_min": None, "scales_max": None}
        row = {"status": "ok", "method": name, "student": student.name, "features": [r.name for r in refs],
               "feature_dims": table.dims if table is not None else [], "feature_cache": paths,
               "student_acc_before": acc0, "student_acc_after": acc1, "transfer_delta": acc1 - acc0, **scales,
               "eval_split": eval_split.name, "train_split": train_split.name, "train_samples": len(train_split),
               "dataset": ctx.info.name, "seed": cfg.trainer.seed, "steps": steps,
               "method_choice": method_choice("method", cfg.method), "method_config": as_dict(cfg.method)}
        if hasattr(method, "scores"):  # B-Tuning: LogME score and weight of each pretrained model
            row["logme_scores"] = dict(zip(row["features"], method.scores.tolist()))
            row["btune_weights"] = dict(zip(row["features"], method.model_weights.tolist()))
        ctx.save_student(student.model, f"{student.name}<-aft[{','.join(row['features'])}]", acc1, name,
                         student.meta.get("kwargs"))
        return ctx.report(row, print_table)
