"""Multiple teachers (`main_multi_teacher.py`): one student, a list of teachers, four modes (docs/REFERENCE.md §1.11,
§5.2 ensembles), each a function of the run's shared state (`Teachers`). Single-teacher stages (sequential stages,
soup members, the ensemble teacher) are `stage.distil`; the parallel mode trains `parallel_method` (multi-teacher
KL+DP) with the same Trainer.

Every stage ends in `<run_dir>/stages/<k>_<teacher>/` with the student after it (`student/`) and its row
(`row.json`, written last); a rerun skips finished stages and the unfinished one resumes from its own trainer
checkpoint (`checkpoints/<mode><k>_<teacher>/`). Metrics are reported against the original student (transfer
delta, knowledge gain/loss), against each teacher (`vs_<teacher>/...`) and against the teachers' ensemble
(`vs_ensemble/...`, the mean softmax)."""
from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from ..data import training_split
from ..engine import predict
from ..errors import UserError, check
from ..io_utils import load_state_dict
from ..methods import build_method, mean_softmax_logits, method_choice, method_class, multi_route, \
    recompute_bn_stats, route_shares, same_target, uniform_soup
from ..metrics import accuracy, transfer_report
from ..models import read_meta
from ..schema import as_dict
from .context import Context, ModelRef, run_context
from .preflight import preflight
from .resolve import resolve_model
from .stage import Stages, distil, ensemble_ref, train_caches
from .zoo import train_zoo_entry

log = logging.getLogger("kt")

MODES = ("sequential", "parallel", "soup", "ensemble")
ORDERS = ("ascending", "descending", "listed")
PARALLEL_CHOICES = ("a method that takes several teachers (a single-teacher one goes in `method`): "
                    "method@parallel_method=multi_kl_dp (or multi_kl_dp_u)")


def validate(cfg: DictConfig) -> None:
    """The shared ranges, then this family's own keys (before any data, zoo or training work)."""
    preflight(cfg)
    check(OmegaConf.is_list(cfg.teachers), f"teachers={cfg.teachers} must be a list of models, not one name: "
                                           f"use teachers=[{cfg.teachers}] or e.g. teachers=[mlp_small,lenet]")
    check(len(cfg.teachers) >= 1, "teachers=[] is empty: give at least one, e.g. teachers=[mlp_small,lenet]")
    if cfg.mode not in MODES:
        raise UserError(f"mode='{cfg.mode}' is unknown: use one of {', '.join(MODES)}")


def order_teachers(accs: Sequence[float], order: str) -> List[int]:
    """Indices of the teachers in stage order: by accuracy `ascending` (weakest first) or `descending`, or as
    `listed`; equal accuracies keep the listed order."""
    if order not in ORDERS:
        raise UserError(f"order='{order}' is unknown: use one of {', '.join(ORDERS)}")
    idx = list(range(len(accs)))
    return idx if order == "listed" else sorted(idx, key=lambda i: accs[i], reverse=order == "descending")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_")[-48:] or "model"


@dataclass
class Teachers:
    """The shared state of one run: context, config, teachers, the initial student, the evaluation references
    (each teacher and their ensemble), the stages written so far."""
    ctx: Context
    cfg: DictConfig
    teachers: List[ModelRef]
    student0: ModelRef
    init_state: dict
    eval_loader: object
    refs: Dict[str, torch.Tensor]
    labels: torch.Tensor
    s0_logits: torch.Tensor
    train_split: object
    stages: Stages

    @classmethod
    def load(cls, ctx: Context, cfg: DictConfig) -> "Teachers":
        teachers = [resolve_model(t, ctx, "teacher") for t in cfg.teachers]
        names = [t.name for t in teachers]
        dup = sorted({n for n in names if names.count(n) > 1} | ({"ensemble"} & set(names)))
        check(not dup, f"teacher name(s) {dup} appear twice or are reserved: list each teacher once")
        student0 = resolve_model(cfg.student, ctx, "student")
        if student0.name in names:
            log.warning("the student %s is also one of the teachers", student0.name)
        for ref in (*teachers, student0):
            ref.model.to(ctx.device)
        split = ctx.ds.split(cfg.eval_split)
        t_eval = {t.name: ctx.outputs(t, split)["logits"] for t in teachers}
        s0 = ctx.outputs(student0, split)
        refs = {**t_eval, "ensemble": mean_softmax_logits(torch.stack(list(t_eval.values())))}
        return cls(ctx, cfg, teachers, student0, copy.deepcopy(student0.model.state_dict()), ctx.eval_loader(split),
                   refs, s0["labels"], s0["logits"],
                   training_split(ctx.ds, cfg.dataset.transfer_split, cfg.dataset.subset), Stages(ctx))

    @property
    def names(self) -> List[str]:
        return [t.name for t in self.teachers]

    def evaluate(self, model) -> Dict[str, float]:
        out = predict(model, self.eval_loader, amp=self.cfg.trainer.amp)
        return transfer_report(out["logits"], self.s0_logits, self.refs, self.labels, float(self.cfg.top_p))

    def eval_logged(self, model) -> Dict[str, float]:
        return {f"eval/{k}": v for k, v in self.evaluate(model).items()}

    def copy_of_student0(self) -> ModelRef:
        """A copy of the initial student (its cache key stays valid: the weights are the same)."""
        m = copy.deepcopy(self.student0.model)
        m.load_state_dict(self.init_state)
        return ModelRef(self.student0.name, m, self.student0.key, self.student0.meta)


