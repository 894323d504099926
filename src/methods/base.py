"""Base class of every training method. A method is a small nn.Module:

- constructor arguments: the student (trained), the frozen models it needs (teacher, frozen initial student) and
  its hyper-parameters; extra trainable modules (projection heads, memory banks) are submodules;
- `loss(batch) -> (loss, logs)` on a `src.batch.Batch`, opened by name (`batch.inputs`, `batch.targets`,
  `batch.ids`); `forward` is `loss`, so DDP can wrap the method (the Trainer hands the batch over untouched);
- `modalities`: the inputs it handles (DatasetInfo.modality: image, text); `build_method(..., modality=...)`
  refuses the others with one line;
- `eval_model()`: the weights to evaluate (MCL evaluates its slow EMA weights);
- `after_step(step)`: per-step updates outside autograd (EMA);
- frozen models are excluded from `state_dict()` (checkpoints hold what training changes) and stay in eval mode.

Frozen models answer through `FrozenOutputs`, which serves logits/features from a per-sample cache (keyed by the
batch's sample ids, `batch.ids`) when the training inputs are not randomly augmented, and runs the model otherwise.

Distillation inputs (gnosis, docs/REFERENCE.md §5.3), shared by every distillation method through `mix`: mixup
(`mixup_alpha`) and synthetic samples (`synth_ratio`: that fraction of each batch, round(ratio * B) rows, is
replaced by images of a frozen generator `synth_generator`, which the teacher then labels). Either bypasses the
output caches (the inputs are new), and either needs float image inputs (`Batch.is_image`): another batch is a
UserError. Synthetic draws come from `StepSeeds`: a torch.Generator per training step
seeded by (synth_seed, rank, draw count), the count being a buffer of the method's state dict, so a resumed run
draws exactly the images an uninterrupted one does, whatever else consumed the global RNG.

What a method needs beyond its student is declared, not sniffed: the class attribute `needs` (names from `NEEDS`,
refined per config by `needs_for`) says which inputs `src.methods.build.build_method` hands to the constructor and
what the caller must prepare (output caches with features, a feature table with the student's features). The
classmethod `check(**hparams)` validates a config's hyper-parameters before any work: unknown keys and the ranges
of `HPARAM_RULES` (one rule per key, shared by every method) here, choices and class-specific rules in each class's
override; constructors call their own class's check, and preflight calls it on every method node of a config
(`src.methods.build.check_method_node`), so each rule has one home.
"""
from __future__ import annotations

import functools
import inspect
import os
from typing import Dict, FrozenSet, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..batch import Batch
from ..errors import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, UserError, check, check_number, in_range
from ..seeding import mix_seed


# What a Method can need beyond `student` (its class attribute `needs`):
#   teacher, frozen_student, sample_labels, teachers, generator, feature_table: constructor inputs (feature_table is
#     the `features` argument of the AFT family: a FeatureTable);
#   features: the frozen models' output caches must hold their intermediate features (CD, CRD);
#   student_features: the feature table must include the student's initial features (B-Tuning).
NEEDS: FrozenSet[str] = frozenset({"teacher", "frozen_student", "sample_labels", "features", "feature_table",
                                   "student_features", "teachers", "generator"})
# constructor parameters that are inputs (models, caches, tables, seeds of the run), never config hyper-parameters
INPUT_PARAMS: FrozenSet[str] = frozenset({
    "self", "student", "teacher", "frozen_student", "sample_labels", "features", "teachers", "generator",
    "discriminator", "teacher_cache", "frozen_student_cache", "teacher_caches", "names", "synth_generator",
    "synth_seed"})


# The range of the methods' hyper-parameters, one rule per key whichever method takes it: (ok, fix) (src.errors),
# `{k}` in the fix is the key as the user wrote it (method.<key>, or the node's full key: parallel_method.alpha,
# few_shot.kd_at.temperature). `Method.check` applies it to every key given (keys without a rule: finite numbers);
# preflight runs that check on every method node of a config. A class keeps only its own rules (choices, rules
# that depend on other keys, or a stricter rule for one key: with a comment saying why).
TEMPERATURE = (in_range(0.01, 1000), "must be > 0, finite and in [0.01, 1000] (outside, the softened targets are "
                                     "uniform or one-hot and the loss vanishes): use e.g. {k}=4")
