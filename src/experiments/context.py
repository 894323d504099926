"""The run context every family works in: run dir, device and ranks, dataset, output cache, loaders, tracker,
and the trainer / student-checkpoint plumbing they share. No maths here.

`setup` takes from the run's config, once, what the shared code needs (`RunSettings`); past it the shared modules
(this one, stage, resolve, zoo) read no config: the families pass their own keys (method, eval_split, top_p, ...)
as arguments."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ..data import build_dataset, build_loader, resolve_device
from ..data.datasets import Dataset, Split
from ..engine import OutputCache, Trainer, digest, seed_everything
from ..io_utils import atomic_path, ensure_dir
from ..models import Normalized, save_checkpoint
from ..tracking import Tracker, lock_run_dir
from .naming import run_labels
from .preflight import preflight, zoo_seed
from .resume import check_resume

log = logging.getLogger("kt")


def run_dir_from_hydra(run_dir=None) -> Path:
    if run_dir is not None:
        return Path(run_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


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


RESULTS_FILE = "results.md"


def keep_tables(show: Callable[[], None], path: Path) -> None:
    """Run `show` (a family's table printer) and keep what it printed: on stdout as always, in `path`
    (`<run_dir>/results.md`) and in the job's log file (Hydra's `main_*.log`; under the submitit launchers stdout
    lands in hidden `.submitit/` files). What was printed before a failure is still shown."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            show()
    finally:
        text = buf.getvalue()
        sys.stdout.write(text)
        sys.stdout.flush()
    with atomic_path(path) as tmp:
        tmp.write_text(f"```\n{text.strip(chr(10))}\n```\n")
    for h in logging.getLogger().handlers:  # the log file only: the console already showed it
        if not isinstance(h, logging.FileHandler) or getattr(h, "stream", None) is None:
            continue  # a closed handler (an earlier in-process run's job log): nothing to copy into
        h.acquire()
        try:
            h.stream.write(text if text.endswith("\n") else text + "\n")
            h.flush()
        except (OSError, ValueError):  # a log file that cannot take it: the copy in results.md is kept
            pass
        finally:
            h.release()


@dataclass
class ModelRef:
    name: str
    model: Normalized
    key: Optional[str]  # content key for output caches (None: do not cache)
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSettings:
    """What the shared code reads of one run's config, taken from it once by `setup`."""
    loader: Any  # the `loader` node: every loader's settings unless a family passes its own
    trainer: Any  # the `trainer`, `optimizer`, `scheduler` nodes: Context.trainer's defaults
    optimizer: Any
    scheduler: Any
    dataset: Any  # the `dataset` node: the splits by role, dataset.subset, the student meta
    paths: Any  # the `paths` node: checkpoints, cache
    zoo: Any  # the `zoo` node (None without one): its models, generators, recipes, name, train_missing
    zoo_seed: int  # which draw of the zoo (zoo.seed)
    seed: int  # trainer.seed
    amp: str  # trainer.amp: the precision of every evaluation
    input_key: str  # how the inputs are decoded and evaluated: part of every output-cache key (`input_key`)
    use_cache: bool = True
    save_student: bool = True
    cache_train_outputs: bool = True

    @classmethod
    def of(cls, cfg: DictConfig) -> "RunSettings":
        return cls(loader=cfg.loader, trainer=cfg.trainer, optimizer=cfg.get("optimizer"),
                   scheduler=cfg.get("scheduler"), dataset=cfg.dataset, paths=cfg.paths, zoo=cfg.get("zoo"),
                   zoo_seed=zoo_seed(cfg), seed=cfg.trainer.seed, amp=cfg.trainer.amp, input_key=input_key(cfg),
                   use_cache=bool(cfg.get("use_cache", True)), save_student=bool(cfg.get("save_student", True)),
                   cache_train_outputs=bool(cfg.get("cache_train_outputs", True)))


