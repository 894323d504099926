"""What a long job says off a terminal (issue 26.1): one log line per evaluation, the printed tables kept in the run
dir and the job log, and scripts/reproduce.py's jobs done / total with an ETA."""
from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, compose
from src.data import build_dataset, build_loader
from src.engine.trainer import Trainer, eval_line
from src.experiments.context import keep_tables
from src.methods.base import CrossEntropy
from src.models import create_model
from src.schema import OptimizerConfig, SchedulerConfig, TrainerConfig


def test_eval_line_shows_accuracies_first_then_lr_rate_and_eta():
    metrics = {"train/loss": 0.41234, "train/lr": 0.045, "epoch": 2.0, "eval/nll": 0.3, "eval/student_acc": 91.2,
               "eval/agreement": 88.0, "eval/flag": True, "eval/name": "x"}
    line = eval_line("distill", 40, 120, metrics, (812.4, 3725.0))
    assert line == ("distill step 40/120 epoch 2.00 | loss 0.4123 | eval/student_acc 91.2 eval/agreement 88 "
                    "(+1 in metrics.jsonl) | lr 4.50e-02 | 812 samples/s | ETA 1:02:05")
    # no eval metric matches the preferred words: all numeric eval metrics are shown (at most 4)
    assert "eval/nll 0.3 |" in eval_line("t", 1, 2, {"eval/nll": 0.3}, (0.0, 0.0))


def test_a_fit_logs_one_line_per_evaluation_with_its_eval_metrics(tmp_path, caplog):
    cfg = compose("pretrain/pretrain")
    ds = build_dataset(cfg.dataset, cfg.paths)
    loader = build_loader(cfg.loader, ds.split("train"), train=True, seed=0, device="cpu")
    torch.manual_seed(0)
    model = create_model("mlp", ds.info, kwargs={"hidden": [16]})
    calls = []

    def evaluate(m):
        calls.append(1)
        return {"eval/acc": 10.0 * len(calls)}

    t = Trainer(CrossEntropy(model), loader,
                OmegaConf.merge(OmegaConf.structured(TrainerConfig), {"progress": "off", "epochs": 3}),
                OmegaConf.merge(OmegaConf.structured(OptimizerConfig), {"name": "sgd", "lr": 0.05}),
                OmegaConf.merge(OmegaConf.structured(SchedulerConfig), {"name": "none"}), tmp_path,
                evaluate=evaluate, name="zoo")
    with caplog.at_level(logging.INFO, logger="src.engine.trainer"):
        t.fit()
    lines = [r.getMessage() for r in caplog.records if " step " in r.getMessage()]
    spe = len(loader)
    assert len(lines) == 3 == len(calls)
    for k, line in enumerate(lines, 1):
        assert line.startswith(f"zoo step {k * spe}/{3 * spe} epoch {k:.2f} | loss ")
        assert f"eval/acc {10 * k:g}" in line and "lr 5.00e-02" in line
        assert re.search(r"\| [\d,]+ samples/s \| ETA \d+:\d\d:\d\d$", line)
    assert lines[-1].endswith("ETA 0:00:00")


def test_printed_tables_are_kept_in_results_md_and_the_job_log(tmp_path, capsys):
    log_file = tmp_path / "main_x.log"
    handler = logging.FileHandler(log_file)
    logging.getLogger().addHandler(handler)
    try:
        keep_tables(lambda: print("acc   91.2\nflips  3.1"), tmp_path / "results.md")
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert capsys.readouterr().out == "acc   91.2\nflips  3.1\n"
    assert (tmp_path / "results.md").read_text() == "```\nacc   91.2\nflips  3.1\n```\n"
    assert log_file.read_text() == "acc   91.2\nflips  3.1\n"


def test_a_failing_printer_still_shows_what_it_printed(tmp_path, capsys):
    def show():
        print("first row")
        raise KeyError("second")

    with pytest.raises(KeyError):
        keep_tables(show, tmp_path / "results.md")
    assert capsys.readouterr().out == "first row\n"


