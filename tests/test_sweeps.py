"""Cluster sweeps without a cluster: the submitit launcher (`hydra/launcher=local`, the code path of
`hydra/launcher=slurm`) runs a 2-job sweep, and the Optuna preset runs 3 trials on digits scored on val."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, compose

TINY = ["teacher=mlp_small", "student=mlp_wide", "trainer.epochs=1", "trainer.device=cpu", "save_student=false"]


def _run(args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "main_transfer.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_slurm_launcher_config_composes():
    from hydra import compose as hcompose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base="1.3"):
        cfg = hcompose("transfer/transfer", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                       return_hydra_config=True)
    la = cfg.hydra.launcher
    assert la._target_.endswith("SlurmLauncher") and la.partition == "gpu"
    assert la.gpus_per_node >= 1 and la.array_parallelism > 0 and la.max_num_timeout > 0
    assert la.additional_parameters.requeue is True


def test_submitit_local_sweep_writes_one_summary_per_job(digits_zoo, tmp_path):
    r = _run(["-m", "hydra/launcher=local", "method=kl,kl_dp", f"hydra.sweep.dir={tmp_path}", *TINY, *digits_zoo])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/summary.json"))]
    assert len(rows) == 2 and {r["method"] for r in rows} == {"KL", "KLDP"}
    assert all(r["status"] == "ok" for r in rows)
    assert (tmp_path / ".submitit").is_dir()  # the jobs went through submitit


def test_optuna_preset_three_trials_on_val(digits_zoo, tmp_path):
    r = _run(["--config-path", "config", "--config-name", "transfer/optuna_kl_dp.yaml", "-m",
              "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path}", *TINY, *digits_zoo])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/summary.json"))]
    assert len(rows) == 3 and all(r["eval_split"] == "val" for r in rows)
    temps = {r["method_config"]["temperature"] for r in rows}
    assert len(temps) == 3 and all(0.5 <= t <= 8.0 for t in temps)
    res = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert set(res["best_params"]) == {"method.temperature", "optimizer.lr"}
    assert res["best_value"] == pytest.approx(max(r["student_acc_after"] for r in rows))


def test_objective_returns_a_summary_number_or_one_clear_error(capsys):
    from src.entry import entry

    summary = {"status": "ok", "student_acc_after": 91.5, "method": "KL"}
    cfg = compose("transfer/transfer", ["objective=student_acc_after"])
    assert entry(lambda c: summary, cfg) == 91.5
    assert entry(lambda c: summary, compose("transfer/transfer")) is summary
    with pytest.raises(SystemExit) as e:
        entry(lambda c: summary, compose("transfer/transfer", ["objective=no_such_key"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no_such_key" in err and "student_acc_after" in err


@pytest.mark.parametrize("key, value", [("n_trials", 0), ("n_jobs", -1)])
def test_optuna_with_no_trials_is_one_line(key, value, capsys, tmp_path):
    """n_trials=0 ran nothing, then optuna raised 'No trials are completed yet' (a traceback)."""
    from omegaconf import OmegaConf

    from src.entry import OutputDirCheck

    sw = OmegaConf.create({"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
                           "n_trials": 3, "n_jobs": 1, key: value})
    with pytest.raises(SystemExit) as e:
        OutputDirCheck().on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)},
                                                                       "sweeper": sw}}))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and err == [f"error: hydra.sweeper.{key}={value} must be an integer >= 1: use e.g. "
                                         f"hydra.sweeper.{key}={20 if key == 'n_trials' else 1}"]


@pytest.mark.parametrize("choice, ours", [("submitit_slurm", "slurm"), ("submitit_local", "local"),
                                          ("slurm", None), ("basic", None)])
def test_the_plugins_bare_launcher_configs_are_refused_naming_ours(choice, ours, capsys, tmp_path):
    """hydra/launcher=submitit_slurm, the name every Hydra user types, silently lost requeue and GPUs."""
    from omegaconf import OmegaConf

    from src.entry import OutputDirCheck

    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / choice)}, "sweeper": {"_target_": "basic"},
                                      "runtime": {"choices": {"hydra/launcher": choice}}}})
    if ours is None:
        OutputDirCheck().on_multirun_start(cfg)
        return
    with pytest.raises(SystemExit) as e:
        OutputDirCheck().on_multirun_start(cfg)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and f"use hydra/launcher={ours} " in err[0]
