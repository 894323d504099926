"""The command line of scripts/: bad input is ONE line `error: <what is wrong, the bad value and the fix>` on stderr and
exit code 2, as for the main_*.py scripts (src/entry.py), never a traceback or argparse's usage dump.

- `ArgumentParser`: argparse with a one-line `error()` (its own messages, e.g. an unknown option or an invalid
  choice, are kept, prefixed `error:`), and number types that name the flag, the value and the allowed range:
  `positive_int`, `non_negative_int`, `int_in_range(lo, hi)`, `positive_float`, `non_negative_float`,
  `in_range_float(lo, hi)`, e.g. `error: argument --batch-size: 0 must be >= 1 (use e.g. --batch-size 64)`.
- `run_script(main)`: a decorator for a script's main: a `UserError` or a Hydra / OmegaConf composition error
  (an unknown config group option or key in the key=value overrides) becomes one line and exit code 2 (the
  traceback too with `KT_DEBUG=1`); any other exception is a bug and keeps its traceback.
- `check_out_path(path, flag)`, `check_device(name, flag)`: an output path below a regular file or in a folder
  that is not writable, an unknown device, absent CUDA or a CUDA index past the visible GPUs: one UserError line.

The SystemExit raised for bad input (`BadInput`) has exit code 2 and the message as its text, so an in-process
caller (the tests) can match on it: `pytest.raises(SystemExit, match="must be >= 1")`.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import math
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

from .errors import USER_ERROR_EXIT_CODE, UserError, closest, debug_enabled


class BadInput(SystemExit):
    """Exit code 2 after the one `error:` line was printed; str() is the message."""

    def __init__(self, message: str):
        super().__init__(USER_ERROR_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def fail(message: str):
    """Print `error: <message>` (one line) on stderr and exit with code 2 (raises BadInput)."""
    message = one_line(message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise BadInput(message)


# ------------------------------------------------------------------------------------------------ number types


def _fmt(v) -> str:
    return "inf" if v == math.inf else f"{v:g}" if isinstance(v, float) else str(v)


class Number:
    """An argparse `type`: an int or a finite float with lo <= v <= hi (lo < v with `lo_open`). `ArgumentParser`
    tells it its flag and default (`bind`), so the message can say `use e.g. <flag> <example>`."""

    def __init__(self, kind: type, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
                 example=None, flag: Optional[str] = None):
        self.kind, self.lo, self.hi, self.lo_open = kind, lo, hi, lo_open
        self.example, self.flag = example, flag
        self.__name__ = "integer" if kind is int else "number"  # argparse names a type by it

    def ok(self, v) -> bool:
        return (v > self.lo if self.lo_open else v >= self.lo) and v <= self.hi

    def rule(self) -> str:
        if self.hi != math.inf:
            return f"in [{_fmt(self.lo)}, {_fmt(self.hi)}]"
        return f"{'>' if self.lo_open else '>='} {_fmt(self.lo)}"

    def fix(self) -> str:
        if self.example is None:
            return ""
        return f" (use e.g. {self.flag} {self.example})" if self.flag else f" (use e.g. {self.example})"

    def bind(self, flag: Optional[str], default) -> "Number":
        """A copy that knows its flag; its example is the given one, else a valid default, else the nearest
        valid number."""
        example = self.example
        if example is None and isinstance(default, (int, float)) and not isinstance(default, bool) \
                and self.ok(default):
            example = default
        if example is None:
            example = self.kind(self.lo + (1 if self.lo_open else 0)) if self.lo != -math.inf else 0
        return Number(self.kind, self.lo, self.hi, self.lo_open, example, flag)

    def __call__(self, text: str):
        try:
            v = self.kind(text)
        except (TypeError, ValueError):
            what = "an integer" if self.kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}{self.fix()}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text} must be a finite number {self.rule()}{self.fix()}")
        if not self.ok(v):
            raise argparse.ArgumentTypeError(f"{text} must be {self.rule()}{self.fix()}")
        return v

    def __repr__(self) -> str:
        return f"{self.__name__} {self.rule()}"


def positive_int(example=None) -> Number:
    """An integer >= 1."""
    return Number(int, 1, example=example)


def non_negative_int(example=None) -> Number:
    """An integer >= 0."""
    return Number(int, 0, example=example)


def int_in_range(lo: int, hi: Optional[int] = None, example=None) -> Number:
    """An integer in [lo, hi] (no upper bound when hi is None)."""
    return Number(int, lo, math.inf if hi is None else hi, example=example)


def positive_float(example=None) -> Number:
    """A finite number > 0."""
    return Number(float, 0.0, lo_open=True, example=example)


def non_negative_float(example=None) -> Number:
    """A finite number >= 0."""
    return Number(float, 0.0, example=example)


def in_range_float(lo: float, hi: float, example=None) -> Number:
    """A finite number in [lo, hi]."""
    return Number(float, lo, hi, example=example)


FACTORIES = (positive_int, non_negative_int, positive_float, non_negative_float)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, whose errors are one line (`error: ...`, exit code 2) and whose number types name their flag."""

    def add_argument(self, *args, **kwargs):
        if kwargs.get("type") in FACTORIES:  # `type=positive_int` without the call: same as positive_int()
            kwargs["type"] = kwargs["type"]()
        action = super().add_argument(*args, **kwargs)
        if isinstance(action.type, Number):
            flag = max(action.option_strings, key=len) if action.option_strings else None
            action.type = action.type.bind(flag, action.default)
        return action

    def error(self, message: str):
        fail(message)


