"""main_transfer end to end on the digits zoo: every method writes every summary key; grids; presets."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose
from src.experiments import transfer
from src.metrics import ensemble_accuracy, transfer_metrics

METHODS = ["kl", "xekl", "kl_dp", "kl_dp_u", "kl_dp_pos", "kl_dp_neg", "kl_dp_neutral", "kl_dp_self", "mcl", "cd",
           "crd"]
KEYS = ["student_acc_before", "student_acc_after", "teacher_acc", "transfer_delta", "knowledge_gain",
        "knowledge_loss", "positive_flips_before", "positive_flips_after", "agreement_after", "method", "teacher",
        "student"]


def test_transfer_metrics_by_hand():
    # 5 samples, labels all 0; initial student right on 0,1,2; now right on 0,1,3; teacher right on 0,3,4
    def onehot(preds):
        return torch.nn.functional.one_hot(torch.tensor(preds), 2).float() * 3

    y = torch.zeros(5, dtype=torch.long)
    before, now, teacher = onehot([0, 0, 0, 1, 1]), onehot([0, 0, 1, 0, 1]), onehot([0, 1, 1, 0, 0])
    m = transfer_metrics(now, before, teacher, y, top_p=50)
    assert m["student_acc"] == pytest.approx(60.0)
    assert m["transfer_delta"] == pytest.approx(0.0)
    assert m["knowledge_gain"] == pytest.approx(20.0)  # sample 3
    assert m["knowledge_loss"] == pytest.approx(20.0)  # sample 2
    assert m["positive_flips"] == pytest.approx(20.0)  # teacher right, now wrong: sample 4
    assert m["negative_flips"] == pytest.approx(20.0)  # now right, teacher wrong: sample 1
    assert m["positive_flips_change"] == pytest.approx(20.0 - 40.0)
    assert m["agreement"] == pytest.approx(60.0)
    assert m["gain_in_top50pct_classes"] == pytest.approx(100.0)  # the only gained sample is class 0
    # confidence ensemble: equal confidences -> first model (teacher) wins ties
    assert ensemble_accuracy(teacher, now, y) == pytest.approx(0.6)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_end_to_end(method, digits_zoo, tmp_path):
    cfg = compose("transfer/transfer", [*digits_zoo, f"method={method}", "teacher=mlp_small", "student=resnet8",
                                        "trainer.epochs=1"])
    s = transfer.run(cfg, run_dir=tmp_path)
    for k in KEYS:
        assert k in s, k
    assert s["status"] == "ok" and s["teacher"] == "mlp_small" and s["student"] == "resnet8"
    assert s["transfer_delta"] == pytest.approx(s["student_acc_after"] - s["student_acc_before"], abs=1e-6)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["method"] == s["method"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [0, s["steps"]]
    assert (tmp_path / "student" / "model.safetensors").is_file()
    if method.startswith("kl_dp"):
        assert 0.0 <= s["dp_share_teacher"] <= 100.0
        assert not any(v != v for v in s.values() if isinstance(v, float))  # no NaN


def test_second_run_reuses_the_output_cache(digits_zoo, tmp_path, caplog):
    cfg = compose("transfer/transfer", [*digits_zoo, "teacher=mlp_small", "student=resnet8", "trainer.epochs=1"])
    transfer.run(cfg, run_dir=tmp_path / "a")
    caplog.set_level("DEBUG")  # cache hits/writes are DEBUG lines
    transfer.run(cfg, run_dir=tmp_path / "b")
    hits = [r.message for r in caplog.records if "output cache hit" in r.message]
    # teacher and initial student on the eval split, and on the transfer split (the teacher's once more for the
    # train-split fidelity of the summary): all from disk
    assert len(hits) == 5, hits


def _run(args, cwd=ROOT, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_grid_multirun_skips_same_pairs(digits_zoo, tmp_path):
    r = _run(["main_transfer.py", "-m", "teacher=mlp_small,resnet8", "student=resnet8", "method=kl,kl_dp",
              "trainer.epochs=1", f"hydra.sweep.dir={tmp_path}", *digits_zoo])
    assert r.returncode == 0, r.stderr[-2000:]
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 4
    rows = [json.loads(p.read_text()) for p in summaries]
    assert sorted(r["status"] for r in rows) == ["ok", "ok", "skipped", "skipped"]
    assert {r["method"] for r in rows if r["status"] == "ok"} == {"KL", "KLDP"}


def test_preset_invocation_form(digits_zoo, tmp_path):
    """The primary config named on the command line (`--config-path/--config-name`) with `method=` choosing the
    method: config/transfer/ holds no per-method presets, any config/method/*.yaml is one override away."""
    r = _run(["main_transfer.py", "--config-path", "config", "--config-name", "transfer/transfer.yaml",
              "method=kl_dp_u", "trainer.epochs=1", "student=resnet8", f"hydra.run.dir={tmp_path}", *digits_zoo])
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["method_config"]["partition"] == "most-conf_u"
    assert "student acc %" in r.stdout and str(tmp_path) in r.stdout


def test_unknown_teacher_is_one_clear_line(digits_zoo, tmp_path):
    r = _run(["main_transfer.py", "teacher=mlp_smal", f"hydra.run.dir={tmp_path}", *digits_zoo])
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "mlp_smal" in err[0] and "mlp_small" in err[0], r.stderr


def test_weaker_teacher_kl_hurts_and_kl_dp_does_not(digits_zoo, tmp_path):
    """The paper's point on the embedded default: KL from a clearly weaker teacher (mlp_small, ~92-93%) costs a
    stronger student (resnet8, ~98-99%) accuracy; KL+DP with the same settings does not. Margins from two zoo draws
    on this project's CPU (KL -4.46 / -7.52, KL+DP +0.28 / -0.28 points; one test image = 0.28): KL loses more
    than a point, KL+DP at most a point and at least 2 points more than KL keeps."""
    res = {}
    for m in ("kl", "kl_dp"):
        cfg = compose("transfer/transfer", [*digits_zoo, f"method={m}", "teacher=mlp_small", "student=resnet8"])
        res[m] = transfer.run(cfg, run_dir=tmp_path / m)
    assert res["kl"]["teacher_acc"] < res["kl"]["student_acc_before"] - 3
    assert res["kl"]["transfer_delta"] < -1.0
    assert res["kl_dp"]["transfer_delta"] >= -1.0
    assert res["kl_dp"]["transfer_delta"] > res["kl"]["transfer_delta"] + 2.0
    assert res["kl_dp"]["knowledge_loss"] < res["kl"]["knowledge_loss"]


def test_the_result_table_names_the_method_as_typed_with_its_class(capsys, tmp_path):
    """`method=kl_dp_u` and `method=kl_dp` are both the class KLDP: the console says which config ran."""
    from src.experiments.transfer import print_table

    row = {"method": "KLDP", "method_choice": "kl_dp_u", "teacher": "mlp_small", "student": "resnet8",
           "eval_split": "test", "teacher_acc": 93.0, "transfer_delta": 0.5, "knowledge_gain": 1.0,
           "knowledge_loss": 0.5, **{f"{k}_{w}": 1.0 for k in ("student_acc", "positive_flips", "negative_flips",
                                                            "agreement") for w in ("before", "after")}}
    print_table(row, tmp_path)
    assert capsys.readouterr().out.splitlines()[1] == "kl_dp_u (KLDP): mlp_small (teacher) -> resnet8 (student), " \
                                                      "eval on test"
