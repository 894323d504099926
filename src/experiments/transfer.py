"""General knowledge transfer (`main_transfer.py`): one teacher, one student, one method from `method/`."""
from __future__ import annotations

import copy
import logging
from typing import Dict, Optional

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from ..data import training_split
from ..engine import Trainer, digest, predict, rows_by_id, seed_everything
from ..errors import check
from ..methods import EnsembleTeacher, build_method, dp_route, method_needs
from ..methods.base import check_synth_ratio
from ..metrics import accuracy, agreement, flips, kl_divergence, transfer_metrics
from ..models import save_checkpoint
from ..schema import as_dict
from .context import Context, ModelRef, setup
from .resolve import resolve_model

log = logging.getLogger("kt")

SUMMARY_KEYS = ("student_acc_before", "student_acc_after", "teacher_acc", "transfer_delta", "knowledge_gain",
                "knowledge_loss", "positive_flips_before", "positive_flips_after", "agreement_after")


def synth_kwargs(ctx: Context, cfg_method) -> Dict[str, object]:
    """With method.synth_ratio > 0: the frozen generator named by method.synth_source (a zoo generator, trained
    first when missing and zoo.train_missing=true, or a main_zeroshot.py run dir) and the run's seed for its draws."""
    ratio = check_synth_ratio(cfg_method.get("synth_ratio", 0.0))
    if ratio == 0:
        return {}
    from .zoo import resolve_generator

    source, meta = resolve_generator(cfg_method.get("synth_source"), ctx)
    log.info("synthetic distillation data: %.0f%% of every batch from generator %s (%s)", 100 * ratio,
             cfg_method.get("synth_source"), meta["folder"])
    return {"synth_generator": source.to(ctx.device), "synth_seed": int(ctx.cfg.trainer.seed)}


def labels_by_id(split):
    """(full_size,) label of each sample id of `split`, -1 for ids outside it (CRD's class-aware negatives)."""
    out = torch.full((max(split.full_size, int(split.ids.max()) + 1 if len(split) else 0),), -1, dtype=torch.long)
    out[split.ids.long()] = split.labels.long()
    return out


def routing_stats(t_logits, s_logits, labels, partition: str) -> Dict[str, float]:
    """Share of eval samples (and of positive / negative flips) whose KL target is the teacher; 0 when a group
    is empty (never NaN)."""
    w = dp_route(t_logits, s_logits, labels, partition)
    t_ok, s_ok = t_logits.argmax(1) == labels, s_logits.argmax(1) == labels
    pos, neg = t_ok & ~s_ok, ~t_ok & s_ok
    share = lambda m: 100.0 * w[m].mean().item() if m.any() else 0.0  # noqa: E731
    return {"dp_share_teacher": 100.0 * w.mean().item(), "dp_pos_flips_to_teacher": share(pos),
            "dp_neg_flips_to_teacher": share(neg)}


def train_caches(ctx: Context, refs, split, loader, features: bool):
    """Per-sample output tables of the frozen models over the training split, when its inputs are not randomly
    augmented (then each sample's output never changes): one evaluation instead of one per epoch."""
    if loader.augmented or not ctx.cfg.get("cache_train_outputs", True):
        if loader.augmented:
            log.info("training inputs are augmented: frozen models run on every batch (no output cache)")
        return [None] * len(refs)
    out = []
    for ref in refs:
        if ref is None:
            out.append(None)
            continue
        o = ctx.outputs(ref, split, features=features)
        table = {"logits": rows_by_id(o, split.full_size).to(ctx.device)}
        if features:
            table["features"] = rows_by_id(o, split.full_size, "features").to(ctx.device)
        log.info("using cached outputs of %s on the %d training samples (inputs are not augmented)", ref.name,
                 len(split))
        out.append(table)
    return out


