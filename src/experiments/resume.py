"""Resume safety: a run dir records its resolved config; a rerun that would resume it with other settings that
change what is trained is refused with one line (unless `+resume.allow_changes=[...]` accepts them)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf

from ..errors import UserError
from ..io_utils import read_json_safe, write_json

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
