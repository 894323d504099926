"""The benchmarks cannot rot: `scripts/bench_gpu.py --device cpu --tiny` runs every arm (training ratios, loaders,
all-pairs flips and streamed KL) at tiny sizes and writes its JSON + Markdown; its FFCV arm (numba compiles FFCV's
pipeline first: about a minute here) runs alone in a `slow` test."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))


def test_bench_gpu_tiny_on_cpu_writes_every_row(tmp_path):
    import bench_gpu

    assert bench_gpu.main(["--device", "cpu", "--tiny", "--skip", "ffcv", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "bench_gpu_cpu_tiny.json").read_text())
    rows = {r["row"].split(" (")[0]: r for r in res["rows"]}
    for key in ("trainer/minimal loop, KL+DP", "KL+DP step / sum of its parts",
                "tensor loader crop+flip / its ceiling", "tensor loader crop+flip / DataLoader+torchvision",
                "tensor loader RRC+flip / its ceiling"):
        assert key in rows and math.isfinite(rows[key]["ratio"]) and rows[key]["ratio"] > 0, key
    mfu = next(r for r in res["rows"] if r["row"].startswith("KL+DP resnet8 -> resnet8 32px none channels_last"))
    assert mfu["step_gflop"] > 0 and mfu["img_s"] > 0
    flips, kl = res["flips"], res["kl"]
    assert flips["pairs"] == 12 * 11 and flips["vectorised_s"] > 0 and flips["peak_rss_gb"] > 0
    assert kl["kl_samples"] == 100 and kl["kl_stream_s_extrapolated"] >= kl["kl_stream_s"]
    md = (tmp_path / "bench_gpu_cpu_tiny.md").read_text()
    assert md.startswith("bench_gpu on cpu") and "| comparison | ratio |" in md and "all-pairs flips" in md


@pytest.mark.slow
def test_bench_gpu_tiny_ffcv_arm(tmp_path):
    os.environ.setdefault("NUMBA_OPT", "0")
    pytest.importorskip("ffcv")
    import bench_gpu

    assert bench_gpu.main(["--device", "cpu", "--tiny", "--skip", "train", "loader", "flips", "kl", "--out",
                           str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "bench_gpu_cpu_tiny.json").read_text())["rows"]
    assert row["row"].startswith("FFCV / DataLoader (JPEG ImageFolder") and row["ratio"] > 0, row