def transfer(ctx: Context, teacher: ModelRef, student: ModelRef, cfg_method, run_dir, name: str = "",
             frozen: Optional[ModelRef] = None, tracker=None, eval_outputs=None,
             synth: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """Distil `teacher` into `student` with `cfg_method`; returns the summary row (and trains student in place).
    `frozen` is the student-teacher (default: a frozen copy of the student as it is now); `synth`: the result of
    `synth_kwargs` when the caller resolved it already."""
    cfg, ds = ctx.cfg, ctx.ds
    eval_split = ds.split(cfg.eval_split)
    t_eval = ctx.outputs(teacher, eval_split)
    s0_eval = eval_outputs if eval_outputs is not None else ctx.outputs(student, eval_split)
    labels = t_eval["labels"]
    needs = method_needs(cfg_method)
    train_split = training_split(ds, cfg.dataset.transfer_split, cfg.dataset.subset)
    loader = ctx.train_loader(train_split)
    frozen_ref = None
    if "frozen_student" in needs:
        frozen_ref = frozen or ModelRef(student.name + "@init", copy.deepcopy(student.model), student.key)
    t_cache, f_cache = train_caches(ctx, [teacher, frozen_ref], train_split, loader, "features" in needs)
    method = build_method(cfg_method, student=student.model, teacher=teacher.model,
                          frozen_student=frozen_ref.model if frozen_ref is not None else None,
                          teacher_cache=t_cache, frozen_student_cache=f_cache,
                          sample_labels=labels_by_id(train_split) if "sample_labels" in needs else None,
                          **(synth if synth is not None else synth_kwargs(ctx, cfg_method)))
    eval_loader = ctx.eval_loader(eval_split)
    top_p = float(cfg.top_p)
    check(0 < top_p <= 100, f"top_p={top_p} must be in (0, 100]: use e.g. top_p=20")

    def evaluate(model):
        out = predict(model, eval_loader, amp=cfg.trainer.amp)
        return {f"eval/{k}": v for k, v in transfer_metrics(out["logits"], s0_eval["logits"], t_eval["logits"],
                                                             labels, top_p).items()}

    before = {f"eval/{k}": v for k, v in transfer_metrics(s0_eval["logits"], s0_eval["logits"],
                                                          t_eval["logits"], labels, top_p).items()}
    partition = getattr(method, "partition", None)
    route = routing_stats(t_eval["logits"], s0_eval["logits"], labels, partition) if partition else {}
    if tracker is not None:
        tracker.log({**before, **{f"eval/{k}": v for k, v in route.items()}, "epoch": 0.0}, 0)
    trainer = Trainer(method, loader, cfg.trainer, cfg.optimizer, cfg.scheduler, run_dir, tracker=tracker,
                      evaluate=evaluate, device=ctx.device, name=name, rank=ctx.rank, world_size=ctx.world_size)
    last = trainer.fit()
    if not last:  # resumed from a checkpoint of a finished run: nothing left to train, evaluate what it holds
        last = evaluate(method.eval_model())
    final_model = method.eval_model()
    if final_model is not student.model:  # e.g. MCL's slow weights: they are the result
        student.model.load_state_dict(final_model.state_dict())
    f_before = flips(t_eval["logits"], s0_eval["logits"], labels)
    row = {**train_fidelity(ctx, teacher, student.model, train_split),
        "student_acc_before": 100 * accuracy(s0_eval["logits"], labels),
        "student_acc_after": last["eval/student_acc"],
        "teacher_acc": 100 * accuracy(t_eval["logits"], labels),
        "transfer_delta": last["eval/transfer_delta"],
        "knowledge_gain": last["eval/knowledge_gain"],
        "knowledge_loss": last["eval/knowledge_loss"],
        "positive_flips_before": f_before["positive_flips_pct"],
        "positive_flips_after": last["eval/positive_flips"],
        "negative_flips_before": f_before["negative_flips_pct"],
        "negative_flips_after": last["eval/negative_flips"],
        "agreement_before": 100 * agreement(t_eval["logits"], s0_eval["logits"]),
        "agreement_after": last["eval/agreement"],
        **{k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("eval/") and
           k.split("/", 1)[1] not in ("student_acc", "transfer_delta", "knowledge_gain", "knowledge_loss",
                                      "positive_flips", "negative_flips", "agreement")},
        **route,
        "steps": trainer.total_steps,
    }
    return row


def train_fidelity(ctx: Context, teacher: ModelRef, model, split) -> Dict[str, float]:
    """Fidelity on the distillation data itself (gnosis, docs/REFERENCE.md §5.1): the student's top-1 agreement with the
    teacher (%), KL(p_teacher || p_student) at T = 1 and both accuracies (%) on the (un-augmented) training split."""
    t = ctx.outputs(teacher, split)
    s = predict(model, ctx.eval_loader(split), amp=ctx.cfg.trainer.amp)
    return {"train_agreement": 100 * agreement(t["logits"], s["logits"]),
            "train_kl": kl_divergence(t["logits"], s["logits"]),
            "train_student_acc": 100 * accuracy(s["logits"], s["labels"]),
            "train_teacher_acc": 100 * accuracy(t["logits"], t["labels"])}


def ensemble_ref(refs) -> ModelRef:
    """One teacher from several: the members' mean softmax (EnsembleTeacher), cached under a key of the members'
    keys (not cached when a member has no key)."""
    keys = [t.key for t in refs]
    return ModelRef("ensemble(" + "+".join(t.name for t in refs) + ")", EnsembleTeacher([t.model for t in refs]),
                    "ensemble-" + digest(*keys) if all(keys) else None)


def print_table(row: Dict[str, object], run_dir) -> None:
    print(f"\n{row['method']}: {row['teacher']} (teacher) -> {row['student']} (student), "
          f"eval on {row['eval_split']}")
    print(f"{'':<24}{'before':>10}{'after':>10}")
    for label, b, a in (("student acc %", row["student_acc_before"], row["student_acc_after"]),
                        ("positive flips %", row["positive_flips_before"], row["positive_flips_after"]),
                        ("negative flips %", row["negative_flips_before"], row["negative_flips_after"]),
                        ("agreement w/ teacher %", row["agreement_before"], row["agreement_after"])):
        print(f"{label:<24}{b:>10.2f}{a:>10.2f}")
    print(f"teacher acc {row['teacher_acc']:.2f}%  transfer delta {row['transfer_delta']:+.2f}  knowledge gain "
          f"{row['knowledge_gain']:.2f}%  loss {row['knowledge_loss']:.2f}%")
    print(f"outputs: {run_dir} (summary.json, metrics.jsonl, student/)")


def run(cfg: DictConfig, run_dir=None) -> dict:
    ctx = setup(cfg, run_dir, job_type="transfer")
    method_name = cfg.get("method_name") or get_class(cfg.method._target_).__name__
    try:
        if str(cfg.teacher) == str(cfg.student) and not cfg.allow_same_pair:
            log.warning("teacher == student (%s): skipped (set allow_same_pair=true to run it)", cfg.teacher)
            return ctx.tracker.summary({"status": "skipped", "reason": "teacher == student",
                                        "teacher": str(cfg.teacher), "student": str(cfg.student),
                                        "method": method_name})
        synth = synth_kwargs(ctx, cfg.method)  # a bad generator fails before any zoo model is trained
        if OmegaConf.is_list(cfg.teacher):  # several teachers: their ensemble (mean softmax) is the teacher
            check(len(cfg.teacher) >= 1, "teacher=[] names no model: give a model or a list of models")
            teacher = ensemble_ref([resolve_model(t, ctx, f"teacher[{i}]") for i, t in enumerate(cfg.teacher)])
        else:
            teacher = resolve_model(cfg.teacher, ctx, "teacher")
        if isinstance(cfg.student, DictConfig):  # a fresh student: the same init whether or not models were trained
            seed_everything(cfg.trainer.seed)
        student = resolve_model(cfg.student, ctx, "student")
        for ref in (teacher, student):
            ref.model.to(ctx.device)
        row = transfer(ctx, teacher, student, cfg.method, ctx.run_dir, tracker=ctx.tracker, synth=synth)
        row.update(status="ok", method=method_name, teacher=teacher.name, student=student.name,
                   eval_split=cfg.eval_split, dataset=ctx.info.name, seed=cfg.trainer.seed,
                   method_config=as_dict(cfg.method))
        if ctx.rank == 0 and cfg.get("save_student", True):
            save_checkpoint(student.model, ctx.run_dir / "student",
                            {"name": f"{student.name}<-{teacher.name}", "method": method_name,
                             "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
                             "test_acc": row["student_acc_after"] / 100, "kwargs": student.meta.get("kwargs", {})})
        return ctx.report(row, print_table)
    finally:
        ctx.tracker.finish()