def single_stage(t: Teachers, teacher: ModelRef, student: ModelRef, trainer_name: str,
                 frozen: Optional[ModelRef] = None, extra: Optional[dict] = None):
    """Stage k: one `method` distillation of `teacher` into `student` (trained in place), or its saved result when
    the stage finished earlier. Returns (student after the stage, with the cache key of its weights; row)."""
    k = t.stages.k + 1

    def train(tracker):
        log.info("stage %d: %s -> %s (%s)", k, teacher.name, student.name, trainer_name)
        t_row = distil(t.ctx, teacher, student, t.cfg.method, t.cfg.eval_split, t.cfg.top_p, trainer_name,
                       frozen=frozen, tracker=tracker)
        row = {"stage": k, "teacher": teacher.name, **(extra or {}), **t.evaluate(student.model),
               "steps": t_row["steps"], "stage_transfer": t_row}
        tracker.log({f"stage_eval/{key}": v for key, v in row.items() if isinstance(v, (int, float))}, row["steps"])
        return student.model, row

    model, row, key = t.stages.run(f"{k}_{_safe(teacher.name)}", train, like=student.model,
                                   label=f"{student.name}<-{teacher.name}", kwargs=t.student0.meta.get("kwargs"))
    return ModelRef(student.name, model, key, student.meta), row


def sequential(t: Teachers):
    """The teachers one after another (order: their accuracy on order_split), each stage's student-teacher the
    student after the previous stage (a frozen copy); each stage's Trainer builds a fresh optimiser."""
    ctx, cfg = t.ctx, t.cfg
    split = ctx.ds.split(cfg.order_split)
    accs = [100 * accuracy(ctx.outputs(m, split)["logits"], split.labels) for m in t.teachers]
    order = order_teachers(accs, str(cfg.order))
    log.info("sequential order (%s, accuracy on %s): %s", cfg.order, split.name,
             ", ".join(f"{t.teachers[i].name} {accs[i]:.2f}%" for i in order))
    student, rows = t.student0, []
    for k, i in enumerate(order, 1):
        teacher = t.teachers[i]
        frozen = ModelRef(f"{student.name}@stage{k}", copy.deepcopy(student.model), student.key)
        student, row = single_stage(t, teacher, student, f"stage{k}_{_safe(teacher.name)}", frozen=frozen,
                                    extra={"order_acc": accs[i], "order_split": split.name})
        rows.append(row)
    return student.model, rows, {"order": [t.teachers[i].name for i in order],
                                 "order_accs": {t.teachers[i].name: accs[i] for i in order}}


def soup(t: Teachers):
    """One student distilled from each teacher (or a finished run given in soup_runs), their weights averaged;
    BatchNorm statistics recomputed on the training split when soup_recompute_bn."""
    cfg, members, rows = t.cfg, [], []
    runs = as_dict(cfg.get("soup_runs"))
    for k, teacher in enumerate(t.teachers, 1):
        student = t.copy_of_student0()
        reused = external_member(t, k, teacher, student, runs.get(teacher.name))
        if reused is None:
            reused = single_stage(t, teacher, student, f"soup{k}_{_safe(teacher.name)}")
        else:
            t.stages.skip(reused[1])
        student, row = reused
        members.append(student.model)
        rows.append(row)
    model = copy.deepcopy(t.student0.model)
    model.load_state_dict(uniform_soup(members))
    extra = {"soup_members": len(members), "soup_bn_samples": 0}
    if cfg.soup_recompute_bn:
        extra["soup_bn_samples"] = recompute_bn_stats(model, t.ctx.train_loader(t.train_split).iter_epoch(0))
    return model, rows, extra