HPARAM_RULES = {
    "temperature": TEMPERATURE, "nce_t": TEMPERATURE, "pts_t": TEMPERATURE, "kd_t": TEMPERATURE,
    "alpha": (in_range(0, 1), "must be in [0, 1]: use e.g. {k}=0.9"),
    "momentum": (in_range(0, 1, hi_open=True), "must be in [0, 1): use e.g. {k}=0.5"),
    "ema_tau": (in_range(0, 1, hi_open=True), "must be in [0, 1): use e.g. {k}=0.999"),
    "label_smoothing": (in_range(0, 1, hi_open=True), "must be in [0, 1): use e.g. {k}=0.1"),
    "feat_dim": (AT_LEAST_ONE, "must be >= 1: use e.g. {k}=128"),
    "num_negatives": (AT_LEAST_ONE, "must be >= 1: use e.g. {k}=4096"),
    "ema_every": (AT_LEAST_ONE, "must be >= 1: use e.g. {k}=1"),
    "n_g": (AT_LEAST_ONE, "must be >= 1: use e.g. {k}=1"), "n_s": (AT_LEAST_ONE, "must be >= 1: use e.g. {k}=10"),
    "topk": (NON_NEGATIVE, "must be >= 0 (0 = all classes): use e.g. {k}=0"),
    "prior_lr": (POSITIVE, "must be > 0: use e.g. {k}=0.01"),
    "generator_lr": (POSITIVE, "must be > 0: use e.g. {k}=1e-3"),
    "pts_p": (POSITIVE, "must be > 0: use e.g. {k}=3"),
    "synth_ratio": (in_range(0, 1, hi_open=True), "must be in [0, 1): use e.g. {k}=0.2 (1 synthetic : 4 real), 0 "
                                                  "disables it"),
    **{w: (NON_NEGATIVE, "must be >= 0: use e.g. {k}=1.0") for w in (
        "prec", "beta", "loss_w", "kl_w", "ce_w", "mixup_alpha", "kd_weight", "ce_weight", "crd_weight")},
}


def check_hparam(key: str, value) -> None:
    """`method.<key>=<value>` against HPARAM_RULES (a key without a rule: any finite number or a non-number).
    None counts as not given; a key with a rule refuses a value that is not a number."""
    if key in HPARAM_RULES:
        check_number(f"method.{key}", value, *HPARAM_RULES[key], require=True)
    else:
        check_number(f"method.{key}", value)


class FrozenOutputs(nn.Module):
    """A frozen model plus an optional cache of its outputs over the training split, indexed by sample id."""

    def __init__(self, model: nn.Module, cache: Optional[Dict[str, torch.Tensor]] = None):
        super().__init__()
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self.cache = cache or {}

    def train(self, mode: bool = True):
        return super().train(False)

    def _cached(self, key: str, idx, use_cache: bool):
        if use_cache and key in self.cache and idx is not None:
            t = self.cache[key]
            return t.index_select(0, idx.to(t.device)).to(idx.device)
        return None

    @torch.no_grad()
    def logits(self, x, idx=None, use_cache: bool = True) -> torch.Tensor:
        z = self._cached("logits", idx, use_cache)
        return z if z is not None else self.model(x).float()

    @torch.no_grad()
    def features_and_logits(self, x, idx=None, use_cache: bool = True):
        f, z = self._cached("features", idx, use_cache), self._cached("logits", idx, use_cache)
        if f is None or z is None:
            f, z = self.model.features_and_logits(x)
        return f.float(), z.float()