# ------------------------------------------------------------------------------------------------- run_script


def composition_error(e: BaseException) -> Optional[str]:
    """One line for a Hydra / OmegaConf error about the composed config (an unknown group option or key, a value of
    the wrong type, a bad override), naming the override; None for anything else."""
    try:
        from hydra.errors import HydraException, MissingConfigException, OverrideParseException
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:  # pragma: no cover - hydra is a requirement
        return None
    if isinstance(e, MissingConfigException) and e.options is not None and e.missing_cfg_file:
        group, _, name = str(e.missing_cfg_file).rpartition("/")
        options = sorted(o for o in e.options if not o.startswith("_"))
        return (f"{group}={name}: there is no config '{e.missing_cfg_file}'{closest(name, options)}: use one of "
                f"{', '.join(f'{group}={o}' for o in options)}")
    if isinstance(e, OverrideParseException):
        return (f"override '{e.override}' cannot be parsed: {_first_lines(e)}: check its quoting (e.g. "
                f"'key=[a,b]' in single quotes)")
    unknown = _unknown_key(e.__cause__ if isinstance(e, HydraException) else e)
    if unknown:
        return unknown
    if isinstance(e, OmegaConfBaseException):
        return _first_lines(e)
    if isinstance(e, HydraException):
        cause = e.__cause__
        extra = f" ({_first_lines(cause, key=False)})" if isinstance(cause, OmegaConfBaseException) else ""
        return _first_lines(e) + extra
    return None


def _unknown_key(cause) -> Optional[str]:
    """An override of a key the config does not have (`optimizer.lrr=1`): the closest existing keys of that node,
    never `+optimizer.lrr` (Hydra's advice, which would add the typo as a new key); `+key` only without a near
    name."""
    key, parent = getattr(cause, "full_key", None), getattr(cause, "parent_node", None)
    if not key or parent is None or "not in" not in str(cause):
        return None
    names = [str(k) for k in parent.keys()]
    prefix, leaf = (key.rsplit(".", 1)[0] + ".", key.rsplit(".", 1)[1]) if "." in key else ("", key)
    near = [n for n in difflib.get_close_matches(leaf, names, n=3, cutoff=0.6)]
    there = f"the keys there: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}"
    if near:
        return f"unknown key '{key}' (closest: {', '.join(prefix + n for n in near)}): check the spelling ({there})"
    return f"unknown key '{key}' ({there}): check the spelling, or add a new key with +{key}=<value>"


