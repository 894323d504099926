"""What every `main_*.py` calls: run the family, turning bad input into one clear line and an exit code.

- UserError: one line `error: ...` on stderr, exit code 2 (traceback too with KT_DEBUG=1); `error.json` in the run
  dir. In a multirun the job fails (logged, error.json) and the other jobs still run.
- SIGTERM / SIGUSR1 (SLURM's warning signal): while a Trainer runs, it finishes the step, checkpoints and raises
  Preempted; between trainers (stages, on-the-fly zoo models, evaluation) Preempted is raised at once. Either way:
  `preempted.json`, exit code 124, and rerunning the same command in the same run dir resumes. In a local sweep
  (Hydra's basic launcher, all jobs in one process) the signal stops the whole sweep, not only the current job. Inside a submitit
  job, its preemption signal (USR2) is handled the same way and then handed to submitit, which requeues the job;
  the requeued job resumes in the same sweep sub-dir (src/engine/preemption.py). When submitit refuses to requeue
  (more timeouts than hydra.launcher.max_num_timeout), the job fails with one UserError line in `error.json`.
- `OutputDirCheck` (a Hydra callback in config/hydra/default.yaml): an unwritable run/sweep dir is one clear line
  and exit code 2 before Hydra tries to create it.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from contextlib import contextmanager

from .cli import fail
from .engine import preemption
from .errors import PREEMPTED_EXIT_CODE, Preempted, UserError, debug_enabled
from .help import maybe_print_help
from .io_utils import as_user_error, write_json

log = logging.getLogger("kt")


def _mode():
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return hc.mode == RunMode.MULTIRUN, hc.runtime.output_dir
    except Exception:
        return False, None


def _objective(summary, cfg):
    """`objective: <summary key>` makes the task return that number (what Hydra's Optuna sweeper optimises);
    unset, the summary dict is returned."""
    key = cfg.get("objective") if hasattr(cfg, "get") else None
    if not key:
        return summary
    if summary.get(key) is None:
        raise UserError(f"objective='{key}' is not a number in this run's summary (status "
                        f"{summary.get('status')}); use one of "
                        f"{', '.join(k for k, v in summary.items() if isinstance(v, (int, float)))}")
    return float(summary[key])


def _on_signal(signum, frame):
    """Entry-level handler: a Trainer installs its own while it runs (finish the step, checkpoint, Preempted);
    reaching this one means no step is in flight, so stop right away (the next trainer would stop too)."""
    preemption.record(signum)
    preemption.STOP_REQUESTED.set()
    log.warning("signal %d received outside a training step: stopping now", signum)
    raise Preempted(f"signal {signum} received; rerun the same command (same run dir) to resume")


@contextmanager
def preemptible():
    """SIGTERM/SIGUSR1 (+ submitit's USR2) -> Preempted for the duration of a run (main thread only); yields the
    handlers it replaced (submitit's requeue handler among them inside a submitit job)."""
    preemption.reset()
    try:
        with preemption.handling(_on_signal) as previous:
            yield previous
    finally:
        preemption.STOP_REQUESTED.clear()


def _check_dir(path, key: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        if debug_enabled():
            raise
        fail(f"output dir {path} is not writable ({e.strerror or e}): set {key}=<a writable folder>")


try:
    from hydra.experimental.callback import Callback as _Callback
except Exception:  # pragma: no cover - hydra without callbacks
    _Callback = object


def _lock_before_hydra_writes(path, key: str) -> None:
    """Take the run dir's lock (held until the process ends; the run's own `lock_run_dir` then re-enters it)
    before Hydra writes `.hydra/config.yaml`, `overrides.yaml` and the job log there: a run refused because the dir
    is busy must leave the running one's record as it is (the aggregator reads it)."""
    from .tracking import RunDirBusy, lock_run_dir

    if int(os.environ.get("RANK", "0") or 0) != 0:  # torchrun: rank 0 holds the run dir for every rank
        return
    try:
        lock_run_dir(path)
    except (RunDirBusy, UserError) as e:
        if debug_enabled():
            raise
        fail(str(e))


PLUGIN_LAUNCHERS = {"submitit_slurm": "slurm", "submitit_local": "local"}


def _check_launcher(config) -> None:
    """`hydra/launcher=submitit_slurm` (the plugin's own name) has none of the suite's settings: no requeue
    (max_num_timeout 0), no GPU, 60 minutes. Refused with one line naming the suite's launcher config."""
    try:
        choice = str(config.hydra.runtime.choices.get("hydra/launcher") or "")
    except Exception:
        return
    if choice in PLUGIN_LAUNCHERS:
        ours = PLUGIN_LAUNCHERS[choice]
        fail(f"hydra/launcher={choice} is the plugin's bare config (no requeue on preemption or timeout, no "
             f"GPU, 60-minute limit): use hydra/launcher={ours} (config/hydra/launcher/{ours}.yaml, the same "
             f"launcher with the suite's preemption and resource settings; its keys are overridable as "
             f"hydra.launcher.*)")


def _check_sweeper(sw) -> None:
    """Optuna with `n_trials=0` (or `n_jobs=0`) ran nothing and ended in optuna's 'No trials are completed yet'
    traceback: one line before the sweep starts."""
    if "optuna" not in str(sw.get("_target_", "")).lower():
        return
    for key in ("n_trials", "n_jobs"):
        v = sw.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            fail(f"hydra.sweeper.{key}={v} must be an integer >= 1: use e.g. hydra.sweeper.{key}="
                 f"{20 if key == 'n_trials' else 1}")


class OutputDirCheck(_Callback):
    """Hydra callback: fail with one line (exit 2) when the run or sweep dir cannot be written, before Hydra
    itself tries to create it (which would end in a traceback), or when another run holds it, before Hydra
    rewrites that run's config files (a sweep dir is held by the process that launches its jobs)."""

    def on_run_start(self, config, **kwargs) -> None:
        _check_dir(str(config.hydra.run.dir), "hydra.run.dir")
        _lock_before_hydra_writes(str(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        _check_dir(str(config.hydra.sweep.dir), "hydra.sweep.dir")
        _lock_before_hydra_writes(str(config.hydra.sweep.dir), "hydra.sweep.dir")
        _check_sweeper(config.hydra.sweeper)
        _check_launcher(config)
        SWEEP_FAILURES.clear()
        SWEEP_JOBS[0] = 0

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_summary()


# what a run dir holds before its run computes anything
BOOKKEEPING = {".hydra", ".lock", "error.json", "preempted.json", ".submitit", "run_config.json"}


def holds_work(out) -> bool:
    """Whether the run dir holds anything a run computed (a checkpoint, metrics, a summary, a cache, a figure):
    anything beyond Hydra's config, the job log, the lock and the failure markers."""
    try:
        return any(n not in BOOKKEEPING and not n.endswith(".log") for n in os.listdir(out))
    except OSError:
        return True


def _mark(out, e: Exception, known: bool) -> None:
    """The failure marker in the job's dir (never touches an earlier summary.json): preempted.json or error.json.
    A busy run dir gets none: it belongs to the run that holds it."""
    from .tracking import RunDirBusy

    if out is None or isinstance(e, RunDirBusy):
        return
    status = "preempted" if isinstance(e, Preempted) else "failed" if known else "crashed"
    record = {"status": status, "error": f"{type(e).__name__}: {e}"}
    if status == "failed" and not holds_work(out):
        record["refused"] = True  # stopped before it computed anything: the aggregator counts it, lists it not
    try:
        write_json(f"{out}/preempted.json" if status == "preempted" else f"{out}/error.json", record)
        if status != "preempted" and os.path.isfile(f"{out}/preempted.json"):
            os.unlink(f"{out}/preempted.json")
    except (OSError, UserError):  # a full disk: the one line below says it
        pass


def _launcher_value(key: str):
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().launcher.get(key)
    except Exception:
        return None


def _requeue(previous, out) -> None:
    """Inside submitit: hand its preemption signal back, which requeues the job and exits. When submitit refuses
    (the job timed out / was preempted more often than hydra.launcher.max_num_timeout allows), the job ends with
    one clear UserError instead (error.json in its dir); its last checkpoint stays there."""
    try:
        preemption.hand_over(previous)
    except Exception as refused:  # submitit's UncompletedJobError, raised by its handler
        raise UserError(f"not requeued: this job was stopped by a timeout or preemption more often than "
                        f"hydra.launcher.max_num_timeout={_launcher_value('max_num_timeout')} allows (submitit: "
                        f"{refused}); its last checkpoint is in {out}: rerun the sweep with "
                        f"hydra.sweep.dir=<the same sweep dir> to resume it, or raise "
                        f"hydra.launcher.max_num_timeout / hydra.launcher.timeout_min") from refused


def _one_line_composition_errors() -> None:
    """Hydra prints its composition errors in 4-25 lines with exit code 1; the suite promises one `error:` line
    and exit code 2. Wraps Hydra's `run_and_report` (what `@hydra.main` calls); HYDRA_FULL_ERROR=1 or KT_DEBUG=1
    keep Hydra's own report."""
    try:
        import hydra._internal.utils as hu
    except Exception:  # pragma: no cover
        return
    original = hu.run_and_report
    if getattr(original, "kt_wrapped", False):
        return

    def run_and_report(func):
        try:
            return func()
        except Exception as e:
            from .cli import composition_error

            line = None if debug_enabled() or os.environ.get("HYDRA_FULL_ERROR") == "1" else composition_error(e)
            if line is None:
                def again():
                    raise e
                return original(again)
            fail(line)

    run_and_report.kt_wrapped = True
    hu.run_and_report = run_and_report


_one_line_composition_errors()
maybe_print_help()  # `main_<family>.py --help`: the family's own help, not Hydra's stock one (src/help.py)

SWEEP_FAILURES: list = []  # (job number, overrides, message) of the failed jobs of this process's local sweep
SWEEP_JOBS = [0]


def _local_sweep() -> bool:
    """A multirun whose jobs run in this process (Hydra's basic launcher, basic sweeper): the sweep then reports
    its failed jobs itself. Inside submitit, or under Optuna (a failed trial must raise), the sweeper does."""
    if os.environ.get("SUBMITIT_EXECUTOR"):
        return False
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        return "basic" in str(hc.launcher.get("_target_", "")).lower() and \
            "basic" in str(hc.sweeper.get("_target_", "")).lower()
    except Exception:
        return False


def _job():
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        return hc.job.num, " ".join(hc.overrides.task) or "no overrides"
    except Exception:
        return "?", "?"


def sweep_summary() -> None:
    """At the end of a local sweep with failed jobs: one summary line and exit code 2 (the finished jobs kept
    their summaries; each failed job has its error.json)."""
    if not SWEEP_FAILURES:
        return
    nums = ", ".join(str(n) for n, _, _ in SWEEP_FAILURES)
    failed = len(SWEEP_FAILURES)
    SWEEP_FAILURES.clear()
    fail(f"{failed} of {SWEEP_JOBS[0]} jobs failed (job {nums}; each has error.json in its dir); the other jobs "
         f"finished and kept their summaries: fix the value named above and rerun those jobs")


def resume_command(kind: str) -> str:
    """The exact command that resumes this run (`kind` run) or sweep: the script and its command-line overrides
    with `hydra.run.dir=<this run's dir>` (`hydra.sweep.dir=<this sweep's dir>`) pinned, since the default dirs
    are timestamped and 'the same command' would start over in a new one."""
    import shlex

    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        key, where = (("hydra.sweep.dir", hc.sweep.dir) if kind == "sweep" else
                      ("hydra.run.dir", hc.runtime.output_dir))
        args = [a for a in sys.argv[1:] if not a.startswith(f"{key}=")]
    except Exception:
        return "the same command with the same run dir"
    if kind == "sweep" and "-m" not in args and "--multirun" not in args:
        args.insert(0, "-m")
    return " ".join(["python", shlex.quote(os.path.basename(sys.argv[0]) or "main.py"),
                     *map(shlex.quote, args), shlex.quote(f"{key}={os.path.abspath(str(where))}")])


def entry(run, cfg):
    multirun, out = _mode()
    if multirun:
        SWEEP_JOBS[0] += 1
    previous = {}
    try:
        with preemptible() as previous:
            result = _objective(run(cfg), cfg)
        for stale in ("preempted.json", "error.json"):  # markers of earlier attempts in this run dir
            if out is not None and os.path.isfile(os.path.join(out, stale)):
                os.unlink(os.path.join(out, stale))
        return result
    except Exception as e:
        e = as_user_error(e)  # a full disk anywhere: one line naming the path and the setting that moves it
        known = isinstance(e, (UserError, Preempted))
        _mark(out, e, known)
        if not known:
            raise  # a bug: keep its traceback
        if debug_enabled():
            traceback.print_exc()
        if log.hasHandlers():  # Hydra's log file; a plain script (scripts/) prints the one line below only
            log.log(logging.WARNING if isinstance(e, Preempted) else logging.ERROR, "%s: %s", type(e).__name__, e)
        if isinstance(e, Preempted):
            try:
                _requeue(previous, out)  # inside submitit: it requeues the job (and exits) from here
            except UserError as refused:
                _mark(out, refused, True)
                log.error("UserError: %s", refused)
                e = refused
        if multirun and isinstance(e, Preempted) and not os.environ.get("SUBMITIT_EXECUTOR"):
            # a local sweep (Hydra's basic launcher runs every job in this process): the signal stops the sweep,
            # not just this job. SystemExit passes Hydra's per-job `except Exception`; the jobs that finished keep
            # their summaries and the same command with the same hydra.sweep.dir resumes this one.
            print(f"preempted: {e}; the sweep stops here; resume it with: {resume_command('sweep')}",
                  file=sys.stderr)
            sys.exit(PREEMPTED_EXIT_CODE)
        if multirun and _local_sweep():
            # one line for this job; the sweep goes on and ends with a summary and exit code 2 (on_multirun_end)
            num, overrides = _job()
            SWEEP_FAILURES.append((num, overrides, str(e)))
            print(f"error: job {num} ({overrides}) failed: {e}", file=sys.stderr)
            return None
        if multirun:
            raise e  # submitit / Optuna: the sweeper records the failure; other jobs are not lost
        if isinstance(e, Preempted):
            print(f"preempted: {e}; resume with: {resume_command('run')}", file=sys.stderr)
            sys.exit(PREEMPTED_EXIT_CODE)
        fail(str(e))
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # torchrun: leave the process group cleanly
            dist.destroy_process_group()
