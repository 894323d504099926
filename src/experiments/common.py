"""Wiring shared by every family: run dir, device and ranks, dataset, model resolution (zoo name, checkpoint,
timm name), output cache, loaders, tracker. No maths here."""
from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ..data import build_dataset, build_loader, resolve_device
from ..data.datasets import Dataset, Split
from ..data.loaders import loader_dtype
from ..engine import OutputCache, digest, seed_everything
from ..errors import UserError, closest
from ..io_utils import content_hash, ensure_dir, load_state_dict, read_json_safe, write_json
from ..models import Normalized, create_model, load_checkpoint, read_meta, save_checkpoint, zoo_dir
from ..models.zoo import verified_hash
from ..tracking import Tracker, lock_run_dir

log = logging.getLogger("kt")


def run_dir_from_hydra(run_dir=None) -> Path:
    if run_dir is not None:
        return Path(run_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def as_dict(node) -> dict:
    """A plain dict from a config node, a dict or None."""
    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def submitit_task_env() -> None:
    """Inside a submitit job with several tasks (hydra.launcher.tasks_per_node=K: SLURM starts K copies with
    srun), export what torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) from the job's SLURM
    variables, so the same DDP path serves both. The port derives from the job id: every task agrees on it."""
    if "WORLD_SIZE" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import random

    from submitit import JobEnvironment

    env = JobEnvironment()
    if env.num_tasks <= 1:
        return
    addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if env.num_nodes == 1 else env.hostnames[0])
    port = os.environ.get("MASTER_PORT") or str(random.Random(env.job_id).randint(20000, 60000))
    os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                      LOCAL_WORLD_SIZE=str(env.num_tasks // env.num_nodes), MASTER_ADDR=addr, MASTER_PORT=port)


def dist_info():
    submitit_task_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def init_distributed(device_name: str):
    rank, world, local = dist_info()
    dev = resolve_device(device_name)
    if world > 1:
        import torch.distributed as dist

        if dev.type == "cuda":
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


@dataclass
class ModelRef:
    name: str
    model: Normalized
    key: Optional[str]  # content key for output caches (None: do not cache)
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    cfg: DictConfig
    run_dir: Path
    device: torch.device
    ds: Dataset
    dataset_key: str
    tracker: Optional[Tracker]
    cache: OutputCache
    rank: int = 0
    world_size: int = 1

    @property
    def info(self):
        return self.ds.info

    def eval_loader(self, split: Split):
        return build_loader(self.cfg.loader, split, train=False, device=self.device)

    def train_loader(self, split: Split, loader_cfg=None, seed: Optional[int] = None):
        return build_loader(loader_cfg or self.cfg.loader, split, train=True,
                            seed=self.cfg.trainer.seed if seed is None else seed, device=self.device,
                            rank=self.rank, world_size=self.world_size)

    @property
    def inputs_key(self) -> str:
        """The data part of every output-cache key: dataset + how its images are decoded and evaluated."""
        return f"{self.dataset_key}-{input_key(self.cfg)}"

    def outputs(self, ref: ModelRef, split: Split, features: bool = False) -> Dict[str, torch.Tensor]:
        return self.cache.get(ref.model.to(self.device), ref.key, self.inputs_key, split, self.eval_loader(split),
                              features=features, amp=self.cfg.trainer.amp, label=ref.name)

    def report(self, row: Dict[str, Any], printer: Callable[[Dict[str, Any], Path], None]) -> Dict[str, Any]:
        """The end of every family's run: `summary.json` (+ wandb summary) from `row`, then `printer(summary,
        run_dir)` on rank 0; returns the summary."""
        summary = self.tracker.summary(row)
        if self.rank == 0:
            printer(summary, self.run_dir)
        return summary

    def output_path(self, ref: ModelRef, split: Split) -> Optional[Path]:
        """The cache file `outputs(ref, split)` reads and writes (None when it is not cached)."""
        return self.cache.path(ref.key, self.inputs_key, split) if ref.key and self.cache.enabled else None


def dataset_key(dcfg) -> str:
    parts = OmegaConf.to_container(dcfg, resolve=True)
    parts.pop("subset", None)
    for k in ("pretrain_split", "transfer_split", "val_split", "test_split"):
        parts.pop(k, None)
    return f"{dcfg.name}-{dcfg.image_size}px-{digest(sorted(parts.items()))}"


def input_key(cfg) -> str:
    """What decides a model's outputs on a split besides the dataset and the model: how images are decoded (the
    loader backend; for FFCV the .beton folder, whose JPEG settings change pixels), their dtype and the eval
    precision. Part of every output-cache key."""
    ld = cfg.loader
    parts = [str(ld.backend), str(ld.get("dtype", "float32")), f"amp_{cfg.trainer.amp}"]
    if ld.backend == "ffcv":
        parts.append(digest(str(ld.get("ffcv_dir"))))
    return "-".join(parts)


def _num(node, key):
    v = node.get(key) if node is not None and hasattr(node, "get") else None
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _in(lo, hi, lo_open=False, hi_open=False):
    def ok(v):
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    return ok


_POS, _NONNEG, _ONE_UP = _in(0, math.inf, lo_open=True), _in(0, math.inf), _in(1, math.inf)
_TEMPERATURE = (_in(0.01, 1000), "must be > 0, finite and in [0.01, 1000] (outside, the softened targets are "
                                 "uniform or one-hot and the loss vanishes): use e.g. {k}=4")
# (key, ok, fix) per config group; `{k}` in a fix is the full key. Applied to the group at the top level and at
# every nested place it recurs (finetune.*, few_shot.*, zoo recipes).
GROUP_RULES = {
    "optimizer": [("lr", _POS, "must be > 0: use e.g. {k}=0.1"),
                  ("weight_decay", _NONNEG, "must be >= 0: use e.g. {k}=5e-4"),
                  ("momentum", _in(0, 1, hi_open=True), "must be in [0, 1): use e.g. {k}=0.9")],
    "scheduler": [("warmup_epochs", _NONNEG, "must be >= 0: use e.g. {k}=1 (or 0 for no warm-up)"),
                  ("step_size", _POS, "must be > 0 (epochs between decays): use e.g. {k}=30"),
                  ("gamma", _in(0, 1, lo_open=True), "must be in (0, 1] (the lr factor at each step): use e.g. "
                                                     "{k}=0.1"),
                  ("min_lr_ratio", _in(0, 1), "must be in [0, 1] (the cosine floor as a fraction of the lr): use "
                                              "e.g. {k}=0")],
    "loader": [("batch_size", _POS, "must be > 0: use e.g. {k}=128"),
               ("eval_batch_size", _POS, "must be > 0: use e.g. {k}=512"),
               ("num_workers", _NONNEG, "must be >= 0: use e.g. {k}=4 (0: load in the main process)"),
               ("crop_padding", _NONNEG, "must be >= 0 (pixels of padding for the random crop): use e.g. {k}=4")],
    "trainer": [("max_steps", _POS, "must be > 0 (or null to train for trainer.epochs)"),
                ("seed", _NONNEG, "must be >= 0: use e.g. {k}=0"),
                ("eval_every", _ONE_UP, "must be >= 1 (epochs between evaluations): use e.g. {k}=1"),
                ("eval_every_steps", _ONE_UP, "must be >= 1 or null: use e.g. {k}=100"),
                ("ckpt_every_steps", _ONE_UP, "must be >= 1 or null: use e.g. {k}=500"),
                ("grad_clip", _POS, "must be > 0 or null: use e.g. {k}=5"),
                ("keep_checkpoints", _ONE_UP, "must be >= 1: use e.g. {k}=1")],
}
CHOICES = {"trainer": {"amp": ("none", "bf16", "fp16"), "progress": ("auto", "on", "off")}}
# hyper-parameters of method nodes (any node with a `_target_`, at any depth): the same rule wherever it is
METHOD_RULES = {
    "temperature": _TEMPERATURE, "nce_t": _TEMPERATURE, "pts_t": _TEMPERATURE, "kd_t": _TEMPERATURE,
    "alpha": (_in(0, 1), "must be in [0, 1]: use e.g. {k}=0.9"),
    "momentum": (_in(0, 1, hi_open=True), "must be in [0, 1): use e.g. {k}=0.5"),
    "ema_tau": (_in(0, 1, hi_open=True), "must be in [0, 1): use e.g. {k}=0.999"),
    "label_smoothing": (_in(0, 1, hi_open=True), "must be in [0, 1): use e.g. {k}=0.1"),
    "feat_dim": (_ONE_UP, "must be >= 1: use e.g. {k}=128"),
    "num_negatives": (_ONE_UP, "must be >= 1: use e.g. {k}=4096"),
    "ema_every": (_ONE_UP, "must be >= 1: use e.g. {k}=1"),
    "n_g": (_ONE_UP, "must be >= 1: use e.g. {k}=1"), "n_s": (_ONE_UP, "must be >= 1: use e.g. {k}=10"),
    "topk": (_NONNEG, "must be >= 0 (0 = all classes): use e.g. {k}=0"),
    "prior_lr": (_POS, "must be > 0: use e.g. {k}=0.01"), "generator_lr": (_POS, "must be > 0: use e.g. {k}=1e-3"),
    "gamma": (_POS, "must be > 0: use e.g. {k}=0.1"), "pts_p": (_POS, "must be > 0: use e.g. {k}=3"),
    "synth_ratio": (_in(0, 1, hi_open=True), "must be in [0, 1): use e.g. {k}=0.2 (1 synthetic : 4 real), 0 disables "
                    "it"),
    **{w: (_NONNEG, "must be >= 0: use e.g. {k}=1.0") for w in (
        "prec", "beta", "loss_w", "kl_w", "ce_w", "mixup_alpha", "kd_weight", "ce_weight", "crd_weight")},
}
RECIPE_RULES = [("epochs", _POS, "must be > 0: use e.g. {k}=30"), ("batch_size", _POS, "must be > 0: use e.g. {k}=64"),
                ("crop_padding", _NONNEG, "must be >= 0: use e.g. {k}=1"), ("seed", _NONNEG, "must be >= 0"),
                ("label_smoothing", _in(0, 1, hi_open=True), "must be in [0, 1): use e.g. {k}=0.1")]


def _bad(key: str, v, fix: str):
    raise UserError(f"{key}={v} {fix.format(k=key)}")


def _check_number(key: str, v, ok=None, fix: str = "") -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return
    if not math.isfinite(v):
        _bad(key, v, "must be a finite number" + (f" ({fix.format(k=key)})" if fix else ""))
    if ok is not None and not ok(v):
        _bad(key, v, fix)


def _check_rules(node, prefix: str, rules) -> None:
    if not isinstance(node, (DictConfig, dict)):
        return
    for key, ok, fix in rules:
        if key in node:
            _check_number(f"{prefix}.{key}" if prefix else key, node.get(key), ok, fix)


def check_group(node, group: str, prefix: str) -> None:
    """The range rules of config group `group` on `node` (found at key `prefix`), every float finite."""
    if not isinstance(node, (DictConfig, dict)):
        return
    _check_rules(node, prefix, GROUP_RULES.get(group, []))
    for k, choices in CHOICES.get(group, {}).items():
        if k in node and node.get(k) not in choices:
            raise UserError(f"{prefix}.{k}='{node.get(k)}' is unknown: use one of {', '.join(choices)}")
    for k in node:
        _check_number(f"{prefix}.{k}", node.get(k))
    if group == "optimizer" and node.get("betas") is not None:
        b = list(node.get("betas"))
        if len(b) != 2 or not all(isinstance(x, (int, float)) and 0 <= x < 1 for x in b):
            raise UserError(f"{prefix}.betas={b} must be two numbers in [0, 1): use e.g. {prefix}.betas=[0.9,0.999]")
    if group == "trainer" and node.get("max_steps") is None and "epochs" in node:
        _check_number(f"{prefix}.epochs", node.get("epochs"), _POS, "must be > 0: use e.g. {k}=10")


def _method_nodes(node, prefix: str = ""):
    """(full key, node) of every config node with a `_target_` below `node` (zoo and hydra excluded)."""
    if not isinstance(node, DictConfig):
        return
    if "_target_" in node and prefix:
        yield prefix, node
    for k in node:
        if not prefix and k in ("zoo", "hydra"):
            continue
        try:
            child = node.get(k)
        except Exception:  # an interpolation that cannot be resolved here: composition reports it
            continue
        if isinstance(child, DictConfig):
            yield from _method_nodes(child, f"{prefix}.{k}" if prefix else str(k))


def check_dataset(d) -> None:
    if d is None:
        return
    for k in ("mean", "std"):
        vals = d.get(k)
        if vals is None:
            continue
        vals = list(vals)
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in vals) or \
                (k == "std" and any(v <= 0 for v in vals)):
            pos = " > 0 (a 0 divides by zero)" if k == "std" else ""
            raise UserError(f"dataset.{k}={vals} must be finite numbers{pos}: use the dataset's per-channel {k}, "
                            f"e.g. dataset.{k}=[0.25]")
    _check_rules(d, "dataset", [("val_fraction", _in(0, 1, hi_open=True), "must be in [0, 1): use e.g. {k}=0.1"),
                                ("crop_pct", _in(0, 1, lo_open=True), "must be in (0, 1]: use e.g. {k}=0.875"),
                                ("image_size", _POS, "must be > 0"), ("channels", _POS, "must be > 0"),
                                ("num_classes", _POS, "must be > 0")])


