"""Preemption signals, shared by the entry point (src/entry.py) and the Trainer.

SIGTERM and SIGUSR1 (SLURM's `--signal` warning) stop a run cleanly: a Trainer finishes its step and checkpoints,
then `Preempted` ends the run (exit code 124 outside a sweep); rerunning the same command resumes.

Inside a submitit job (hydra/launcher=slurm or local) submitit has its own handler on its preemption signal
(USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise): it asks the launcher for a checkpoint of the job and
requeues it (`scontrol requeue` on SLURM, a restart by the local controller). We take that signal over too, so the
step in flight finishes and is checkpointed first, and then hand the signal back to submitit's handler
(`hand_over`), which requeues; the requeued job runs the same overrides in the same sweep sub-dir and the Trainer
resumes there (or, past hydra.launcher.max_num_timeout, submitit's handler raises instead and the entry point
turns that into error.json). SIGTERM keeps submitit's own handler out of it (submitit ignores SIGTERM by design).
Verified against a real SLURM in tests/test_slurm.py (scancel --signal=USR2, partition preemption)."""
from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional

log = logging.getLogger(__name__)

# Set by the entry point's handler, so a signal that arrives between two trainers (multi-stage runs, zoo models
# trained on the fly) still stops the next one at once.
STOP_REQUESTED = threading.Event()
_received: Dict[str, Optional[int]] = {"signum": None}


def submitit_signal() -> Optional[int]:
    """The signal submitit requeues on, when this process is a submitit job that installed its handler, else None."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    signum = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    if signum is None:
        return None
    return signum if _is_submitits(signal.getsignal(signum)) else None


def _is_submitits(handler) -> bool:
    """Whether a signal handler is a method of submitit's SignalHandler."""
    return type(getattr(handler, "__self__", None)).__module__.startswith("submitit")


_taken: set = set()  # submitit signals that one of our handlers holds right now (nested installs keep them)


def signals() -> tuple:
    extra = submitit_signal()  # may be SIGUSR1 itself (SUBMITIT_PREEMPT_SIGNAL=USR1): listed once
    extras = (_taken | ({extra} if extra is not None else set())) - {signal.SIGTERM, signal.SIGUSR1}
    return (signal.SIGTERM, signal.SIGUSR1) + tuple(sorted(extras))


def record(signum: int) -> None:
    _received["signum"] = signum


def received() -> Optional[int]:
    return _received["signum"]


@contextmanager
def handling(handler: Callable) -> Iterator[Dict[int, object]]:
    """Install `handler` on the preemption signals (main thread only); yields the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield {}
        return
    sigs = signals()
    taken = set(sigs) - {signal.SIGTERM, signal.SIGUSR1} - _taken
    old = {s: signal.signal(s, handler) for s in sigs}
    _taken.update(taken)
    try:
        yield old
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _taken.difference_update(taken)


def reset() -> None:
    STOP_REQUESTED.clear()
    _received["signum"] = None


def hand_over(previous: Dict[int, object]) -> None:
    """After the checkpoint: give submitit's preemption signal back to submitit's handler, which requeues the job
    (it exits the process). A no-op for other signals and outside submitit."""
    signum = received()
    handler = previous.get(signum) if signum is not None else None
    if signum is None or not callable(handler) or not _is_submitits(handler):
        return
    log.warning("checkpoint saved; handing signal %d to submitit, which requeues this job", signum)
    signal.signal(signum, handler)
    handler(signum, None)
