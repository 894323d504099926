"""What several families share: one distillation stage (a teacher into a student with a `method/` node, measured
with the transfer metrics: main_transfer's run and every multi-teacher stage), and the stage folders of
multi-stage runs (a finished stage's student + row, read back on a rerun; steps continued across stages).
No maths here: the losses are in src/methods, the metrics in src/metrics."""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..data import training_split
from ..engine import digest, predict, rows_by_id
from ..io_utils import load_state_dict, read_json_safe, write_json
from ..methods import EnsembleTeacher, build_method, dp_route, method_needs
from ..methods.base import check_synth_ratio
from ..metrics import accuracy, agreement, flips, kl_divergence, routing_shares, transfer_metrics
from ..models import Normalized, read_meta, save_checkpoint
from ..models.zoo import verified_hash
from ..tracking import StageTracker
from .context import Context, ModelRef
from .zoo import resolve_generator

log = logging.getLogger("kt")


# ------------------------------------------------------------------------------------------ a distillation stage
def synth_inputs(ctx: Context, cfg_method) -> Dict[str, object]:
    """With method.synth_ratio > 0: the frozen generator named by method.synth_source (a zoo generator, trained
    first when missing and zoo.train_missing=true, or a main_zeroshot.py run dir) and the run's seed for its draws."""
    ratio = check_synth_ratio(cfg_method.get("synth_ratio", 0.0))
    if ratio == 0:
        return {}
    source, meta = resolve_generator(cfg_method.get("synth_source"), ctx)
    log.info("synthetic distillation data: %.0f%% of every batch from generator %s (%s)", 100 * ratio,
             cfg_method.get("synth_source"), meta["folder"])
    return {"synth_generator": source.to(ctx.device), "synth_seed": int(ctx.settings.seed)}


def labels_by_id(split):
    """(full_size,) label of each sample id of `split`, -1 for ids outside it (CRD's class-aware negatives)."""
    out = torch.full((max(split.full_size, int(split.ids.max()) + 1 if len(split) else 0),), -1, dtype=torch.long)
    out[split.ids.long()] = split.labels.long()
    return out


def train_caches(ctx: Context, refs, split, loader, features: bool):
    """Per-sample output tables of the frozen models over the training split, when its inputs are not randomly
    augmented (then each sample's output never changes): one evaluation instead of one per epoch."""
    if loader.augmented or not ctx.settings.cache_train_outputs:
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


def ensemble_ref(refs) -> ModelRef:
    """One teacher from several: the members' mean softmax (EnsembleTeacher), cached under a key of the members'
    keys (not cached when a member has no key)."""
    keys = [t.key for t in refs]
    return ModelRef("ensemble(" + "+".join(t.name for t in refs) + ")", EnsembleTeacher([t.model for t in refs]),
                    "ensemble-" + digest(*keys) if all(keys) else None)


def stage_method(ctx: Context, teacher: ModelRef, student: ModelRef, cfg_method, train_split, loader,
                 frozen: Optional[ModelRef] = None, synth: Optional[Dict[str, object]] = None):
    """The `method` node built for distilling `teacher` into `student`: with the student-teacher when it needs one
    (`frozen`, default a frozen copy of the student as it is now), the frozen models' output caches when the
    training inputs are not augmented, the split's labels by sample id, the synthetic-data generator."""
    needs = method_needs(cfg_method)
    if "frozen_student" in needs:
        frozen = frozen or ModelRef(student.name + "@init", copy.deepcopy(student.model), student.key)
    else:
        frozen = None
    t_cache, f_cache = train_caches(ctx, [teacher, frozen], train_split, loader, "features" in needs)
    return build_method(cfg_method, modality=ctx.info.modality, student=student.model, teacher=teacher.model,
                        frozen_student=frozen.model if frozen is not None else None,
                        teacher_cache=t_cache, frozen_student_cache=f_cache,
                        sample_labels=labels_by_id(train_split) if "sample_labels" in needs else None,
                        **(synth if synth is not None else synth_inputs(ctx, cfg_method)))