def check_zoo(cfg) -> None:
    z = cfg.get("zoo")
    if not isinstance(z, DictConfig):
        return
    entries = [("zoo.train", z.get("train"))] + [(f"zoo.models.{m}", z.models.get(m)) for m in (z.get("models") or {})]
    for prefix, node in entries:
        if not isinstance(node, DictConfig):
            continue
        _check_rules(node, prefix, RECIPE_RULES)
        arch = node.get("arch") if prefix != "zoo.train" else None
        if arch is not None:
            from ..models.factory import check_kwargs

            check_kwargs(str(arch), as_dict(node.get("kwargs")), f"{prefix}.kwargs")
        for group in ("optimizer", "scheduler"):
            check_group(node.get(group), group, f"{prefix}.{group}")


def preflight(cfg: DictConfig) -> None:
    """Cheap checks of the values every family shares, run by `setup` before any data, model or training work:
    numeric ranges (finite, by their full key, also where a group recurs: finetune.*, few_shot.*, zoo recipes),
    temperatures and other hyper-parameters of every method node, paths that must stay in their root, and the
    model names in `teacher` / `student` / `teachers` / `models` (so a typo fails in a second, not after the zoo
    models were trained). Each failure is one UserError naming the value and the fix. Families with keys of their
    own add their checks in their `validate`."""
    for prefix in ("", "finetune", "few_shot"):
        base = cfg if not prefix else cfg.get(prefix)
        if not isinstance(base, DictConfig):
            continue
        for group in GROUP_RULES:
            check_group(base.get(group), group, f"{prefix}.{group}" if prefix else group)
    _check_rules(cfg, "", [("top_p", _in(0, 100, lo_open=True), "must be in (0, 100]: use e.g. top_p=20"),
                           ("temperature", _TEMPERATURE[0], _TEMPERATURE[1].replace("{k}=4", "{k}=1.0")),
                           ("label_smoothing", _in(0, 1, hi_open=True), "must be in [0, 1): use e.g. {k}=0.1")])
    sub = cfg.get("dataset", {}).get("subset") if cfg.get("dataset") is not None else None
    _check_rules(sub, "dataset.subset", [("fraction", _in(0, 1, lo_open=True), "is outside (0, 1]: use e.g. 0.1"),
                                         ("per_class", _POS, "must be > 0: use e.g. 128")])
    check_dataset(cfg.get("dataset"))
    for key, node in _method_nodes(cfg):
        check_partition(key, node)
        for k in node:
            if k in METHOD_RULES:
                _check_number(f"{key}.{k}", node.get(k), *METHOD_RULES[k])
            else:
                _check_number(f"{key}.{k}", node.get(k))
    check_zoo(cfg)
    zoo_seed(cfg)  # a bad zoo.seed: one UserError
    ld = cfg.get("loader")
    if ld is not None:
        loader_dtype(ld.get("dtype", "float32"))  # an unknown name: one UserError naming it and the choices
    check_paths(cfg)
    for role in ("teacher", "student", "teachers", "models", "model"):
        spec = cfg.get(role)
        for i, s in enumerate(spec if OmegaConf.is_list(spec) or isinstance(spec, (list, tuple)) else [spec]):
            if isinstance(s, str):
                check_model_spec(s, cfg, role if role not in ("teachers", "models") else f"{role}[{i}]")
            elif isinstance(s, DictConfig) and s.get("arch") is not None:
                from ..models.factory import check_kwargs

                check_kwargs(str(s.arch), as_dict(s.get("kwargs")), f"{role}.kwargs")


