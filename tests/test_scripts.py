"""The command-line tools in scripts/ that are not experiments: the sweep aggregator and the two benchmarks run on
tiny inputs (their numbers are checked for shape and sanity, never against a time: speed targets live in the
benchmark's own ratios, not in tests)."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from conftest import load_script


def _summary(d, method, delta, gain, loss, partition=None, status="ok"):
    d.mkdir(parents=True)
    s = {"status": status, "method": method, "transfer_delta": delta, "knowledge_gain": gain,
         "knowledge_loss": loss, "method_config": {"partition": partition} if partition else {}}
    (d / "summary.json").write_text(json.dumps(s))


def test_aggregate_sweep_success_rate_and_deltas(tmp_path, capsys):
    agg = load_script("aggregate_sweep")
    for i, (delta, gain, loss) in enumerate([(1.0, 2.0, 1.0), (-0.5, 0.5, 1.0), (2.0, 3.0, 1.0)]):
        _summary(tmp_path / str(i), "KL", delta, gain, loss)
    _summary(tmp_path / "3", "KLDP", 0.5, 1.0, 0.5, partition="most-conf")
    _summary(tmp_path / "4", "KLDP", 0.0, 0.0, 0.0, partition="most-conf")
    _summary(tmp_path / "5", "KL", 9.0, 9.0, 0.0, status="failed")  # an unfinished job is not a pair
    table = agg.main([str(tmp_path), "--csv", str(tmp_path / "t.csv")])
    by = {t["method"]: t for t in table}
    assert set(by) == {"KL", "KLDP(most-conf)"}
    kl, dp = by["KL"], by["KLDP(most-conf)"]
    assert kl["pairs"] == 3 and kl["success_rate"] == pytest.approx(200 / 3)
    assert kl["mean_delta"] == pytest.approx(2.5 / 3) and kl["median_delta"] == 1.0
    assert kl["mean_gain"] == pytest.approx(5.5 / 3) and kl["mean_loss"] == 1.0
    assert dp["pairs"] == 2 and dp["success_rate"] == 50.0  # a delta of 0 is not a success
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [r["method"] for r in rows] == ["KL", "KLDP(most-conf)"]
    assert "66.7" in capsys.readouterr().out


def test_aggregate_sweep_bad_dir_is_one_clear_line(tmp_path):
    agg = load_script("aggregate_sweep")
    with pytest.raises(SystemExit, match="is not a directory"):
        agg.main([str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="no finished transfer summaries"):
        agg.main([str(tmp_path)])


def _tiny_benchmark(tmp_path, extra):
    bench = load_script("benchmark")
    n = torch.get_num_threads()
    try:
        assert bench.main(["--threads", "1", "--batch-size", "8", "--steps", "2", "--repeats", "2", "--warmup", "1",
                           "--loader-samples", "256", "--dl-batches", "2", "--workers", "0", "--skip", "ffcv",
                           "--out", str(tmp_path), *extra]) == 0
    finally:
        torch.set_num_threads(n)
    return json.loads(next(tmp_path.glob("benchmark_*.json")).read_text())


def test_benchmark_runs_every_comparison_and_writes_its_table(tmp_path):
    res = _tiny_benchmark(tmp_path, ["--device", "cpu"])
    rows = {r["row"]: r for r in res["rows"]}
    assert set(rows) == {"trainer/minimal loop, KD (KL)", "trainer/minimal loop, KL+DP",
                         "KL+DP step / sum of its parts",
                         "tensor loader / DataLoader+torchvision (CIFAR-shaped, crop+flip)"}
    for r in rows.values():
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["target"] > 0
    parts = rows["KL+DP step / sum of its parts"]["parts_ms"]
    assert set(parts) == {"student fwd+bwd+step", "teacher fwd", "frozen-student fwd"}
    assert all(v > 0 for v in parts.values())
    assert len(rows["trainer/minimal loop, KD (KL)"]["trainer_s"]) == 2  # one timing per repeat
    table = (tmp_path / "benchmark_cpu.md").read_text()
    assert table.count("\n| ") == 5 and "device cpu" in table  # header row + 4 comparisons
    assert "cores" in res["device_name"]  # the machine is named


@pytest.mark.gpu
def test_benchmark_on_cuda_with_bf16_channels_last_compile(tmp_path):
    res = _tiny_benchmark(tmp_path, ["--device", "cuda", "--amp", "bf16", "--channels-last", "--compile"])
    assert res["args"]["device"].startswith("cuda") and len(res["rows"]) == 4
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in res["rows"])


def test_bench_flips_vectorised_statistics_on_a_small_problem(tmp_path, monkeypatch):
    bf = load_script("bench_flips")
    out = tmp_path / "bench_flips.json"
    monkeypatch.setattr("sys.argv", ["bench_flips.py", "--models", "6", "--samples", "300", "--classes", "10",
                                     "--loop-pairs", "5", "--kl-samples", "50", "--kl-loop-pairs", "3",
                                     "--out", str(out)])
    bf.main()  # asserts inside: the loop reference's values equal the vectorised ones on the timed pairs
    res = json.loads(out.read_text())
    assert res["pairs"] == 30 and res["loop_pairs_timed"] == 5 and res["kl_samples"] == 50
    assert res["vectorised_s"] > 0 and res["speedup"] > 0 and res["kl_loop_pairs_timed"] == 3
    pct = res["synthetic_pos_flips_pct"]
    assert 0 <= pct["min"] <= pct["median"] <= pct["max"] <= 100
