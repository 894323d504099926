"""Composition of every config: each primary config (any `config/*/*.yaml` starting with `# @package _global_`,
discovered so new families and presets are covered automatically) and each option of each config group; typed
schemas reject wrong types and unknown keys at composition."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
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