def check_partition(key: str, node) -> None:
    """`<key>.partition` among the partitions of the node's method (multi-teacher methods take fewer)."""
    if node.get("partition") is None:
        return
    import inspect

    from hydra.utils import get_class

    from ..methods.kd import PARTITIONS
    from ..methods.multi import MULTI_PARTITIONS

    try:
        multi = "teachers" in inspect.signature(get_class(str(node._target_)).__init__).parameters
    except Exception:  # an unimportable _target_ is reported by the family with its choices
        return
    choices = MULTI_PARTITIONS if multi else PARTITIONS
    if str(node.partition) not in choices:
        raise UserError(f"{key}.partition='{node.partition}' is unknown{closest(str(node.partition), choices)}: use "
                        f"one of {', '.join(choices)}")


def check_paths(cfg) -> None:
    """`save_as` is a name inside paths.checkpoints/<dataset>/ (never a path out of it); order_split is never the
    test split; soup_runs paths exist."""
    name = cfg.get("save_as")
    if name is not None:
        n = str(name)
        if not n or n in (".", "..") or Path(n).name != n or "\\" in n:
            raise UserError(f"save_as='{n}' must be a plain name (the model goes to <paths.checkpoints>/<dataset>/"
                            f"<save_as>/): use e.g. save_as=my_mlp")
    d = cfg.get("dataset")
    if cfg.get("order_split") is not None and d is not None and str(cfg.order_split) == str(d.get("test_split")):
        raise UserError(f"order_split={cfg.order_split} is the test split: ordering teachers by test accuracy leaks "
                        f"it; use order_split={d.get('val_split')} (the validation split)")
    runs = cfg.get("soup_runs")
    if isinstance(runs, DictConfig):
        for t, p in runs.items():
            if p is not None and not Path(str(p)).is_dir():
                raise UserError(f"soup_runs.{t}={p} does not exist: give a finished main_transfer run dir or a "
                                f"student checkpoint folder (or remove the entry to train it)")


