"""Every `python ...` command in README.md composes and passes the entry scripts' preflight checks as written.

In-process and cheap: each command is parsed like its script would parse it (`--config-path/--config-name`,
Hydra overrides, `-m` sweeps expanded value by value), composed with Hydra's compose API (Hydra's own keys too,
so launcher / sweeper overrides are checked), and given to `preflight`, which checks numbers and model names
(zoo, timm, checkpoint), then to the family's own `validate` where it has one. Commands that need real data or a cluster are checked this far; the digits ones also
run end to end in the other test files."""
from __future__ import annotations

import importlib
import re
import shlex

import pytest

from conftest import ROOT, load_script
from src.errors import UserError

SCRIPTS = {"main_pretrain.py": "pretrain/pretrain", "main_transfer.py": "transfer/transfer",
           "main_flips.py": "prediction_flips/flips", "main_multi_teacher.py": "multi_teacher/multi_teacher",
           "main_aft.py": "aft/aft", "main_kdep.py": "kdep/kdep", "main_zeroshot.py": "zeroshot/zeroshot",
           "scripts/save_features.py": "aft/aft"}
# each family's own early validation of its keys (run after the shared preflight)
VALIDATE = {"main_aft.py": "src.experiments.aft", "scripts/save_features.py": "src.experiments.aft",
            "main_kdep.py": "src.experiments.kdep", "main_zeroshot.py": "src.experiments.zeroshot"}


def readme_commands():
    """`python ...` lines of the README's bash blocks, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("python "):
                cmds.append(line)
    return cmds


COMMANDS = readme_commands()


def test_the_readme_has_commands_for_every_entry_script():
    used = {shlex.split(c)[1] for c in COMMANDS}
    assert set(SCRIPTS) <= used, set(SCRIPTS) - used
    assert len(COMMANDS) >= 20


def _sweep_variants(overrides):
    """One override list per value of every comma-separated sweep (`a=x,y` -> x, then y; others at the first)."""
    def split(o):
        k, _, v = o.partition("=")
        if "," in v and not v.startswith(("[", "{")) and "=" in o:
            return [f"{k}={x}" for x in v.split(",")]
        return [o]

    options = [split(o) for o in overrides]
    base = [opts[0] for opts in options]
    variants = [base]
    for i, opts in enumerate(options):
        for alt in opts[1:]:
            variants.append(base[:i] + [alt] + base[i + 1:])
    return variants


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if shlex.split(c)[1] in SCRIPTS])
def test_readme_entry_command_composes_and_passes_preflight(cmd, kt_paths, monkeypatch):
    import src.models.hub as hub

    # the full-scale commands name hub weights: they run where the hub (or a warm HF cache) is; tests/test_hub.py
    # checks the offline answer
    monkeypatch.setattr(hub, "offline", lambda: False)
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    from src.experiments.preflight import preflight

    args = shlex.split(cmd)[1:]
    script, rest = args[0], args[1:]
    config_name, config_dir, multirun, overrides = SCRIPTS[script], str(ROOT / "config"), False, []
    it = iter(rest)
    for a in it:
        if a == "--config-path":
            config_dir = str(ROOT / next(it))
        elif a == "--config-name":
            config_name = next(it).removesuffix(".yaml")
        elif a in ("-m", "--multirun"):
            multirun = True
        else:
            overrides.append(a)
    assert multirun or not any("," in o.partition("=")[2] and not o.partition("=")[2].startswith(("[", "{"))
                               for o in overrides), f"a sweep without -m: {cmd}"
    # the user's own paths.* stay (e.g. paths.data=/datasets); checkpoints / cache go to the test's folders
    own = {o.partition("=")[0] for o in overrides}
    paths = [p for p in kt_paths if p.partition("=")[0] not in own]
    for variant in _sweep_variants(overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=[*variant, *paths], return_hydra_config=True)
        if script == "main_pretrain.py" and cfg.name not in (None, "all"):
            entries = [*cfg.zoo.models, *(cfg.zoo.get("generators") or {})]
            assert cfg.name in entries, f"{cmd}: name={cfg.name} is not a zoo entry"
        with open_dict(cfg):
            hydra_cfg = cfg.pop("hydra")
        assert OmegaConf.select(hydra_cfg, "launcher._target_") is not None
        preflight(cfg)
        if script in VALIDATE:
            try:
                importlib.import_module(VALIDATE[script]).validate(cfg)
            except UserError as e:  # a file an earlier README command writes (e.g. basis=outputs/<run>/...)
                assert "does not exist" in str(e) and "outputs/" in cmd, f"{cmd}: {e}"


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if shlex.split(c)[1] == "scripts/write_ffcv.py"])
def test_readme_write_ffcv_command_parses_and_composes(cmd):
    mod = load_script("write_ffcv")
    args = mod.parse_args(shlex.split(cmd)[2:])
    cfg = mod.compose_config(args.config_name, args.overrides)
    assert cfg.loader.backend == "ffcv" and cfg.dataset.name == "imagenet"


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if shlex.split(c)[1] in ("scripts/aggregate.py",
                                                                             "scripts/reproduce.py")])
def test_readme_aggregate_and_reproduce_commands_parse(cmd):
    args = shlex.split(cmd)
    mod = load_script(args[1].removeprefix("scripts/").removesuffix(".py"))
    mod.parser().parse_args(args[2:])  # argparse exits on an unknown flag or a bad value


def test_readme_shows_the_aggregator_and_the_reproduction():
    used = {shlex.split(c)[1] for c in COMMANDS}
    assert {"scripts/aggregate.py", "scripts/reproduce.py"} <= used


def test_the_install_stamp_is_keyed_on_requirements_content(tmp_path):
    """`make demo` reinstalled whenever requirements.txt was newer than the stamp (any checkout touching it)."""
    import os
    import shutil
    import subprocess

    for f in ("Makefile", "requirements.txt", "requirements-text-data.txt"):
        shutil.copy(ROOT / f, tmp_path / f)
    q = lambda: subprocess.run(["make", "-q", "install", "VENV=venv"], cwd=tmp_path).returncode  # noqa: E731
    assert q() != 0  # no stamp yet: the install would run
    stamp = subprocess.run(["make", "-s", "-p", "-n", "install", "VENV=venv"], cwd=tmp_path, capture_output=True,
                           text=True).stdout.split("STAMP := ")[1].split("\n")[0]
    (tmp_path / "venv").mkdir()
    (tmp_path / stamp.replace("$(VENV)", "venv")).touch()
    assert q() == 0
    later = os.stat(tmp_path / "requirements.txt").st_mtime + 100
    os.utime(tmp_path / "requirements.txt", (later, later))  # touched, same content: nothing to do
    assert q() == 0
    with open(tmp_path / "requirements.txt", "a") as f:
        f.write("# changed\n")
    assert q() != 0  # another content: the install runs
