"""User-facing errors: one clear line naming the bad value and the fix.

Anything raised as :class:`UserError` is printed as a single line by `src.entry.entry` (the one entry
of every main script and of scripts/; full traceback only with ``KT_DEBUG=1``) and the process exits with code 2.
Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import difflib
import os
from typing import Iterable


class UserError(ValueError):
    """Bad input from the user: the message names the bad value and the fix."""


class Preempted(RuntimeError):
    """Raised after a checkpoint was written because SIGTERM/SIGUSR1 asked the run to stop."""


# Exit code used after a preemption checkpoint; submitit requeues on its own signal handling, plain SLURM
# scripts can `scontrol requeue` on it.
PREEMPTED_EXIT_CODE = 124
USER_ERROR_EXIT_CODE = 2


def closest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """' (closest: a, b)' or '' : a suffix for error messages."""
    choices = sorted(set(choices))
    near = difflib.get_close_matches(str(name), choices, n=n, cutoff=0.5)
    if not near:
        near = [c for c in choices if str(name).lower() in c.lower()][:n]
    return f" (closest: {', '.join(near)})" if near else ""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


def debug_enabled() -> bool:
    return os.environ.get("KT_DEBUG", "0") not in ("", "0", "false", "False")