@dataclass
class Context:
    """One run's context (`setup`): what the shared code reads of the config is `settings`; the config itself stays
    with the family's `run`."""
    settings: RunSettings
    run_dir: Path
    device: torch.device
    ds: Dataset
    dataset_key: str
    tracker: Optional[Tracker]
    cache: OutputCache
    rank: int = 0
    world_size: int = 1
    # trains a missing zoo entry (name, ctx) when zoo.train_missing=true; set by `run_context` (the zoo's trainer
    # lives above this module, so resolution gets it passed in instead of importing it)
    train_missing: Optional[Callable[[str, "Context"], Any]] = None

    @property
    def info(self):
        return self.ds.info

    def eval_loader(self, split: Split):
        return build_loader(self.settings.loader, split, train=False, device=self.device,
                            channels_last=bool(self.settings.trainer.channels_last))

    def train_loader(self, split: Split, loader_cfg=None, seed: Optional[int] = None,
                     channels_last: Optional[bool] = None):
        """A trainer's loader; `channels_last` is its trainer config's (default the run's trainer.channels_last)."""
        return build_loader(loader_cfg or self.settings.loader, split, train=True,
                            seed=self.settings.seed if seed is None else seed, device=self.device,
                            rank=self.rank, world_size=self.world_size,
                            channels_last=bool(self.settings.trainer.channels_last if channels_last is None
                                               else channels_last))

    @property
    def inputs_key(self) -> str:
        """The data part of every output-cache key: dataset + how its images are decoded and evaluated."""
        return f"{self.dataset_key}-{self.settings.input_key}"

    def outputs(self, ref: ModelRef, split: Split, features: bool = False) -> Dict[str, torch.Tensor]:
        return self.cache.get(ref.model.to(self.device), ref.key, self.inputs_key, split, self.eval_loader(split),
                              features=features, amp=self.settings.amp, label=ref.name)

    def report(self, row: Dict[str, Any], printer: Callable[[Dict[str, Any], Path], None]) -> Dict[str, Any]:
        """The end of every family's run: `summary.json` (+ wandb summary) from `row`, then `printer(summary,
        run_dir)` on rank 0; returns the summary."""
        summary = self.tracker.summary(row)
        if self.rank == 0:
            keep_tables(lambda: printer(summary, self.run_dir), self.run_dir / RESULTS_FILE)
        return summary

    def eval_images(self, split: Split):
        """(images, labels) of a split in sample-id order (the order of `predict`'s outputs), on the device."""
        xs, ys, ids = [], [], []
        for b in self.eval_loader(split).iter_epoch(0):
            xs.append(b.inputs.float()), ys.append(b.targets), ids.append(b.ids)
        order = torch.argsort(torch.cat(ids))
        return torch.cat(xs)[order.to(xs[0].device)], torch.cat(ys)[order.to(ys[0].device)]

    def trainer(self, method, loader, evaluate=None, name: str = "", tracker: Any = "run", trainer_cfg=None,
                optimizer_cfg=None, scheduler_cfg=None, run_dir=None) -> Trainer:
        """A Trainer for `method` on this run's device and ranks; its groups default to the run's `trainer`,
        `optimizer` and `scheduler` nodes, its tracker to the run's ("run"; None for none, or e.g. a
        StageTracker), its checkpoints to <run_dir>/checkpoints/<name>/; its errors name the method and the
        groups' keys as the config does (src/experiments/naming.py)."""
        s = self.settings
        trainer_cfg, optimizer_cfg = trainer_cfg or s.trainer, optimizer_cfg or s.optimizer
        return Trainer(method, loader, trainer_cfg, optimizer_cfg, scheduler_cfg or s.scheduler,
                       run_dir or self.run_dir, tracker=self.stage_tracker(tracker), evaluate=evaluate,
                       device=self.device, name=name, rank=self.rank, world_size=self.world_size,
                       labels=run_labels(method, optimizer_cfg, trainer_cfg))

    def stage_tracker(self, tracker: Any = "run"):
        """The tracker a trainer or stage logs to: "run" means the run's own, anything else (None, a
        StageTracker) is taken as it is."""
        return self.tracker if isinstance(tracker, str) and tracker == "run" else tracker

    def student_meta(self, name: str, acc: Optional[float] = None, method: Optional[str] = None,
                     kwargs: Optional[dict] = None) -> Dict[str, Any]:
        """The meta.json of a student this run writes: its display name, the dataset, its accuracy in percent."""
        meta = {"name": name, "dataset": OmegaConf.to_container(self.settings.dataset, resolve=True),
                "kwargs": dict(kwargs or {}), "acc_unit": "percent"}
        if method is not None:
            meta["method"] = method
        if acc is not None:
            meta["test_acc"] = float(acc)
        return meta

    def save_student(self, model: Normalized, name: str, acc: Optional[float] = None, method: Optional[str] = None,
                     kwargs: Optional[dict] = None, folder: Optional[Path] = None) -> Optional[dict]:
        """`model` -> <run_dir>/student/ (a checkpoint folder every family takes as a model), on rank 0 and unless
        save_student=false; `acc` in percent. Returns the saved meta (with the weights' hash), else None."""
        if self.rank != 0 or (folder is None and not self.settings.save_student):
            return None
        return save_checkpoint(model, folder or self.run_dir / "student", self.student_meta(name, acc, method, kwargs))

    def output_path(self, ref: ModelRef, split: Split) -> Optional[Path]:
        """The cache file `outputs(ref, split)` reads and writes (None when it is not cached)."""
        return self.cache.path(ref.key, self.inputs_key, split) if ref.key and self.cache.enabled else None


