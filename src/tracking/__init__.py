"""Tracking: always `metrics.jsonl` (one flushed line per evaluation) and `summary.json` in the run dir; wandb
(online | offline | disabled) gets the same numbers, the resolved config, figures and tables. wandb is never
required for a result to exist, and a resumed run continues the same wandb run (the id lives in the run dir and
in the checkpoint).

One run per run dir: `lock_run_dir` takes an advisory fcntl lock on `<run_dir>/.lock` for the run's life
(released by `Tracker.finish`, or by the OS when the process dies); a second run in the same dir fails with one
line. A torn last line of `metrics.jsonl` (a kill inside the append) is dropped before the next line is
appended."""
from __future__ import annotations

import json
import logging
import math
import os
import platform
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..errors import UserError
from ..io_utils import ensure_dir, write_json

log = logging.getLogger(__name__)


def _clean(v):
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


def _new_run_id() -> str:
    """A wandb-style run id (8 lowercase alphanumerics); `wandb.util.generate_id` is gone in wandb >= 0.2x."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "torchvision", "timm", "numpy", "hydra", "omegaconf", "wandb"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            pass
    return out


class RunDirBusy(UserError):
    """Another process holds the run dir's lock (entry() then writes no error.json into that run's dir)."""


_LOCKS: Dict[str, int] = {}  # resolved run dir -> fd of its held lock file (this process)


def lock_run_dir(run_dir) -> None:
    """Hold an exclusive advisory lock on `<run_dir>/.lock` until `unlock_run_dir` (or the process ends). A
    second run in the same dir gets one RunDirBusy line naming the holder's pid. Re-locking a dir this process
    already holds is a no-op (sequential in-process runs)."""
    import fcntl

    run_dir = ensure_dir(run_dir, "hydra.run.dir")
    key = str(Path(run_dir).resolve())
    if key in _LOCKS:
        return
    path = Path(key) / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:  # a directory named .lock, a dangling link into a read-only place, ...
        kind = "a directory" if path.is_dir() else f"not openable ({e.strerror or e})"
        raise UserError(f"run dir lock {path} is {kind}: remove it (rm -r {path}) if no run uses {run_dir}, or "
                        f"set hydra.run.dir=<another folder>") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunDirBusy(f"run dir {run_dir} is in use by another run (pid {holder}): wait for it to finish or "
                         f"set hydra.run.dir=<another folder>") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _LOCKS[key] = fd


def unlock_run_dir(run_dir) -> None:
    fd = _LOCKS.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def drop_torn_line(path: Path) -> bool:
    """Cut a last line without its newline (a kill inside an append) off `path`; True when one was dropped."""
    try:
        with open(path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size == 0:
                return False
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return False
            f.seek(max(0, size - (1 << 20)))
            tail = f.read()
            cut = tail.rfind(b"\n")
            keep = size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= (1 << 20) else size)
            f.truncate(keep)
        log.warning("dropped a torn last line of %s (a run was killed while writing it)", path)
        return True
    except FileNotFoundError:
        return False


def metric_rows(path: Path, quarantine: bool = False) -> List[Tuple[str, dict]]:
    """(line, row) of every well-formed line of a metrics.jsonl. A line that is not UTF-8 or not a JSON object (a
    torn write: a kill or a full disk inside an append) is skipped; with `quarantine` it is also moved out of the
    file, appended to `<file>.quarantine` with a warning naming both, so the file stays readable by any tool."""
    if not path.is_file():
        return []
    good, bad = [], []
    for raw in path.read_bytes().splitlines():
        try:
            line = raw.decode("utf-8")
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
            good.append((line, row))
        except (UnicodeDecodeError, ValueError):
            bad.append(raw)
    if bad and quarantine:
        with open(path.with_name(path.name + ".quarantine"), "ab") as f:
            f.write(b"".join(b + b"\n" for b in bad))
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line, _ in good))
        os.replace(tmp, path)
        log.warning("moved %d unreadable line(s) of %s (not UTF-8 / not JSON: a torn write) to %s.quarantine",
                    len(bad), path, path.name)
    return good


WANDB_ENV_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")


def _wandb_logged_in() -> bool:
    """An API key is configured (WANDB_API_KEY or ~/.netrc from `wandb login`); asks no server."""
    return bool(os.environ.get("WANDB_API_KEY") or _netrc_key())


def _netrc_key() -> Optional[str]:
    import netrc

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        auth = netrc.netrc(os.environ.get("NETRC") or os.path.expanduser("~/.netrc")).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return auth[2] if auth else None


def _model_name(spec) -> str:
    """A teacher / student entry of a config as a short name: `mlp_small`, `resnet8` (a fresh `{arch: resnet8}`),
    `[lenet+resnet20]` (a list: an ensemble), the file name of `arch@/path/file`."""
    if isinstance(spec, dict):
        return str(spec.get("arch") or spec.get("name") or "?")
    if isinstance(spec, (list, tuple)):
        return "[" + "+".join(_model_name(s) for s in spec) + "]"
    s = str(spec)
    return s.rsplit("/", 1)[-1] if "/" in s else s


def _hydra():
    """Hydra's runtime config when Hydra runs the app (None under the compose API and in scripts)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get() if HydraConfig.initialized() else None
    except Exception:
        return None


