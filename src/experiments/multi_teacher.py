"""Multiple teachers (`main_multi_teacher.py`): one student, a list of teachers, four modes (docs/REFERENCE.md §1.11,
§5.2 ensembles). Single-teacher stages (sequential stages, soup members, the ensemble teacher) run through
`transfer.transfer`; the parallel mode runs `parallel_method` (multi-teacher KL+DP) with the same Trainer.

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
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from ..data import training_split
from ..engine import Trainer, predict
from ..errors import UserError, check
from ..io_utils import load_state_dict
from ..methods import build_method, mean_softmax_logits, multi_route, recompute_bn_stats, route_shares, \
    uniform_soup
from ..metrics import accuracy, agreement, flips, transfer_metrics
from ..models import read_meta, save_checkpoint
from ..schema import as_dict
from .context import Context, ModelRef, setup
from .resolve import resolve_model
from .stage import read_stage, write_stage
from .transfer import ensemble_ref, train_caches, transfer

log = logging.getLogger("kt")

MODES = ("sequential", "parallel", "soup", "ensemble")
ORDERS = ("ascending", "descending", "listed")
_STUDENT_KEYS = ("student_acc", "transfer_delta", "knowledge_gain", "knowledge_loss", "nll", "ece")


def order_teachers(accs: Sequence[float], order: str) -> List[int]:
    """Indices of the teachers in stage order: by accuracy `ascending` (weakest first) or `descending`, or as
    `listed`; equal accuracies keep the listed order."""
    if order not in ORDERS:
        raise UserError(f"order='{order}' is unknown: use one of {', '.join(ORDERS)}")
    idx = list(range(len(accs)))
    return idx if order == "listed" else sorted(idx, key=lambda i: accs[i], reverse=order == "descending")


def report(now, before, refs: Dict[str, torch.Tensor], labels, top_p: float) -> Dict[str, float]:
    """Everything main_transfer reports, for the student `now` against the initial student `before`, with the
    teacher-dependent numbers once per reference model in `refs` (name -> eval logits) as `vs_<name>/<metric>`."""
    out: Dict[str, float] = {"student_acc_before": 100 * accuracy(before, labels)}
    for name, t in refs.items():
        m = transfer_metrics(now, before, t, labels, top_p)
        if "student_acc_after" not in out:
            out.update({("student_acc_after" if k == "student_acc" else k): m[k] for k in _STUDENT_KEYS})
        f0 = flips(t, before, labels)
        out[f"vs_{name}/teacher_acc"] = 100 * accuracy(t, labels)
        out[f"vs_{name}/positive_flips_before"] = f0["positive_flips_pct"]
        out[f"vs_{name}/negative_flips_before"] = f0["negative_flips_pct"]
        out[f"vs_{name}/agreement_before"] = 100 * agreement(t, before)
        out.update({f"vs_{name}/{k}": v for k, v in m.items() if k not in _STUDENT_KEYS})
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_")[-48:] or "model"


class StageTracker:
    """The run's tracker seen from one stage: the stage's trainer steps are offset by the steps of the stages
    before it (metrics.jsonl stays monotonic, and resuming a stage truncates only that stage's lines), and every
    line carries the stage number."""

    def __init__(self, base, offset: int, stage: int):
        self.base, self.offset, self.stage = base, int(offset), int(stage)

    @property
    def run_id(self):
        return getattr(self.base, "run_id", None)

    def log(self, metrics, step: int) -> None:
        if self.base is not None:
            self.base.log({**metrics, "stage": self.stage}, self.offset + int(step))

    def truncate_after(self, step: int) -> None:
        if self.base is not None:
            self.base.truncate_after(self.offset + int(step))


class MultiTeacher:
    """The shared state of one run: context, teachers, the initial student and the evaluation references."""

    def __init__(self, cfg: DictConfig, ctx: Context):
        self.cfg, self.ctx = cfg, ctx
        names = [str(t) for t in cfg.teachers]
        check(len(names) >= 1, "teachers=[] is empty: give at least one, e.g. teachers=[mlp_small,lenet]")
        if cfg.mode not in MODES:
            raise UserError(f"mode='{cfg.mode}' is unknown: use one of {', '.join(MODES)}")
        self.teachers = [resolve_model(t, ctx, "teacher") for t in cfg.teachers]
        tnames = [t.name for t in self.teachers]
        dup = sorted({n for n in tnames if tnames.count(n) > 1} | ({"ensemble"} & set(tnames)))
        check(not dup, f"teacher name(s) {dup} appear twice or are reserved: list each teacher once")
        self.student0 = resolve_model(cfg.student, ctx, "student")
        if self.student0.name in tnames:
            log.warning("the student %s is also one of the teachers", self.student0.name)
        for ref in (*self.teachers, self.student0):
            ref.model.to(ctx.device)
        self.init_state = copy.deepcopy(self.student0.model.state_dict())
        top_p = float(cfg.top_p)
        check(0 < top_p <= 100, f"top_p={top_p} must be in (0, 100]: use e.g. top_p=20")
        self.top_p = top_p
        self.eval_split = ctx.ds.split(cfg.eval_split)
        self.eval_loader = ctx.eval_loader(self.eval_split)
        self.t_eval = {t.name: ctx.outputs(t, self.eval_split)["logits"] for t in self.teachers}
        s0 = ctx.outputs(self.student0, self.eval_split)
        self.labels, self.s0_logits = s0["labels"], s0["logits"]
        self.refs = {**self.t_eval, "ensemble": mean_softmax_logits(torch.stack(list(self.t_eval.values())))}
        self.train_split = training_split(ctx.ds, cfg.dataset.transfer_split, cfg.dataset.subset)
        self.stages_dir = Path(ctx.run_dir) / "stages"

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model) -> Dict[str, float]:
        out = predict(model, self.eval_loader, amp=self.cfg.trainer.amp)
        return report(out["logits"], self.s0_logits, self.refs, self.labels, self.top_p)

    def eval_logged(self, model) -> Dict[str, float]:
        return {f"eval/{k}": v for k, v in self.evaluate(model).items()}

    def fresh_student(self, tag: str = "") -> ModelRef:
        """A copy of the initial student (its cache key stays valid: the weights are the same)."""
        m = copy.deepcopy(self.student0.model)
        m.load_state_dict(self.init_state)
        return ModelRef(self.student0.name + tag, m, self.student0.key, self.student0.meta)

    # ------------------------------------------------------------------ stages on disk
    def stage_dir(self, k: int, teacher_name: str) -> Path:
        return self.stages_dir / f"{k}_{_safe(teacher_name)}"

    def load_stage(self, d: Path, like: ModelRef):
        """(student after the stage, its row) when stage `d` finished earlier, else None."""
        done = read_stage(d, like.model, self.ctx.device)
        if done is None:
            return None
        model, row, meta = done
        return ModelRef(like.name, model, meta["hash"], like.meta), row

    def save_stage(self, d: Path, student: ModelRef, row: dict, label: str) -> ModelRef:
        """Returns the student with a cache key for its new weights (None on ranks that do not write)."""
        meta = write_stage(d, row, student.model, self._meta(label, row.get("student_acc_after")), self.ctx.rank)
        return ModelRef(student.name, student.model, meta["hash"] if meta else None, student.meta)

    def _meta(self, label: str, acc) -> dict:
        return {"name": label, "dataset": OmegaConf.to_container(self.cfg.dataset, resolve=True),
                "test_acc": None if acc is None else acc / 100, "kwargs": self.student0.meta.get("kwargs", {})}

    def log_stage(self, k: int, row: dict, step: int) -> None:
        if self.ctx.tracker is not None:
            self.ctx.tracker.log({**{f"stage_eval/{key}": v for key, v in row.items()
                                     if isinstance(v, (int, float))}, "stage": k}, step)

    # ------------------------------------------------------------------ modes
    def single_stage(self, k: int, teacher: ModelRef, student: ModelRef, trainer_name: str, offset: int,
                     frozen: Optional[ModelRef] = None, extra: Optional[dict] = None):
        """One `method` distillation of `teacher` into `student` (trained in place), or its saved result when
        the stage finished earlier. Returns (student after the stage, row)."""
        d = self.stage_dir(k, teacher.name)
        done = self.load_stage(d, student)
        if done is not None:
            log.info("stage %d (%s) finished earlier: re-using %s", k, teacher.name, d)
            return done
        log.info("stage %d: %s -> %s (%s)", k, teacher.name, student.name, trainer_name)
        t_row = transfer(self.ctx, teacher, student, self.cfg.method, self.ctx.run_dir, name=trainer_name,
                         frozen=frozen, tracker=StageTracker(self.ctx.tracker, offset, k))
        row = {"stage": k, "teacher": teacher.name, **(extra or {}), **self.evaluate(student.model),
               "steps": t_row["steps"], "stage_transfer": t_row}
        student = self.save_stage(d, student, row, f"{student.name}<-{teacher.name}")
        self.log_stage(k, row, offset + t_row["steps"])
        return student, row

    def sequential(self):
        split = self.ctx.ds.split(self.cfg.order_split)
        accs = [100 * accuracy(self.ctx.outputs(t, split)["logits"], split.labels) for t in self.teachers]
        order = order_teachers(accs, str(self.cfg.order))
        log.info("sequential order (%s, accuracy on %s): %s", self.cfg.order, split.name,
                 ", ".join(f"{self.teachers[i].name} {accs[i]:.2f}%" for i in order))
        student, rows, offset = self.student0, [], 0
        for k, i in enumerate(order, 1):
            t = self.teachers[i]
            # the student-teacher of this stage is the student after the previous stage (a frozen copy); the
            # stage's Trainer (own name, own checkpoints) builds a fresh optimiser
            frozen = ModelRef(f"{student.name}@stage{k}", copy.deepcopy(student.model), student.key)
            student, row = self.single_stage(k, t, student, f"stage{k}_{_safe(t.name)}", offset, frozen=frozen,
                                             extra={"order_acc": accs[i], "order_split": split.name})
            offset += int(row["steps"])
            rows.append(row)
        return student.model, rows, {"order": [self.teachers[i].name for i in order],
                                     "order_accs": {self.teachers[i].name: accs[i] for i in order}}

    def soup(self):
        members, rows, offset = [], [], 0
        runs = as_dict(self.cfg.get("soup_runs"))
        for k, t in enumerate(self.teachers, 1):
            student = self.fresh_student()
            reused = self.external_member(k, t, student, runs.get(t.name))
            if reused is None:
                reused = self.single_stage(k, t, student, f"soup{k}_{_safe(t.name)}", offset)
            student, row = reused
            offset += int(row.get("steps", 0))
            members.append(student.model)
            rows.append(row)
        model = copy.deepcopy(self.student0.model)
        model.load_state_dict(uniform_soup(members))
        extra = {"soup_members": len(members), "soup_bn_samples": 0}
        if self.cfg.soup_recompute_bn:
            loader = self.ctx.train_loader(self.train_split)
            extra["soup_bn_samples"] = recompute_bn_stats(model, loader.iter_epoch(0))
        return model, rows, extra

    def external_member(self, k: int, teacher: ModelRef, like: ModelRef, path) -> Optional[tuple]:
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
        if t_row.get("method_config", {}).get("_target_") not in (None, self.cfg.method._target_):
            log.warning("soup_runs.%s was distilled with %s, this run's method is %s", teacher.name,
                        t_row["method_config"]["_target_"], self.cfg.method._target_)
        log.info("soup member %d (%s): re-using the finished run %s", k, teacher.name, folder)
        model.to(self.ctx.device)
        row = {"stage": k, "teacher": teacher.name, "reused_from": str(folder), **self.evaluate(model),
               "steps": int(t_row.get("steps", 0)), "stage_transfer": t_row}
        return ModelRef(like.name, model, meta["hash"], like.meta), row

    def ensemble(self):
        student, row = self.single_stage(1, ensemble_ref(self.teachers), self.student0, "ensemble", 0)
        return student.model, [row], {}

    def parallel(self):
        ctx, cfg = self.ctx, self.cfg
        names = [t.name for t in self.teachers]
        d = self.stage_dir(1, "parallel")
        done = self.load_stage(d, self.student0)
        if done is not None:
            log.info("parallel stage finished earlier: re-using %s", d)
            return done[0].model, [done[1]], _routing(done[1])
        student = self.student0
        loader = ctx.train_loader(self.train_split)
        frozen = ModelRef(student.name + "@init", copy.deepcopy(student.model), student.key)
        caches = train_caches(ctx, [*self.teachers, frozen], self.train_split, loader, False)
        method = build_method(cfg.parallel_method, "parallel_method", accept=lambda c: "teachers" in c.needs,
                              choices="a method that takes several teachers (a single-teacher one goes in `method`): "
                                      "method@parallel_method=multi_kl_dp (or multi_kl_dp_u)",
                              student=student.model, teachers=[t.model for t in self.teachers],
                              frozen_student=frozen.model, teacher_caches=caches[:-1],
                              frozen_student_cache=caches[-1], names=[t.name for t in self.teachers])
        src = multi_route(torch.stack([self.t_eval[n] for n in names]), self.s0_logits, self.labels,
                          method.partition)
        shares = route_shares(src, len(names))
        route = {"route/student": 100 * shares[0].item(),
                 **{f"route/{n}": 100 * shares[i + 1].item() for i, n in enumerate(names)}}
        if ctx.tracker is not None:
            ctx.tracker.log({**self.eval_logged(student.model), **{f"eval/{k}": v for k, v in route.items()},
                             "epoch": 0.0}, 0)
        trainer = Trainer(method, loader, cfg.trainer, cfg.optimizer, cfg.scheduler, ctx.run_dir,
                          tracker=ctx.tracker, evaluate=self.eval_logged, device=ctx.device, name="parallel",
                          rank=ctx.rank, world_size=ctx.world_size)
        trainer.fit()
        train_route = {}
        for h in reversed(trainer.history):  # routing shares of the last training window
            if any(k.startswith("train/route_") for k in h):
                train_route = {f"train_route/{k[len('train/route_'):]}": 100 * v for k, v in h.items()
                               if k.startswith("train/route_")}
                break
        row = {"stage": 1, "teacher": "+".join(names), **self.evaluate(student.model), **route, **train_route,
               "steps": trainer.total_steps}
        student = self.save_stage(d, student, row, f"{student.name}<-parallel({'+'.join(names)})")
        return student.model, [row], _routing(row)


def _routing(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.startswith(("route/", "train_route/"))}


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
    print(f"outputs: {run_dir} (summary.json, metrics.jsonl, stages/, student/)")


def run(cfg: DictConfig, run_dir=None) -> dict:
    ctx = setup(cfg, run_dir, job_type="multi_teacher")
    try:
        mt = MultiTeacher(cfg, ctx)
        model, rows, extra = getattr(mt, str(cfg.mode))()
        cfg_method = cfg.parallel_method if cfg.mode == "parallel" else cfg.method
        method_name = cfg.get("method_name") or get_class(cfg_method._target_).__name__
        final = mt.evaluate(model)
        summary = {"status": "ok", "mode": str(cfg.mode), "method": method_name, "student": mt.student0.name,
                   "teachers": [t.name for t in mt.teachers], "eval_split": str(cfg.eval_split),
                   "dataset": ctx.info.name, "seed": cfg.trainer.seed, "method_config": as_dict(cfg_method),
                   **extra, **final, "steps": sum(int(r.get("steps", 0)) for r in rows), "stages": rows}
        if ctx.rank == 0 and cfg.get("save_student", True):
            save_checkpoint(model, ctx.run_dir / "student",
                            mt._meta(f"{mt.student0.name}<-{cfg.mode}({'+'.join(summary['teachers'])})",
                                     final["student_acc_after"]))
        return ctx.report(summary, print_rows)
    finally:
        ctx.tracker.finish()
