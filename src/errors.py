"""User-facing errors: one clear line naming the bad value and the fix.

Anything raised as :class:`UserError` is printed as a single line by `src.entry.entry` (the one entry
of every main script and of scripts/; full traceback only with ``KT_DEBUG=1``) and the process exits with code 2.
Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import difflib
import math
import os
from typing import Callable, Iterable, Optional


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


# ---------------------------------------------------------------------------------------------- numeric rules
# A rule is (ok, fix): `ok(v)` says whether number v is valid; `fix` completes "<key>=<v> ..." and may name the full
# key as `{k}` (e.g. "must be > 0: use e.g. {k}=0.1"). The config checks (src/experiments/preflight.py) and the
# methods' hyper-parameter table (src/methods/base.py: HPARAM_RULES) are written with these.
Rule = Callable[[float], bool]


def in_range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Rule:
    """The rule lo <= v <= hi; `lo_open` / `hi_open` make that end strict."""
    def ok(v):
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    return ok


POSITIVE: Rule = in_range(0, math.inf, lo_open=True)
NON_NEGATIVE: Rule = in_range(0, math.inf)
AT_LEAST_ONE: Rule = in_range(1, math.inf)


def is_number(v) -> bool:
    """An int or a float, not a bool (YAML's true / false are no numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bad(key: str, v, fix: str):
    raise UserError(f"{key}={v} {fix.format(k=key)}")


def check_number(key: str, v, ok: Optional[Rule] = None, fix: str = "", require: bool = False) -> None:
    """One UserError `<key>=<v> <fix>` when number `v` is not finite or `ok(v)` is false. A value that is not a
    number is skipped, unless `require` (then None still counts as not given, anything else is refused)."""
    if not is_number(v):
        if require and v is not None:
            _bad(key, repr(v) if isinstance(v, str) else v,
                 "must be a number" + (f" ({fix.format(k=key)})" if fix else ""))
        return
    if not math.isfinite(v):
        _bad(key, v, "must be a finite number" + (f" ({fix.format(k=key)})" if fix else ""))
    if ok is not None and not ok(v):
        _bad(key, v, fix)
