"""Benchmark: all pairwise prediction-flip statistics for many models from (synthetic) cached predictions.

    .venv/bin/python scripts/bench_flips.py                       # 400 models x 50,000 samples x 1,000 classes
    .venv/bin/python scripts/bench_flips.py --models 50 --samples 5000 --classes 100 --out /tmp/b.json

What is timed, in one run:
- vectorised (src/metrics/pairwise.py): for ALL N*(N-1) ordered pairs, positive/negative flips, accuracy
  difference, per-class positive/negative flips with their mean/std/entropy, the class concentration
  (classes holding 2/5/20/50% of the positive flips) and top-1 agreement; from the (N, n) predicted classes.
- loop reference: the same statistics pair by pair with src/metrics/flips.py (flips, per_class_flips,
  class_concentration) plus an agreement comparison, timed on --loop-pairs random pairs and extrapolated
  linearly to all pairs (stated as such in the output). Its values are checked against the vectorised ones.
- KL(teacher || student) needs the full probabilities: 400 x 50,000 x 1,000 float32 logits are 80 GB, so it is
  timed separately on all N models but only --kl-samples samples (all pairs, chunked log-softmax matmuls) and
  extrapolated linearly in the number of samples; it is NOT part of the "all statistics under a minute" number.
Synthetic predictions: model accuracies uniform in [0.45, 0.9], correlated through per-sample difficulty; wrong
predictions go to a per-sample confusion class 60% of the time, else to a uniformly random wrong class.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def vectorised(preds, labels, K):
    t = time.perf_counter()
    st = pw.pairwise_stats(preds, labels, K)
    return st, time.perf_counter() - t


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=400)
    ap.add_argument("--samples", type=int, default=50_000)
    ap.add_argument("--classes", type=int, default=1_000)
    ap.add_argument("--loop-pairs", type=int, default=300, help="pairs timed in the loop reference")
    ap.add_argument("--kl-samples", type=int, default=500, help="samples for the KL timing (0: skip)")
    ap.add_argument("--kl-loop-pairs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/bench_flips.json")
    a = ap.parse_args()
    N, n, K = a.models, a.samples, a.classes
    print(f"bench_flips: {N} models x {n} samples x {K} classes, {torch.get_num_threads()} threads "
          f"({os.cpu_count()} cpus)")

    preds, labels = synthetic_predictions(N, n, K, a.seed)
    all_pairs = N * (N - 1)
    st, t_vec = vectorised(preds, labels, K)
    print(f"vectorised, all {all_pairs} ordered pairs (flips, acc diff, per-class mean/std/entropy, "
          f"concentration, agreement): {t_vec:.2f} s")

    rng = random.Random(a.seed)
    pairs = [(t, s) for t, s in ((rng.randrange(N), rng.randrange(N)) for _ in range(4 * a.loop_pairs)) if t != s]
    pairs = pairs[:a.loop_pairs]
    ref, t_loop = loop_reference(preds, labels, K, pairs)
    t_loop_all = t_loop / len(pairs) * all_pairs
    ratio = t_loop_all / t_vec
    for (t, s), (f, pc, cc, agree) in zip(pairs, ref):  # the two agree
        assert f["positive_flips"] == st["pos_flips"][t, s] and f["negative_flips"] == st["neg_flips"][t, s]
        assert abs(pc["pos_class_entropy"] - st["pos_class_entropy"][t, s].item()) < 1e-4
        assert abs(pc["pos_class_std"] - st["pos_class_std"][t, s].item()) < 1e-4
        assert all(cc[k] == st[k][t, s] for k in cc)
        assert abs(agree - st["agreement"][t, s].item()) < 1e-6
    print(f"loop reference: {t_loop:.2f} s for {len(pairs)} pairs, extrapolated to all {all_pairs} pairs: "
          f"{t_loop_all:.1f} s  (values match the vectorised ones)")
    print(f"speed-up vectorised vs loop: {ratio:.0f}x")
    pos_pct = st["pos_flips_pct"][~torch.eye(N, dtype=torch.bool)]
    res = {
        "models": N, "samples": n, "classes": K, "pairs": all_pairs, "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
        "covered": ["pos/neg flips (count, %)", "acc diff", "per-class pos/neg flips mean/std/entropy",
                    "classes for 2/5/20/50% of positive flips", "top-1 agreement"],
        "vectorised_s": t_vec,
        "loop_pairs_timed": len(pairs), "loop_s_on_timed_pairs": t_loop,
        "loop_s_extrapolated_all_pairs": t_loop_all, "speedup": ratio,
        "synthetic_pos_flips_pct": {"min": pos_pct.min().item(), "median": pos_pct.median().item(),
                                    "max": pos_pct.max().item()},
    }

    if a.kl_samples > 0:
        S = min(a.kl_samples, n)
        g = torch.Generator().manual_seed(a.seed + 1)
        z = torch.randn(N, S, K, generator=g) * 2
        z.scatter_add_(2, preds[:, :S].long().unsqueeze(-1), torch.full((N, S, 1), 6.0))  # peak at the prediction
        t = time.perf_counter()
        kl = pw.kl_matrix(z)
        t_kl = time.perf_counter() - t
        kp = pairs[:a.kl_loop_pairs]
        t = time.perf_counter()
        ref_kl = [kl_divergence(z[p], z[q]) for p, q in kp]
        t_kl_loop = time.perf_counter() - t
        for (p, q), v in zip(kp, ref_kl):
            assert abs(v - kl[p, q].item()) < 1e-3 * max(1.0, abs(v))
        scale = n / S
        res.update({"kl_samples": S, "kl_vectorised_s": t_kl, "kl_vectorised_s_extrapolated_all_samples":
                    t_kl * scale, "kl_loop_pairs_timed": len(kp), "kl_loop_s_extrapolated_all":
                    t_kl_loop / len(kp) * all_pairs * scale})
        print(f"KL (not in the numbers above): all {all_pairs} pairs on {S} samples: {t_kl:.2f} s vectorised "
              f"(x{scale:.0f} samples -> ~{t_kl * scale:.0f} s extrapolated for all {n}); loop "
              f"{t_kl_loop:.2f} s for {len(kp)} pairs -> ~{t_kl_loop / len(kp) * all_pairs * scale:.0f} s "
              f"extrapolated")
        del z

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
