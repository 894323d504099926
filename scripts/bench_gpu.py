"""GPU benchmark in one command (`make bench-gpu`, at most ~5 minutes on one GPU): what a GPU user cares about,
written as JSON + Markdown to bench_results/bench_gpu_<device>.{json,md}.

1. KL+DP, ResNet-50 teacher -> ResNet-18 student at 224 px, bf16 autocast, channels_last, without and with
   torch.compile: the Trainer's step vs a minimal hand-written loop doing the same maths (goal >= 0.97), the
   step vs the sum of its parts (student fwd+bwd+step, teacher fwd, frozen-student fwd; goal >= 0.9), images/s
   and model FLOP utilisation (FLOPs of one step counted by torch.utils.flop_counter / step time / the GPU's
   dense bf16 peak, from a small table or --peak-tflops).
2. The tensor loader on the device: crop+flip and RRC+flip vs their ceiling (slice + convert), vs a DataLoader.
3. FFCV to the device on a JPEG ImageFolder written here (skipped, with the reason, when ffcv does not import).
4. All-pairs flips statistics (400 x 50,000 x 1,000) and the streamed KL on the GPU (KL on a stated fraction of
   the samples, extrapolated).
5. With 2+ GPUs: a 2-process DDP student step vs 1 GPU (images/s, scaling efficiency).

Synthetic data, randomly initialised timm models, no downloads.

    python scripts/bench_gpu.py                       # CUDA, full sizes
    python scripts/bench_gpu.py --device cpu --tiny   # a few seconds on CPU: the test suite runs this
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_flips  # noqa: E402
import benchmark as bm  # noqa: E402

from src.cli import ArgumentParser, check_device, check_out_path, positive_float, run_script  # noqa: E402
from src.data.loaders import TensorLoader  # noqa: E402

# dense bf16 tensor-core peak (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "L40": 181.0, "A10G": 70.0, "A10": 125.0, "L4": 121.0, "RTX 4090": 165.0, "RTX 3090": 71.0,
                    "V100": 125.0, "B200": 2250.0}


def peak_tflops(name: str, override=None):
    if override is not None:
        return float(override)
    for k, v in PEAK_BF16_TFLOPS.items():
        if k in name:
            return v
    return None


def bench_args(a, dev, compile_: bool) -> SimpleNamespace:
    """The settings scripts/benchmark.py's arms read."""
    tiny = a.tiny
    return SimpleNamespace(
        device=dev, amp="bf16" if dev.type == "cuda" or a.amp == "bf16" else "none", channels_last=True,
        compile=compile_, student=a.student, teacher=a.teacher, img_size=a.img_size,
        batch_size=a.batch_size, steps=a.steps, repeats=a.repeats,
        warmup=a.warmup if not compile_ else max(a.warmup, 3 if tiny else 10),
        workers=a.workers, loader_samples=a.loader_samples, dl_batches=a.dl_batches,
        ffcv_samples=a.ffcv_samples)


def device_batches(args, dev, n_batches=4):
    split = bm.cifar_split(args.batch_size * n_batches, size=args.img_size, seed=2)
    tl = TensorLoader(split, args.batch_size, shuffle=True, drop_last=True, augment="crop_flip", crop_padding=4,
                      flip=True, device=dev, channels_last=True)
    return list(tl.iter_epoch(0))


def step_flops(args, dev, batches) -> float:
    """FLOPs of one KL+DP step (teacher fwd, frozen fwd, student fwd + bwd), counted on the eager models."""
    from torch.utils.flop_counter import FlopCounterMode

    s, t, f = bm.make_models(args, dev)
    opt = torch.optim.SGD(s.parameters(), lr=0.01)
    step = bm.minimal_step_fn("kldp", s, t, f, opt, SimpleNamespace(**{**vars(args), "compile": False}), dev)
    with FlopCounterMode(display=False) as fc:
        step(batches[0].inputs, batches[0].targets)
    return float(fc.get_total_flops())