def check_model_spec(name: str, cfg, role: str = "model") -> None:
    """UserError unless `name` can be resolved by `resolve_model` (without loading or training anything)."""
    import timm

    if name in zoo_names(cfg) or Path(name).exists():
        return
    if "@" in name:
        arch, path = name.split("@", 1)
        if not timm.is_model(arch):
            from ..models import nets

            raise UserError(f"unknown architecture '{arch}' in {role}={name}"
                            f"{closest(arch, timm.list_models() + list(nets.OUR_MODELS))}: use arch@weights_file "
                            f"with a timm name or one of ours")
        if not Path(path).is_file():
            raise UserError(f"weights file {path} (from {role}={name}) does not exist: check the path")
        return
    if timm.is_model(name):
        return
    raise UserError(f"unknown {role} '{name}'{closest(name, zoo_names(cfg) + timm.list_models())}: use a zoo name "
                    f"({', '.join(zoo_names(cfg)) or 'none configured'}), a timm model name, a checkpoint folder "
                    f"or arch@weights_file")


def setup(cfg: DictConfig, run_dir=None, job_type: str = "train", tracker: bool = True) -> Context:
    run_dir = run_dir_from_hydra(run_dir)
    preflight(cfg)
    rank, world, device = init_distributed(cfg.trainer.device)
    if world > 1:  # every rank resumes from and reports into rank 0's run dir (Hydra's default dir has a pid)
        import torch.distributed as dist

        box = [str(run_dir)]
        dist.broadcast_object_list(box, src=0)
        run_dir = Path(box[0])
    if rank == 0:
        lock_run_dir(run_dir)  # one run per run dir (released by Tracker.finish or when the process ends)
    check_resume(cfg, run_dir, write=rank == 0)
    for key in ("checkpoints", "cache"):  # a path below a regular file or uncreatable: one line, now
        ensure_dir(cfg.paths[key], f"paths.{key}")
    seed_everything(cfg.trainer.seed)  # preflight() refused a negative seed
    ds = build_dataset(cfg.dataset, cfg.paths)
    trk = None
    if tracker:
        trk = Tracker(run_dir, cfg.wandb, OmegaConf.to_container(cfg, resolve=True), rank=rank, job_type=job_type)
    cache = OutputCache(Path(cfg.paths.cache) / "outputs", enabled=bool(cfg.get("use_cache", True)))
    return Context(cfg, run_dir, device, ds, dataset_key(cfg.dataset), trk, cache, rank, world)


