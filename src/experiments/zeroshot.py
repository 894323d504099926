"""Zero-shot knowledge transfer (`main_zeroshot.py`, docs/REFERENCE.md §4): a generator and the student play the
adversarial belief-matching game with no real training data; few-shot baselines (KD+AT, scratch) train on M real
images per class; transition curves / MTE compare every student's decision boundaries with the teacher's."""
from __future__ import annotations

import copy
import logging
from typing import Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ..data.datasets import Split, subset_positions
from ..data import NoiseBatches
from ..engine import predict, seed_everything
from ..errors import UserError, check
from ..methods import build_method, method_class
from ..methods.zeroshot import ZeroShot, no_param_grads, stage_shapes
from ..metrics import accuracy, agreement
from ..metrics.transition import agreeing, mean_transition_error, transition_curves
from ..models import create_model
from ..models.gan import ZeroShotSource, save_generator
from ..models.generator import Generator
from ..plots.zeroshot import pseudo_image_grid, transition_grid, transition_plot
from ..schema import LoaderConfig, OptimizerConfig, SchedulerConfig, TrainerConfig, typed
from ..tracking import StageTracker
from .context import Context, ModelRef, run_context
from .preflight import model_spec, preflight
from .resolve import resolve_model
from .zoo import train_zoo_entry

log = logging.getLogger("kt")

BASELINES = ("kd_at", "scratch")
ZEROSHOT_METHODS = "method._target_=src.methods.ZeroShot (or a subclass of it)"


def is_zeroshot(cls) -> bool:
    return issubclass(cls, ZeroShot)


# ------------------------------------------------------------------------------------------------ validation
def check_stages(teacher_model, student_model, cfg, names) -> None:
    """With method.beta > 0, teacher and student need 3 stages of equal spatial sizes (WRN / CIFAR ResNet)."""
    d = cfg.dataset
    shapes = [stage_shapes(m, d.channels, d.image_size) for m in (teacher_model, student_model)]
    for role, name, s in zip(("teacher", "student"), names, shapes):
        check(s is not None and len(s) == 3,
              f"method.beta={cfg.method.beta}: attention transfer needs 3 intermediate stages (WRN / CIFAR ResNet) "
              f"but {role} '{name}' has {len(s) if s else 'none'}: set method.beta=0")
    check(shapes[0] == shapes[1], f"method.beta={cfg.method.beta}: teacher stages {shapes[0]} and student stages "
                                  f"{shapes[1]} differ in size: set method.beta=0")


def validate(cfg: DictConfig) -> None:
    """The family's own keys, before any dataset, zoo or training work (one line naming the value and the fix)."""
    # trainer.epochs is ${pseudo_batches}: name the key the user sets, before the shared ranges
    check(cfg.pseudo_batches >= 1, f"pseudo_batches={cfg.pseudo_batches} must be >= 1: use e.g. pseudo_batches=150")
    preflight(cfg)  # the shared ranges (finite numbers, full keys), then this family's own keys
    m = cfg.method
    method_class(m, accept=is_zeroshot, choices=ZEROSHOT_METHODS)  # its hyper-parameters: preflight (cls.check)
    check(cfg.trainer.max_steps is None, f"trainer.max_steps={cfg.trainer.max_steps}: zero-shot KT counts "
                                         f"pseudo-batches; remove trainer.max_steps and set pseudo_batches=N")
    Generator(cfg.generator.z_dim, cfg.dataset.image_size, cfg.dataset.channels)  # checks z_dim and image size
    bad = [b for b in cfg.baselines if b not in BASELINES]
    check(not bad, f"baselines={list(cfg.baselines)}: unknown '{bad[0] if bad else ''}'; use any of "
                   f"{', '.join(BASELINES)} (or [])")
    check(cfg.shots_per_class >= 1, f"shots_per_class={cfg.shots_per_class} must be >= 1: use e.g. 10")
    t = cfg.transition
    check(t.n_images >= 1, f"transition.n_images={t.n_images} must be >= 1: use e.g. 1000 (the paper)")
    check(t.steps >= 1, f"transition.steps={t.steps} must be >= 1: use e.g. 200 (the paper)")
    check(1 <= t.mte_steps <= t.steps, f"transition.mte_steps={t.mte_steps} must be in [1, transition.steps="
                                       f"{t.steps}]: use e.g. 100 (the paper)")
    check(t.lr > 0, f"transition.lr={t.lr} must be > 0: use 1.0 (the paper)")
    fs = cfg.few_shot
    for node, schema in ((fs.optimizer, OptimizerConfig), (fs.scheduler, SchedulerConfig)):
        typed(schema, node)  # unknown keys / wrong types fail here
    typed(TrainerConfig, cfg.trainer, fs.trainer)
    if m.beta > 0:  # a cheap look at the named architectures (zoo entries, arch@file, names) before any loading
        archs = [model_spec(cfg.teacher, cfg).arch, model_spec(cfg.student, cfg).arch]
        if all(archs):
            d = cfg.dataset
            models = [create_model(a, d) for a in archs]
            check_stages(*models, cfg, [str(cfg.teacher), str(cfg.student)])