def _first_lines(e: BaseException, key: bool = True) -> str:
    """The message of a Hydra / OmegaConf error up to its search-path listing / `full_key:` details, on one line
    (with `key`, the full key is kept)."""
    lines = []
    for line in str(e).splitlines():
        if line.strip().startswith(("Config search path", "See https://")):
            break
        if line.startswith("    full_key:") or line.startswith("    object_type") or line.startswith(
                "    reference_type"):
            continue
        lines.append(line)
    text = one_line("\n".join(lines)) or type(e).__name__
    full_key = getattr(e, "full_key", None) if key else None
    return f"{text} (key {full_key})" if full_key and str(full_key) not in text else text


def run_script(main: Callable) -> Callable:
    """Decorator for a script's main: UserError and composition errors -> one `error:` line, exit code 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - only bad input is turned into a line
            from .io_utils import as_user_error

            e = as_user_error(e)  # a full disk: one line naming the path
            message = str(e) if isinstance(e, UserError) else composition_error(e)
            if message is None:
                raise  # a bug: keep its traceback
            if debug_enabled():
                traceback.print_exc()
            fail(message)

    return wrapped


# ------------------------------------------------------------------------------------------- paths and devices


def check_out_path(path, flag: str, folder: bool = True) -> Path:
    """`path` (an output folder, or with folder=False an output file) when it can be created and written; else one
    UserError naming the part of the path in the way: a regular file in its parent chain, a folder that is not
    writable, or (for a file) a folder at the path itself. Creates nothing."""
    from .io_utils import os_reason, write_probe

    path = Path(path)
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a regular file, not a folder: move it away or pick another {flag}")
    if not folder and os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder: give a file path, e.g. {flag} {path / 'out.json'}")
    start = path if folder else path.parent
    for p in [start, *start.parents]:
        if not os.path.exists(p):
            continue
        if not os.path.isdir(p):
            raise UserError(f"{flag} {path} cannot be created: {p} is a regular file, not a folder: move it away or "
                            f"pick another {flag}")
        denied = write_probe(p)
        if denied is not None:
            raise UserError(f"{flag} {path} cannot be written: {p} is not writable by you ({os_reason(denied)}): "
                            f"fix its permissions or pick another {flag}")
        break
    return path


DEVICE = re.compile(r"(cpu|cuda)(?::(\d+))?")


def check_device(name, flag: str = "--device", auto: bool = False, cpu_fix: Optional[str] = None):
    """torch.device(name) for cpu, cuda or cuda:<index> (and `auto` = cuda when there is one, else cpu, when
    `auto`); one UserError for anything else, for cuda without CUDA and for an index past the visible GPUs.
    `cpu_fix` replaces the suggested `use <flag> cpu`."""
    import torch

    text = str(name).strip()
    if auto and text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = DEVICE.fullmatch(text)
    known = ["cpu", "cuda", "cuda:0"] + (["auto"] if auto else [])
    if m is None:
        raise UserError(f"{flag} {text!r} is not a device{closest(text, known)}: use "
                        f"{'auto, ' if auto else ''}cpu, cuda or cuda:<index>")
    fix = cpu_fix or f"use {flag} cpu"
    if m.group(1) == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {text}: CUDA is not available here (torch {torch.__version__}, no GPU "
                            f"visible): {fix}")
        n = torch.cuda.device_count()
        if m.group(2) is not None and int(m.group(2)) >= n:
            visible = "cuda:0" + (f" to cuda:{n - 1}" if n > 1 else "")
            raise UserError(f"{flag} {text}: only {n} CUDA device(s) visible ({visible}): use {flag} cuda:0")
    return torch.device(text)