_ROW_AFTER = {"student_acc": "student_acc_after", "transfer_delta": "transfer_delta",
              "knowledge_gain": "knowledge_gain", "knowledge_loss": "knowledge_loss",
              "positive_flips": "positive_flips_after", "negative_flips": "negative_flips_after",
              "agreement": "agreement_after"}


def stage_row(t_eval, s0_eval, last: Dict[str, float]) -> Dict[str, Any]:
    """The summary row of a stage from the eval outputs of the teacher and the initial student and the last
    evaluation (`eval/<transfer metric>`): before / after of accuracy, flips and agreement, then every other
    transfer metric under its own name."""
    t, s0, labels = t_eval["logits"], s0_eval["logits"], t_eval["labels"]
    f0 = flips(t, s0, labels)
    after = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("eval/")}
    return {"student_acc_before": 100 * accuracy(s0, labels), "teacher_acc": 100 * accuracy(t, labels),
            "positive_flips_before": f0["positive_flips_pct"], "negative_flips_before": f0["negative_flips_pct"],
            "agreement_before": 100 * agreement(t, s0),
            **{_ROW_AFTER.get(k, k): v for k, v in after.items()}}


def train_fidelity(ctx: Context, teacher: ModelRef, model, split) -> Dict[str, float]:
    """Fidelity on the distillation data itself (gnosis, docs/REFERENCE.md §5.1): the student's top-1 agreement
    with the teacher (%), KL(p_teacher || p_student) at T = 1 and both accuracies (%) on the (un-augmented)
    training split."""
    t = ctx.outputs(teacher, split)
    s = predict(model, ctx.eval_loader(split), amp=ctx.settings.amp)
    return {"train_agreement": 100 * agreement(t["logits"], s["logits"]),
            "train_kl": kl_divergence(t["logits"], s["logits"]),
            "train_student_acc": 100 * accuracy(s["logits"], s["labels"]),
            "train_teacher_acc": 100 * accuracy(t["logits"], t["labels"])}