# ------------------------------------------------------------------------------------------------ pieces
def fresh_student(spec, ctx: Context, cfg: DictConfig) -> ModelRef:
    """An architecture name is a fresh, randomly initialised student; anything else resolves like a teacher."""
    s = model_spec(spec, cfg)
    if s.is_fresh_arch:
        return resolve_model({"arch": s.arch, "name": s.name}, ctx, "student")
    return resolve_model(spec, ctx, "student")


def few_shot_split(ctx: Context, cfg: DictConfig) -> Split:
    split = ctx.ds.split(cfg.few_shot.split)
    m = int(cfg.shots_per_class)
    fewest = int(torch.bincount(split.labels, minlength=ctx.info.num_classes).min())
    check(m <= fewest, f"shots_per_class={m}: split '{split.name}' has only {fewest} images in its smallest class: "
                       f"use shots_per_class<={fewest}")
    return split.select(subset_positions(split.labels, None, m, int(cfg.few_shot.seed)))


class ZeroShotRun:
    """One run: the teacher, the initial student, the evaluation split; trains and measures every student."""

    def __init__(self, cfg: DictConfig, ctx: Context):
        self.cfg, self.ctx = cfg, ctx
        # a bad shots_per_class fails before training
        self.few_shot = few_shot_split(ctx, cfg) if cfg.baselines else None
        self.teacher = resolve_model(cfg.teacher, ctx, "teacher")
        self.teacher.model.to(ctx.device).eval()
        seed_everything(cfg.trainer.seed)  # the same student / generator init whether or not the zoo was trained
        self.student = fresh_student(cfg.student, ctx, cfg)
        self.student.model.to(ctx.device)
        if cfg.method.beta > 0:
            check_stages(self.teacher.model, self.student.model, cfg, [self.teacher.name, self.student.name])
        self.init_state = copy.deepcopy(self.student.model.state_dict())
        self.eval_split = ctx.ds.split(cfg.eval_split)
        self.t_eval = ctx.outputs(self.teacher, self.eval_split)
        self.eval_loader = ctx.eval_loader(self.eval_split)
        self.offset, self.stage = 0, 0
        self.curves: Dict[str, dict] = {}  # student name -> its transition curves (for the grid figure)

    def evaluate(self, model, name: str) -> Dict[str, float]:
        out = predict(model, self.eval_loader, amp=self.cfg.trainer.amp)
        return {f"eval/{name}_acc": 100 * accuracy(out["logits"], out["labels"]),
                f"eval/{name}_agreement": 100 * agreement(out["logits"], self.t_eval["logits"])}

    def fit(self, method, loader, trainer_cfg, optim_cfg, sched_cfg, name: str) -> Dict[str, float]:
        ctx = self.ctx
        trainer = ctx.trainer(method, loader, lambda m: self.evaluate(m, name), name,
                              tracker=StageTracker(ctx.tracker, self.offset, self.stage), trainer_cfg=trainer_cfg,
                              optimizer_cfg=optim_cfg, scheduler_cfg=sched_cfg)
        last = trainer.fit() or self.evaluate(method.eval_model(), name)  # {}: nothing left to evaluate
        self.offset, self.stage = self.offset + trainer.total_steps, self.stage + 1
        return {"acc": last[f"eval/{name}_acc"], "agreement": last[f"eval/{name}_agreement"],
                "steps": trainer.total_steps}

    def copy_of_initial_student(self):
        m = copy.deepcopy(self.student.model)
        m.load_state_dict(self.init_state)
        return m

    def zero_shot(self) -> Dict[str, float]:
        cfg, info = self.cfg, self.ctx.info
        generator = Generator(cfg.generator.z_dim, info.image_size, info.channels)
        method = build_method(cfg.method, accept=is_zeroshot, choices=ZEROSHOT_METHODS, modality=info.modality,
                              student=self.student.model, teacher=self.teacher.model, generator=generator)
        loader = NoiseBatches(cfg.loader.batch_size, cfg.generator.z_dim, method.steps_per_batch,
                              cfg.trainer.seed, self.ctx.device)
        res = self.fit(method, loader, cfg.trainer, cfg.optimizer, cfg.scheduler, "zeroshot")
        if self.ctx.rank == 0:  # <run dir>/generator/: a source of synthetic distillation data (method.synth_source)
            t = self.teacher.model
            self.pseudo_images(generator)
            save_generator(generator, self.ctx.run_dir / "generator",
                           {"name": f"zeroshot<-{self.teacher.name}", "teacher": self.teacher.name,
                            "mean": t.mean.flatten().tolist(), "std": t.std.flatten().tolist(),
                            "dataset": OmegaConf.to_container(cfg.dataset, resolve=True)})
        return res

    def pseudo_images(self, generator, batches: int = 4, per_batch: int = 8) -> None:
        """plots/pseudo_images.png: a few images of `batches` fresh noise batches from the trained generator, as the
        teacher sees them (raw [0, 1]), each titled with the teacher's predicted class and probability."""
        t = self.teacher.model
        source = ZeroShotSource(generator, t.mean.flatten().tolist(), t.std.flatten().tolist()).to(self.ctx.device)
        modes = generator.training, t.training
        generator.eval(), t.eval()  # BN running statistics: the saved generator is not changed by drawing from it
        with torch.no_grad():
            x = source.sample(batches * per_batch, torch.Generator().manual_seed(int(self.cfg.trainer.seed)))
            p = torch.softmax(t(x).float(), 1)
        generator.train(modes[0]), t.train(modes[1])
        conf, pred = p.max(1)
        path = pseudo_image_grid(x.clamp(0, 1).cpu(), pred.tolist(), conf.tolist(), self.ctx.info.classes, batches,
                                 self.ctx.run_dir / "plots" / "pseudo_images.png", self.teacher.name)
        self.ctx.tracker.log_figure("zeroshot/pseudo_images", path)

    def baseline(self, name: str) -> Dict[str, float]:
        cfg, fs = self.cfg, self.cfg.few_shot
        seed_everything(cfg.trainer.seed)
        student, split = self.copy_of_initial_student(), self.few_shot
        loader_cfg = typed(LoaderConfig, cfg.loader, {"batch_size": min(int(cfg.loader.batch_size), len(split))})
        trainer_cfg = typed(TrainerConfig, cfg.trainer, fs.trainer)
        loader = self.ctx.train_loader(split, loader_cfg, channels_last=trainer_cfg.channels_last)
        method = build_method(fs[name], f"few_shot.{name}", modality=self.ctx.info.modality, student=student,
                              teacher=self.teacher.model)
        res = self.fit(method, loader, trainer_cfg,
                       typed(OptimizerConfig, fs.optimizer), typed(SchedulerConfig, fs.scheduler), name)
        res["model"] = student
        return res

    def transition(self, name: str, student) -> Optional[float]:
        """Transition curves of `student` vs. the teacher on eval images both classify alike; returns the MTE.
        Steps are taken in the student's normalised input space (the paper's models share it); the teacher sees
        the same images de-normalised back to raw [0, 1] (it normalises them itself). None: they agree nowhere."""
        cfg, t = self.cfg, self.cfg.transition
        teacher = self.teacher.model
        student.eval()
        s_logits = predict(student, self.eval_loader)["logits"]
        pos = agreeing(s_logits, self.t_eval["logits"], int(t.n_images), seed=int(cfg.trainer.seed))
        if len(pos) == 0:
            log.warning("student '%s' and the teacher agree on no %s image: no transition curves", name,
                        cfg.eval_split)
            return None
        x, _ = self.ctx.eval_images(self.eval_split)
        x = student.normalize(x[pos.to(x.device)])
        labels = self.t_eval["labels"][pos.to(self.t_eval["labels"].device)].to(x.device)  # true labels
        with no_param_grads(student):
            curves = transition_curves(student.forward_normalized, lambda u: teacher(student.denormalize(u)), x, labels,
                                       self.ctx.info.num_classes, int(t.steps), float(t.lr), t.chunk)
        mte = mean_transition_error(curves["student"], curves["teacher"], int(t.mte_steps))
        self.curves[name] = {**curves, "mte": mte, "images": len(pos)}
        log.info("transition curves of %s on %d images x %d classes: MTE %.4f", name, len(pos),
                 self.ctx.info.num_classes - 1, mte)
        path = transition_plot(curves["student"], curves["teacher"], self.ctx.run_dir / "plots" /
                               f"transition_{name}.png", title=f"{name} vs. teacher {self.teacher.name} "
                               f"({len(pos)} images)", mte=mte, mte_steps=int(t.mte_steps))
        self.ctx.tracker.log_figure(f"transition/{name}", path)
        return mte


