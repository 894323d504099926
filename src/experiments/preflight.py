"""Cheap checks of a composed config, run before any data, model or training work: numeric ranges by their full
key (also where a group recurs: finetune.*, few_shot.*, zoo recipes), every method node's hyper-parameters, paths,
and the model names each role gives. Each failure is one UserError naming the value and the fix."""
from __future__ import annotations

import functools
import math
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..data.loaders import loader_dtype
from ..errors import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, UserError, check_number, in_range
from ..methods.base import TEMPERATURE
from ..methods.build import check_method_node
from ..models.spec import ModelSpec
from ..schema import as_dict


def _num(node, key):
    v = node.get(key) if node is not None and hasattr(node, "get") else None
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# (key, ok, fix) per config group; `{k}` in a fix is the full key. Applied to the group at the top level and at
# every nested place it recurs (finetune.*, few_shot.*, zoo recipes).
GROUP_RULES = {
    "optimizer": [("lr", POSITIVE, "must be > 0: use e.g. {k}=0.1"),
                  ("weight_decay", NON_NEGATIVE, "must be >= 0: use e.g. {k}=5e-4"),
                  ("momentum", in_range(0, 1, hi_open=True), "must be in [0, 1): use e.g. {k}=0.9")],
    "scheduler": [("warmup_epochs", NON_NEGATIVE, "must be >= 0: use e.g. {k}=1 (or 0 for no warm-up)"),
                  ("step_size", POSITIVE, "must be > 0 (epochs between decays): use e.g. {k}=30"),
                  ("gamma", in_range(0, 1, lo_open=True), "must be in (0, 1] (the lr factor at each step): use e.g. "
                                                     "{k}=0.1"),
                  ("min_lr_ratio", in_range(0, 1), "must be in [0, 1] (the cosine floor as a fraction of the lr): use "
                                              "e.g. {k}=0")],
    "loader": [("batch_size", POSITIVE, "must be > 0: use e.g. {k}=128"),
               ("eval_batch_size", POSITIVE, "must be > 0: use e.g. {k}=512"),
               ("num_workers", NON_NEGATIVE, "must be >= 0: use e.g. {k}=4 (0: load in the main process)"),
               ("crop_padding", NON_NEGATIVE, "must be >= 0 (pixels of padding for the random crop): use e.g. {k}=4")],
    "trainer": [("max_steps", POSITIVE, "must be > 0 (or null to train for trainer.epochs)"),
                ("seed", NON_NEGATIVE, "must be >= 0: use e.g. {k}=0"),
                ("eval_every", AT_LEAST_ONE, "must be >= 1 (epochs between evaluations): use e.g. {k}=1"),
                ("eval_every_steps", AT_LEAST_ONE, "must be >= 1 or null: use e.g. {k}=100"),
                ("ckpt_every_steps", AT_LEAST_ONE, "must be >= 1 or null: use e.g. {k}=500"),
                ("grad_clip", POSITIVE, "must be > 0 or null: use e.g. {k}=5"),
                ("keep_checkpoints", AT_LEAST_ONE, "must be >= 1: use e.g. {k}=1")],
}
CHOICES = {"trainer": {"amp": ("none", "bf16", "fp16"), "progress": ("auto", "on", "off")},
           "loader": {"verify": ("full", "sample", "none")}}
RECIPE_RULES = [("epochs", POSITIVE, "must be > 0: use e.g. {k}=30"),
                ("batch_size", POSITIVE, "must be > 0: use e.g. {k}=64"),
                ("crop_padding", NON_NEGATIVE, "must be >= 0: use e.g. {k}=1"), ("seed", NON_NEGATIVE, "must be >= 0"),
                ("label_smoothing", in_range(0, 1, hi_open=True), "must be in [0, 1): use e.g. {k}=0.1")]


# the families' own on/off keys (untyped top-level keys of config/<family>/*.yaml and the zoo groups):
# `cka=maybe` composed as the string 'maybe', which is truthy, and ran CKA. tests/test_config.py checks that
# every boolean top-level key of the shipped configs is listed here.
FLAGS = ("cka", "kl", "use_cache", "save_student", "skip_existing", "freeze_backbone", "allow_same_pair",
         "cache_train_outputs", "use_val", "soup_recompute_bn", "zoo.train_missing")


CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
PRIMARY = {"prediction_flips": "prediction_flips/flips.yaml"}  # else <task>/<task>.yaml


