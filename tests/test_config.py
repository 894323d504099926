"""Composition of every config: each primary config (any `config/*/*.yaml` starting with `# @package _global_`,
discovered so new families and presets are covered automatically) and each option of each config group; typed
schemas reject wrong types and unknown keys at composition; every `_target_` names its class `src.methods.<Class>`
(bar the listed non-method ones) and no preset only overrides the method group."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from conftest import CONFIG_DIR, compose

from src import schema

CONFIG = Path(CONFIG_DIR)
GLOBAL_HEADER = "# @package _global_"


def _is_primary(p: Path) -> bool:
    with open(p) as f:
        return f.readline().strip() == GLOBAL_HEADER


PRIMARY = sorted(str(p.relative_to(CONFIG).with_suffix("")) for p in CONFIG.glob("*/*.yaml") if _is_primary(p))

# group -> options: every yaml under a config folder that is not a primary config (nested groups such as
# hydra/launcher are Hydra's own and need plugins; they are left out)
GROUP_OPTIONS = sorted(
    (p.parent.name, p.stem) for p in CONFIG.glob("*/*.yaml")
    if not _is_primary(p) and p.parent.name != "hydra")

TYPED = {"paths": schema.PathsConfig, "dataset": schema.DatasetConfig, "loader": schema.LoaderConfig,
         "optimizer": schema.OptimizerConfig, "scheduler": schema.SchedulerConfig, "trainer": schema.TrainerConfig,
         "wandb": schema.WandbConfig, "model": schema.ModelConfig}


def _compose_with_hydra(name, overrides=()):
    from hydra import compose as hcompose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hcompose(config_name=name, overrides=list(overrides), return_hydra_config=True)


_CHOICES_CACHE = {}


def _choices(primary):
    if primary not in _CHOICES_CACHE:
        _CHOICES_CACHE[primary] = dict(_compose_with_hydra(primary).hydra.runtime.choices)
    return _CHOICES_CACHE[primary]


def test_discovery_finds_the_pretrain_config_and_the_groups():
    assert "pretrain/pretrain" in PRIMARY
    groups = {g for g, _ in GROUP_OPTIONS}
    assert {"paths", "dataset", "model", "zoo", "loader", "optimizer", "scheduler", "wandb", "trainer"} <= groups
    assert ("dataset", "digits") in GROUP_OPTIONS and ("loader", "torch") in GROUP_OPTIONS


@pytest.mark.parametrize("primary", PRIMARY)
def test_primary_config_composes_and_resolves(primary):
    cfg = compose(primary)
    assert "task" in cfg, f"{primary}: no `task` key (the run dir is named after it)"
    # every interpolation resolves (no hydra node here: it is resolved by Hydra at run time)
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    # the `# @package _global_` header puts the groups at the top level, typed by their schema
    for group, typ in TYPED.items():
        if group in cfg:
            assert OmegaConf.get_type(cfg[group]) is typ, f"{primary}: {group} is not typed as {typ.__name__}"


def _primary_for_group(group):
    """pretrain/pretrain when it selects `group`, else the first primary config that does."""
    for primary in ["pretrain/pretrain"] + [p for p in PRIMARY if p != "pretrain/pretrain"]:
        if group in _choices(primary):
            return primary
    return None


def _option_rounds():
    """Every (group, option) pair, packed into as few compositions as possible: round r of primary P selects the
    r-th option of every group P selects (composition costs ~0.3 s, the groups do not interact)."""
    by_primary = {}
    for group, option in GROUP_OPTIONS:
        primary = _primary_for_group(group)
        by_primary.setdefault(primary, {}).setdefault(group, []).append(option)
    rounds = []
    for primary, groups in sorted(by_primary.items(), key=lambda kv: str(kv[0])):
        for r in range(max(len(v) for v in groups.values())):
            rounds.append((primary, [f"{g}={opts[r]}" for g, opts in sorted(groups.items()) if r < len(opts)]))
    return rounds


ROUNDS = _option_rounds()


def test_rounds_cover_every_group_option():
    covered = {tuple(o.split("=")) for _, ovs in ROUNDS for o in ovs}
    assert covered == set(GROUP_OPTIONS)


@pytest.mark.parametrize("primary,overrides", ROUNDS, ids=[" ".join(o) for _, o in ROUNDS])
def test_every_group_option_composes_as_override(primary, overrides):
    if primary is None:
        pytest.skip(f"no primary config selects the groups of {overrides} yet")
    cfg = _compose_with_hydra(primary, overrides)
    for ov in overrides:
        group, option = ov.split("=")
        assert cfg.hydra.runtime.choices[group] == option
        node = cfg[group]
        if group in TYPED:
            assert OmegaConf.get_type(node) is TYPED[group], ov
        if group in ("dataset", "optimizer", "scheduler"):
            assert node.name == option, ov
        if group == "wandb":
            assert node.mode == option, ov
        if group == "loader":
            assert node.backend == option, ov
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.to_container(cfg, resolve=True)


def test_pretrain_defaults_are_the_digits_demo():
    cfg = compose("pretrain/pretrain")
    assert cfg.dataset.name == "digits" and cfg.loader.backend == "tensor"
    assert cfg.wandb.mode in ("offline", "disabled")  # the digits defaults never go online
    assert sum(cfg.dataset.splits.values()) == pytest.approx(1.0)
    assert len(cfg.zoo.models) >= 6


def test_overrides_are_applied_with_their_types():
    cfg = compose("pretrain/pretrain", ["optimizer=adamw", "optimizer.lr=0.002", "trainer.epochs=3",
                                        "loader.batch_size=32", "dataset.splits.train=0.5", "dataset.splits.transfer=0.2"])
    assert cfg.optimizer.name == "adamw" and cfg.optimizer.lr == 0.002 and isinstance(cfg.optimizer.lr, float)
    assert cfg.trainer.epochs == 3.0 and cfg.loader.batch_size == 32
    assert dict(cfg.dataset.splits) == {"train": 0.5, "transfer": 0.2, "val": 0.1, "test": 0.2}


@pytest.mark.parametrize("override", ["optimizer.lr=abc", "trainer.epochs=abc", "loader.batch_size=1.5",
                                      "optimizer.foo=1", "dataset.no_such_key=3", "trainer.amp=[1,2]"])
def test_bad_override_fails_at_composition(override):
    with pytest.raises((HydraException, OmegaConfBaseException)) as e:
        compose("pretrain/pretrain", [override])
    key = override.split("=")[0]
    assert key in str(e.value) or key.split(".")[-1] in str(e.value) or "merging override" in str(e.value)


def _config_copy(tmp_path):
    dst = tmp_path / "config"
    shutil.copytree(CONFIG, dst)
    return dst


def _compose_from(config_dir, name, overrides=()):
    from hydra import compose as hcompose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return hcompose(config_name=name, overrides=list(overrides))


def test_unknown_key_in_a_group_file_fails_at_composition(tmp_path):
    """The schema, not only struct mode, guards the YAML files: a typo'd key in a group file is rejected."""
    cdir = _config_copy(tmp_path)
    f = cdir / "optimizer" / "sgd.yaml"
    f.write_text(f.read_text() + "learning_rate: 0.1\n")
    with pytest.raises((HydraException, OmegaConfBaseException)) as e:
        _compose_from(cdir, "pretrain/pretrain")
    assert "learning_rate" in str(e.value) or "learning_rate" in repr(e.value.__cause__)


