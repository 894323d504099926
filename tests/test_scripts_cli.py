"""scripts/ answer bad input like the main_*.py scripts (README "Bad input", issue 25): ONE line `error: ...` on
stderr naming the bad value (and the fix), exit code 2; never a traceback, an argparse usage dump or a value
silently replaced (a batch size of 0 run as 64). In-process through each script's `main([...])` (src/cli.py's
ArgumentParser and run_script), plus two real subprocesses for the whole path from the command line."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, load_script

# (id, script, argv, substrings of the one line, cuda): {file} = a regular file, {tmp} = the test's tmp dir;
# cuda: None (untouched), "none" (no GPU here) or an int (that many GPUs visible), patched into torch.cuda
CASES = [
    # benchmark.py: numbers refused, never replaced (`x or 64`)
    ("benchmark-batch-size-0", "benchmark", ["--batch-size", "0"],
     ["argument --batch-size: 0 must be >= 1", "use e.g. --batch-size 64"], None),
    ("benchmark-batch-size-text", "benchmark", ["--batch-size", "abc"], ["--batch-size", "'abc' is not an integer"],
     None),
    ("benchmark-workers-negative", "benchmark", ["--workers", "-1"], ["--workers: -1 must be >= 0"], None),
    ("benchmark-repeats-negative", "benchmark", ["--repeats", "-2"], ["--repeats: -2 must be >= 1"], None),
    ("benchmark-repeats-0", "benchmark", ["--repeats", "0"], ["--repeats: 0 must be >= 1", "--repeats 9"], None),
    ("benchmark-steps-negative", "benchmark", ["--steps", "-3"], ["--steps: -3 must be >= 1"], None),
    ("benchmark-steps-0", "benchmark", ["--steps", "0"], ["--steps: 0 must be >= 1"], None),
    ("benchmark-warmup-negative", "benchmark", ["--warmup", "-1"], ["--warmup: -1 must be >= 0"], None),
    ("benchmark-threads-negative", "benchmark", ["--threads", "-4"], ["--threads: -4 must be >= 1"], None),
    ("benchmark-threads-0", "benchmark", ["--threads", "0"], ["--threads: 0 must be >= 1"], None),
    ("benchmark-loader-samples-negative", "benchmark", ["--loader-samples", "-5"],
     ["--loader-samples: -5 must be >= 256"], None),
    ("benchmark-dl-batches-negative", "benchmark", ["--dl-batches", "-1"], ["--dl-batches: -1 must be >= 1"], None),
    ("benchmark-ffcv-samples-negative", "benchmark", ["--ffcv-samples", "-1"], ["--ffcv-samples: -1 must be >= 4"],
     None),
    ("benchmark-device-tpu", "benchmark", ["--device", "tpu"], ["--device 'tpu' is not a device", "cpu, cuda"], None),
    ("benchmark-device-cuda-absent", "benchmark", ["--device", "cuda"],
     ["--device cuda: CUDA is not available", "use --device cpu"], "none"),
    ("benchmark-device-cuda-7", "benchmark", ["--device", "cuda:7"],
     ["--device cuda:7: only 1 CUDA device(s) visible", "--device cuda:0"], 1),
    ("benchmark-student-unknown", "benchmark", ["--device", "cpu", "--student", "resnet9000", "--out", "{tmp}"],
     ["--student 'resnet9000' is not a model", "closest:"], None),
    ("benchmark-teacher-unknown", "benchmark", ["--device", "cpu", "--teacher", "wrn_16_9x", "--out", "{tmp}"],
     ["--teacher 'wrn_16_9x' is not a model"], None),
    ("benchmark-out-below-file", "benchmark", ["--device", "cpu", "--out", "{file}/x"],
     ["--out {file}/x cannot be created", "{file} is a regular file"], None),
    ("benchmark-unknown-option", "benchmark", ["--bogus"], ["unrecognized arguments: --bogus"], None),
    ("benchmark-amp-choice", "benchmark", ["--amp", "fp8"], ["argument --amp: invalid choice: 'fp8'"], None),
    # bench_gpu.py
    ("bench_gpu-peak-tflops-negative", "bench_gpu", ["--peak-tflops", "-1"],
     ["argument --peak-tflops: -1 must be > 0"], None),
    ("bench_gpu-peak-tflops-0", "bench_gpu", ["--peak-tflops", "0"], ["--peak-tflops: 0 must be > 0"], None),
    ("bench_gpu-peak-tflops-nan", "bench_gpu", ["--peak-tflops", "nan"], ["--peak-tflops: nan must be a finite"],
     None),
    ("bench_gpu-device-cuda-absent", "bench_gpu", [], ["--device cuda: CUDA is not available",
                                                      "run on a GPU node, or use --device cpu --tiny"], "none"),
    ("bench_gpu-device-tpu", "bench_gpu", ["--device", "tpu"], ["--device 'tpu' is not a device"], None),
    ("bench_gpu-out-below-file", "bench_gpu", ["--device", "cpu", "--tiny", "--out", "{file}/x"],
     ["--out {file}/x", "{file} is a regular file"], None),
    # bench_flips.py
    ("bench_flips-models-1", "bench_flips", ["--models", "1"], ["argument --models: 1 must be >= 2"], None),
    ("bench_flips-classes-0", "bench_flips", ["--classes", "0"], ["argument --classes: 0 must be >= 2"], None),
    ("bench_flips-samples-0", "bench_flips", ["--samples", "0"], ["argument --samples: 0 must be >= 1"], None),
    ("bench_flips-kl-max-gb-0", "bench_flips", ["--kl-max-gb", "0"], ["argument --kl-max-gb: 0 must be > 0",
                                                                      "--kl-max-gb 2"], None),
    ("bench_flips-kl-samples-negative", "bench_flips", ["--kl-samples", "-1"], ["--kl-samples: -1 must be >= 0"],
     None),
    ("bench_flips-loop-pairs-0", "bench_flips", ["--loop-pairs", "0"], ["--loop-pairs: 0 must be >= 1"], None),
    ("bench_flips-out-below-file", "bench_flips", ["--out", "{file}/x/b.json"],
     ["--out {file}/x/b.json cannot be created", "{file} is a regular file"], None),
    ("bench_flips-out-is-a-folder", "bench_flips", ["--out", "{tmp}"], ["--out {tmp} is a folder"], None),
    ("bench_flips-device-cuda-7", "bench_flips", ["--device", "cuda:7"], ["--device cuda:7: only 1 CUDA"], 1),
    ("bench_flips-device-cuda-absent", "bench_flips", ["--device", "cuda"], ["--device cuda: CUDA is not"], "none"),
    ("bench_flips-kl-dir-below-file", "bench_flips", ["--kl-dir", "{file}/kl", "--out", "{tmp}/b.json"],
     ["--kl-dir {file}/kl", "{file} is a regular file"], None),
    # write_ffcv.py: options
    ("write_ffcv-chunksize-0", "write_ffcv", ["--chunksize", "0"], ["argument --chunksize: 0 must be >= 1"], None),
    ("write_ffcv-num-workers-negative", "write_ffcv", ["--num-workers", "-3"],
     ["argument --num-workers: -3 must be >= 1", "--num-workers 4"], None),
    ("write_ffcv-smart-threshold-negative", "write_ffcv", ["--write-mode", "smart", "--smart-threshold", "-5"],
     ["argument --smart-threshold: -5 must be >= 0"], None),
    ("write_ffcv-smart-without-threshold", "write_ffcv", ["--write-mode", "smart"],
     ["smart needs --smart-threshold"], None),
    ("write_ffcv-threshold-without-smart", "write_ffcv", ["--smart-threshold", "100"],
     ["--smart-threshold: 100 is only used with --write-mode smart"], None),
    ("write_ffcv-jpeg-quality-0", "write_ffcv", ["--jpeg-quality", "0"],
     ["argument --jpeg-quality: 0 must be in [1, 100]", "--jpeg-quality 90"], None),
    ("write_ffcv-jpeg-quality-101", "write_ffcv", ["--jpeg-quality", "101"],
     ["--jpeg-quality: 101 must be in [1, 100]"], None),
    ("write_ffcv-compress-probability-2", "write_ffcv", ["--compress-probability", "2"],
     ["argument --compress-probability: 2 must be in [0, 1]", "--compress-probability 0.5"], None),
    ("write_ffcv-page-size-0", "write_ffcv", ["--page-size-mib", "0"], ["argument --page-size-mib: 0 must be >= 2"],
     None),
    ("write_ffcv-page-size-3", "write_ffcv", ["--page-size-mib", "3"],
     ["--page-size-mib: 3 must be a power of two", "--page-size-mib 8"], None),
    ("write_ffcv-max-res-0", "write_ffcv", ["--max-res", "0"], ["argument --max-res: 0 must be >= 1", "--max-res 256"],
     None),
    # write_ffcv.py: key=value overrides (Hydra composition errors), before any dataset is built
    ("write_ffcv-unknown-group-option", "write_ffcv", ["dataset=cifar11", "paths.data={tmp}"],
     ["dataset=cifar11", "closest: cifar10", "dataset=digits"], None),
    ("write_ffcv-unknown-key", "write_ffcv", ["foo=1", "paths.data={tmp}"], ["unknown key 'foo' (closest: zoo)"], None),
    ("write_ffcv-unknown-nested-key", "write_ffcv", ["dataset.bogus=1", "paths.data={tmp}"],
     ["unknown key 'dataset.bogus'", "add a new key with +dataset.bogus=<value>"], None),
    ("write_ffcv-wrong-type", "write_ffcv", ["trainer.max_steps=abc", "paths.data={tmp}"],
     ["trainer.max_steps=abc", "'abc'", "Integer"], None),
    ("write_ffcv-unparsable-override", "write_ffcv", ["dataset=[a", "paths.data={tmp}"],
     ["override 'dataset=[a' cannot be parsed"], None),
    ("write_ffcv-unknown-config-name", "write_ffcv", ["--config-name", "nope/nope", "paths.data={tmp}"],
     ["nope/nope"], None),
    # aggregate.py
    ("aggregate-out-below-file", "aggregate", ["{tmp}", "--out", "{file}/x"],
     ["--out {file}/x cannot be created", "{file} is a regular file"], None),
    ("aggregate-missing-dir", "aggregate", ["{tmp}/missing"], ["{tmp}/missing is not a directory"], None),
    ("aggregate-wandb-choice", "aggregate", ["{tmp}", "--wandb", "cloud"], ["argument --wandb: invalid choice"], None),
    ("aggregate-no-dirs", "aggregate", [], ["the following arguments are required: dirs"], None),
    # reproduce.py (checked before anything is deleted or run)
    ("reproduce-lanes-0", "reproduce", ["--lanes", "0", "--report-only", "--out", "{tmp}"], ["--lanes 0 must be >= 1"],
     None),
    ("reproduce-seeds-twice", "reproduce", ["--seeds", "0", "0", "--report-only", "--out", "{tmp}"],
     ["must be distinct integers"], None),
    ("reproduce-seeds-text", "reproduce", ["--seeds", "x"], ["argument --seeds: 'x' is not an integer"], None),
    ("reproduce-seeds-negative", "reproduce", ["--seeds", "0", "-1"], ["argument --seeds: -1 must be >= 0"], None),
    ("reproduce-out-below-file", "reproduce", ["--report-only", "--out", "{file}/x"], ["is a file, not a folder"],
     None),
    ("rehearse-unknown-row", "rehearse", ["--rows", "transfer_kldp", "--out", "{tmp}"],
     ["--rows transfer_kldp is not a rehearsal row", "transfer_kl_dp"], None),
    ("rehearse-out-below-file", "rehearse", ["--out", "{file}/x"], ["is a regular file, not a folder"], None),
]


def _fill(items, tmp_path, file):
    return [s.replace("{tmp}", str(tmp_path)).replace("{file}", str(file)) for s in items]


def _patch_cuda(monkeypatch, cuda):
    if cuda is None:
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda != "none")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0 if cuda == "none" else int(cuda))


def _one_line(capsys) -> str:
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1, f"stderr is not one line: {err}"
    assert err[0].startswith("error: ") and "Traceback" not in captured.err and "usage:" not in captured.err
    return err[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_argument_is_one_line_and_exit_code_2(case, tmp_path, capsys, monkeypatch):
    _, script, argv, expect, cuda = case
    monkeypatch.delenv("KT_DEBUG", raising=False)
    file = tmp_path / "afile"
    file.write_text("a regular file\n")
    _patch_cuda(monkeypatch, cuda)
    mod = load_script(script)
    with pytest.raises(SystemExit) as ei:
        mod.main(_fill(argv, tmp_path, file))
    assert ei.value.code == 2
    line = _one_line(capsys)
    for s in _fill(expect, tmp_path, file):
        assert s in line, f"{s!r} not in {line!r}"
    assert line == f"error: {ei.value}"  # the SystemExit carries the message (in-process callers match on it)


def test_the_table_covers_every_script_with_arguments():
    scripts = {p.stem for p in (ROOT / "scripts").glob("*.py") if "add_argument" in p.read_text()}
    assert scripts == {c[1] for c in CASES}
    assert len(CASES) >= 25


# ---------------------------------------------------------------------------- valid invocations are unchanged


def test_defaults_are_unchanged():
    bm = load_script("benchmark").parser().parse_args([])
    assert (bm.device, bm.batch_size, bm.steps, bm.warmup, bm.repeats, bm.threads, bm.workers) == \
        ("auto", None, None, None, 9, None, None)
    assert (bm.loader_samples, bm.dl_batches, bm.ffcv_samples, bm.student, bm.teacher) == \
        (10000, 8, 2048, None, None)
    wf = load_script("write_ffcv").parse_args([])
    assert (wf.max_res, wf.jpeg_quality, wf.compress_probability, wf.smart_threshold, wf.num_workers,
            wf.page_size_mib, wf.chunksize, wf.seed, wf.overrides) == (None, 90, 0.5, None, 4, 8, 100, 0, [])
    bf = load_script("bench_flips").parser().parse_args([])
    assert (bf.models, bf.samples, bf.classes, bf.loop_pairs, bf.kl_samples, bf.kl_max_gb, bf.device) == \
        (400, 50_000, 1_000, 300, 1000, 2.0, "cpu")
    bg = load_script("bench_gpu").parser().parse_args([])
    assert (bg.device, bg.peak_tflops, bg.tiny) == ("cuda", None, False)


def test_edge_values_that_are_valid_still_parse(tmp_path, monkeypatch):
    """0 where 0 means something (workers in the main process, no KL timing, warmup off), the ends of the ranges,
    and the device-dependent defaults filled in only where nothing was given."""
    bench = load_script("benchmark")
    a = bench.parser().parse_args(["--workers", "0", "--warmup", "0", "--device", "cpu", "--out", str(tmp_path)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.settle(a) == torch.device("cpu")
    assert (a.workers, a.warmup, a.batch_size, a.steps, a.amp, a.student, a.teacher) == \
        (0, 0, 64, 10, "none", "resnet8", "wrn_16_1")
    b = bench.parser().parse_args(["--device", "auto", "--batch-size", "8", "--steps", "2", "--out", str(tmp_path)])
    bench.settle(b)
    assert (b.device, b.batch_size, b.steps, b.warmup) == (torch.device("cpu"), 8, 2, 3)
    wf = load_script("write_ffcv").parse_args(["--jpeg-quality", "1", "--compress-probability", "0", "--max-res", "1",
                                               "--page-size-mib", "2", "--write-mode", "smart", "--smart-threshold",
                                               "0", "dataset=cifar10", "--splits", "test", "paths.data=/d"])
    assert (wf.jpeg_quality, wf.compress_probability, wf.max_res, wf.page_size_mib, wf.smart_threshold) == \
        (1, 0.0, 1, 2, 0)
    assert wf.overrides == ["dataset=cifar10", "paths.data=/d"] and wf.splits == ["test"]
    assert load_script("write_ffcv").parse_args(["--compress-probability", "1", "--jpeg-quality", "100"]) \
        .compress_probability == 1.0
    bf = load_script("bench_flips").parser().parse_args(["--models", "2", "--classes", "2", "--kl-samples", "0"])
    assert (bf.models, bf.classes, bf.kl_samples) == (2, 2, 0)
    assert load_script("bench_gpu").parser().parse_args(["--peak-tflops", "312"]).peak_tflops == 312.0


def test_peak_tflops_override_is_taken_as_given():
    bg = load_script("bench_gpu")
    assert bg.peak_tflops("NVIDIA H100 80GB HBM3", 500.0) == 500.0
    assert bg.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and bg.peak_tflops("unknown GPU") is None


# ------------------------------------------------------------------------------------------------- src/cli.py


def test_run_script_keeps_the_traceback_of_a_bug_and_shows_it_with_kt_debug(capsys, monkeypatch):
    from src.cli import run_script
    from src.errors import UserError

    @run_script
    def bug():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        bug()

    @run_script
    def bad():
        raise UserError("x=1 is bad: use x=2")

    monkeypatch.setenv("KT_DEBUG", "1")
    with pytest.raises(SystemExit) as ei:
        bad()
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "UserError" in err
    assert err.strip().splitlines()[-1] == "error: x=1 is bad: use x=2"


def test_number_types_name_value_range_and_flag(capsys):
    from src.cli import ArgumentParser, in_range_float, non_negative_float, positive_int

    p = ArgumentParser()
    p.add_argument("n", type=positive_int)  # the factory itself works as a type too
    p.add_argument("--frac", type=in_range_float(0, 1), default=0.25)
    p.add_argument("--lr", type=non_negative_float(0.1))
    a = p.parse_args(["3", "--frac", "1", "--lr", "0"])
    assert (a.n, a.frac, a.lr) == (3, 1.0, 0.0) and isinstance(a.n, int)
    for argv, line in ((["0"], "error: argument n: 0 must be >= 1 (use e.g. 1)"),
                       (["1", "--frac", "-0.5"],
                        "error: argument --frac: -0.5 must be in [0, 1] (use e.g. --frac 0.25)"),
                       (["1", "--lr", "inf"],
                        "error: argument --lr: inf must be a finite number >= 0 (use e.g. --lr 0.1)"),
                       (["1.5"], "error: argument n: '1.5' is not an integer (use e.g. 1)")):
        with pytest.raises(SystemExit) as ei:
            p.parse_args(argv)
        assert ei.value.code == 2 and _one_line(capsys) == line


def test_check_device_accepts_what_exists(monkeypatch):
    from src.cli import check_device

    assert check_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda:1") and check_device("auto", auto=True).type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device("auto", auto=True) == torch.device("cpu")


# ------------------------------------------------------------------------ the real command line (2 subprocesses)


def _run(script, args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for k in ("KT_DEBUG", "HYDRA_FULL_ERROR"):
        env.pop(k, None)
    res = subprocess.run([sys.executable, f"scripts/{script}.py", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in res.stderr, err
    return err[0]


@pytest.mark.slow
def test_subprocess_write_ffcv_unknown_dataset_is_one_line(tmp_path):
    line = _run("write_ffcv", ["dataset=cifar11", f"paths.data={tmp_path}"], tmp_path)
    assert "dataset=cifar11" in line and "closest: cifar10" in line
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_subprocess_benchmark_batch_size_0_is_one_line(tmp_path):
    line = _run("benchmark", ["--batch-size", "0", "--out", str(tmp_path)], tmp_path)
    assert line == "error: argument --batch-size: 0 must be >= 1 (use e.g. --batch-size 64)"


def test_write_ffcv_checks_every_split_before_writing_any(tmp_path):
    """write_ffcv.py failed on an empty split after it had written the others: every split is checked first."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "if" / split / c).mkdir(parents=True)
            for j in range(3):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                    tmp_path / "if" / split / c / f"{j}.png")
    ffcv = load_script("write_ffcv")
    args = ["--out-dir", str(tmp_path / "ff"), "dataset=imagefolder", f"dataset.root={tmp_path / 'if'}",
            "dataset.num_classes=2", "dataset.image_size=16", "dataset.val_fraction=0.1"]  # 6 images: val is empty
    with pytest.raises(SystemExit, match=r"split\(s\) val of imagefolder hold no samples \(nothing was written\)"):
        ffcv.main(args)
    assert not (tmp_path / "ff").exists()