def print_table(row: dict, run_dir) -> None:
    print(f"\nzero-shot KT: {row['teacher']} (teacher) -> {row['student']} (student), {row['dataset']}, "
          f"eval on {row['eval_split']}")
    print(f"{'model':<10}{'real training data':<30}{'acc %':>8}{'agree %':>9}{'MTE':>8}")
    print(f"{'teacher':<10}{'all of its training split':<30}{row['teacher_acc']:>8.2f}{'':>9}{'':>8}")
    data = {"zeroshot": f"none ({row['pseudo_batches']} pseudo-batches)",
            **{b: f"{row['shots_per_class']} images/class" for b in BASELINES}}
    for name in ["zeroshot", *row["baselines"]]:
        mte = row.get(f"mte_{name}")
        print(f"{name:<10}{data[name]:<30}{row[f'{name}_acc']:>8.2f}{row[f'{name}_agreement']:>9.2f}"
              f"{'' if mte is None else f'{mte:.3f}':>8}")
    print(f"outputs: {run_dir} (summary.json, metrics.jsonl, student/, plots/)")


def run(cfg: DictConfig, run_dir=None) -> dict:
    with run_context(cfg, run_dir, "zeroshot", validate=validate, train_missing=train_zoo_entry) as ctx:
        if ctx.world_size > 1:
            raise UserError(f"zero-shot KT runs on one process (WORLD_SIZE={ctx.world_size}): launch it with "
                            f"python, not torchrun")
        r = ZeroShotRun(cfg, ctx)
        labels = r.t_eval["labels"]
        row = {"status": "ok", "teacher": r.teacher.name, "student": r.student.name, "dataset": ctx.info.name,
               "eval_split": cfg.eval_split, "teacher_acc": 100 * accuracy(r.t_eval["logits"], labels),
               "pseudo_batches": int(cfg.pseudo_batches), "shots_per_class": int(cfg.shots_per_class),
               "baselines": list(cfg.baselines), "seed": cfg.trainer.seed}
        zs = r.zero_shot()
        row.update(zeroshot_acc=zs["acc"], zeroshot_agreement=zs["agreement"], zeroshot_steps=zs["steps"])
        students = {"zeroshot": r.student.model}
        for b in cfg.baselines:
            res = r.baseline(b)
            row.update({f"{b}_acc": res["acc"], f"{b}_agreement": res["agreement"], f"{b}_steps": res["steps"]})
            students[b] = res["model"]
        for name, model in students.items():
            row[f"mte_{name}"] = r.transition(name, model)
        if r.curves:
            grid = transition_grid(r.curves, ctx.run_dir / "plots" / "transition_grid.png", r.teacher.name,
                                   int(cfg.transition.mte_steps))
            ctx.tracker.log_figure("transition/grid", grid)
        # the zero-shot student: a checkpoint folder any family takes as a model
        ctx.save_student(r.student.model, f"{r.student.name}<-{r.teacher.name}", row["zeroshot_acc"], "zeroshot",
                         r.student.meta.get("kwargs"))
        return ctx.report(row, print_table)