def test_wrong_type_in_a_group_file_fails_at_composition(tmp_path):
    cdir = _config_copy(tmp_path)
    f = cdir / "trainer" / "default.yaml"
    f.write_text(f.read_text() + "max_steps: many\n")
    with pytest.raises((HydraException, OmegaConfBaseException)):
        _compose_from(cdir, "pretrain/pretrain")


def test_run_and_sweep_dirs_do_not_collide():
    """Jobs started in the same second get distinct dirs: the pid in single runs, the job number in sweeps."""
    cfg = _compose_with_hydra("pretrain/pretrain")
    run_dir = OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"]
    sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
    assert "kt_pid" in run_dir
    assert "hydra.job.num" in sweep["subdir"]


# ------------------------------------------------------------------------------------------ one `_target_` style

# `_target_`s in config/ that are not transfer methods (they keep their module path)
NON_METHOD_TARGETS = {"src.entry.OutputDirCheck"}  # hydra/default.yaml: the run-dir check callback
METHOD_TARGET = re.compile(r"^src\.methods\.[A-Z][A-Za-z0-9_]*$")


def _targets(node, where):
    """(file:key path, target) of every `_target_` in a parsed YAML document, at any depth."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "_target_":
                yield where, v
            else:
                yield from _targets(v, f"{where}.{k}" if ":" in where else f"{where}:{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _targets(v, f"{where}[{i}]")


CONFIG_TARGETS = sorted(t for p in sorted(CONFIG.rglob("*.yaml"))
                        for t in _targets(yaml.safe_load(p.read_text()) or {}, str(p.relative_to(CONFIG))))


def test_target_walk_finds_the_method_files_and_the_nested_nodes():
    where = {w for w, _ in CONFIG_TARGETS}
    assert {"method/kl_dp.yaml", "method/aft.yaml", "method/kdep.yaml", "zeroshot/zeroshot.yaml:method",
            "zeroshot/zeroshot.yaml:few_shot.kd_at", "zeroshot/zeroshot.yaml:few_shot.scratch",
            "hydra/default.yaml:callbacks.output_dir_check"} <= where
    assert {t for _, t in CONFIG_TARGETS} >= NON_METHOD_TARGETS


@pytest.mark.parametrize("where,target", CONFIG_TARGETS, ids=[w for w, _ in CONFIG_TARGETS])
def test_every_config_target_is_src_methods_class_and_imports(where, target):
    from hydra.utils import get_class

    from src.methods import Method

    cls = get_class(target)  # imports
    if target in NON_METHOD_TARGETS:
        return
    assert METHOD_TARGET.match(target), (f"{where}: _target_: {target}; name the class as src.methods.<Class> "
                                         f"(export it from src/methods/__init__.py)")
    assert issubclass(cls, Method), f"{where}: {target} is not a src.methods.Method"


def test_old_long_method_targets_normalise_to_the_config_form():
    """Run dirs written before the one-style change hold `src.methods.<module>.<Class>`; both forms import the same
    class and compare equal through canonical_target / same_target."""
    from hydra.utils import get_class

    from src.methods import canonical_target, same_target

    methods = sorted({t for _, t in CONFIG_TARGETS if t not in NON_METHOD_TARGETS})
    assert {"src.methods.AFT", "src.methods.KDEP", "src.methods.CrossEntropy", "src.methods.ZeroShot"} <= set(methods)
    for short in methods:
        cls = get_class(short)
        long = f"{cls.__module__}.{cls.__name__}"  # e.g. src.methods.aft.AFT
        assert long != short and get_class(long) is cls
        assert canonical_target(long) == short and canonical_target(short) == short
        assert same_target(long, short) and same_target(short, long)
    assert canonical_target("src.methods.aft.AFT") == "src.methods.AFT"
    assert not same_target("src.methods.aft.AFT", "src.methods.KL")
    for other in sorted(NON_METHOD_TARGETS) + [None, "src.methods.KL"]:
        assert canonical_target(other) == other


def _only_a_method_override(doc: dict) -> bool:
    """A preset whose file says no more than `method=<x>` on its parent config: `defaults` is its only key and its
    one override is `override /method`."""
    overrides = [k for entry in doc.get("defaults") or [] if isinstance(entry, dict)
                 for k in entry if str(k).startswith("override ")]
    return set(doc) <= {"defaults"} and overrides == ["override /method"]


def test_method_only_check_recognises_the_folded_presets():
    assert _only_a_method_override({"defaults": ["transfer", {"override /method": "kl_dp_u"}, "_self_"]})
    assert not _only_a_method_override(
        {"defaults": ["transfer", {"override /method": "kl"}, {"override /scheduler": "cosine"}, "_self_"]})
    assert not _only_a_method_override({"defaults": ["transfer", {"override /method": "kl"}], "teacher": "lenet"})


@pytest.mark.parametrize("primary", PRIMARY)
def test_no_preset_is_only_a_method_override(primary):
    doc = yaml.safe_load((CONFIG / f"{primary}.yaml").read_text()) or {}
    assert not _only_a_method_override(doc), (
        f"config/{primary}.yaml only overrides the method group: delete it and use `method=<name>` on its parent")



def test_every_boolean_family_key_is_checked_as_a_flag():
    """`cka=maybe` composed as a truthy string and ran CKA: every on/off key of the shipped family and zoo configs
    is in preflight's FLAGS, and a non-boolean value is one line naming it."""
    from src.errors import UserError
    from src.experiments.preflight import FLAGS, preflight

    found = set()
    for p in [*CONFIG.glob("*/*.yaml"), *CONFIG.glob("zoo/*.yaml")]:
        if p.parent.name in ("dataset", "loader", "optimizer", "scheduler", "trainer", "wandb", "paths", "model",
                             "method", "hydra"):
            continue  # typed groups: their schemas refuse a string for a bool at composition
        body = yaml.safe_load(p.read_text()) or {}
        prefix = "zoo." if p.parent.name == "zoo" else ""
        found |= {prefix + k for k, v in body.items() if isinstance(v, bool)}
    assert found and found <= set(FLAGS), sorted(found - set(FLAGS))
    for primary, key in (("prediction_flips/flips", "cka"), ("transfer/transfer", "use_cache"),
                         ("pretrain/pretrain", "zoo.train_missing")):
        with pytest.raises(UserError, match=rf"^{re.escape(key)}=maybe must be true or false: use {key}=true"):
            preflight(compose(primary, [f"{key}=maybe"]))
        preflight(compose(primary, [f"{key}=false"]))