def external_member(t: Teachers, k: int, teacher: ModelRef, like: ModelRef, path) -> Optional[tuple]:
    """A finished single-teacher run given in soup_runs (a main_transfer run dir or a student folder)."""
    if not path:
        return None
    p = Path(str(path))
    folder = p / "student" if (p / "student" / "meta.json").is_file() else p
    meta = read_meta(folder)
    if meta is None:
        log.warning("soup_runs.%s=%s holds no finished student: distilling it here", teacher.name, p)
        return None
    model = copy.deepcopy(like.model)
    try:
        model.load_state_dict(load_state_dict(folder / "model.safetensors"))
    except RuntimeError as e:
        raise UserError(f"soup_runs.{teacher.name}={p}: its student is not a {like.name} ({e}); give a run "
                        f"with the same student") from e
    expect = f"{like.name}<-{teacher.name}"
    if meta.get("name") != expect:
        log.warning("soup_runs.%s: the student in %s is '%s', expected '%s'", teacher.name, folder,
                    meta.get("name"), expect)
    summary = p / "summary.json"
    t_row = json.loads(summary.read_text()) if summary.is_file() else {}
    target = t_row.get("method_config", {}).get("_target_")
    if target is not None and not same_target(target, t.cfg.method._target_):
        log.warning("soup_runs.%s was distilled with %s, this run's method is %s", teacher.name, target,
                    t.cfg.method._target_)
    log.info("soup member %d (%s): re-using the finished run %s", k, teacher.name, folder)
    model.to(t.ctx.device)
    row = {"stage": k, "teacher": teacher.name, "reused_from": str(folder), **t.evaluate(model),
           "steps": int(t_row.get("steps", 0)), "stage_transfer": t_row}
    return ModelRef(like.name, model, meta["hash"], like.meta), row



def ensemble(t: Teachers):
    """One distillation from the teachers' ensemble (mean softmax) as a single teacher."""
    student, row = single_stage(t, ensemble_ref(t.teachers), t.student0, "ensemble")
    return student.model, [row], {}


def parallel(t: Teachers):
    """All teachers at once with `parallel_method` (multi-teacher KL+DP: per sample the most confident of the
    teachers and the frozen initial student is the target); one stage, logged as the run's own lines."""
    student, names = t.student0, t.names

    def train(_):
        ctx = t.ctx
        loader = ctx.train_loader(t.train_split)
        frozen = ModelRef(student.name + "@init", copy.deepcopy(student.model), student.key)
        caches = train_caches(ctx, [*t.teachers, frozen], t.train_split, loader, False)
        method = build_method(t.cfg.parallel_method, "parallel_method", accept=lambda c: "teachers" in c.needs,
                              choices=PARALLEL_CHOICES, modality=ctx.info.modality, student=student.model,
                              teachers=[m.model for m in t.teachers], frozen_student=frozen.model,
                              teacher_caches=caches[:-1], frozen_student_cache=caches[-1], names=names)
        shares = route_shares(multi_route(torch.stack([t.refs[n] for n in names]), t.s0_logits, t.labels,
                                          method.partition), len(names))
        route = {"route/student": 100 * shares[0].item(),
                 **{f"route/{n}": 100 * shares[i + 1].item() for i, n in enumerate(names)}}
        if ctx.tracker is not None:  # the starting point, logged before the Trainer (which may resume) exists
            ctx.tracker.log({**t.eval_logged(student.model), **{f"eval/{k}": v for k, v in route.items()},
                             "epoch": 0.0}, 0)
        trainer = ctx.trainer(method, loader, t.eval_logged, "parallel")
        trainer.fit()
        row = {"stage": 1, "teacher": "+".join(names), **t.evaluate(student.model), **route,
               **_train_route(trainer.history), "steps": trainer.total_steps}
        return student.model, row

    model, row, _ = t.stages.run("1_parallel", train, like=student.model,
                                 label=f"{student.name}<-parallel({'+'.join(names)})",
                                 kwargs=student.meta.get("kwargs"))
    return model, [row], _routing(row)


