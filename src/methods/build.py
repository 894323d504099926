"""One way to build a Method from its config node (`_target_` + hyper-parameters), for every experiment family.

- `method_class(cfg, what, accept, choices)`: the class named by `_target_`, or one UserError naming `<what>._target_`.
- `method_hparams(cfg)`: the node minus `_target_`, as a plain (resolved) dict.
- `method_needs(cfg, what, accept, choices)`: `cls.needs_for(hparams)`, what the caller must prepare (see
  `src.methods.base.NEEDS`).
- `build_method(cfg, what, student=..., <inputs>...)`: checks the hyper-parameters (`cls.check`) and calls the
  constructor with the student, exactly the inputs the class needs, and the optional inputs that are given.
- `check_method_node(cfg, key)`: the same check alone, by the node's full config key (preflight, on every node).

The callers offer what they have by vocabulary name (`teacher=`, `frozen_student=`, `feature_table=`, ...); a class
that does not need an input does not receive it, and a needed input that the caller did not give is a bug
(ValueError), not a user error.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Callable, Dict, FrozenSet, Optional

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from ..errors import UserError
from .base import NEEDS, Method

# needs that are constructor inputs -> the constructor's parameter name (the rest of NEEDS are requirements on
# what the caller prepares: caches with features, a feature table with the student's features)
INPUTS: Dict[str, str] = {"teacher": "teacher", "frozen_student": "frozen_student", "sample_labels": "sample_labels",
                          "feature_table": "features", "teachers": "teachers", "generator": "generator"}
# passed whenever given and not None (Method's **kw takes them)
OPTIONAL = ("teacher_cache", "frozen_student_cache", "teacher_caches", "names", "synth_generator", "synth_seed")
assert set(INPUTS) <= NEEDS


def method_hparams(cfg_method) -> dict:
    """The hyper-parameters of a method node: every key but `_target_`, resolved, as a plain dict."""
    if cfg_method is None:
        return {}
    d = OmegaConf.to_container(cfg_method, resolve=True) if OmegaConf.is_config(cfg_method) else dict(cfg_method)
    return {k: v for k, v in d.items() if k != "_target_"}


def method_class(cfg_method, what: str = "method", accept: Optional[Callable[[type], bool]] = None,
                 choices: str = "") -> type:
    """The Method subclass named by `cfg_method._target_`; one UserError naming `<what>._target_` (and `choices`,
    e.g. 'method=aft, aft_kd, ...') when it is missing, cannot be imported, is not a Method, or `accept(cls)` is
    false (the family takes other methods)."""
    use = f": use {choices}" if choices else ""
    target = cfg_method.get("_target_") if isinstance(cfg_method, (DictConfig, Mapping)) else None
    if not target:
        raise UserError(f"{what} has no _target_{use}")
    try:
        cls = get_object(str(target))
    except Exception as e:  # ImportError, AttributeError, ValueError: hydra's message names what is missing
        raise UserError(f"{what}._target_={target} cannot be imported ({str(e).splitlines()[0]}){use}") from e
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise UserError(f"{what}._target_={target} is not a Method (a class of src/methods, e.g. src.methods.KL)"
                        f"{use}")
    if accept is not None and not accept(cls):
        raise UserError(f"{what}._target_={target}: {cls.__name__} is not a method of this family{use}")
    return cls


def method_needs(cfg_method, what: str = "method", accept: Optional[Callable[[type], bool]] = None,
                 choices: str = "") -> FrozenSet[str]:
    """What the method of `cfg_method` needs beyond its student under its hyper-parameters (`Method.needs_for`)."""
    return method_class(cfg_method, what, accept, choices).needs_for(method_hparams(cfg_method))


def _rename(e: UserError, what: str) -> UserError:
    """The error of a check with its `method.<key>` names as `<what>.<key>` (the node's full config key)."""
    return UserError(re.sub(r"\bmethod\.", f"{what}.", str(e))) if what != "method" else e


def _check(cls: type, hp: dict, what: str) -> None:
    """`cls.check(**hp)`, its message naming `<what>.<key>`; a TypeError (a value of the wrong type that a class
    rule compares) is the config's too."""
    try:
        cls.check(**hp)
    except UserError as e:
        raise _rename(e, what) from e
    except TypeError as e:
        raise UserError(f"cannot build {what} {cls.__name__}: {e}") from e


def check_method_node(node, key: str = "method") -> None:
    """The hyper-parameters of the method node at config key `key` (`_target_` + hyper-parameters), by the class's
    own `check` (HPARAM_RULES, then the class's rules), every message naming `<key>.<hparam>`: what preflight runs
    on every node with a `_target_`. A `_target_` that cannot be imported or is no Method is left to the family,
    which reports it with its choices."""
    try:
        cls = method_class(node, key)
    except UserError:
        return
    _check(cls, method_hparams(node), key)


def build_method(cfg_method, what: str = "method", *, accept: Optional[Callable[[type], bool]] = None,
                 choices: str = "", **available) -> Method:
    """The Method of `cfg_method` (`_target_` + hyper-parameters) at config key `what`.

    `available`: `student` and the inputs the caller has, by their names in `NEEDS` (teacher, frozen_student,
    sample_labels, feature_table, teachers, generator) plus the optional ones (teacher_cache,
    frozen_student_cache, teacher_caches, names, synth_generator, synth_seed). The constructor gets the student,
    exactly the inputs in `cls.needs_for(hparams)` and the optional inputs that are not None. UserError: a bad
    `_target_` or hyper-parameter (`cls.check`), or a constructor that refuses the keys (TypeError). ValueError: a
    needed input is missing (the caller's bug)."""
    cls = method_class(cfg_method, what, accept, choices)
    hp = method_hparams(cfg_method)
    odd = sorted(set(available) - {"student", *INPUTS, *OPTIONAL})
    if odd:
        raise TypeError(f"build_method got unknown inputs {odd}: offer {['student', *INPUTS, *OPTIONAL]}")
    _check(cls, hp, what)
    kwargs = {"student": available.get("student")}
    for name in ["student", *sorted(cls.needs_for(hp) & set(INPUTS))]:
        if available.get(name) is None:
            raise ValueError(f"{what} {cls.__name__} needs the input '{name}' but build_method was not given it")
        kwargs[INPUTS.get(name, name)] = available[name]
    kwargs.update({k: available[k] for k in OPTIONAL if available.get(k) is not None})
    try:
        return cls(**kwargs, **hp)
    except UserError as e:
        raise _rename(e, what) from e
    except TypeError as e:
        raise UserError(f"cannot build {what} {cls.__name__}: {e}") from e
