"""One way to build a Method from its config node (`_target_` + hyper-parameters), for every experiment family.

- `method_class(cfg, what, accept, choices)`: the class named by `_target_`, or one UserError naming `<what>._target_`.
- `method_hparams(cfg)`: the node minus `_target_`, as a plain (resolved) dict.
- `method_needs(cfg, what, accept, choices)`: `cls.needs_for(hparams)`, what the caller must prepare (see
  `src.methods.base.NEEDS`).
- `build_method(cfg, what, modality=..., student=..., <inputs>...)`: checks the input modality (`modality`, the
  dataset's `DatasetInfo.modality`, against `cls.modalities`; not given: no check) and the hyper-parameters
  (`cls.check`), then calls the constructor with the student, exactly the inputs the class needs, and the optional
  inputs that are given.
- `check_method_node(cfg, key, modality=None)`: the same checks alone, by the node's full config key (preflight,
  on every node; it knows no dataset, so no modality).
- `check_modality(cls, cfg, what, modality)`: one UserError naming the method, the modality and the method
  configs (config/method/*.yaml) that accept it, when `cls` does not handle those inputs.

The callers offer what they have by vocabulary name (`teacher=`, `frozen_student=`, `feature_table=`, ...); a class
that does not need an input does not receive it, and a needed input that the caller did not give is a bug
(ValueError), not a user error.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List, Optional

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from ..errors import UserError
from .base import NEEDS, Method
from .targets import canonical_target

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


METHOD_CONFIGS = Path(__file__).resolve().parents[2] / "config" / "method"
MIXING = ("mixup_alpha", "synth_ratio")  # hyper-parameters that blend or replace images (Method.mix)


def load_method_file(name: str, depth: int = 0) -> dict:
    """config/method/<name>.yaml with its `defaults` (sibling method files) merged in, as a plain dict ({} when
    there is no such file)."""
    f = METHOD_CONFIGS / f"{name}.yaml"
    if depth > 5 or not f.is_file():
        return {}
    own = OmegaConf.to_container(OmegaConf.load(f)) or {}
    out: dict = {}
    for d in own.pop("defaults", None) or []:
        if isinstance(d, str) and d not in ("_self_", "_schema"):
            out.update(load_method_file(d, depth + 1))
    out.update(own)
    return out


def _config_target(name: str) -> Optional[str]:
    """The `_target_` of config/method/<name>.yaml (its `defaults` followed), canonical form."""
    target = load_method_file(name).get("_target_")
    return canonical_target(str(target)) if target else None


def hydra_choice(key: str) -> Optional[str]:
    """The config/method file Hydra composed for the node at `key` (`method`, or `method@parallel_method`), when
    Hydra runs the app; None otherwise (the compose API) or when it chose none."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            choices = HydraConfig.get().runtime.choices
            for k in (key, f"method@{key}"):
                if choices.get(k):
                    return str(choices.get(k))
    except Exception:  # a label for a message: never a second error
        pass
    return None


@functools.lru_cache(maxsize=None)
def method_configs() -> Dict[str, type]:
    """config/method/<name>.yaml -> the Method class its `_target_` names (files that name none are left out)."""
    out = {}
    for f in sorted(METHOD_CONFIGS.glob("*.yaml")):
        target = _config_target(f.stem)
        try:
            cls = get_object(target) if target else None
        except Exception:  # a broken file is the config's own error, reported where it is used
            continue
        if isinstance(cls, type) and issubclass(cls, Method):
            out[f.stem] = cls
    return out


def methods_for(modality: str) -> List[str]:
    """The method configs (config/method/*.yaml names) whose class handles `modality` inputs."""
    return [name for name, cls in method_configs().items() if modality in cls.modalities]


def method_choice(key: str, node) -> Optional[str]:
    """The config/method file the node at `key` came from (`kl_dp_u`): Hydra's choice when Hydra runs the app,
    else (the compose API) the file of the same `_target_` whose settings the node matches best (the only one
    when its class has one file); None when no file names its `_target_`. The one rule that names a method by
    its config, for messages and summaries alike."""
    choice = hydra_choice(key)
    if choice:
        return choice
    try:
        target = canonical_target(str(node.get("_target_", "")))
        best, best_score = None, None
        for name in method_configs():
            d = load_method_file(name)
            if canonical_target(str(d.get("_target_", ""))) != target:
                continue
            keys = [k for k in d if k != "_target_"]
            score = sum(d[k] == node.get(k) for k in keys) - sum(d[k] != node.get(k) for k in keys)
            if best_score is None or score > best_score:
                best, best_score = name, score
        return best
    except Exception:  # a label: never a second error
        return None