class StepSeeds(nn.Module):
    """One torch.Generator (CPU) per draw, seeded by (seed, stream, number of draws so far). The count is a buffer:
    checkpoints hold it, so a resumed run continues the same sequence of draws."""

    def __init__(self, seed: int = 0, stream: int = 0):
        super().__init__()
        self.seed, self.stream = int(seed), int(stream)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def next(self) -> torch.Generator:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.stream, int(self.count)))
        self.count += 1
        return g


def check_synth_ratio(synth_ratio) -> float:
    """`method.synth_ratio` by its HPARAM_RULES rule, as a float (here None is no number either)."""
    if synth_ratio is None:
        raise UserError(f"method.synth_ratio=null must be a number "
                        f"({HPARAM_RULES['synth_ratio'][1].format(k='method.synth_ratio')})")
    check_hparam("synth_ratio", synth_ratio)
    return float(synth_ratio)


def describe_inputs(inputs) -> str:
    """A batch's inputs in a few words, for messages: 'a 2-D int64 tensor', 'a dict of tensors (input_ids, ...)'."""
    if torch.is_tensor(inputs):
        return f"a {inputs.ndim}-D {str(inputs.dtype).replace('torch.', '')} tensor"
    if isinstance(inputs, dict):
        return f"a dict of tensors ({', '.join(map(str, inputs))})"
    return f"a {type(inputs).__name__} of {len(inputs)}" if hasattr(inputs, "__len__") else type(inputs).__name__


@functools.lru_cache(maxsize=None)
def _hparam_names(cls) -> FrozenSet[str]:
    """The config hyper-parameters of Method class `cls`: the named parameters of its __init__, and while an
    __init__ takes **kw, of the next __init__ up the MRO (down to Method's), less the inputs (INPUT_PARAMS)."""
    names = set()
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if klass is Method or not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return frozenset(names - INPUT_PARAMS)