def _train_route(history: List[dict]) -> dict:
    """The routing shares (%) of the last training window that logged them."""
    for h in reversed(history):
        if any(k.startswith("train/route_") for k in h):
            return {f"train_route/{k[len('train/route_'):]}": 100 * v for k, v in h.items()
                    if k.startswith("train/route_")}
    return {}


def _routing(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.startswith(("route/", "train_route/"))}


RUN_MODE = {"sequential": sequential, "parallel": parallel, "soup": soup, "ensemble": ensemble}


def print_rows(summary: dict, run_dir) -> None:
    print(f"\n{summary['mode']} ({summary['method']}): {', '.join(summary['teachers'])} -> {summary['student']}, "
          f"eval on {summary['eval_split']}")
    print(f"{'stage':<7}{'teacher':<34}{'acc %':>8}{'delta':>8}{'gain %':>8}{'loss %':>8}")
    for r in summary["stages"]:
        print(f"{r['stage']:<7}{str(r['teacher'])[:33]:<34}{r['student_acc_after']:>8.2f}"
              f"{r['transfer_delta']:>+8.2f}{r['knowledge_gain']:>8.2f}{r['knowledge_loss']:>8.2f}")
    route = _routing(summary)
    if route:
        print("routing: " + ", ".join(f"{k} {v:.1f}%" for k, v in route.items()))
    print(f"final: student acc {summary['student_acc_before']:.2f} -> {summary['student_acc_after']:.2f}% "
          f"(transfer delta {summary['transfer_delta']:+.2f}); ensemble of teachers "
          f"{summary['vs_ensemble/teacher_acc']:.2f}%")
    print(versus_line(summary))
    print(f"outputs: {run_dir} (summary.json, metrics.jsonl, stages/, student/, plots/multi_teacher.png)")


def versus_line(summary: dict) -> str:
    """The final student against the best teacher and, when the run holds one, the best single-teacher transfer."""
    from ..plots.multi_teacher import best_single_transfer

    accs = {t: summary[f"vs_{t}/teacher_acc"] for t in summary["teachers"] if f"vs_{t}/teacher_acc" in summary}
    after = summary["student_acc_after"]
    parts = []
    if accs:
        best = max(accs, key=accs.get)
        parts.append(f"best teacher {best} {accs[best]:.2f}%")
    single = best_single_transfer(summary)
    if single is not None:
        parts.append(f"best single-teacher transfer ({single[0]}) {single[1]:.2f}% -> {summary['mode']} "
                     f"{after - single[1]:+.2f} points")
    else:
        parts.append("best single-teacher transfer: not in this run (main_transfer.py runs; scripts/aggregate.py "
                     "compares them)")
    return f"vs. single teachers: {'; '.join(parts)}"


def run(cfg: DictConfig, run_dir=None) -> dict:
    with run_context(cfg, run_dir, "multi_teacher", validate=validate, train_missing=train_zoo_entry) as ctx:
        t = Teachers.load(ctx, cfg)
        model, rows, extra = RUN_MODE[str(cfg.mode)](t)
        cfg_method = cfg.parallel_method if cfg.mode == "parallel" else cfg.method
        method_name = cfg.get("method_name") or method_class(cfg_method).__name__
        final = t.evaluate(model)
        summary = {"status": "ok", "mode": str(cfg.mode), "method": method_name, "student": t.student0.name,
                   "teachers": t.names, "eval_split": str(cfg.eval_split), "dataset": ctx.info.name,
                   "seed": cfg.trainer.seed, "method_config": as_dict(cfg_method),
                   "method_choice": method_choice("parallel_method" if cfg.mode == "parallel" else "method",
                                                  cfg_method), **extra, **final,
                   "steps": sum(int(r.get("steps", 0)) for r in rows), "stages": rows}
        ctx.save_student(model, f"{t.student0.name}<-{cfg.mode}({'+'.join(t.names)})", final["student_acc_after"],
                         kwargs=t.student0.meta.get("kwargs"))
        if ctx.rank == 0:
            from ..plots.multi_teacher import run_figure

            ctx.tracker.log_figure("plots/multi_teacher", run_figure(summary, ctx.run_dir / "plots" /
                                                                     "multi_teacher.png"))
        return ctx.report(summary, print_rows)
