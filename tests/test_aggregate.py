"""scripts/aggregate.py and src/tracking/aggregate.py on run dirs written by hand in the families' real formats:
statistics per seed then over seeds, failed / incomplete runs listed, tables, figures, bad input."""
from __future__ import annotations

import csv
import json
import math

import pytest

from conftest import load_script
from src.tracking import aggregate as agg


def _run(d, summary, error=None, hydra_method=None, refused=False):
    d.mkdir(parents=True)
    if summary is not None:
        (d / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    if error is not None:
        (d / "error.json").write_text(json.dumps({"status": "failed", "error": error,
                                                  **({"refused": True} if refused else {})}))
    if hydra_method:
        (d / ".hydra").mkdir()
        (d / ".hydra" / "config.yaml").write_text("trainer: {seed: 0}\n")
        (d / ".hydra" / "hydra.yaml").write_text(
            f"hydra:\n  job: {{name: main_transfer}}\n  runtime:\n    choices: {{method: {hydra_method}}}\n")


def _transfer(method, t, s, delta, seed, zoo_seed=0, gain=1.0, loss=0.5, alpha=1.0):
    return {"status": "ok", "family": "transfer", "method": method, "teacher": t, "student": s, "seed": seed,
            "zoo_seed": zoo_seed, "transfer_delta": delta, "knowledge_gain": gain, "knowledge_loss": loss,
            "teacher_acc": 90.0, "student_acc_before": 95.0, "student_acc_after": 95.0 + delta,
            "method_config": {"alpha": alpha}}


@pytest.fixture()
def sweep(tmp_path):
    """Two seeds x two pairs of KL and XE-KL (told apart by the Hydra method choice and by alpha), one failed job,
    one killed job (no summary), one torn summary and one skipped pair."""
    root = tmp_path / "multirun"
    deltas = {("KL", 0): [1.0, -1.0], ("KL", 1): [2.0, 1.0], ("xekl", 0): [-0.5, -0.5], ("xekl", 1): [0.5, -2.0]}
    i = 0
    for (m, seed), ds in deltas.items():
        for (t, s), d in zip([("a", "b"), ("b", "a")], ds):
            _run(root / str(i), _transfer("KL", t, s, d, seed, alpha=1.0 if m == "KL" else 0.5),
                 hydra_method="kl" if m == "KL" else "xekl")
            i += 1
    _run(root / "f", None, error="UserError: optimizer.lr=-1 must be > 0")
    _run(root / "r", None, error="UserError: unknown teacher 'nosuch'", refused=True)  # validation: nothing computed
    _run(root / "k", None, hydra_method="kl")
    _run(root / "torn", '{"status": "ok", "transf')
    _run(root / "skip", {"status": "skipped", "reason": "teacher == student", "family": "transfer"})
    (root / "0" / "stages" / "1_x").mkdir(parents=True)  # a run's own sub-folder is not a run
    (root / "0" / "stages" / "1_x" / "summary.json").write_text("{}")
    return root


def test_transfer_statistics_per_seed_then_over_seeds(sweep):
    runs, problems = agg.load_runs([sweep])
    assert len(runs) == 8
    status = sorted((p["status"], p["dir"].rsplit("/", 1)[1]) for p in problems)
    assert status == [("failed", "f"), ("incomplete", "k"), ("incomplete", "torn"), ("refused", "r"),
                      ("skipped", "skip")]
    assert "optimizer.lr=-1" in next(p for p in problems if p["status"] == "failed")["reason"]
    t = {r["method"]: r for r in agg.aggregate(runs)["transfer_methods"]}
    assert set(t) == {"kl", "xekl"}  # the config group names Hydra recorded
    kl = t["kl"]
    assert kl["seeds"] == 2 and kl["runs"] == 4 and kl["pairs"] == 2
    # success per seed: 50% (seed 0), 100% (seed 1) -> mean 75, sample std 35.36, CI = t(0.975, 1) * std / sqrt 2
    assert kl["success_rate"]["mean"] == pytest.approx(75.0)
    assert kl["success_rate"]["std"] == pytest.approx(math.sqrt(2 * 25.0 ** 2))
    assert kl["success_rate"]["ci95"] == pytest.approx(12.7062 * 35.3553 / math.sqrt(2), rel=1e-4)
    assert kl["mean_delta"]["mean"] == pytest.approx((0.0 + 1.5) / 2)
    assert kl["worst_delta"]["mean"] == pytest.approx((-1.0 + 1.0) / 2)
    xe = t["xekl"]
    assert xe["success_rate"]["mean"] == pytest.approx(25.0) and xe["median_delta"]["mean"] == pytest.approx(-0.625)
    pairs = {(r["method"], r["teacher"]): r for r in agg.aggregate(runs)["transfer_pairs"]}
    assert pairs[("kl", "a")]["delta"]["mean"] == pytest.approx(1.5) and pairs[("kl", "a")]["delta"]["n"] == 2
    assert pairs[("kl", "a")]["gap"]["mean"] == pytest.approx(-5.0)


def test_method_label_without_hydra_dirs():
    assert agg.method_label({"method": "KL", "method_config": {"alpha": 0.5}}) == "XE-KL"
    assert agg.method_label({"method": "KLDP", "method_config": {"partition": "most-conf"}}) == "KLDP"
    assert agg.method_label({"method": "KLDP", "method_config": {"partition": "most-conf_u"}}) == "KLDP(most-conf_u)"
    assert agg.method_label({"method": "KLDP", "method_name": "mine"}) == "mine"


def test_describe_single_value_and_empty():
    d = agg.describe([2.0])
    assert d["n"] == 1 and d["mean"] == 2.0 and d["std"] == 0.0 and math.isnan(d["ci95"])
    assert agg.describe([])["n"] == 0 and agg.fmt(agg.describe([])) == "-"
    assert agg.fmt(agg.describe([1.0, 3.0])) == "2.00 ± 1.41 [±12.71]"


def test_cli_writes_markdown_csv_and_figure(sweep, tmp_path, capsys):
    tables, problems = load_script("aggregate").main([str(sweep), "--out", str(tmp_path / "out")])
    out = tmp_path / "out"
    md = (out / "results.md").read_text()
    assert "## transfer_methods" in md and "75.00 ± 35.36" in md
    assert ("Failed, incomplete, invalid or duplicate runs (3; 1 skipped by design; 1 refused before computing "
            "anything, not listed" in md) and "optimizer.lr=-1" in md and "nosuch" not in md
    rows = list(csv.DictReader(open(out / "transfer_methods.csv")))
    assert [r["method"] for r in rows] == ["kl", "xekl"] and float(rows[0]["success_rate_mean"]) == 75.0
    fig = out / "figures" / "transfer_delta_vs_gap.png"
    assert fig.is_file() and fig.stat().st_size > 1000
    assert "8 runs, 5 failed / incomplete / skipped" in capsys.readouterr().out


def test_other_families(tmp_path):
    root = tmp_path / "runs"
    for k, (z, accs, unit) in enumerate([(0, {"m1": 0.9, "m2": 0.95}, {}),  # an old summary: fractions
                                         (1, {"m1": 92.0, "m2": 97.0}, {"acc_unit": "percent"})]):
        _run(root / f"zoo{k}", {"task": "pretrain", "family": "pretrain", "zoo_seed": z, "seed": 0, **unit,
                                "models": {n: {"test_acc": a} for n, a in accs.items()}})
        _run(root / f"zs{k}", {"status": "ok", "family": "zeroshot", "seed": k, "teacher": "t", "student": "s",
                               "teacher_acc": 99.0, "baselines": ["kd_at"], "zeroshot_acc": 50.0 + 10 * k,
                               "kd_at_acc": 90.0, "mte_zeroshot": 0.3, "mte_kd_at": 0.5})
        _run(root / f"aft{k}", {"status": "ok", "family": "aft", "seed": k, "method": "aft", "student": "s",
                                "features": ["f1", "f2"], "student_acc_after": 95.0 + k, "transfer_delta": 1.0})
        _run(root / f"flips{k}", {"task": "prediction_flips", "family": "prediction_flips", "zoo_seed": k,
                                  "dataset": "digits", "split": "test", "agreement": {"mean": 90.0}})
        with open(root / f"flips{k}" / "pairs.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["teacher", "student", "pos_flips", "pos_flips_pct", "acc_diff"])
            w.writeheader()
            w.writerow({"teacher": "a", "student": "b", "pos_flips": 0 if k else 2, "pos_flips_pct": 0.0 if k else 1.0,
                        "acc_diff": -2.0})
            w.writerow({"teacher": "b", "student": "a", "pos_flips": 3, "pos_flips_pct": 1.5, "acc_diff": 2.0})
    runs, problems = agg.load_runs([root])
    assert not problems
    t = agg.aggregate(runs)
    zoo = {r["model"]: r for r in t["zoo"]}
    assert zoo["m1"]["test_acc"]["mean"] == pytest.approx(91.0) and zoo["m1"]["test_acc"]["n"] == 2
    zs = {r["student_kind"]: r for r in t["zeroshot"]}
    assert zs["zeroshot"]["acc"]["mean"] == pytest.approx(55.0) and zs["kd_at"]["mte"]["mean"] == pytest.approx(0.5)
    assert t["aft"][0]["student_acc_after"]["mean"] == pytest.approx(95.5) and t["aft"][0]["features"] == "f1+f2"
    fl = t["flips"][0]
    assert fl["zoo_draws"] == 2 and fl["pairs_with_pos_flips_pct"]["mean"] == pytest.approx(75.0)
    assert fl["weaker_teacher_pairs_with_pos_flips_pct"]["mean"] == pytest.approx(50.0)


def test_bad_input_is_one_clear_line(tmp_path):
    a = load_script("aggregate")
    with pytest.raises(SystemExit, match="is not a directory"):
        a.main([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no finished runs"):
        a.main([str(tmp_path / "empty")])


def test_duplicates_count_once_unbalanced_rows_are_flagged_nonfinite_runs_are_invalid(tmp_path):
    """The same configuration and seeds in two directories was two samples (n=4 from seeds {0,1,2,0}); a method
    row pooled seeds over different pair sets without a word; a NaN summary was averaged; n=1 printed '± 0.00'."""
    a, b = tmp_path / "sweep_a", tmp_path / "copy_of_a"
    pairs = [("t1", "s1"), ("t2", "s1"), ("t1", "s2")]
    for seed in (0, 1, 2):
        for i, (t, s) in enumerate(pairs if seed == 0 else pairs[:1]):  # seed 0 has 3 pairs, seeds 1-2 one
            _run(a / f"{seed}{i}", _transfer("kl", t, s, 1.0 + seed, seed), hydra_method="kl")
    _run(b / "00", _transfer("kl", "t1", "s1", 1.0, 0), hydra_method="kl")  # a copy of a/00
    _run(b / "nan", '{"status": "ok", "family": "transfer", "method": "kl", "teacher": "t1", "student": "s3", '
                    '"seed": 0, "transfer_delta": NaN, "knowledge_gain": 1.0, "knowledge_loss": 0.5, '
                    '"teacher_acc": 90.0, "student_acc_before": 95.0, "student_acc_after": Infinity}')
    _run(b / "null", {**_transfer("kl", "t2", "s3", 1.0, 0), "transfer_delta": None})  # the tracker's NaN
    runs, problems = agg.load_runs([a, b])
    assert len(runs) == 5
    status = {p["dir"].split("/")[-1]: (p["status"], p["reason"]) for p in problems}
    assert status["00"][0] == "duplicate" and str(a / "00") in status["00"][1]
    assert status["nan"][0] == "invalid" and "transfer_delta" in status["nan"][1] and \
        "student_acc_after" in status["nan"][1]
    assert status["null"][0] == "invalid" and "transfer_delta" in status["null"][1]
    pair = next(r for r in agg.transfer_tables(runs)["transfer_pairs"] if (r["teacher"], r["student"]) == ("t1", "s1"))
    assert pair["delta"]["n"] == 3 and pair["delta"]["mean"] == pytest.approx(2.0)  # seeds 0, 1, 2 once each
    row = agg.transfer_tables(runs)["transfer_methods"][0]
    assert row["balance"] == "unbalanced: z0s0 3 pairs, z0s1 1 pair, z0s2 1 pair"
    lone = next(r for r in agg.transfer_tables(runs)["transfer_pairs"] if (r["teacher"], r["student"]) == ("t2", "s1"))
    assert agg.fmt(lone["delta"]) == "1.00 (n=1)"
    md = agg.write(agg.aggregate(runs), problems, tmp_path / "out", runs).read_text()
    assert "duplicate: " in md and "invalid: " in md and "unbalanced: z0s0 3 pairs" in md
    balanced = [r for r in runs if r["summary"]["teacher"] == "t1" and r["summary"]["student"] == "s1"]
    assert agg.transfer_tables(balanced)["transfer_methods"][0]["balance"] == "ok"


def test_the_fidelity_table_prints_as_mean_and_std_everywhere():
    """`--print fidelity`, results.md and the report show the fidelity table in the README's layout (mean ± std per
    metric), not its raw _mean/_std columns."""
    from src.tracking.fidelity import format_table

    rows = [{"teacher": "self-distillation", "data": "as is", "runs": 3, "seeds": [0, 1, 2],
             "test_agreement_mean": 95.26, "test_agreement_std": 0.48, "test_kl_mean": 0.131, "test_kl_std": 0.02}]
    md = agg.table_markdown("fidelity", rows)
    assert md == format_table(rows)
    assert md.splitlines()[2] == "| self-distillation | as is | 3 | 95.26 ± 0.48 | 0.13 ± 0.02 |"
    other = [{"method": "kl", "delta": agg.describe([1.0, 3.0])}]
    assert agg.table_markdown("transfer_methods", other) == agg.markdown(other)