class Method(nn.Module):
    needs: FrozenSet[str] = frozenset()  # inputs beyond the student, names from NEEDS
    # the input modalities (DatasetInfo.modality) this method's loss handles: a method that opens only logits,
    # pooled features and ids declares {"image", "text"}; one that reads pixels or stages keeps {"image"}
    modalities: FrozenSet[str] = frozenset({"image"})

    @classmethod
    def needs_for(cls, hparams: dict) -> FrozenSet[str]:
        """What this method needs under the hyper-parameters `hparams` (a config's keys minus _target_)."""
        return cls.needs

    @classmethod
    def check(cls, **hparams) -> None:
        """One UserError for the first bad hyper-parameter, before any data work: a key the constructor does not
        take, then each value by its HPARAM_RULES rule (every number finite), then (subclasses, after calling
        this) the class's own rules. Only the keys given are checked (the defaults are valid); None counts as not
        given. Messages name `method.<key>` (`build_method` / `check_method_node` rename it to the node's key)."""
        known = _hparam_names(cls)
        for k in hparams:
            if k not in known:
                raise UserError(f"method {cls.__name__} has no parameter {k}: remove method.{k}")
        for k, v in hparams.items():
            check_hparam(k, v)

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module] = None,
                 frozen_student: Optional[nn.Module] = None, teacher_cache=None, frozen_student_cache=None,
                 mixup_alpha: float = 0.0, synth_ratio: float = 0.0, synth_source: Optional[str] = None,
                 synth_generator: Optional[nn.Module] = None, synth_seed: int = 0):
        super().__init__()
        self.student = student
        self.teacher = FrozenOutputs(teacher, teacher_cache) if teacher is not None else None
        self.frozen_student = (FrozenOutputs(frozen_student, frozen_student_cache)
                               if frozen_student is not None else None)
        Method.check(mixup_alpha=mixup_alpha, synth_ratio=synth_ratio)
        self.mixup_alpha = float(mixup_alpha)
        self.synth_ratio = float(synth_ratio)
        self.synth_generator = None
        if self.synth_ratio > 0:
            if synth_generator is None:
                raise UserError(f"method.synth_ratio={synth_ratio} needs a generator: set method.synth_source="
                                f"<zoo generator name | main_zeroshot.py run dir> (got {synth_source})")
            check(hasattr(synth_generator, "sample"), f"method.synth_source={synth_source} is not a generator "
                                                      f"(no sample method)")
            self.synth_generator = synth_generator  # frozen: excluded from the state dict like the teacher
            for p in self.synth_generator.parameters():
                p.requires_grad_(False)
            self.synth_draws = StepSeeds(synth_seed, int(os.environ.get("RANK", "0")))

    _FROZEN = ("teacher.", "frozen_student.", "synth_generator.")

    # ------------------------------------------------------------------ plumbing
    def forward(self, batch):
        return self.loss(batch)

    def loss(self, batch: Batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def eval_model(self) -> nn.Module:
        return self.student

    def after_step(self, step: int) -> None:
        pass

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        for k in [k for k in sd if k[len(prefix):].startswith(self._FROZEN)]:
            del sd[k]
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        res = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in res.missing_keys if not k.startswith(self._FROZEN)]
        if strict and (missing or res.unexpected_keys):
            raise RuntimeError(f"state dict mismatch: missing {missing[:3]}, unexpected {res.unexpected_keys[:3]}")
        return type(res)(missing, res.unexpected_keys)

    def frozen_modules(self) -> List[FrozenOutputs]:
        return [m for m in (self.teacher, self.frozen_student) if m is not None]

    def compile_models(self, trained: bool = True, frozen: bool = False) -> None:
        if trained:
            self.student.compile()
        if frozen:
            for m in self.frozen_modules():
                m.model.compile()

    # ------------------------------------------------------------------ distillation inputs
    def mix(self, batch: Batch) -> Tuple[torch.Tensor, bool]:
        """The distillation inputs of a training batch (gnosis). Mixup: one lambda ~ Beta(a, a) per batch, inputs
        mixed with a permutation of themselves. Then synthetic data: the first round(synth_ratio * B) rows are
        replaced by generated images. The teacher relabels both, so caches are bypassed. Returns (inputs, fresh):
        fresh = the inputs are not the dataset's samples (no cached outputs, no true labels). Mixing blends float
        images only: with mixup_alpha > 0 or synth_ratio > 0, another batch (text, ...) is a UserError."""
        x = batch.inputs
        if (self.mixup_alpha > 0 or self.synth_generator is not None) and not batch.is_image:
            raise UserError(f"method.mixup_alpha={self.mixup_alpha} / method.synth_ratio={self.synth_ratio} mix "
                            f"float images, but {type(self).__name__}'s batch holds {describe_inputs(x)}: set "
                            f"method.mixup_alpha=0 and method.synth_ratio=0")
        if not self.training or not batch.is_image:  # text (a list of str): nothing is mixed
            return x, False
        fresh = False
        if self.mixup_alpha > 0:
            lam = torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha).sample().to(x.device)
            perm = torch.randperm(x.shape[0], device=x.device)
            x, fresh = lam * x + (1 - lam) * x[perm], True
        n = self.synth_count(x.shape[0])
        if n > 0:
            fake = self.synth_generator.sample(n, self.synth_draws.next()).to(x.device, x.dtype)
            x, fresh = torch.cat([fake, x[n:]]), True
        return x, fresh

    def synth_count(self, batch_size: int) -> int:
        """Synthetic rows in a batch of `batch_size`: round(synth_ratio * B) (every batch, also the last)."""
        return int(round(self.synth_ratio * batch_size)) if self.synth_generator is not None else 0


class CrossEntropy(Method):
    """Supervised training (pretraining / fine-tuning the zoo), with optional label smoothing."""

    def __init__(self, student: nn.Module, label_smoothing: float = 0.0, **kw):
        super().__init__(student, **kw)
        self.label_smoothing = label_smoothing

    modalities = frozenset({"image", "text"})  # logits and labels only

    def loss(self, batch):
        y = batch.targets
        z = self.student(batch.inputs)
        loss = F.cross_entropy(z, y, label_smoothing=self.label_smoothing)
        return loss, {"acc": 100 * (z.detach().argmax(1) == y).float().mean()}  # %, like every eval accuracy