@functools.lru_cache(maxsize=None)
def required_keys(task: str) -> tuple:
    """The top-level keys a family's primary config defines: its own keys and its config groups (`/method: kl`
    -> method). A run needs all of them; `~teacher` on the command line deletes one. Read once per process."""
    f = CONFIG_DIR / PRIMARY.get(task, f"{task}/{task}.yaml")
    if not f.is_file():
        return ()
    body = OmegaConf.to_container(OmegaConf.load(f), resolve=False) or {}
    groups = [next(iter(d)).lstrip("/").split("@")[-1] for d in body.get("defaults", []) if isinstance(d, dict)]
    return tuple(k for k in [*groups, *body] if k not in ("defaults", "hydra"))


def check_required(cfg) -> None:
    """A key the family needs that the command line deleted (`~top_p`) fails now, not mid-run."""
    task = cfg.get("task")
    missing = [k for k in required_keys(str(task)) if k not in cfg] if task else []
    if missing:
        k = missing[0]
        raise UserError(f"{k} is required by this run's config ({PRIMARY.get(task, f'{task}/{task}.yaml')}) but was "
                        f"deleted (~{k}): drop ~{k} from the command line, or give it a value ({k}=...)")


def check_device(name, key: str = "trainer.device") -> None:
    """`trainer.device=bogus` was a torch traceback: auto, cpu, cuda, cuda:<visible index>, mps or any torch
    device type, else one line."""
    import torch

    if name in (None, "auto"):
        return
    try:
        d = torch.device(str(name))
    except (RuntimeError, ValueError):
        raise UserError(f"{key}={name!r} is not a device: use {key}=auto, cpu, cuda or cuda:<index>") from None
    if d.type == "cuda" and torch.cuda.is_available() and d.index is not None and d.index >= torch.cuda.device_count():
        raise UserError(f"{key}={name}: only {torch.cuda.device_count()} GPU(s) are visible: use {key}=cuda:0 "
                        f"(or {key}=auto)")


def check_flags(cfg) -> None:
    for key in FLAGS:
        v = OmegaConf.select(cfg, key, default=None)
        if v is not None and not isinstance(v, bool):
            raise UserError(f"{key}={v} must be true or false: use {key}=true or {key}=false")


def _check_rules(node, prefix: str, rules) -> None:
    if not isinstance(node, (DictConfig, dict)):
        return
    for key, ok, fix in rules:
        if key in node:
            check_number(f"{prefix}.{key}" if prefix else key, node.get(key), ok, fix)


def check_group(node, group: str, prefix: str) -> None:
    """The range rules of config group `group` on `node` (found at key `prefix`), every float finite."""
    if not isinstance(node, (DictConfig, dict)):
        return
    _check_rules(node, prefix, GROUP_RULES.get(group, []))
    for k, choices in CHOICES.get(group, {}).items():
        if k in node and node.get(k) not in choices:
            raise UserError(f"{prefix}.{k}='{node.get(k)}' is unknown: use one of {', '.join(choices)}")
    for k in node:
        check_number(f"{prefix}.{k}", node.get(k))
    if group == "optimizer" and node.get("betas") is not None:
        b = list(node.get("betas"))
        if len(b) != 2 or not all(isinstance(x, (int, float)) and 0 <= x < 1 for x in b):
            raise UserError(f"{prefix}.betas={b} must be two numbers in [0, 1): use e.g. {prefix}.betas=[0.9,0.999]")
    if group == "trainer" and node.get("max_steps") is None and "epochs" in node:
        check_number(f"{prefix}.epochs", node.get("epochs"), POSITIVE, "must be > 0: use e.g. {k}=10")


def _method_nodes(node, prefix: str = ""):
    """(full key, node) of every config node with a `_target_` below `node` (zoo and hydra excluded)."""
    if not isinstance(node, DictConfig):
        return
    if "_target_" in node and prefix:
        yield prefix, node
    for k in node:
        if not prefix and k in ("zoo", "hydra"):
            continue
        try:
            child = node.get(k)
        except Exception:  # an interpolation that cannot be resolved here: composition reports it
            continue
        if isinstance(child, DictConfig):
            yield from _method_nodes(child, f"{prefix}.{k}" if prefix else str(k))


