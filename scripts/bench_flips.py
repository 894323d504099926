"""Benchmark: all pairwise prediction-flip statistics for many models from (synthetic) cached predictions.

    .venv/bin/python scripts/bench_flips.py                       # 400 models x 50,000 samples x 1,000 classes
    .venv/bin/python scripts/bench_flips.py --models 50 --samples 5000 --classes 100 --out /tmp/b.json
    .venv/bin/python scripts/bench_flips.py --device cuda --kl-samples 50000 --kl-dir /local/scratch  # full KL

What is timed, in one run:
- vectorised (src/metrics/pairwise.py): for ALL N*(N-1) ordered pairs, positive/negative flips, accuracy
  difference, per-class positive/negative flips with their mean/std/entropy, the class concentration
  (classes holding 2/5/20/50% of the positive flips) and top-1 agreement; from the (N, n) predicted classes.
- loop reference: the same statistics pair by pair with src/metrics/flips.py (flips, per_class_flips,
  class_concentration) plus an agreement comparison, timed on --loop-pairs random pairs and extrapolated
  linearly to all pairs (stated as such in the output). Its values are checked against the vectorised ones.
- KL(teacher || student) needs the full probabilities: 400 x 50,000 x 1,000 float32 logits are 80 GB, so they
  are never held: each model's fp16 log-probabilities go to a memory-mapped file (40 GB at full size) and
  `kl_matrix_stream` reads blocks of samples of all models within --kl-max-gb. Timed separately (not part of the
  5 s) on all N models and --kl-samples samples, extrapolated linearly to --samples unless they are equal.
- Peak memory: the process's peak RSS (resource.getrusage), and on CUDA torch's peak allocation.
Synthetic predictions: model accuracies uniform in [0.45, 0.9], correlated through per-sample difficulty; wrong
predictions go to a per-sample confusion class 60% of the time, else to a uniformly random wrong class.
"""
from __future__ import annotations

import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.cli import (ArgumentParser, check_device, check_out_path, int_in_range, non_negative_int,  # noqa: E402
                     positive_float, positive_int, run_script)
from src.engine.cache import log_prob_file  # noqa: E402
from src.metrics import pairwise as pw  # noqa: E402
from src.metrics.classification import kl_divergence  # noqa: E402
from src.metrics.flips import class_concentration, flips, per_class_flips  # noqa: E402


def synthetic_predictions(N: int, n: int, K: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % K)[torch.randperm(n, generator=g)]
    acc = 0.45 + 0.45 * torch.rand(N, 1, generator=g)
    difficulty = torch.randn(1, n, generator=g)
    logit = torch.log(acc / (1 - acc)) - 1.5 * difficulty
    correct = torch.rand(N, n, generator=g) < torch.sigmoid(logit)
    confusion = (labels + 1 + torch.randint(0, K - 1, (n,), generator=g)) % K  # != label
    uniform = (labels.view(1, n) + 1 + torch.randint(0, K - 1, (N, n), generator=g)) % K
    wrong = torch.where(torch.rand(N, n, generator=g) < 0.6, confusion.view(1, n), uniform)
    preds = torch.where(correct, labels.view(1, n), wrong).to(torch.int16 if K <= 32767 else torch.int32)
    return preds, labels