def bench_training(a, dev, compile_: bool, tmp: Path, peak):
    args = bench_args(a, dev, compile_)
    batches = device_batches(args, dev)
    tag = "compiled" if compile_ else "eager"
    row, method = bm.bench_trainer_vs_minimal("kldp", batches, args, dev, tmp / f"kldp_{tag}")
    rows = [dict(row, row=f"{row['row']} ({tag})")]
    if not compile_ or a.parts_compiled:
        parts = bm.bench_parts(method, batches, args, dev, tmp / f"parts_{tag}")
        rows.append(dict(parts, row=f"{parts['row']} ({tag})"))
    step_s = statistics.median(row["trainer_s"]) / args.steps
    flops = step_flops(args, dev, batches)
    achieved = flops / step_s / 1e12
    mfu = None if peak is None else achieved / peak
    rows.append({"row": f"KL+DP {args.teacher} -> {args.student} {args.img_size}px {args.amp} channels_last ({tag})",
                 "ratio": mfu, "target": None, "a": f"{args.batch_size / step_s:,.0f} img/s (trainer)",
                 "b": f"{achieved:.1f} TFLOP/s model FLOPs ({flops / 1e9:.1f} GFLOP/step)"
                      + ("" if peak is None else f", MFU vs {peak:g} TFLOP/s peak"),
                 "img_s": args.batch_size / step_s, "tflops": achieved, "mfu": mfu, "step_gflop": flops / 1e9})
    return rows


# -------------------------------------------------------------------------------------------------- DDP


def _ddp_worker(rank, world, port, a, out_dir):
    import torch.distributed as dist

    dev = torch.device(f"cuda:{rank}") if a.device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    try:
        args = bench_args(a, dev, False)
        s, _, _ = bm.make_models(args, dev, seed=0)
        model = torch.nn.parallel.DistributedDataParallel(s, device_ids=[rank] if dev.type == "cuda" else None)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        batch = device_batches(args, dev, 1)[0]
        x, y = batch.inputs, batch.targets

        def step():
            with bm.autocast(args, dev):
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(args.warmup):
            step()
        bm.sync(dev)
        dist.barrier()
        t = time.perf_counter()
        for _ in range(args.steps * 2):
            step()
        bm.sync(dev)
        dt = time.perf_counter() - t
        if rank == 0:
            (Path(out_dir) / f"ddp_{world}.json").write_text(json.dumps({"s": dt, "steps": args.steps * 2}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_ddp(a, tmp: Path):
    import torch.multiprocessing as mp

    res = {}
    for world in (1, 2):
        mp.spawn(_ddp_worker, args=(world, _free_port(), a, str(tmp)), nprocs=world, join=True)
        r = json.loads((tmp / f"ddp_{world}.json").read_text())
        res[world] = world * a.batch_size * r["steps"] / r["s"]
    eff = res[2] / (2 * res[1])
    return {"row": f"DDP 2 processes / 2 x 1 process ({a.student} student step, {a.batch_size} per process)",
            "ratio": eff, "target": 0.9, "a": f"2 proc {res[2]:,.0f} img/s", "b": f"1 proc {res[1]:,.0f} img/s"}


# ------------------------------------------------------------------------------------------------- main


def parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda | cuda:<index> | cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke test of every arm)")
    p.add_argument("--amp", default=None, choices=["none", "bf16"])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile arm")
    p.add_argument("--parts-compiled", action="store_true", help="also time the parts of the compiled step")
    p.add_argument("--ddp", default="auto", choices=["auto", "on", "off"],
                   help="auto: with 2+ GPUs; on: also on CPU (gloo)")
    p.add_argument("--peak-tflops", type=positive_float(989), default=None,
                   help="dense bf16 peak of the GPU, TFLOP/s (default: table)")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "loader", "ffcv", "flips", "kl"])
    p.add_argument("--out", default=str(ROOT / "bench_results"))
    return p


