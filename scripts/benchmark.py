"""Speed benchmark of the suite's hot paths, in one run, as ratios (higher is better, target in brackets):

1. Trainer step throughput / a hand-written minimal PyTorch loop doing the same maths, for KL (KD) and KL+DP
   (same models, same pre-built batches, same optimiser)                                            [>= 0.97]
2. `tensor` loader (uint8 split on the device, crop+flip gathered on uint8, then converted) on CIFAR-shaped data
   (random crop 4 px + flip) / its ceiling: the same batches sliced and converted, no augmentation   [>= 0.5]
   and / torch DataLoader + torchvision transforms (workers = cores, pinned memory)              [>= 10x on CPU]
   RRC+flip / the same ceiling (reported)
3. FFCV loader / DataLoader on a JPEG ImageFolder (only when ffcv imports; the row says why it is skipped),
   and the cost of its page checksums (loader.verify=full | sample | none) / one epoch's load of that file
4. KL+DP step (in the Trainer) / the sum of its parts measured alone: student fwd+bwd+SGD step, teacher fwd,
   frozen-student fwd                                                                                [>= 0.9]

Fairness: warmup first, then `--repeats` timed windows per arm, arms interleaved (A B A B ...) so that a noisy,
shared CPU slows both alike; medians reported. On CUDA, timings synchronise at window boundaries only.

    python scripts/benchmark.py                                  # CPU here: small models, writes bench_results/
    python scripts/benchmark.py --device cuda --amp bf16 --channels-last --compile
Prints a table and writes bench_results/benchmark_<device>.json (+ .md)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from src.cli import (ArgumentParser, check_device, check_out_path, int_in_range, non_negative_int,  # noqa: E402
                     positive_int, run_script)
from src.data.datasets import DatasetInfo, Split  # noqa: E402
from src.data.loaders import TensorLoader, TorchLoader  # noqa: E402
from src.engine import Trainer  # noqa: E402
from src.errors import UserError, closest  # noqa: E402
from src.methods import KL, KLDP  # noqa: E402
from src.models import ImageInputs, create_model  # noqa: E402
from src.schema import LoaderConfig, OptimizerConfig, SchedulerConfig, TrainerConfig  # noqa: E402

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261]


def cpu_name() -> str:
    """The CPU model (Linux: /proc/cpuinfo), its architecture and core count, e.g. 'AMD EPYC, x86_64, 2 cores'."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model or 'unknown CPU'}, {platform.machine()}, {os.cpu_count()} cores"


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def cifar_split(n, size=32, seed=0, name="train"):
    g = torch.Generator().manual_seed(seed)
    info = DatasetInfo("synthetic", 10, [str(i) for i in range(10)], 3, size, CIFAR_MEAN, CIFAR_STD)
    return Split(name=name, labels=torch.randint(0, 10, (n,), generator=g), ids=torch.arange(n),
                 images=torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), info=info,
                 full_size=n)


class ListLoader:
    """Pre-built device batches behind the loader interface: both arms of a comparison see the same tensors."""

    def __init__(self, batches):
        self.batches, self.batch_size = batches, len(batches[0])
        self.num_samples = self.batch_size * len(batches)

    def __len__(self):
        return len(self.batches)

    def iter_epoch(self, epoch=0, start=0):
        return iter(self.batches[start:])


def make_models(args, dev, seed=0):
    torch.manual_seed(seed)
    size = getattr(args, "img_size", 32)
    mk = lambda arch: create_model(arch, ImageInputs(10, 3, CIFAR_MEAN, CIFAR_STD, size)).to(dev)  # noqa: E731
    student, teacher = mk(args.student), mk(args.teacher)
    frozen = mk(args.student)
    frozen.load_state_dict(student.state_dict())
    for m in (teacher, frozen):
        m.eval().requires_grad_(False)
    if args.channels_last:
        for m in (student, teacher, frozen):
            m.to(memory_format=torch.channels_last)
    return student, teacher, frozen


