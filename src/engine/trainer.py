"""The training loop shared by every family. It knows nothing about methods: it calls `model(batch)` (a
method's `forward` returns `(loss, logs)`), steps the optimiser and schedule, evaluates and checkpoints.

Features: epochs or steps; SGD/Adam/AdamW; none/step/cosine-with-warmup schedules; bf16 autocast, fp16 with a
GradScaler; channels_last; optional torch.compile; grad clipping; evaluation every N epochs or steps; atomic
checkpoints with automatic resume (weights, optimiser, schedule, step, RNG states) that is bit-exact on CPU;
SIGTERM/SIGUSR1 (+ submitit's USR2, see src/engine/preemption.py) -> finish the step, checkpoint, raise Preempted
(under DDP all ranks agree on the step); DDP when torch.distributed is initialised."""
from __future__ import annotations

import logging
import math
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..errors import Preempted, UserError, check
from ..io_utils import atomic_path, load_state_dict, safe_torch_load, save_safetensors, torch_save
from ..seeding import seed_everything  # noqa: F401  (moved to src/seeding.py; re-exported)
from . import preemption
from .preemption import STOP_REQUESTED

log = logging.getLogger(__name__)

FINITE_CHECK_EVERY = 50  # CUDA: steps between host reads of the non-finite-loss flag


def _plain(v):
    """A value torch.load(weights_only=True) reads back: numpy / 0-d tensor scalars become Python numbers."""
    if torch.is_tensor(v) and v.numel() == 1 or isinstance(v, np.generic):
        return v.item()
    return v