def wandb_identity(config: Optional[dict], family: str, wandb_cfg=None) -> Dict[str, Any]:
    """The wandb `name`, `group` and `tags` of a run: what it is (`transfer kl_dp mlp_small->resnet8 s0`: family,
    the method config chosen, teacher -> student or the teachers, the seed), grouped by its sweep (`transfer/
    2026-12-04/18-40-00_123`, the sweep dir's last parts; a single run: no group), tagged by its family. Values set
    in the `wandb` config win."""
    config = config if isinstance(config, dict) else {}
    hc = _hydra()
    choices = dict(hc.runtime.choices) if hc is not None else {}
    method = config.get("parallel_method") if config.get("mode") == "parallel" else config.get("method")
    choice = choices.get("method") or (str(method.get("_target_", "")).rsplit(".", 1)[-1]
                                       if isinstance(method, dict) else "")
    parts = [family] + ([choice] if choice else [])
    if config.get("teachers"):
        parts.append(_model_name(config["teachers"]) + "->" + _model_name(config.get("student", "?")))
    elif config.get("teacher") is not None and config.get("student") is not None:
        parts.append(_model_name(config["teacher"]) + "->" + _model_name(config["student"]))
    seed = (config.get("trainer") or {}).get("seed")
    if seed is not None:
        parts.append(f"s{seed}")
    group = None
    if hc is not None and getattr(hc.mode, "name", str(hc.mode)) == "MULTIRUN":
        group = "/".join(Path(str(hc.sweep.dir)).parts[-3:])
    get = (lambda k: getattr(wandb_cfg, k, None)) if wandb_cfg is not None else (lambda k: None)
    tags = list(get("tags") or [])
    return {"name": get("name") or " ".join(parts), "group": get("group") or group,
            "tags": tags + ([family] if family not in tags else [])}