def check_dataset(d) -> None:
    if d is None:
        return
    for k in ("mean", "std"):
        vals = d.get(k)
        if vals is None:
            continue
        vals = list(vals)
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in vals) or \
                (k == "std" and any(v <= 0 for v in vals)):
            pos = " > 0 (a 0 divides by zero)" if k == "std" else ""
            raise UserError(f"dataset.{k}={vals} must be finite numbers{pos}: use the dataset's per-channel {k}, "
                            f"e.g. dataset.{k}=[0.25]")
    _check_rules(d, "dataset", [("val_fraction", in_range(0, 1, hi_open=True), "must be in [0, 1): use e.g. {k}=0.1"),
                                ("crop_pct", in_range(0, 1, lo_open=True), "must be in (0, 1]: use e.g. {k}=0.875"),
                                ("image_size", POSITIVE, "must be > 0"), ("channels", POSITIVE, "must be > 0"),
                                ("num_classes", POSITIVE, "must be > 0")])


def check_zoo(cfg) -> None:
    z = cfg.get("zoo")
    if not isinstance(z, DictConfig):
        return
    entries = [("zoo.train", z.get("train"))] + [(f"zoo.models.{m}", z.models.get(m)) for m in (z.get("models") or {})]
    for prefix, node in entries:
        if not isinstance(node, DictConfig):
            continue
        _check_rules(node, prefix, RECIPE_RULES)
        arch = node.get("arch") if prefix != "zoo.train" else None
        if arch is not None:
            from ..models.factory import check_kwargs

            check_kwargs(str(arch), as_dict(node.get("kwargs")), f"{prefix}.kwargs")
        for group in ("optimizer", "scheduler"):
            check_group(node.get(group), group, f"{prefix}.{group}")


def check_family_method(cfg: DictConfig) -> None:
    """`main_transfer.py method=kdep`: a method of another family fails here, in one line naming the family it
    belongs to and this family's method configs (by class: an edited copy of kl_dp is still KLDP)."""
    from ..help import FAMILIES, script_methods
    from ..methods.build import method_class, method_choice, method_configs

    script = f"main_{cfg.get('task')}.py"
    own = script_methods(script)
    if not own or not OmegaConf.is_dict(cfg.get("method")) or not cfg.method.get("_target_"):
        return
    try:
        cls = method_class(cfg.method)
    except UserError:
        return  # a bad _target_: the family reports it with its choices
    configs = method_configs()
    if cls in {configs[n] for n in own}:
        return
    home = [s for s in FAMILIES if cls in {configs[n] for n in script_methods(s)}]
    where = f"it is a method of {' and '.join(home)}" if home else "no family script takes it"
    raise UserError(f"method={method_choice('method', cfg.method)} ({cls.__name__}): {where}; {script} takes "
                    f"method={', '.join(own)}")


def preflight(cfg: DictConfig) -> None:
    """Cheap checks of the values every family shares, run by `setup` before any data, model or training work:
    numeric ranges (finite, by their full key, also where a group recurs: finetune.*, few_shot.*, zoo recipes),
    temperatures and other hyper-parameters of every method node, paths that must stay in their root, and the
    model names in `teacher` / `student` / `teachers` / `models` (so a typo fails in a second, not after the zoo
    models were trained). Each failure is one UserError naming the value and the fix. Families with keys of their
    own add their checks in their `validate`."""
    check_required(cfg)
    check_family_method(cfg)
    check_device((cfg.get("trainer") or {}).get("device"))
    for prefix in ("", "finetune", "few_shot"):
        base = cfg if not prefix else cfg.get(prefix)
        if not isinstance(base, DictConfig):
            continue
        for group in GROUP_RULES:
            check_group(base.get(group), group, f"{prefix}.{group}" if prefix else group)
    _check_rules(cfg, "", [("top_p", in_range(0, 100, lo_open=True), "must be in (0, 100]: use e.g. top_p=20"),
                           ("temperature", TEMPERATURE[0], TEMPERATURE[1].replace("{k}=4", "{k}=1.0")),
                           ("label_smoothing", in_range(0, 1, hi_open=True), "must be in [0, 1): use e.g. {k}=0.1")])
    sub = cfg.get("dataset", {}).get("subset") if cfg.get("dataset") is not None else None
    _check_rules(sub, "dataset.subset", [("fraction", in_range(0, 1, lo_open=True), "is outside (0, 1]: use e.g. 0.1"),
                                         ("per_class", POSITIVE, "must be > 0: use e.g. 128")])
    check_dataset(cfg.get("dataset"))
    check_flags(cfg)
    for key, node in _method_nodes(cfg):
        check_method_node(node, key)  # the method's own check (src/methods/base.py: HPARAM_RULES), by full key
    check_zoo(cfg)
    zoo_seed(cfg)  # a bad zoo.seed: one UserError
    ld = cfg.get("loader")
    if ld is not None:
        loader_dtype(ld.get("dtype", "float32"))  # an unknown name: one UserError naming it and the choices
    check_paths(cfg)
    for role in ("teacher", "student", "teachers", "models", "model"):
        spec = cfg.get(role)
        for i, s in enumerate(spec if OmegaConf.is_list(spec) or isinstance(spec, (list, tuple)) else [spec]):
            if isinstance(s, str) or (isinstance(s, DictConfig) and s.get("arch") is not None):
                check_model_spec(s, cfg, role if role not in ("teachers", "models") else f"{role}[{i}]")