# ------------------------------------------------------------------------------------------ resume
RUN_CONFIG = "run_config.json"
# keys that do not change what a run computes: where files go, logging, devices, speed knobs
NOT_TRAINING = ("hydra", "wandb", "paths", "resume", "objective", "trainer.resume", "trainer.progress",
                "trainer.device", "trainer.compile", "trainer.compile_frozen", "trainer.keep_checkpoints",
                "loader.device", "loader.num_workers", "loader.pin_memory", "loader.ffcv_os_cache", "use_cache",
                "cache_train_outputs", "save_student", "plot_pair", "zoo.train_missing", "skip_existing")


def _flat(node, prefix: str = "") -> Dict[str, Any]:
    out = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = node
    return out


def _has_progress(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob("*/latest")) or any((run_dir / "stages").glob("*/row.json"))


def _allowed(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def check_resume(cfg: DictConfig, run_dir: Path, write: bool = True) -> None:
    """A run dir records its resolved config (`run_config.json`); a rerun that would resume its checkpoints (or
    finished stages) with a changed setting that affects training is refused with one line listing the
    differences. `+resume.allow_changes=[trainer.epochs,...]` accepts the named keys (and the keys below them)."""
    try:
        now = _flat(OmegaConf.to_container(cfg, resolve=True))
    except Exception:  # an interpolation only Hydra can resolve: compare what is written
        now = _flat(OmegaConf.to_container(cfg, resolve=False))
    now = {k: v for k, v in now.items() if not _allowed(k, NOT_TRAINING)}
    rec = run_dir / RUN_CONFIG
    resuming = bool(cfg.trainer.get("resume", True)) and rec.is_file() and _has_progress(run_dir)
    if resuming:
        before = read_json_safe(rec, "run config", "delete it to accept this run's settings, or use a new run dir")
        before = before if isinstance(before, dict) else {}
        rs = cfg.get("resume")
        allow = [str(a) for a in (rs.get("allow_changes") or [])] if isinstance(rs, DictConfig) else []
        diff = [k for k in sorted(set(before) | set(now)) if before.get(k, "<unset>") != now.get(k, "<unset>")
                and not _allowed(k, allow)]
        if diff:
            shown = ", ".join(f"{k}: {before.get(k, '<unset>')} -> {now.get(k, '<unset>')}" for k in diff[:4])
            more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
            raise UserError(f"run dir {run_dir} holds a run with other settings ({shown}{more}): use a new run dir, "
                            f"trainer.resume=false to start over, or +resume.allow_changes=[{','.join(diff[:4])}]")
    if write:
        write_json(rec, now)


# ------------------------------------------------------------------------------------------ model resolution


def zoo_names(cfg) -> list:
    z = cfg.get("zoo")
    return list(z.models.keys()) if z is not None and z.get("models") else []


def zoo_seed(cfg) -> int:
    """Which draw of the zoo: 0 = the entries' own seeds; k > 0 trains every entry with seed + 1000 k."""
    z = cfg.get("zoo")
    k = z.get("seed", 0) if z is not None else 0
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise UserError(f"zoo.seed={k} must be an integer >= 0 (0 = the zoo's own seeds): use e.g. zoo.seed=1")
    return k


def zoo_folder(cfg, dataset_name: str, name: str) -> Path:
    """Checkpoint folder of zoo entry `name`; draw k > 0 of the zoo (zoo.seed=k) lives under zoo_seed<k>/."""
    k = zoo_seed(cfg)
    return zoo_dir(cfg.paths.checkpoints, dataset_name if k == 0 else f"{dataset_name}/zoo_seed{k}", name)


def hash_index(cfg) -> Path:
    """Where content hashes of weight files are remembered across runs (by path, size and mtime)."""
    return Path(cfg.paths.cache) / "content_hashes.json"


def resolve_model(spec, ctx: Context, role: str = "model") -> ModelRef:
    """A model from a zoo name, a checkpoint folder/file written by this suite, `arch@weights_file`, a timm name
    (pretrained hub weights), or a model config node {arch, pretrained, checkpoint, kwargs}."""
    info, cfg = ctx.info, ctx.cfg
    if isinstance(spec, (DictConfig, dict)):
        spec = OmegaConf.create(spec) if isinstance(spec, dict) else spec
        m = create_model(spec.arch, info.num_classes, info.channels, info.mean, info.std,
                         pretrained=bool(spec.get("pretrained", False)), checkpoint=spec.get("checkpoint"),
                         kwargs=as_dict(spec.get("kwargs")), img_size=info.image_size)
        key = None
        if spec.get("checkpoint"):
            key = f"{spec.arch}-{content_hash(spec.checkpoint, hash_index(cfg))}"
        elif spec.get("pretrained"):
            key = f"timm-{spec.arch}"
        return ModelRef(spec.get("name") or spec.arch, m, key, {})
    name = str(spec)
    check_model_spec(name, cfg, role)  # unknown names and missing weight files fail here, before any loading
    if name in zoo_names(cfg):
        folder = zoo_folder(cfg, info.name, name)
        meta = read_meta(folder)
        if meta is None:
            if not cfg.zoo.get("train_missing", False):
                raise UserError(f"zoo model '{name}' has no checkpoint in {folder}: train it with "
                                f"`python main_pretrain.py name={name}` or set zoo.train_missing=true")
            from .pretrain import train_zoo_entry

            log.info("zoo model '%s' is missing: training it now (zoo.train_missing=true)", name)
            train_zoo_entry(name, ctx)
        model, meta = load_checkpoint(folder, info.num_classes, info.channels, hash_index(cfg))
        return ModelRef(name, model, meta["hash"], meta)
    if "@" in name:
        arch, path = name.split("@", 1)
        m = create_model(arch, info.num_classes, info.channels, info.mean, info.std, checkpoint=path,
                         img_size=info.image_size, reinit_head=not role.startswith("teacher"))
        return ModelRef(name, m, f"{arch}-{content_hash(path, hash_index(cfg))}", {"arch": arch, "checkpoint": path})
    p = Path(name)
    if p.exists():
        model, meta = load_checkpoint(p, info.num_classes, info.channels, hash_index(cfg))
        return ModelRef(meta.get("name", p.name), model, meta["hash"], meta)
    # what is left is a timm name (check_model_spec accepted it): its pretrained hub weights
    try:
        m = create_model(name, info.num_classes, info.channels, info.mean, info.std, pretrained=True)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"could not load pretrained weights for timm model '{name}' ({type(e).__name__}); "
                        f"offline, use '{name}@/path/to/weights.safetensors' or pre-fill the HF cache") from e
    tag = getattr(m.net, "pretrained_cfg", {}).get("tag") or ""
    return ModelRef(name, m, f"timm-{name}-{tag}", {"arch": name})


# ------------------------------------------------------------------------------------------- stages
# Multi-stage families (multi-teacher, KDEP) keep each finished stage in a folder: the stage's student under
# `student/` (written first) and `row.json` (written last: its presence marks the stage finished).
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