class Tracker:
    def __init__(self, run_dir, wandb_cfg=None, config: Optional[dict] = None, rank: int = 0,
                 job_type: str = "train"):
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.active = rank == 0
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.summary_path = self.run_dir / "summary.json"
        self._wandb = None
        self.run_id = None
        self._seen = None  # (step, keys) of the lines in metrics.jsonl, read on first use
        self._seed = ((config or {}).get("trainer") or {}).get("seed") if isinstance(config, dict) else None
        self.job_type = job_type
        self._torn_checked = False
        if not self.active:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"output dir {self.run_dir} is not writable ({e.strerror}): set hydra.run.dir "
                            f"(or hydra.sweep.dir) to a writable folder") from e
        id_file = self.run_dir / ".tracker.json"
        state = json.loads(id_file.read_text()) if id_file.is_file() else {}
        mode = getattr(wandb_cfg, "mode", "disabled") if wandb_cfg is not None else "disabled"
        if mode not in ("online", "offline", "disabled"):
            raise UserError(f"wandb.mode='{mode}' is unknown: use online, offline or disabled")
        if mode != "disabled":
            self._start_wandb(wandb_cfg, mode, state, id_file, config, job_type)

    def _start_wandb(self, wandb_cfg, mode: str, state: dict, id_file: Path, config, job_type: str) -> None:
        """wandb.init, or one line naming the fix: a bad WANDB_MODE in the environment (wandb reads it over the
        config's mode), `wandb=online` without a login, or any failure to start (no network)."""
        env_mode = os.environ.get("WANDB_MODE")
        if env_mode is not None and env_mode not in WANDB_ENV_MODES:
            raise UserError(f"the environment variable WANDB_MODE={env_mode!r} is not a wandb mode: unset it "
                            f"(unset WANDB_MODE) or set it to online, offline or disabled")
        import wandb

        if mode == "online" and env_mode in (None, "online", "run") and not _wandb_logged_in():
            raise UserError("wandb=online needs a login and a network: run `wandb login` (or set WANDB_API_KEY), "
                            "or log locally with wandb=offline (sync later with `wandb sync <run dir>/wandb`)")
        self.run_id = state.get("wandb_id") or _new_run_id()
        write_json(id_file, {"wandb_id": self.run_id})
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            self._wandb = wandb.init(
                project=wandb_cfg.project, entity=wandb_cfg.entity, notes=wandb_cfg.notes, config=config,
                dir=str(self.run_dir), mode=mode, id=self.run_id, resume="allow", job_type=job_type,
                reinit="finish_previous", **wandb_identity(config, job_type, wandb_cfg))
        except Exception as e:  # wandb's CommError / UsageError / pydantic errors: tracebacks of many lines
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"wandb (mode={mode}) could not start: {type(e).__name__}: {first}: use "
                            f"wandb=offline (or wandb=disabled) for runs without a network") from e
        if mode == "online":  # WANDB_SILENT hides wandb's own lines: say where the run is
            log.info("wandb run '%s': %s", self._wandb.name, self._wandb.url)
        else:
            log.info("wandb offline run '%s' in %s: upload it with `wandb sync %s`", self._wandb.name,
                     Path(self._wandb.dir).parent, Path(self._wandb.dir).parent)

    # ------------------------------------------------------------------ metrics
    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint's step so nothing is duplicated."""
        if not self.active or not self.metrics_path.is_file():
            return
        keep = [line for line, row in metric_rows(self.metrics_path, quarantine=True) if row.get("step", -1) <= step]
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        os.replace(tmp, self.metrics_path)
        self._seen = None

    @staticmethod
    def _line_key(row: dict):
        return int(row.get("step", -1)), tuple(sorted(row))

    def _already_logged(self, row: dict) -> bool:
        """True when metrics.jsonl already holds a line with this step and these keys: a resumed run re-logs what
        it logs before its trainer resumes (e.g. the step-0 'before' evaluation), and that is not a new line."""
        if self._seen is None:
            self._seen = {self._line_key(row) for _, row in metric_rows(self.metrics_path, quarantine=True)}
        return self._line_key(row) in self._seen

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        if not self.active:
            return
        row = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        if not self._torn_checked:
            self._torn_checked = True
            if drop_torn_line(self.metrics_path):
                self._seen = None
        if self._already_logged(row):
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        self._seen.add(self._line_key(row))
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=int(step))

    def read_metrics(self) -> List[dict]:
        return [row for _, row in metric_rows(self.metrics_path)]

    def summary(self, values: Dict[str, Any]) -> Dict[str, Any]:
        values = {k: _clean(v) for k, v in values.items()}
        if self._seed is not None:  # every summary says which seed made it (and with which library versions)
            values.setdefault("seed", self._seed)
        values.setdefault("family", self.job_type)  # what scripts/aggregate.py groups runs by
        values.setdefault("versions", versions())
        if self.active:
            write_json(self.summary_path, values)
            if self._wandb is not None:
                self._wandb.summary.update({k: v for k, v in values.items() if not isinstance(v, (dict, list))})
        return values

    def log_figure(self, name: str, path) -> None:
        if self.active and self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Image(str(path))})

    def log_table(self, name: str, rows: List[dict]) -> None:
        if self.active and self._wandb is not None and rows:
            import wandb

            cols = list(rows[0])
            self._wandb.log({name: wandb.Table(columns=cols, data=[[_clean(r.get(c)) for c in cols] for r in rows])})

    def finish(self, exit_code: Optional[int] = None) -> None:
        """Finish the wandb run (always, also on failure). Called from a `finally:` while an exception propagates,
        the run is marked failed (exit code 1; 124 for a preemption, which the rerun resumes). Releases the run
        dir's lock."""
        if self.active:
            unlock_run_dir(self.run_dir)
        if self._wandb is not None:
            if exit_code is None:
                import sys

                from ..errors import PREEMPTED_EXIT_CODE, Preempted

                err = sys.exc_info()[1]
                exit_code = 0 if err is None else PREEMPTED_EXIT_CODE if isinstance(err, Preempted) else 1
            try:
                self._wandb.finish(exit_code=exit_code)
            finally:
                self._wandb = None


from .stage import StageTracker  # noqa: E402,F401