def check_paths(cfg) -> None:
    """`save_as` is a name inside paths.checkpoints/<dataset>/ (never a path out of it); order_split is never the
    test split; soup_runs paths exist."""
    name = cfg.get("save_as")
    if name is not None:
        n = str(name)
        if not n or n in (".", "..") or Path(n).name != n or "\\" in n:
            raise UserError(f"save_as='{n}' must be a plain name (the model goes to <paths.checkpoints>/<dataset>/"
                            f"<save_as>/): use e.g. save_as=my_mlp")
        zoo = cfg.get("zoo") or {}
        taken = [*(zoo.get("models") or {}), *(zoo.get("generators") or {})]
        if n in taken or re.fullmatch(r"zoo_seed\d+", n):
            what = "the folder of another zoo draw" if n not in taken else "a model of this dataset's zoo"
            raise UserError(f"save_as={n} is {what} (<paths.checkpoints>/<dataset>/{n}/): saving there would "
                            f"replace it; pick a name the zoo does not use, e.g. save_as={n}_mine (zoo: "
                            f"{', '.join(taken)})")
    d = cfg.get("dataset")
    if cfg.get("order_split") is not None and d is not None and str(cfg.order_split) == str(d.get("test_split")):
        val = d.get("val_split")  # ImageNet (val_fraction 0) has none besides test: its val_split is test
        fix = (f"order_split={val} (the validation split)" if str(val) != str(cfg.order_split) else
               f"dataset.val_fraction=0.02 order_split=val (dataset={d.get('name')} has no validation split but "
               f"test: hold 2% of train out as one)")
        raise UserError(f"order_split={cfg.order_split} is the test split: ordering teachers by test accuracy leaks "
                        f"it; use {fix}")
    runs = cfg.get("soup_runs")
    if isinstance(runs, DictConfig):
        for t, p in runs.items():
            if p is not None and not Path(str(p)).is_dir():
                raise UserError(f"soup_runs.{t}={p} does not exist: give a finished main_transfer run dir or a "
                                f"student checkpoint folder (or remove the entry to train it)")


def model_spec(spec, cfg) -> ModelSpec:
    """`spec` (a name or a model node) parsed against the run's zoo: the one grammar, src/models/spec.py."""
    return spec_in_zoo(spec, cfg.get("zoo"))


def spec_in_zoo(spec, zoo) -> ModelSpec:
    """`spec` parsed against the zoo node `zoo` (None: no zoo)."""
    return ModelSpec.parse(spec, zoo.models if zoo is not None and zoo.get("models") else None)


def check_model_spec(name, cfg, role: str = "model") -> None:
    """UserError unless `name` can be resolved by `resolve_model` (without loading or training anything)."""
    model_spec(name, cfg).check(role, zoo_names(cfg))


def zoo_names(cfg) -> list:
    return zoo_entries(cfg.get("zoo"))


def zoo_entries(zoo) -> list:
    """The model names of the zoo node `zoo` (None: no zoo)."""
    return list(zoo.models.keys()) if zoo is not None and zoo.get("models") else []


def zoo_seed(cfg) -> int:
    """Which draw of the zoo: 0 = the entries' own seeds; k > 0 trains every entry with seed + 1000 k."""
    z = cfg.get("zoo")
    k = z.get("seed", 0) if z is not None else 0
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise UserError(f"zoo.seed={k} must be an integer >= 0 (0 = the zoo's own seeds): use e.g. zoo.seed=1")
    return k