def autocast(args, dev):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")


# ------------------------------------------------------------------------------------- the minimal loops


def kl_loss(zs, target_probs):
    """Per-sample KL(target || softmax(zs)) averaged (T = 1): the maths of src.methods.kd.kl_to_target."""
    log_ps = F.log_softmax(zs.float(), 1)
    return (torch.special.xlogy(target_probs, target_probs).sum(1) - (target_probs * log_ps).sum(1)).mean()


def minimal_step_fn(kind, student, teacher, frozen, opt, args, dev):
    def step(x, y):
        with autocast(args, dev):
            with torch.no_grad():  # frozen forwards first, as the methods do (src/methods/kd.py three_logits)
                pt = teacher(x).float().softmax(1)
                if kind == "kldp":
                    pf = frozen(x).float().softmax(1)
                    w = (pt.gather(1, y[:, None]) > pf.gather(1, y[:, None])).float()
                    pt = w * pt + (1 - w) * pf
            zs = student(x)
            loss = kl_loss(zs, pt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def time_loop(step, batches, n, dev):
    sync(dev)
    t0 = time.perf_counter()
    for i in range(n):
        b = batches[i % len(batches)]
        step(b.inputs, b.targets)
    sync(dev)
    return time.perf_counter() - t0


def tcfg(args, steps):
    return OmegaConf.merge(OmegaConf.structured(TrainerConfig), {
        "max_steps": steps, "progress": "off", "resume": False, "amp": args.amp,
        "channels_last": args.channels_last, "compile": args.compile, "compile_frozen": args.compile,
        "device": str(args.device),
        # the 8-batch "epoch" here is artificial: evaluate / checkpoint only at the end, outside the windows
        "eval_every_steps": 10 ** 9, "ckpt_every_steps": 10 ** 9})


def paired_windows(method, batches, other, args, dev, run_dir):
    """Run the real Trainer for warmup + repeats x steps; after every window of `steps` trainer steps (timed
    between two calls of the method's after_step hook), run the other arm once (`other()` returns its time):
    A B A B ..., so both arms see the same machine load. The trainer's final evaluation and checkpoint lie
    outside the windows."""
    w, n, reps = args.warmup, args.steps, args.repeats
    a, b, mark = [], [], {}

    def after_step(step):
        if step < w or (step - w) % n:
            return
        sync(dev)
        if step > w:
            a.append(time.perf_counter() - mark["t"])
        if len(b) < reps:
            b.append(other())
        sync(dev)
        mark["t"] = time.perf_counter()

    method.after_step = after_step
    t = Trainer(method, ListLoader(batches), tcfg(args, w + n * reps + 1),
                OmegaConf.merge(OmegaConf.structured(OptimizerConfig), {"name": "sgd", "lr": 0.01,
                                                                         "weight_decay": 5e-4}),
                OmegaConf.merge(OmegaConf.structured(SchedulerConfig), {"name": "none"}), run_dir, device=dev)
    t.fit()
    del method.after_step
    return a[:reps], b[:reps]


def bench_trainer_vs_minimal(kind, batches, args, dev, tmp):
    student, teacher, frozen = make_models(args, dev)
    s2, t2, f2 = make_models(args, dev)
    cls = KL if kind == "kl" else KLDP
    method = cls(student, teacher, **({"frozen_student": frozen} if kind == "kldp" else {}))
    if args.compile:
        for m in (s2, t2, f2):
            m.compile()
    opt = torch.optim.SGD([p for p in s2.parameters()], lr=0.01, momentum=0.9, weight_decay=5e-4)
    step = minimal_step_fn(kind, s2, t2, f2, opt, args, dev)
    time_loop(step, batches, args.warmup, dev)
    tr, mn = paired_windows(method, batches, lambda: time_loop(step, batches, args.steps, dev), args, dev,
                            Path(tmp) / kind)
    bs = len(batches[0])
    t_ips, m_ips = bs * args.steps / statistics.median(tr), bs * args.steps / statistics.median(mn)
    # the ratio: median over the paired (adjacent, interleaved) windows, robust to load that changes over time
    paired = statistics.median(m / t for t, m in zip(tr, mn))
    return {"row": f"trainer/minimal loop, {'KD (KL)' if kind == 'kl' else 'KL+DP'}", "ratio": paired,
            "ratio_of_medians": t_ips / m_ips,
            "target": 0.97, "a": f"trainer {t_ips:,.0f} img/s", "b": f"minimal {m_ips:,.0f} img/s",
            "trainer_s": tr, "minimal_s": mn}, method


def bench_parts(method, batches, args, dev, tmp):
    """KL+DP step in the Trainer vs student fwd+bwd+SGD step, teacher fwd, frozen fwd, each timed alone."""
    t, f = method.teacher.model, method.frozen_student.model
    s_copy, _, _ = make_models(args, dev)  # a twin student, so the parts do not change the trained one
    if args.compile:
        s_copy.compile()
    opt = torch.optim.SGD(s_copy.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def student_part(x, y):
        with autocast(args, dev):
            loss = F.cross_entropy(s_copy(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def fwd(m):
        def step(x, y):
            with torch.no_grad(), autocast(args, dev):
                m(x)
        return step

    parts = {"student fwd+bwd+step": student_part, "teacher fwd": fwd(t), "frozen-student fwd": fwd(f)}
    for p in parts.values():
        time_loop(p, batches, args.warmup, dev)
    times = {k: [] for k in parts}

    def other():
        tot = 0.0
        for k, p in parts.items():
            times[k].append(time_loop(p, batches, args.steps, dev))
            tot += times[k][-1]
        return tot

    step_t, _ = paired_windows(method, batches, other, args, dev, Path(tmp) / "parts")
    med = {k: statistics.median(v) for k, v in times.items()}
    total, st = sum(med.values()), statistics.median(step_t)
    sums = [sum(v[i] for v in times.values()) for i in range(len(step_t))]
    paired = statistics.median(p / t for t, p in zip(step_t, sums))
    return {"row": "KL+DP step / sum of its parts", "ratio": paired, "ratio_of_medians": total / st, "target": 0.9,
            "a": f"step {1e3 * st / args.steps:.2f} ms",
            "b": "parts " + " + ".join(f"{1e3 * v / args.steps:.2f}" for v in med.values()) + " ms",
            "parts_ms": {k: 1e3 * v / args.steps for k, v in med.items()}, "step_s": step_t}


# ------------------------------------------------------------------------------------------------- loaders


def time_epoch(loader, dev, max_batches):
    """Images/s of one epoch (at most max_batches), steady state: the clock restarts when the first batch is out
    (a DataLoader's worker start-up is not counted, in its favour) unless that was the only batch."""
    sync(dev)
    start = t0 = time.perf_counter()
    n = first = 0
    for b, batch in enumerate(loader.iter_epoch(0)):
        if b == 0:
            sync(dev)
            t0, first = time.perf_counter(), len(batch)
            continue
        n += len(batch)
        if b + 1 >= max_batches:
            break
    sync(dev)
    if n == 0:  # a single batch: its whole time
        return first / max(time.perf_counter() - start, 1e-9) if first else 0.0
    return n / (time.perf_counter() - t0)


def bench_loaders(args, dev):
    """Tensor loader crop+flip and RRC+flip against their ceiling (the same batches of the same split sliced and
    converted to float, no augmentation) and against the DataLoader+torchvision (best setting on this machine:
    `--workers` workers, pinned memory), interleaved per repeat."""
    split = cifar_split(args.loader_samples)
    common = dict(batch_size=256, shuffle=True, drop_last=True, crop_padding=4, flip=True, seed=0, device=dev)
    arms = {"ceiling": TensorLoader(split, **{**common, "augment": "none"}),
            "crop_flip": TensorLoader(split, **{**common, "augment": "crop_flip"}),
            "rrc_flip": TensorLoader(split, **{**common, "augment": "rrc_flip"}),
            "dataloader": TorchLoader(split, num_workers=args.workers, pin_memory=True, train=True,
                                      **{**common, "augment": "crop_flip"})}
    nb = {k: (args.dl_batches if k == "dataloader" else len(v)) for k, v in arms.items()}
    for k, ld in arms.items():
        time_epoch(ld, dev, 3)
    ips = {k: [] for k in arms}
    for _ in range(args.repeats):
        for k, ld in arms.items():
            ips[k].append(time_epoch(ld, dev, nb[k]))
    med = {k: statistics.median(v) for k, v in ips.items()}
    # ratios: median over the interleaved repeats of the per-repeat ratio (robust to load that drifts)
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(ips[a], ips[b]))  # noqa: E731
    dl = f"DataLoader {med['dataloader']:,.0f} img/s ({args.workers} workers, pinned memory)"
    ceil = f"ceiling {med['ceiling']:,.0f} img/s (slice + convert)"
    return [
        {"row": "tensor loader crop+flip / its ceiling (CIFAR-shaped)", "ratio": ratio("crop_flip", "ceiling"),
         "target": 0.5, "a": f"crop+flip {med['crop_flip']:,.0f} img/s", "b": ceil, "img_s": med},
        {"row": "tensor loader crop+flip / DataLoader+torchvision", "ratio": ratio("crop_flip", "dataloader"),
         "target": 10.0 if dev.type == "cpu" else None, "a": f"crop+flip {med['crop_flip']:,.0f} img/s", "b": dl},
        {"row": "tensor loader RRC+flip / its ceiling", "ratio": ratio("rrc_flip", "ceiling"), "target": None,
         "a": f"rrc+flip {med['rrc_flip']:,.0f} img/s", "b": ceil},
    ]


def bench_ffcv(args, dev, tmp, verify_rows=None):
    """FFCV / DataLoader on a JPEG ImageFolder written here; `verify_rows` (a list) gets the loader.verify rows."""
    try:
        import ffcv  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return {"row": "FFCV / DataLoader (JPEG ImageFolder)", "ratio": None, "target": None,
                "a": "skipped", "b": f"ffcv does not import ({type(e).__name__}: {e})"}
    try:
        from PIL import Image

        from src.data.ffcv_loader import FFCVLoader, write_beton

        n, size = args.ffcv_samples, 64
        src = cifar_split(n, size=size, seed=1)
        folder = Path(tmp) / "imagefolder"
        files = []
        for i in range(n):
            p = folder / str(int(src.labels[i])) / f"{i:05d}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(src.images[i].permute(1, 2, 0).numpy()).save(p, quality=90)
            files.append(str(p))
        info = DatasetInfo("jpegfolder", 10, [str(i) for i in range(10)], 3, size, CIFAR_MEAN, CIFAR_STD)
        split = Split("train", src.labels, src.ids, files=files, info=info, full_size=n)
        beton = Path(tmp) / "ffcv"
        write_beton(split, beton / "jpegfolder_train.beton", write_mode="jpg", num_workers=max(1, args.workers))
        lcfg = OmegaConf.merge(OmegaConf.structured(LoaderConfig), {"ffcv_dir": str(beton), "backend": "ffcv",
                                                                    "num_workers": max(1, args.workers)})
        common = dict(batch_size=min(128, n // 4), shuffle=True, drop_last=True, augment="rrc_flip", flip=True, seed=0,
                      device=dev)
        fl = FFCVLoader(lcfg, split, train=True, **common)
        dl = TorchLoader(split, num_workers=args.workers, train=True, **common)
        time_epoch(fl, dev, 2)
        time_epoch(dl, dev, 2)
        a, b = [], []
        for _ in range(args.repeats):
            a.append(time_epoch(fl, dev, len(fl)))
            b.append(time_epoch(dl, dev, len(dl)))
        ma, mb = statistics.median(a), statistics.median(b)
        if verify_rows is not None:
            verify_rows.extend(bench_verify(fl, args, dev))
        return {"row": "FFCV / DataLoader (JPEG ImageFolder 64px, rrc+flip)", "ratio": ma / mb, "target": None,
                "a": f"FFCV {ma:,.0f} img/s", "b": f"DataLoader {mb:,.0f} img/s ({args.workers} workers)"}
    except Exception as e:  # noqa: BLE001
        return {"row": "FFCV / DataLoader (JPEG ImageFolder)", "ratio": None, "target": None, "a": "skipped",
                "b": f"FFCV failed: {type(e).__name__}: {str(e)[:200]}"}


def bench_verify(fl, args, dev):
    """Cost of the page checksums checked at every FFCV loader start (loader.verify), as the ratio of the check's
    time to one epoch's load of the same file through the same loader, interleaved (lower is cheaper)."""
    from src.data.ffcv_loader import verify_beton

    times = {m: [] for m in ("full", "sample", "none")}
    epoch, pages = [], {}
    for _ in range(args.repeats):
        for m in times:
            t0 = time.perf_counter()
            pages[m] = verify_beton(fl.path, m, 0, "rewrite it")
            times[m].append(time.perf_counter() - t0)
        epoch.append(fl.num_samples / max(time_epoch(fl, dev, len(fl)), 1e-9))
    t_epoch = statistics.median(epoch)
    mib = fl.path.stat().st_size / 2**20
    return [{"row": f"FFCV loader.verify={m} / one epoch's load (cost, lower is cheaper)",
             "ratio": statistics.median(times[m]) / t_epoch, "target": None,
             "a": f"{statistics.median(times[m]) * 1e3:.2f} ms ({pages[m]} pages of a {mib:.1f} MiB file)",
             "b": f"epoch {t_epoch * 1e3:.0f} ms ({fl.num_samples} images)"} for m in times]


# ---------------------------------------------------------------------------------------------------- main


def markdown_table(head, rows) -> str:
    """The result rows (row, ratio, target, a, b) as a Markdown table under a header line."""
    lines = [head, "", "| comparison | ratio | target | ok | arm A | arm B |", "|---|---|---|---|---|---|"]
    for r in rows:
        ok = "" if r["ratio"] is None or r["target"] is None else ("yes" if r["ratio"] >= r["target"] else "NO")
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        target = "-" if r["target"] is None else f">= {r['target']}"
        lines.append(f"| {r['row']} | {ratio} | {target} | {ok} | {r['a']} | {r['b']} |")
    return "\n".join(lines)


def parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:<index> | auto")
    p.add_argument("--amp", default=None, choices=["none", "bf16"], help="default: bf16 on CUDA, none on CPU")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile student and frozen models (both arms)")
    p.add_argument("--student", default=None, help="default: resnet8 on CPU, resnet20 on CUDA")
    p.add_argument("--teacher", default=None, help="default: wrn_16_1 on CPU, wrn_16_2 on CUDA")
    p.add_argument("--batch-size", type=positive_int(64), default=None, help="default: 64 on CPU, 256 on CUDA")
    p.add_argument("--steps", type=positive_int(10), default=None,
                   help="timed steps per window (default 10 CPU, 50 CUDA)")
    p.add_argument("--warmup", type=non_negative_int(3), default=None)
    p.add_argument("--repeats", type=positive_int(), default=9)
    p.add_argument("--threads", type=positive_int(2), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--workers", type=non_negative_int(2), default=None,
                   help="DataLoader workers, 0 = in the main process (default: cpu_count, at most 8)")
    p.add_argument("--loader-samples", type=int_in_range(256), default=10000,
                   help="samples of the loader comparison, at least one batch of 256")
    p.add_argument("--dl-batches", type=positive_int(), default=8, help="DataLoader batches per timed window")
    p.add_argument("--ffcv-samples", type=int_in_range(4), default=2048)
    p.add_argument("--skip", nargs="*", default=[], choices=["trainer", "loader", "ffcv", "parts"])
    p.add_argument("--out", default=str(ROOT / "bench_results"))
    return p


def check_model(name: str, flag: str) -> str:
    """`name` when create_model knows it (any timm name or one of ours); else one UserError, before any work."""
    import timm

    from src.models import OUR_MODELS

    if not timm.is_model(name):
        raise UserError(f"{flag} {name!r} is not a model{closest(name, timm.list_models() + list(OUR_MODELS))}: "
                        f"any timm name or one of {', '.join(OUR_MODELS)} works")
    return name


def settle(args) -> torch.device:
    """Check the device, the output folder and the model names, and fill in the device-dependent defaults (only
    where an argument was not given: a 0 is refused by the parser, never replaced)."""
    dev = check_device(args.device, "--device", auto=True)
    check_out_path(args.out, "--out")
    cuda = dev.type == "cuda"
    args.device = dev
    if args.amp is None:
        args.amp = "bf16" if cuda else "none"
    if args.student is None:
        args.student = "resnet20" if cuda else "resnet8"
    if args.teacher is None:
        args.teacher = "wrn_16_2" if cuda else "wrn_16_1"
    check_model(args.student, "--student")
    check_model(args.teacher, "--teacher")
    if args.batch_size is None:
        args.batch_size = 256 if cuda else 64
    if args.steps is None:
        args.steps = 50 if cuda else 10
    if args.warmup is None:
        args.warmup = 20 if args.compile else 5 if cuda else 3
    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 2)
    return dev


@run_script
def main(argv=None):
    args = parser().parse_args(argv)
    dev = settle(args)
    cuda = dev.type == "cuda"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    split = cifar_split(args.batch_size * 8, seed=2)
    tl = TensorLoader(split, args.batch_size, shuffle=True, drop_last=True, augment="crop_flip", crop_padding=4,
                      flip=True, device=dev, channels_last=args.channels_last)
    batches = list(tl.iter_epoch(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if "trainer" not in args.skip:
            for kind in ("kl", "kldp"):
                row, method = bench_trainer_vs_minimal(kind, batches, args, dev, tmp)
                rows.append(row)
                print(f"  {row['row']}: {row['ratio']:.3f}", flush=True)
                if kind == "kldp" and "parts" not in args.skip:
                    rows.append(bench_parts(method, batches, args, dev, tmp))
                    print(f"  {rows[-1]['row']}: {rows[-1]['ratio']:.3f}", flush=True)
        if "loader" not in args.skip:
            for row in bench_loaders(args, dev):
                rows.append(row)
                print(f"  {row['row']}: {row['ratio']:.2f}", flush=True)
        if "ffcv" not in args.skip:
            verify = []
            rows.append(bench_ffcv(args, dev, tmp, verify))
            rows.extend(verify)
    name = torch.cuda.get_device_name(dev) if cuda else cpu_name()
    head = (f"device {dev.type} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
            f"amp {args.amp}, channels_last {args.channels_last}, compile {args.compile}, student {args.student}, "
            f"teacher {args.teacher}, batch {args.batch_size}, {args.repeats} repeats x {args.steps} steps "
            f"(median), warmup {args.warmup}")
    table = markdown_table(head, rows)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = dev.type + ("_compile" if args.compile else "")
    cfg = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}
    (out / f"benchmark_{tag}.json").write_text(json.dumps({"header": head, "device_name": name, "args": cfg,
                                                           "rows": rows}, indent=2) + "\n")
    (out / f"benchmark_{tag}.md").write_text(table + "\n")
    print(f"\nwritten: {out}/benchmark_{tag}.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