def _finite(tensors) -> bool:
    """True when every floating-point tensor is finite (one host sync)."""
    flags = [t.detach().isfinite().all() for t in tensors if torch.is_tensor(t) and t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class RunLabels:
    """How the Trainer's one-line errors (non-finite loss, non-finite weights) name what its caller configured: the
    method (`method=kl_dp (KLDP)`), its settings that can make a loss overflow (`method.temperature=4.0`), and the
    key prefixes of the optimizer and trainer settings (`optimizer`, `finetune.trainer`). The caller holds the
    config and words them; the engine reads no config. `method=None`: the method is named by its class and its
    non-zero numeric constructor settings (`method CrossEntropy: label_smoothing=0.1`), read when a message is
    worded -- how a method built without a config node is named."""
    method: Optional[str] = None
    params: Sequence[str] = ()
    optimizer: str = "optimizer"
    trainer: str = "trainer"

    def describe(self, method) -> Tuple[str, list]:
        """(name, settings) of `method` for a message: the caller's words, else its class and settings."""
        if self.method is not None:
            return self.method, list(self.params)
        return describe_by_class(method)


def describe_by_class(method) -> Tuple[str, list]:
    """('method KL', ['temperature=4.0', ...]): a method by its class and its (at most 6) non-zero numeric
    constructor settings that have a numeric default."""
    import inspect

    try:
        sig = inspect.signature(type(method).__init__).parameters
    except (TypeError, ValueError):
        sig = {}
    params = []
    for k, prm in sig.items():
        v = getattr(method, k, None)
        if _number(prm.default) and _number(v) and v != 0:
            params.append(f"{k}={v}")
    return f"method {type(method).__name__}", params[:6]


def build_optimizer(cfg, param_groups, batch_size: int = 256, world_size: int = 1):
    """The optimiser of an `optimizer` node (its ranges are checked once, by the config's preflight)."""
    lr = cfg.lr * (batch_size * world_size / 256.0 if cfg.scale_lr else 1.0)
    groups = []
    for g in param_groups:
        g = dict(g)
        g["lr"] = g.get("lr", lr) * (batch_size * world_size / 256.0 if (cfg.scale_lr and "lr" in g) else 1.0)
        g["params"] = [p for p in g["params"] if p.requires_grad]
        if g["params"]:
            groups.append(g)
    check(len(groups) > 0, "nothing to train: every parameter is frozen")
    name = cfg.name.lower()
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(groups, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise UserError(f"optimizer.name='{cfg.name}' is unknown: use sgd, adam or adamw")


def lr_lambda(cfg, total_steps: int, steps_per_epoch: int, prefix: str = "scheduler") -> Callable[[int], float]:
    name = cfg.name.lower()
    if name not in ("none", "step", "cosine"):
        raise UserError(f"{prefix}.name='{cfg.name}' is unknown: use none, step or cosine")
    fin = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
    check(fin(cfg.warmup_epochs) and cfg.warmup_epochs >= 0,
          f"{prefix}.warmup_epochs={cfg.warmup_epochs} must be >= 0: use e.g. {prefix}.warmup_epochs=1")
    if name == "step":
        check(fin(cfg.step_size) and cfg.step_size > 0, f"{prefix}.step_size={cfg.step_size} must be > 0")
        check(fin(cfg.gamma) and 0 < cfg.gamma <= 1, f"{prefix}.gamma={cfg.gamma} must be in (0, 1]")
    if name == "cosine":
        check(fin(cfg.min_lr_ratio) and 0 <= cfg.min_lr_ratio <= 1,
              f"{prefix}.min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1]")
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    step_size = max(1, int(round(cfg.step_size * steps_per_epoch)))

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        if name == "cosine":
            t = (s - warm) / max(1, total_steps - warm)
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if name == "step":
            return cfg.gamma ** (s // step_size)
        return 1.0

    return f


def _rng_state() -> Dict[str, object]:
    npst = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": (npst[0], torch.from_numpy(npst[1].astype(np.int64)), int(npst[2]), int(npst[3]),
                    float(npst[4]))}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class CheckpointDir:
    """`<run_dir>/checkpoints/step_XXXXXXXX/{model.safetensors,state.pt}` + an atomically replaced `latest`
    pointer: a crash while saving leaves the previous checkpoint and pointer intact."""

    def __init__(self, root, keep: int = 1):
        self.root, self.keep = Path(root), max(1, keep)

    def latest(self) -> Optional[Path]:
        """The checkpoint the `latest` pointer names: only a `step_<N>` folder directly inside this run's own
        checkpoint folder (a pointer to `../other_run/step_N`, an absolute path or a link out is refused, so a
        run never ends on another run's weights)."""
        ptr = self.root / "latest"
        if not ptr.is_file():
            return None
        name = ptr.read_text(errors="replace").strip()
        d = self.root / name
        if not re.fullmatch(r"step_\d+", name) or d.is_symlink() or d.resolve().parent != self.root.resolve():
            raise UserError(f"checkpoint pointer {ptr} names {name!r}, not a step_<N> folder of this run's "
                            f"{self.root}: delete {ptr} (the run then resumes from none) or use a new run dir")
        return d if (d / "state.pt").is_file() else None

    def save(self, step: int, weights: Dict[str, torch.Tensor], state: dict) -> Path:
        d = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_safetensors(weights, tmp / "model.safetensors")
        torch_save(state, tmp / "state.pt")
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)
        with atomic_path(self.root / "latest") as p:
            p.write_text(d.name)
        olds = sorted(x for x in self.root.iterdir() if x.name.startswith("step_") and x.is_dir() and x != d)
        for old in olds[: max(0, len(olds) - (self.keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        return d

    @staticmethod
    def load(d: Path):
        return load_state_dict(d / "model.safetensors"), safe_torch_load(d / "state.pt")


EVAL_LINE_KEYS = ("acc", "agreement", "loss", "miou", "map")  # the eval metrics a progress line shows first


def eval_line(name: str, step: int, total: int, metrics: Dict[str, float], rate: Tuple[float, float]) -> str:
    """'distill step 40/120 epoch 2.00 | loss 0.4120 | eval/acc 91.20 eval/nll 0.31 | lr 4.50e-02 | 812 samples/s
    | ETA 0:00:12': the per-evaluation progress line."""
    evals = [k for k, v in metrics.items() if k.startswith("eval/") and _number(v)]
    first = [k for k in evals if any(w in k for w in EVAL_LINE_KEYS)] or evals
    shown = " ".join(f"{k} {metrics[k]:.4g}" for k in first[:4])
    if len(evals) > len(first[:4]):
        shown += f" (+{len(evals) - len(first[:4])} in metrics.jsonl)"
    per_s, left = rate
    parts = [f"{name} step {step}/{total} epoch {metrics.get('epoch', 0.0):.2f}"]
    if _number(metrics.get("train/loss")):
        parts.append(f"loss {metrics['train/loss']:.4f}")
    if shown:
        parts.append(shown)
    if _number(metrics.get("train/lr")):
        parts.append(f"lr {metrics['train/lr']:.2e}")
    m, sec = divmod(int(round(left)), 60)
    parts += [f"{per_s:,.0f} samples/s", f"ETA {m // 60}:{m % 60:02d}:{sec:02d}"]
    return " | ".join(parts)


class Trainer:
    """Trains a Method (`method`: its loss, its trainable modules, `eval_model()` for what `evaluate` measures).
    `cfg`, `optim_cfg`, `sched_cfg`: objects with the fields of the trainer / optimizer / scheduler schemas
    (src/schema.py: config nodes or the plain dataclasses); `labels`: how its errors name the method and the keys
    of those settings (default: the method's class, `optimizer.*`, `trainer.*`)."""

    def __init__(self, method: nn.Module, loader, cfg, optim_cfg, sched_cfg, run_dir, tracker=None,
                 evaluate: Optional[Callable[[nn.Module], Dict[str, float]]] = None, device="cpu",
                 name: str = "", rank: int = 0, world_size: int = 1, labels: Optional[RunLabels] = None):
        self.method = method
        self.labels = labels if labels is not None else RunLabels()  # how the errors name the caller's settings
        self.loader, self.cfg, self.device = loader, cfg, torch.device(device)
        self.run_dir, self.tracker, self.evaluate = Path(run_dir), tracker, evaluate
        self.name = name
        self.rank, self.world_size = rank, world_size
        self.ckpt = CheckpointDir(self.run_dir / "checkpoints" / (name or "train"), cfg.keep_checkpoints)
        self.steps_per_epoch = len(loader)
        check(self.steps_per_epoch > 0, f"the training split yields no batch (batch size {loader.batch_size}, "
                                        f"{loader.num_samples} samples, drop_last): lower loader.batch_size")
        # trainer.* ranges (max_steps, epochs, grad_clip, ...) are checked once, by the config's preflight; the
        # names that pick a code path (amp, optimizer.name, scheduler.name) are the engine's own to refuse
        if cfg.max_steps is not None:
            self.total_steps = int(cfg.max_steps)
        else:
            self.total_steps = max(1, int(math.ceil(cfg.epochs * self.steps_per_epoch)))
        if cfg.amp not in ("none", "bf16", "fp16"):
            raise UserError(f"trainer.amp='{cfg.amp}' is unknown: use none, bf16 or fp16")
        self.method.to(self.device)
        if cfg.channels_last:
            self.method.to(memory_format=torch.channels_last)
        if hasattr(self.method, "compile_models") and (cfg.compile or cfg.compile_frozen):
            self.method.compile_models(trained=cfg.compile, frozen=cfg.compile_frozen)
        self.forward = self.method
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.forward = DDP(self.method, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                               broadcast_buffers=False, find_unused_parameters=False)
        groups = self.method.param_groups() if hasattr(self.method, "param_groups") else \
            [{"params": list(self.method.parameters())}]
        self.optim_cfg = optim_cfg
        self.optimizer = build_optimizer(optim_cfg, groups, loader.batch_size, world_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(sched_cfg, self.total_steps, self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.step = 0
        self._stop = False
        self.history = []
        # running sums of the train logs since the last evaluation and the last evaluation's numbers: part of the
        # checkpoint, so a resumed run logs and returns exactly what an uninterrupted one does
        self._sums: Dict[str, torch.Tensor] = {}
        self._count = 0
        self._last: Dict[str, float] = {}
        self._clock = (time.perf_counter(), 0)

    # ----------------------------------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        weights = self.method.state_dict()  # the method's trainable state (frozen models are left out)
        if not _finite(weights.values()):  # never replace the last good checkpoint with NaN/inf weights
            name, params = self.labels.describe(self.method)
            raise UserError(
                f"non-finite weights at step {self.step} ({self._settings(name, params)}): {self._fix()}; "
                f"last good checkpoint kept: {self.ckpt.latest() or 'none (none was written yet)'}")
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "rng": _rng_state(), "wandb_id": getattr(self.tracker, "run_id", None),
                 "total_steps": self.total_steps,
                 "train_sums": {k: torch.as_tensor(v).detach().float().cpu() for k, v in self._sums.items()},
                 "train_count": self._count, "last_eval": {k: _plain(v) for k, v in self._last.items()}}
        d = self.ckpt.save(self.step, weights, state)
        log.debug("checkpoint saved: %s", d)
        return d

    def try_resume(self) -> bool:
        d = self.ckpt.latest() if self.cfg.resume else None
        if d is None:
            return False
        weights, state = CheckpointDir.load(d)
        own_sd = self.method.state_dict()
        own = set(own_sd)
        bad = [k for k, v in weights.items() if k in own_sd and v.shape != own_sd[k].shape]
        if bad:  # load_state_dict raises a bare RuntimeError on shape mismatches, even with strict=False
            raise UserError(f"checkpoint {d} does not match this run's models (mis-shaped {bad[:2]}): use a new "
                            f"run dir or trainer.resume=false")
        missing, unexpected = self.method.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if k in own]:
            raise UserError(f"checkpoint {d} does not match this run's models (missing {missing[:2]}, unexpected "
                            f"{unexpected[:2]}): use a new run dir or trainer.resume=false")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])
        self._sums = {k: v.to(self.device) for k, v in state.get("train_sums", {}).items()}
        self._count = int(state.get("train_count", 0))
        self._last = dict(state.get("last_eval", {}))
        if self.tracker is not None and self.step < self.total_steps:
            # drop the lines this trainer will log again; a finished one logs nothing more, and the lines after
            # its step are later stages' (multi-stage runs re-entering a stage that ended)
            self.tracker.truncate_after(self.step)
        log.info("resumed from %s at step %d/%d", d, self.step, self.total_steps)
        return True

    # ------------------------------------------------------------------------------------------------ loop
    def _handler(self, signum, frame):
        log.warning("signal %d received: finishing the current step, then checkpointing", signum)
        preemption.record(signum)
        self._stop = True

    def _stop_requested(self) -> bool:
        return self._stop or STOP_REQUESTED.is_set()

    def _stop_agreed(self, sync_point: bool) -> bool:
        """Stop after this step? One process: when signalled. DDP: the ranks agree (MAX of their flags) at sync
        points (every step on CPU; on CUDA every FINITE_CHECK_EVERY steps and after an evaluation), so that all
        stop after the same step even when the signal reaches them in different steps (a rank that stopped alone
        would leave the others blocked in the next gradient all-reduce and rank 0 without its checkpoint)."""
        if self.world_size == 1:
            return self._stop_requested()
        if not sync_point:
            return False
        flag = torch.tensor([float(self._stop_requested())], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        # only the reduced value counts: a signal whose handler runs while this rank waits in the all_reduce
        # sets self._stop here but not on the other ranks; it is agreed at the next sync point
        agreed = flag.item() > 0
        if agreed:
            self._stop = True
        return agreed

    def request_stop(self) -> None:
        self._stop = True

    def _eval_due(self, step: Optional[int] = None) -> bool:
        step = self.step if step is None else step
        if step >= self.total_steps:
            return True
        if self.cfg.eval_every_steps:
            return step % self.cfg.eval_every_steps == 0
        return step % self.steps_per_epoch == 0 and (step // self.steps_per_epoch) % \
            max(1, self.cfg.eval_every) == 0

    def _ckpt_due(self, evaluated: bool, step: Optional[int] = None) -> bool:
        step = self.step if step is None else step
        if self.cfg.ckpt_every_steps:
            return step % self.cfg.ckpt_every_steps == 0 or step >= self.total_steps
        return evaluated

    def _autocast(self):
        if self.cfg.amp == "none":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def fit(self) -> Dict[str, float]:
        self.try_resume()
        with preemption.handling(self._handler):
            return self._loop()

    def _progress(self):
        p = self.cfg.progress
        on = p == "on" or (p == "auto" and sys.stdout.isatty())
        if not on or self.rank != 0:
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc=self.name or "train", dynamic_ncols=True)

    def _update(self, loss: torch.Tensor) -> None:
        """One optimiser update from `loss`: backward (scaled under fp16), optional grad-norm clipping, the
        optimiser and the schedule step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def _loop(self) -> Dict[str, float]:
        if self._stop_requested() and self.step < self.total_steps:  # signalled before this trainer started
            if self.rank == 0 and self.step > 0:
                self.save()
            raise Preempted(f"stopped at step {self.step}/{self.total_steps}; rerun the same command "
                            f"(same run dir) to resume")
        bar = self._progress()
        self._clock = (time.perf_counter(), self.step)  # samples/s and ETA of this fit (a resume starts its own)
        lazy = self.device.type == "cuda"
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        while self.step < self.total_steps:
            epoch, start = divmod(self.step, self.steps_per_epoch)
            self.method.train()
            for batch in self.loader.iter_epoch(epoch, start):  # opaque: only the method opens it
                with self._autocast():
                    loss, logs = self.forward(batch)
                # on CUDA the finiteness flag accumulates on the device and is read every FINITE_CHECK_EVERY
                # steps and before any eval/checkpoint (no host sync per step); on CPU it is read every step
                nonfinite = nonfinite | ~torch.isfinite(loss.detach()).all()
                if (not lazy or self.step % FINITE_CHECK_EVERY == 0 or self._eval_due(self.step + 1)
                        or self._ckpt_due(False, self.step + 1) or self._stop_requested()) and nonfinite.item():
                    latest = self.ckpt.latest()
                    raise UserError(self._nonfinite_message(lazy, latest))
                self._update(loss)
                self.step += 1
                if hasattr(self.method, "after_step"):
                    self.method.after_step(self.step)
                sums = self._sums
                sums["loss"] = sums.get("loss", 0) + loss.detach().float()
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0) + (v.detach().float() if torch.is_tensor(v) else float(v))
                self._count += 1
                if bar is not None:
                    bar.update(1)
                evaluated = False
                if self._eval_due():
                    train = {f"train/{k}": v / self._count for k, v in self._reduce(self._sums).items()}
                    train["train/lr"] = self.optimizer.param_groups[0]["lr"]
                    self._sums, self._count = {}, 0
                    self._last = self._do_eval(train)
                    evaluated = True
                    self._report_eval(self._last, bar)
                if self.rank == 0 and self._ckpt_due(evaluated):
                    self.save()
                if self._stop_agreed(not lazy or self.step % FINITE_CHECK_EVERY == 0 or evaluated):
                    if self.rank == 0 and not self._ckpt_due(evaluated):
                        self.save()
                    if self.world_size > 1:
                        torch.distributed.barrier()  # nobody exits before rank 0's checkpoint is on disk
                    raise Preempted(f"stopped at step {self.step}/{self.total_steps}; rerun the same command "
                                    f"(same run dir) to resume")
                if self.step >= self.total_steps:
                    break
        if bar is not None:
            bar.close()
        return self._last

    def _report_eval(self, metrics: Dict[str, float], bar) -> None:
        """One line per evaluation in the job log and on stdout (what a job off a terminal says: step/total,
        epoch, loss, the eval metrics, lr, samples/s, ETA); on a terminal the bar carries loss and accuracy."""
        if self.rank != 0:
            return
        if bar is not None:
            bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items()
                             if k in ("train/loss", "eval/acc")}, refresh=False)
        log.info(eval_line(self.name or "train", self.step, self.total_steps, metrics, self._rate()))

    def _rate(self) -> Tuple[float, float]:
        """(samples/s, seconds left) of this fit so far."""
        t0, s0 = self._clock
        took, steps = time.perf_counter() - t0, self.step - s0
        if took <= 0 or steps <= 0:
            return 0.0, 0.0
        return steps * self.loader.batch_size * self.world_size / took, (self.total_steps - self.step) * took / steps

    def _settings(self, name: str, params) -> str:
        """'method=kl_dp (KLDP): method.temperature=4.0, ...; optimizer.lr=0.1' -- what the message names."""
        opt = self.labels.optimizer
        lr = getattr(self.optim_cfg, "lr", None)
        return f"{name}{': ' + ', '.join(params) if params else ''}; {opt}.lr={lr}"

    def _fix(self) -> str:
        opt, tr = self.labels.optimizer, self.labels.trainer
        clip = f"{tr}.grad_clip=1.0" if not self.cfg.grad_clip else f"a smaller {tr}.grad_clip"
        amp = f" / {tr}.amp=none" if self.cfg.amp != "none" else ""
        return (f"lower {opt}.lr (e.g. by 10x) or the method's loss weights / raise its temperatures (method.*, "
                f"shown above), or set {clip}{amp}, and rerun in a new run dir")

    def _nonfinite_message(self, lazy: bool, latest) -> str:
        """One line naming the method as the caller labelled it (`labels`), the settings that can cause it and the
        fix; before any update the learning rate cannot be the cause."""
        where = f"at step {self.step}" if not lazy or self.step == 0 else f"by step {self.step}"
        name, params = self.labels.describe(self.method)
        if self.step == 0:
            shown = f"{name}{': ' + ', '.join(params) if params else ''}"
            cause = ("before any update, so not the learning rate: check the method's settings (method.*: "
                     "weights, temperatures, precisions), the inputs (dataset.mean/std) and any basis or cached "
                     "outputs it reads")
            return f"non-finite loss {where} ({shown}): {cause}; last good checkpoint: {latest or 'none'}"
        kept = f"{latest} (kept)" if latest else "none (none was written before this step)"
        return (f"non-finite loss {where} ({self._settings(name, params)}): {self._fix()}; last good checkpoint: "
                f"{kept}")

    def _reduce(self, sums: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """Running sums of the train logs as floats (one host sync per evaluation, not per step); under DDP
        averaged over ranks (every rank has the same keys: same method, same number of steps)."""
        if not sums:
            return {}
        t = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device) for v in sums.values()])
        if self.world_size > 1:
            torch.distributed.all_reduce(t)
            t = t / self.world_size
        return dict(zip(sums, t.tolist()))

    def _do_eval(self, train_logs: Dict[str, float]) -> Dict[str, float]:
        metrics = dict(train_logs)
        metrics["epoch"] = self.step / self.steps_per_epoch
        if self.evaluate is not None and self.rank == 0:
            model = self.method.eval_model() if hasattr(self.method, "eval_model") else self.method
            metrics.update(self.evaluate(model))
        if self.world_size > 1:  # rank 0 evaluated: every rank returns (and reports) its numbers
            box = [metrics if self.rank == 0 else None]
            torch.distributed.broadcast_object_list(box, src=0)
            metrics = box[0]
        if self.tracker is not None:
            self.tracker.log(metrics, self.step)
        self.history.append({"step": self.step, **metrics})
        return metrics
