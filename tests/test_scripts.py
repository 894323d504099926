"""The benchmarks in scripts/ run on tiny inputs (their numbers are checked for shape and sanity, never against a
time: speed targets live in the benchmark's own ratios, not in tests). The results aggregator: test_aggregate.py."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import load_script


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
                         "KL+DP step / sum of its parts", "tensor loader crop+flip / its ceiling (CIFAR-shaped)",
                         "tensor loader crop+flip / DataLoader+torchvision", "tensor loader RRC+flip / its ceiling"}
    for r in rows.values():
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0
        assert r["target"] is None or r["target"] > 0  # RRC against its ceiling has no goal
    parts = rows["KL+DP step / sum of its parts"]["parts_ms"]
    assert set(parts) == {"student fwd+bwd+step", "teacher fwd", "frozen-student fwd"}
    assert all(v > 0 for v in parts.values())
    assert len(rows["trainer/minimal loop, KD (KL)"]["trainer_s"]) == 2  # one timing per repeat
    table = (tmp_path / "benchmark_cpu.md").read_text()
    assert table.count("\n| ") == 7 and "device cpu" in table  # header row + 6 comparisons
    assert "cores" in res["device_name"]  # the machine is named


@pytest.mark.gpu
def test_benchmark_on_cuda_with_bf16_channels_last_compile(tmp_path):
    res = _tiny_benchmark(tmp_path, ["--device", "cuda", "--amp", "bf16", "--channels-last", "--compile"])
    assert res["args"]["device"].startswith("cuda") and len(res["rows"]) == 6
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in res["rows"])


def test_bench_flips_vectorised_statistics_on_a_small_problem(tmp_path, monkeypatch):
    bf = load_script("bench_flips")
    out = tmp_path / "bench_flips.json"
    monkeypatch.setattr("sys.argv", ["bench_flips.py", "--models", "6", "--samples", "300", "--classes", "10",
                                     "--loop-pairs", "5", "--kl-samples", "50", "--kl-dir", str(tmp_path),
                                     "--out", str(out)])
    bf.main()  # asserts inside: the loop reference's values equal the vectorised ones on the timed pairs
    res = json.loads(out.read_text())
    assert res["pairs"] == 30 and res["loop_pairs_timed"] == 5 and res["kl_samples"] == 50
    assert res["vectorised_s"] > 0 and res["speedup"] > 0 and res["peak_rss_gb"] > 0
    # KL streamed from fp16 files on a stated fraction of the samples, extrapolated to all of them
    assert res["kl_stream_s"] > 0 and res["kl_extrapolated_from_fraction"] == pytest.approx(50 / 300)
    pct = res["synthetic_pos_flips_pct"]
    assert 0 <= pct["min"] <= pct["median"] <= pct["max"] <= 100