@run_script
def main(argv=None):
    a = parser().parse_args(argv)
    dev = check_device(a.device, "--device", cpu_fix="run on a GPU node, or use --device cpu --tiny")
    check_out_path(a.out, "--out")
    tiny = a.tiny
    a.device = dev.type
    a.student, a.teacher = ("resnet8", "resnet8") if tiny else ("resnet18", "resnet50")
    a.img_size = 32 if tiny else 224
    a.batch_size = 4 if tiny else 128
    a.steps, a.repeats, a.warmup = (1, 2, 1) if tiny else (10, 5, 5)
    a.workers = min(8, os.cpu_count() or 2)
    a.loader_samples, a.dl_batches, a.ffcv_samples = (1024, 4, 128) if tiny else (50000, 8, 4096)
    flips_size = (12, 600, 10) if tiny else (400, 50000, 1000)
    kl_samples = 100 if tiny else 2000
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(dev)
    else:
        name = bm.cpu_name()
    peak = peak_tflops(name, a.peak_tflops) if dev.type == "cuda" else a.peak_tflops
    t_start = time.perf_counter()
    rows, extra = [], {}

    def done(r):
        rows.append(r)
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        print(f"  [{time.perf_counter() - t_start:6.1f} s] {r['row']}: {ratio}  {r['a']} | {r['b']}", flush=True)

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        if "train" not in a.skip:
            # torch.compile on a CPU smoke test would spend minutes compiling: eager only there
            for c in ([False] if a.no_compile or (tiny and dev.type == "cpu") else [False, True]):
                for r in bench_training(a, dev, c, tmp, peak):
                    done(r)
        la = bench_args(a, dev, False)
        if "loader" not in a.skip:
            for r in bm.bench_loaders(la, dev):
                done(r)
        if "ffcv" not in a.skip:
            done(bm.bench_ffcv(la, dev, tmp))
        if "flips" not in a.skip:
            N, n, K = flips_size
            fr = bench_flips.bench_flips(N, n, K, loop_pairs=20 if tiny else 100, device=dev, log=lambda *_: None)
            extra["flips"] = fr
            done({"row": f"all-pairs flips statistics {N} x {n} x {K} on {dev.type}", "ratio": fr["speedup"],
                  "target": None, "a": f"{fr['vectorised_s']:.2f} s ({fr['pairs']} pairs)",
                  "b": f"loop ~{fr['loop_s_extrapolated_all_pairs']:.0f} s extrapolated; peak "
                       + (f"{fr['peak_cuda_gb']:.1f} GB GPU" if "peak_cuda_gb" in fr else
                          f"{fr['peak_rss_gb']:.1f} GB RSS")})
        if "kl" not in a.skip:
            N, n, K = flips_size
            kr = bench_flips.bench_kl(N, n, min(kl_samples, n), K, tmp / "kl", device=dev, max_gb=2.0,
                                      loop_pairs=5, log=lambda *_: None)
            extra["kl"] = kr
            done({"row": f"KL all pairs streamed from fp16 memmaps, {N} x {kr['kl_samples']} of {n} x {K}",
                  "ratio": None, "target": None, "a": f"{kr['kl_stream_s']:.2f} s measured",
                  "b": f"~{kr['kl_stream_s_extrapolated']:.0f} s extrapolated to {n} samples "
                       f"({kr['kl_file_gb_full']:.3g} GB of files)"})
        ngpu = torch.cuda.device_count() if dev.type == "cuda" else 0
        if a.ddp == "on" or (a.ddp == "auto" and ngpu >= 2):
            done(bench_ddp(a, tmp))
        elif dev.type == "cuda":
            rows.append({"row": "DDP 2 processes / 1 process", "ratio": None, "target": None, "a": "skipped",
                         "b": f"{ngpu} GPU visible (needs 2)"})
    total = time.perf_counter() - t_start
    head = (f"bench_gpu on {dev.type} ({name}), torch {torch.__version__}, {'tiny' if tiny else 'full'} sizes, "
            f"{total:.0f} s in all")
    table = bm.markdown_table(head, rows)
    print("\n" + table)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_gpu_{dev.type}{'_tiny' if tiny else ''}"
    (out / f"{stem}.json").write_text(json.dumps({"header": head, "device_name": name, "seconds": total,
                                                  "peak_tflops": peak, "rows": rows, **extra}, indent=2,
                                                 default=str) + "\n")
    (out / f"{stem}.md").write_text(table + "\n")
    print(f"\nwritten: {out}/{stem}.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