def dataset_key(dcfg) -> str:
    parts = OmegaConf.to_container(dcfg, resolve=True)
    parts.pop("subset", None)
    if parts.get("text") is None:  # image datasets: the key they had before text datasets existed
        parts.pop("text", None)
    for k in ("pretrain_split", "transfer_split", "val_split", "test_split"):
        parts.pop(k, None)
    shape = "text" if dcfg.get("text") is not None else f"{dcfg.image_size}px"
    return f"{dcfg.name}-{shape}-{digest(sorted(parts.items()))}"


def input_key(cfg) -> str:
    """What decides a model's outputs on a split besides the dataset and the model: how images are decoded (the
    loader backend; for FFCV the .beton folder, whose JPEG settings change pixels), their dtype and the eval
    precision. Part of every output-cache key."""
    ld = cfg.loader
    parts = [str(ld.backend), str(ld.get("dtype", "float32")), f"amp_{cfg.trainer.amp}"]
    if ld.backend == "ffcv":
        parts.append(digest(str(ld.get("ffcv_dir"))))
    return "-".join(parts)


def setup(cfg: DictConfig, run_dir=None, job_type: str = "train", tracker: bool = True,
          validate: Callable[[DictConfig], None] = preflight, train_missing=None) -> Context:
    """The context of one run: `validate(cfg)` (the shared `preflight`, or a family's checks that start with it)
    before anything else, then ranks, the run dir's lock and resume check, dataset, tracker and output cache."""
    run_dir = run_dir_from_hydra(run_dir)
    validate(cfg)
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
    settings = RunSettings.of(cfg)
    cache = OutputCache(Path(cfg.paths.cache) / "outputs", enabled=settings.use_cache)
    return Context(settings, run_dir, device, ds, dataset_key(cfg.dataset), trk, cache, rank, world, train_missing)


@contextmanager
def run_context(cfg: DictConfig, run_dir=None, job_type: str = "train", validate: Callable = preflight,
                train_missing=None) -> Iterator[Context]:
    """`with run_context(cfg, run_dir, "transfer") as ctx:` the skeleton of every family's run: `setup`, the body,
    and the tracker finished whatever happens (wandb run closed, run-dir lock released)."""
    ctx = setup(cfg, run_dir, job_type, validate=validate, train_missing=train_missing)
    try:
        yield ctx
    finally:
        if ctx.rank == 0 and (ctx.cache.hits or ctx.cache.computed):
            log.info(ctx.cache.summary())
        if ctx.tracker is not None:
            ctx.tracker.finish()