def test_reproduce_progress_counts_jobs_and_estimates_the_rest(monkeypatch):
    spec = importlib.util.spec_from_file_location("reproduce_script", ROOT / "scripts" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    clock = iter([100.0, 130.0, 160.0, 190.0, 220.0])
    monkeypatch.setattr(mod.time, "time", lambda: next(clock))
    p = mod.Progress(4)
    assert p.tick() == "[1/4 done, ETA 0:01:30]"  # 30 s per job so far, 3 left
    assert p.tick() == "[2/4 done, ETA 0:01:00]"
    assert p.tick() == "[3/4 done, ETA 0:00:30]"
    assert p.tick() == "[4/4 done, ETA 0:00:00]"


def test_every_method_config_is_named_back_by_its_own_file():
    """summary.json's `method_choice` (issue 26.6): the config the user chose (kl_dp_u, aft_kd), not only the
    class (KLDP for both kl_dp and kl_dp_u). Without Hydra's record (the compose API) the rule matches the node
    against config/method/*.yaml: every file must be named back by its own name."""
    from src.methods import method_choice
    from src.methods.build import method_configs

    names = sorted(method_configs())
    assert {"kl", "kl_dp", "kl_dp_u", "xekl", "aft_kd"} <= set(names)
    fam = {"aft": "aft/aft", "kdep": "kdep/kdep"}
    for name in names:
        primary = fam.get(name.split("_")[0], "transfer/transfer")
        if name.startswith("multi_"):
            primary = "multi_teacher/multi_teacher"
        node = compose(primary, [f"method={name}"]).method
        assert method_choice("method", node) == name, name


def test_wandb_runs_are_named_grouped_by_sweep_and_tagged_by_family(monkeypatch):
    import types

    import src.tracking as tracking

    cfg = {"teacher": "mlp_small", "student": {"arch": "resnet8"}, "trainer": {"seed": 2},
           "method": {"_target_": "src.methods.KLDP"}}
    monkeypatch.setattr(tracking, "_hydra", lambda: None)  # the compose API: the class names the method
    assert tracking.wandb_identity(cfg, "transfer") == {"name": "transfer KLDP mlp_small->resnet8 s2",
                                                        "group": None, "tags": ["transfer"]}
    sweep = types.SimpleNamespace(mode=types.SimpleNamespace(name="MULTIRUN"),
                                  runtime=types.SimpleNamespace(choices={"method": "kl_dp_u"}),
                                  sweep=types.SimpleNamespace(dir="multirun/transfer/2026-12-04/18-40-00_7"))
    monkeypatch.setattr(tracking, "_hydra", lambda: sweep)
    got = tracking.wandb_identity({**cfg, "teacher": ["lenet", "/z/resnet20.safetensors"]}, "transfer")
    assert got == {"name": "transfer kl_dp_u [lenet+resnet20.safetensors]->resnet8 s2",
                   "group": "transfer/2026-12-04/18-40-00_7", "tags": ["transfer"]}
    own = types.SimpleNamespace(name="mine", group="g", tags=["a"])
    assert tracking.wandb_identity(cfg, "kdep", own) == {"name": "mine", "group": "g", "tags": ["a", "kdep"]}


def test_an_offline_wandb_run_says_its_name_and_the_sync_command(tmp_path, caplog, monkeypatch):
    import src.tracking as tracking

    monkeypatch.setattr(tracking, "_hydra", lambda: None)
    wcfg = compose("transfer/transfer", ["wandb=offline"]).wandb
    with caplog.at_level(logging.INFO, logger="src.tracking"):
        t = tracking.Tracker(tmp_path, wcfg, {"teacher": "a", "student": "b", "trainer": {"seed": 0}},
                             job_type="transfer")
        t.finish(0)
    line = next(r.getMessage() for r in caplog.records if "wandb offline run" in r.getMessage())
    assert line.startswith("wandb offline run 'transfer a->b s0' in ") and "`wandb sync " in line
    synced = line.split("`wandb sync ")[1].rstrip("`")
    assert synced.startswith(str(tmp_path / "wandb" / "offline-run-")) and Path(synced).is_dir()


def test_the_output_cache_says_what_it_saved_in_one_line(tmp_path):
    """Issue 26.10: each cache hit / write is a DEBUG line; the run ends with one INFO line of counts."""
    from src.engine.cache import OutputCache

    c = OutputCache(tmp_path / "outputs")
    c.hits, c.computed = 3, 2
    assert c.summary() == f"output cache: 3 read back, 2 computed ({tmp_path / 'outputs'})"
    c.rejected, c.unstored = 1, 2
    assert c.summary().endswith(f"2 computed, 1 invalid entries recomputed, 2 not stored ({tmp_path / 'outputs'})")
    assert OutputCache(tmp_path, enabled=False).summary() == "output cache: 0 read back, 0 computed (disabled)"


def test_a_closed_log_handler_left_by_an_earlier_run_is_skipped(tmp_path, capsys):
    """An in-process run after another one finds the earlier run's closed FileHandler (stream None) on the root
    logger: the table is still printed and kept, never an AttributeError at the end of a finished run."""
    closed = logging.FileHandler(tmp_path / "old.log")
    closed.close()
    logging.getLogger().addHandler(closed)
    try:
        keep_tables(lambda: print("acc 1"), tmp_path / "results.md")
    finally:
        logging.getLogger().removeHandler(closed)
    assert capsys.readouterr().out == "acc 1\n" and (tmp_path / "results.md").read_text() == "```\nacc 1\n```\n"
