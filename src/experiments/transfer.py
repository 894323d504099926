"""General knowledge transfer (`main_transfer.py`): one teacher (or the ensemble of several), one student, one
method from `method/`; the distillation stage itself is src/experiments/stage.py."""
from __future__ import annotations

import logging
from typing import Dict

from omegaconf import DictConfig, OmegaConf

from ..engine import seed_everything
from ..errors import check
from ..methods import method_choice, method_class
from ..schema import as_dict
from .context import run_context
from .resolve import resolve_model
from .stage import distil, ensemble_ref, synth_inputs
from .zoo import train_zoo_entry

log = logging.getLogger("kt")


def print_table(row: Dict[str, object], run_dir) -> None:
    choice = row.get("method_choice")
    name = f"{choice} ({row['method']})" if choice and choice != row["method"] else row["method"]
    print(f"\n{name}: {row['teacher']} (teacher) -> {row['student']} (student), "
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
    with run_context(cfg, run_dir, "transfer", train_missing=train_zoo_entry) as ctx:
        method_name = cfg.get("method_name") or method_class(cfg.method).__name__
        pair = {"teacher": str(cfg.teacher), "student": str(cfg.student), "method": method_name}
        if pair["teacher"] == pair["student"] and not cfg.allow_same_pair:
            log.warning("teacher == student (%s): skipped (set allow_same_pair=true to run it)", cfg.teacher)
            return ctx.tracker.summary({"status": "skipped", "reason": "teacher == student", **pair})
        synth = synth_inputs(ctx, cfg.method)  # a bad generator fails before any zoo model is trained
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
        row = distil(ctx, teacher, student, cfg.method, cfg.eval_split, cfg.top_p, synth=synth)
        row.update(status="ok", method=method_name, teacher=teacher.name, student=student.name,
                   eval_split=cfg.eval_split, dataset=ctx.info.name, seed=cfg.trainer.seed,
                   method_choice=method_choice("method", cfg.method), method_config=as_dict(cfg.method))
        ctx.save_student(student.model, f"{student.name}<-{teacher.name}", row["student_acc_after"], method_name,
                         student.meta.get("kwargs"))
        return ctx.report(row, print_table)