def distil(ctx: Context, teacher: ModelRef, student: ModelRef, cfg_method, eval_split: str, top_p: float,
           name: str = "", frozen: Optional[ModelRef] = None, tracker: Any = "run",
           synth: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """One distillation stage: `teacher` into `student` (trained in place) with `cfg_method` on the dataset's
    transfer split, evaluated on split `eval_split` with the transfer metrics (`top_p`: their concentration level,
    %) before and after (and KL+DP's routing shares); returns the stage's row. `name`: the trainer's checkpoint
    folder; `tracker`: the run's ("run") or a StageTracker; `synth`: the result of `synth_inputs` when the caller
    resolved it already."""
    amp, d = ctx.settings.amp, ctx.settings.dataset
    eval_split = ctx.ds.split(eval_split)
    t_eval, s0_eval = ctx.outputs(teacher, eval_split), ctx.outputs(student, eval_split)
    labels, top_p = t_eval["labels"], float(top_p)
    train_split = training_split(ctx.ds, d.transfer_split, d.subset)
    loader = ctx.train_loader(train_split)
    method = stage_method(ctx, teacher, student, cfg_method, train_split, loader, frozen, synth)
    eval_loader = ctx.eval_loader(eval_split)

    def evaluate(model):
        out = predict(model, eval_loader, amp=amp)
        return {f"eval/{k}": v for k, v in transfer_metrics(out["logits"], s0_eval["logits"], t_eval["logits"],
                                                             labels, top_p).items()}

    partition = getattr(method, "partition", None)
    route = routing_shares(dp_route(t_eval["logits"], s0_eval["logits"], labels, partition), t_eval["logits"],
                           s0_eval["logits"], labels) if partition else {}
    tracker = ctx.stage_tracker(tracker)
    if tracker is not None:  # the starting point, logged before the Trainer (which may resume) exists
        before = transfer_metrics(s0_eval["logits"], s0_eval["logits"], t_eval["logits"], labels, top_p)
        tracker.log({**{f"eval/{k}": v for k, v in {**before, **route}.items()}, "epoch": 0.0}, 0)
    trainer = ctx.trainer(method, loader, evaluate, name, tracker=tracker)
    last = trainer.fit() or evaluate(method.eval_model())  # {}: resumed after the last step, nothing to train
    final_model = method.eval_model()
    if final_model is not student.model:  # e.g. MCL's slow weights: they are the result
        student.model.load_state_dict(final_model.state_dict())
    return {**train_fidelity(ctx, teacher, student.model, train_split), **stage_row(t_eval, s0_eval, last),
            **route, "steps": trainer.total_steps}


# ------------------------------------------------------------------------------------------- stage folders
def read_stage(d: Path, like: Optional[torch.nn.Module] = None, device="cpu"):
    """(model, row, checkpoint meta) of the stage finished earlier in folder `d`, else None. `model` is a copy of
    `like` holding the stage's student weights (model and meta are None when `like` is None)."""
    if not (d / "row.json").is_file():
        return None
    row = read_json_safe(d / "row.json", "stage result", f"delete the folder {d} to rerun the stage")
    if like is None:
        return None, row, None
    meta = read_meta(d / "student")
    if meta is None:
        return None
    meta = dict(meta, hash=verified_hash(d / "student", meta))
    model = copy.deepcopy(like)
    model.load_state_dict(load_state_dict(d / "student" / "model.safetensors"))
    return model.to(device), row, meta


def write_stage(d: Path, row: dict, model: Optional[Normalized] = None, meta: Optional[dict] = None,
                rank: int = 0) -> Optional[dict]:
    """Mark stage `d` finished: the student's weights first (if any), the row last. Only rank 0 writes (the other
    ranks hold the same weights); returns the saved checkpoint's meta (with its content hash), else None."""
    if rank != 0:
        return None
    saved = save_checkpoint(model, d / "student", meta or {}) if model is not None else None
    write_json(d / "row.json", row)
    return saved


class Stages:
    """Named stages of a run, in order, each in <run_dir>/stages/<name>/: a stage finished earlier is read back;
    the others run with a StageTracker whose steps continue after the earlier stages' (metrics.jsonl stays
    monotonic) and are then written (the student first, row.json last)."""

    def __init__(self, ctx: Context):
        self.ctx, self.offset, self.k = ctx, 0, 0
        self.trained: List[str] = []

    def folder(self, name: str) -> Path:
        return Path(self.ctx.run_dir) / "stages" / name

    def run(self, name: str, fn: Callable[[StageTracker], Tuple[Optional[torch.nn.Module], dict]],
            like: Optional[torch.nn.Module] = None, label: Optional[str] = None,
            kwargs: Optional[dict] = None) -> Tuple[Optional[torch.nn.Module], dict, Optional[str]]:
        """Stage `name`: `fn(tracker) -> (student or None, row)`, or its saved result when it finished earlier
        (`like`: a model whose copy receives the saved student weights). The student is saved as `label` (its
        architecture kwargs `kwargs`, accuracy the row's student_acc_after). Returns (student, row, content hash
        of the student's weights: its output-cache key; None without a student or on ranks that do not write)."""
        self.k += 1
        d = self.folder(name)
        done = read_stage(d, like, self.ctx.device)
        if done is not None:
            log.info("stage %d (%s) finished earlier: re-using %s", self.k, name, d)
            model, row, meta = done
        else:
            log.info("stage %d: %s", self.k, name)
            model, row = fn(StageTracker(self.ctx.tracker, self.offset, self.k))
            meta = write_stage(d, row, model, self.ctx.student_meta(label or name, row.get("student_acc_after"),
                                                                    kwargs=kwargs), self.ctx.rank)
            self.trained.append(name)
        self.offset += int(row.get("steps", 0))
        return model, row, meta["hash"] if meta else None

    def skip(self, row: dict) -> None:
        """Count a stage whose result came from elsewhere (e.g. a finished run given in soup_runs): the next stage
        is numbered after it and its steps continue after the row's."""
        self.k += 1
        self.offset += int(row.get("steps", 0))