def peak_rss_gb() -> float:
    """Peak resident memory (GiB) of this process since the last `reset_peak_rss` (Linux VmHWM), else since its
    start (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2 ** 20
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def reset_peak_rss() -> None:
    """Restart the peak-RSS count at the current RSS (Linux: `5` to /proc/self/clear_refs; elsewhere a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def vectorised(preds, labels, K, device="cpu"):
    dev = torch.device(device)
    preds, labels = preds.to(dev), labels.to(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    st = pw.pairwise_stats(preds, labels, K)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return {k: v.cpu() for k, v in st.items()}, time.perf_counter() - t


def loop_reference(preds, labels, K, pairs):
    t = time.perf_counter()
    out = []
    for a, b in pairs:
        pa, pb = preds[a].long(), preds[b].long()
        f = flips(pa, pb, labels)
        pc = per_class_flips(pa, pb, labels, K)
        cc = class_concentration(pc["pos_per_class"])
        agree = (pa == pb).double().mean().item() * 100
        out.append((f, pc, cc, agree))
    return out, time.perf_counter() - t


def synthetic_logits(preds, m: int, S: int, K: int, seed: int) -> torch.Tensor:
    """(S, K) logits of model m on the first S samples, peaked at its predicted class."""
    g = torch.Generator().manual_seed(seed * 100003 + m)
    z = torch.randn(S, K, generator=g) * 2
    z[torch.arange(S), preds[m, :S].long()] += 6.0
    return z


def bench_flips(N, n, K, loop_pairs=300, seed=0, device="cpu", log=print) -> dict:
    """All-pairs statistics of N synthetic models (vectorised, on `device`) checked against the loop reference
    on `loop_pairs` random pairs; returns timings and peak memory."""
    preds, labels = synthetic_predictions(N, n, K, seed)
    all_pairs = N * (N - 1)
    reset_peak_rss()
    rss0 = peak_rss_gb()  # the inputs (and whatever the process holds) before the statistics
    st, t_vec = vectorised(preds, labels, K, device)
    res = {"models": N, "samples": n, "classes": K, "pairs": all_pairs, "device": str(device),
           "vectorised_s": t_vec, "peak_rss_gb": peak_rss_gb(), "peak_rss_gb_before": rss0}
    if torch.device(device).type == "cuda":
        res["peak_cuda_gb"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2 ** 30
    log(f"vectorised on {device}, all {all_pairs} ordered pairs (flips, acc diff, per-class mean/std/entropy, "
        f"concentration, agreement): {t_vec:.2f} s (target <= 5 s on 2 CPU cores), peak RSS "
        f"{res['peak_rss_gb']:.2f} GB (before: {rss0:.2f} GB)")
    rng = random.Random(seed)
    pairs = [(t, s) for t, s in ((rng.randrange(N), rng.randrange(N)) for _ in range(4 * loop_pairs)) if t != s]
    pairs = pairs[:loop_pairs]
    ref, t_loop = loop_reference(preds, labels, K, pairs)
    for (t, s), (f, pc, cc, agree) in zip(pairs, ref):  # the two agree
        assert f["positive_flips"] == st["pos_flips"][t, s] and f["negative_flips"] == st["neg_flips"][t, s]
        assert abs(pc["pos_class_entropy"] - st["pos_class_entropy"][t, s].item()) < 1e-4
        assert abs(pc["pos_class_std"] - st["pos_class_std"][t, s].item()) < 1e-4
        assert all(cc[k] == st[k][t, s] for k in cc)
        assert abs(agree - st["agreement"][t, s].item()) < 1e-6
    t_loop_all = t_loop / max(1, len(pairs)) * all_pairs
    log(f"loop reference: {t_loop:.2f} s for {len(pairs)} pairs, extrapolated to all {all_pairs} pairs: "
        f"{t_loop_all:.1f} s  (values match the vectorised ones); speed-up {t_loop_all / t_vec:.0f}x")
    pos_pct = st["pos_flips_pct"][~torch.eye(N, dtype=torch.bool)]
    res.update({"loop_pairs_timed": len(pairs), "loop_s_on_timed_pairs": t_loop,
                "loop_s_extrapolated_all_pairs": t_loop_all, "speedup": t_loop_all / t_vec,
                "synthetic_pos_flips_pct": {"min": pos_pct.min().item(), "median": pos_pct.median().item(),
                                            "max": pos_pct.max().item()},
                "covered": ["pos/neg flips (count, %)", "acc diff", "per-class pos/neg flips mean/std/entropy",
                            "classes for 2/5/20/50% of positive flips", "top-1 agreement"]})
    return res


def bench_kl(N, n, S, K, folder, seed=0, device="cpu", max_gb=2.0, loop_pairs=20, log=print) -> dict:
    """Streamed KL for all pairs on S of the n samples: fp16 log-probability memory maps written per model
    (engine.cache.log_prob_file, timed apart), then kl_matrix_stream, checked against the float32 loop reference
    on a few pairs; time extrapolated linearly to n samples (said so in the output)."""
    preds, _ = synthetic_predictions(N, S, K, seed)
    folder = Path(folder)
    t = time.perf_counter()
    files = [log_prob_file(synthetic_logits(preds, m, S, K, seed), folder / f"model{m}.logp.f16.npy")
             for m in range(N)]
    t_write = time.perf_counter() - t
    reset_peak_rss()
    rss0 = peak_rss_gb()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    kl = pw.kl_matrix_stream(files, max_bytes=int(max_gb * 1e9), device=dev).cpu()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t_kl = time.perf_counter() - t
    rng = random.Random(seed + 1)
    kp = [(a, b) for a, b in ((rng.randrange(N), rng.randrange(N)) for _ in range(4 * loop_pairs)) if a != b]
    for a, b in kp[:loop_pairs]:
        v = kl_divergence(synthetic_logits(preds, a, S, K, seed), synthetic_logits(preds, b, S, K, seed))
        assert abs(v - kl[a, b].item()) < 2e-3 * max(1.0, abs(v)), (a, b, v, kl[a, b].item())
    scale = n / S
    res = {"kl_models": N, "kl_samples": S, "kl_classes": K, "kl_device": str(device), "kl_max_gb": max_gb,
           "kl_file_gb": N * S * K * 2 / 1e9, "kl_write_s": t_write, "kl_stream_s": t_kl,
           "kl_stream_s_extrapolated": t_kl * scale, "kl_extrapolated_from_fraction": S / n,
           "kl_peak_rss_gb": peak_rss_gb(), "kl_peak_rss_gb_before": rss0,
           "kl_file_gb_full": N * n * K * 2 / 1e9}
    if dev.type == "cuda":
        res["kl_peak_cuda_gb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    log(f"KL streamed from fp16 memmaps on {device}: all {N * (N - 1)} pairs on {S} of {n} samples "
        f"({res['kl_file_gb']:.3g} GB on disk): {t_kl:.2f} s (+ {t_write:.1f} s writing the files); "
        + ("measured at full size" if S == n else
           f"extrapolated x{scale:.0f} to all {n} samples: ~{t_kl * scale:.0f} s")
        + f" ({res['kl_file_gb_full']:.3g} GB of files); peak RSS {res['kl_peak_rss_gb']:.2f} GB with a {max_gb:g} GB "
        f"block budget; matches the float32 loop on {len(kp[:loop_pairs])} pairs")
    return res


def parser() -> ArgumentParser:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int_in_range(2), default=400, help="models (at least 2: one pair)")
    ap.add_argument("--samples", type=positive_int(), default=50_000)
    ap.add_argument("--classes", type=int_in_range(2), default=1_000)
    ap.add_argument("--loop-pairs", type=positive_int(), default=300, help="pairs timed in the loop reference")
    ap.add_argument("--kl-samples", type=non_negative_int(), default=1000,
                    help="samples for the streamed KL timing (0: skip; = --samples: full size, needs models x "
                         "samples x classes x 2 bytes of disk)")
    ap.add_argument("--kl-max-gb", type=positive_float(), default=2.0, help="memory budget of one streamed KL block")
    ap.add_argument("--kl-dir", default=None, help="folder for the fp16 log-prob files (default: a temp dir)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:<index>")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/bench_flips.json")
    return ap


@run_script
def main(argv=None):
    a = parser().parse_args(argv)
    check_device(a.device, "--device")
    check_out_path(a.out, "--out", folder=False)
    if a.kl_dir is not None and a.kl_samples > 0:
        check_out_path(a.kl_dir, "--kl-dir").mkdir(parents=True, exist_ok=True)
    N, n, K = a.models, a.samples, a.classes
    print(f"bench_flips: {N} models x {n} samples x {K} classes, {torch.get_num_threads()} threads "
          f"({os.cpu_count()} cpus)")
    res = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "platform": platform.platform(),
           "processor": platform.processor(), "torch": torch.__version__}
    res.update(bench_flips(N, n, K, a.loop_pairs, a.seed, a.device))
    if a.kl_samples > 0:
        with tempfile.TemporaryDirectory(dir=a.kl_dir) as tmp:
            res.update(bench_kl(N, n, min(a.kl_samples, n), K, tmp, a.seed, a.device, a.kl_max_gb))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