def _method_label(cls: type, cfg_method, what: str) -> str:
    """'method=kdep (KDEP)': the node by its config choice (`method_choice`), or by its `_target_`."""
    choice = method_choice(what, cfg_method)
    if choice:
        return f"{what}={choice} ({cls.__name__})"
    return f"{what}._target_={cfg_method.get('_target_')} ({cls.__name__})"


def check_modality(cls: type, cfg_method, what: str = "method", modality: Optional[str] = None) -> None:
    """One UserError when the method class `cls` (of node `cfg_method` at key `what`) does not handle `modality`
    inputs (`cls.modalities`), naming the method configs that do; or when a non-image modality is asked to be
    mixed (mixup_alpha, synth_ratio > 0: `Method.mix` blends float images). `modality` None: no check."""
    if modality is None:
        return
    if modality not in cls.modalities:
        names = methods_for(modality)
        use = f"use one of {', '.join(names)}" if names else "no method config handles them"
        raise UserError(f"{_method_label(cls, cfg_method, what)} does not handle {modality} inputs: {use}")
    if modality != "image":
        hp = method_hparams(cfg_method)
        for k in MIXING:
            v = hp.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                raise UserError(f"{what}.{k}={v} mixes images, which {modality} inputs are not: set {what}.{k}=0")


def check_method_node(node, key: str = "method", modality: Optional[str] = None) -> None:
    """The hyper-parameters of the method node at config key `key` (`_target_` + hyper-parameters), by the class's
    own `check` (HPARAM_RULES, then the class's rules), every message naming `<key>.<hparam>`: what preflight runs
    on every node with a `_target_`; with `modality` (the dataset's) also `check_modality` first. A `_target_`
    that cannot be imported or is no Method is left to the family, which reports it with its choices."""
    try:
        cls = method_class(node, key)
    except UserError:
        return
    check_modality(cls, node, key, modality)
    _check(cls, method_hparams(node), key)


# the script whose runs give a method the input this one lacks
FAMILY_OF_INPUT = {"feature_table": "main_aft.py", "teachers": "main_multi_teacher.py",
                   "generator": "main_zeroshot.py"}


def _refuse_other_family(cls: type, cfg_method, what: str, missing: str, given: set) -> None:
    """A method of another family given to this one (`main_transfer.py method=aft`): one line naming the family
    it belongs to and the method configs this run can build (those that need only the inputs it has). A missing
    input no method config explains is the caller's bug (ValueError)."""
    from ..help import script_methods

    home = FAMILY_OF_INPUT.get(missing)
    if home is None or missing in given:
        raise ValueError(f"{what} {cls.__name__} needs the input '{missing}' but build_method was not given it")
    own = script_methods()
    takes = f"this script takes {what}={', '.join(own)}" if own else "see this script's --help for its methods"
    raise UserError(f"{_method_label(cls, cfg_method, what)} needs a {missing.replace('_', ' ')}: it is a method "
                    f"of {home}; {takes}")


def build_method(cfg_method, what: str = "method", *, accept: Optional[Callable[[type], bool]] = None,
                 choices: str = "", modality: Optional[str] = None, **available) -> Method:
    """The Method of `cfg_method` (`_target_` + hyper-parameters) at config key `what`; with `modality` (the
    dataset's DatasetInfo.modality) it first refuses a method that does not handle those inputs (`check_modality`).

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
    check_modality(cls, cfg_method, what, modality)
    _check(cls, hp, what)
    kwargs = {"student": available.get("student")}
    for name in ["student", *sorted(cls.needs_for(hp) & set(INPUTS))]:
        if available.get(name) is None:
            _refuse_other_family(cls, cfg_method, what, name, {k for k, v in available.items() if v is not None})
        kwargs[INPUTS.get(name, name)] = available[name]
    kwargs.update({k: available[k] for k in OPTIONAL if available.get(k) is not None})
    try:
        return cls(**kwargs, **hp)
    except UserError as e:
        raise _rename(e, what) from e
    except TypeError as e:
        raise UserError(f"cannot build {what} {cls.__name__}: {e}") from e