@pytest.mark.parametrize("primary", PRIMARY)
def test_every_shipped_config_has_its_required_keys_and_a_deleted_one_is_one_line(primary):
    """`~teacher`, `~top_p` passed composition and crashed mid-run: a key the family's primary config defines is
    required before any work."""
    from src.errors import UserError
    from src.experiments.preflight import check_required, required_keys

    cfg = compose(primary)
    check_required(cfg)  # every shipped config and preset has them all
    assert {"task", "trainer", "paths"} <= set(required_keys(str(cfg.task)))
    deleted = {"transfer/transfer": ["teacher", "top_p"], "multi_teacher/multi_teacher": ["teachers", "top_p"],
               "kdep/kdep": ["teacher", "downstream"], "aft/aft": ["features"], "pretrain/pretrain": ["use_cache"],
               "zeroshot/zeroshot": ["teacher", "pseudo_batches"], "prediction_flips/flips": ["cka_samples", "use_cache"]}
    for k in deleted.get(primary, []):
        with pytest.raises(UserError, match=rf"^{k} is required by this run's config .* was deleted \(~{k}\): drop"):
            check_required(compose(primary, [f"~{k}"]))


@pytest.mark.parametrize("device, match", [("bogus", "trainer.device='bogus' is not a device: use trainer.device=auto"),
                                           ("cuda:x", "trainer.device='cuda:x' is not a device")])
def test_a_bogus_device_is_one_line(device, match):
    from src.errors import UserError
    from src.experiments.preflight import preflight

    with pytest.raises(UserError, match=re.escape(match)):
        preflight(compose("transfer/transfer", [f"trainer.device={device}"]))
    preflight(compose("transfer/transfer", ["trainer.device=cpu"]))


@pytest.mark.parametrize("override, want", [
    ("method=kll", r"^method=kll: there is no config 'method/kll' \(closest: kl, xekl, kl_dp\): use one of "
                   r"method=aft, "),
    ("loader=tensr", r"^loader=tensr: there is no config 'loader/tensr' \(closest: tensor\): use one of "
                     r"loader=ffcv, loader=tensor, loader=torch$"),
    ("optimizer.lrr=1", r"^unknown key 'optimizer.lrr' \(closest: optimizer.lr\): check the spelling"),
    ("qqqqqq=1", r"^unknown key 'qqqqqq' \(the keys there: .*\): check the spelling, or add a new key with "
                 r"\+qqqqqq=<value>$"),
    ("optimizer.lr=abc", r"optimizer.lr=abc .*'abc' of type 'str' could not be converted to Float"),
    ("trainer.epochs=[1", r"check its quoting"),
    ("+optimizer.lr=1", r"^Could not append to config. An item is already at 'optimizer.lr'"),
])
def test_hydra_composition_errors_are_one_line_and_exit_2(override, want, capsys, monkeypatch):
    """Hydra's own composition errors exited 1 in 4-25 lines while the README promises one line and exit 2. The
    wrapper of Hydra's run_and_report (what @hydra.main calls) that src.entry installs prints one line."""
    import hydra._internal.utils as hu

    import src.entry  # noqa: F401  (installs the wrapper, as every main_*.py does by importing it)

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("KT_DEBUG", raising=False)
    assert getattr(hu.run_and_report, "kt_wrapped", False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        hu.run_and_report(lambda: _compose_with_hydra("transfer/transfer", [override]))
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(want, err[0][len("error: "):]), err[0]


@pytest.mark.parametrize("primary, override, match", [
    ("multi_teacher/multi_teacher", "teachers=lenet",
     r"^teachers=lenet must be a list of models, not one name: use teachers=\[lenet\]"),
    ("kdep/kdep", "student=resnet8", r"^student=resnet8: KDEP distils into a fresh model, .*use student.arch=resnet8"),
])
def test_a_family_key_in_the_wrong_form_is_one_line(primary, override, match):
    """`teachers=lenet` (a string) was iterated letter by letter; `main_kdep.py student=<name>`, the form every
    other script takes, ended in AttributeError."""
    from src.errors import UserError
    from src.experiments import kdep, multi_teacher

    validate = multi_teacher.validate if primary.startswith("multi") else kdep.validate
    with pytest.raises(UserError, match=match):
        validate(compose(primary, [override]))
