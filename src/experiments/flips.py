"""Complementary knowledge between models: prediction flips of every ordered (teacher, student) pair
(`main_flips.py`, docs/REFERENCE.md §1.1 and the fidelity metrics of §5.1).

Each model is evaluated once per (content key, dataset, split) through the output cache (`ctx.outputs`); every
pairwise statistic then comes from the stacked predictions with matrix operations (src/metrics/pairwise.py), so
N models cost N evaluations, and a second run costs none."""
from __future__ import annotations

import csv
import math
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..errors import UserError, closest
from ..metrics import cka_matrix
from ..metrics import pairwise as pw
from ..engine.cache import log_prob_file, log_prob_path
from ..metrics.flips import per_class_flips
from ..models import create_model
from ..schema import as_dict
from .context import Context, ModelRef, run_context
from .preflight import model_spec, zoo_names
from .resolve import resolve_model
from .zoo import train_zoo_entry

log = logging.getLogger("kt")

ROOT = Path(__file__).resolve().parents[2]
MODES = ("all_pairs", "pair", "random_pairs", "random_baseline")
# statistics written per ordered pair (CSV columns after teacher/student) and as N x N matrices
PAIR_STATS = ("pos_flips", "pos_flips_pct", "neg_flips", "neg_flips_pct", "acc_diff", "pos_class_mean",
              "pos_class_std", "pos_class_entropy", "neg_class_mean", "neg_class_std", "neg_class_entropy")


# ------------------------------------------------------------------------------------------------ inputs


def _find(path: str) -> Path:
    """A path as given, else relative to the repository root (configs name files under config/)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    return ROOT / p if (ROOT / p).exists() else p


def read_models_csv(path: str) -> Tuple[List[str], Dict[str, float]]:
    """Model names (column `model`) and their published top-1 (optional column `top1`) from a CSV."""
    p = _find(path)
    if not p.is_file():
        raise UserError(f"models_csv={path} does not exist: give a CSV with a `model` column (and optional "
                        f"`top1`), e.g. config/prediction_flips/timm_models.csv")
    with open(p, newline="", encoding="utf-8-sig") as f:  # a UTF-8 BOM (Excel) is not part of the header
        rows = [r for r in csv.DictReader(line for line in f if not line.lstrip().startswith("#"))]
    if not rows or "model" not in rows[0]:
        raise UserError(f"models_csv={path} has no `model` column (columns: {list(rows[0]) if rows else []}): "
                        f"add a header line `model,top1`")
    names, top1 = [], {}
    for r in rows:
        name = (r.get("model") or "").strip()
        if not name:
            continue
        names.append(name)
        if (r.get("top1") or "").strip():
            try:
                top1[name] = float(r["top1"])
                if not math.isfinite(top1[name]):
                    raise ValueError(r["top1"])
            except ValueError as e:
                raise UserError(f"models_csv={path}: top1='{r['top1']}' of model '{name}' is not a finite number: "
                                f"give its top-1 accuracy or leave the cell empty") from e
    return names, top1


def model_list(cfg) -> Tuple[List[str], Dict[str, float]]:
    """The candidate models: `models`, else the CSV's, else the zoo's."""
    if cfg.models is not None and cfg.models_csv:
        raise UserError("both models and models_csv are set: give one of them (models=null to use the CSV)")
    if cfg.models_csv:
        names, top1 = read_models_csv(cfg.models_csv)
    elif cfg.models is not None:
        names = [str(m) for m in (cfg.models if OmegaConf.is_list(cfg.models) or isinstance(cfg.models, list)
                                  else [cfg.models])]
        top1 = {}
    else:
        names, top1 = zoo_names(cfg), {}
        if not names:
            raise UserError("no models: set models=[a,b,...], models_csv=<file> or a zoo with models (zoo=digits)")
    if cfg.get("max_models") is not None:
        k = int(cfg.max_models)
        if k < 2:
            raise UserError(f"max_models={k} must be >= 2 (pairs need two models)")
        if k < len(names):
            names = sorted(random.Random(int(cfg.pair_seed)).sample(names, k), key=names.index)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"model(s) {dup} listed twice: give each model once")
    return names, top1


def select_pairs(cfg, names: List[str]) -> Tuple[List[str], List[Tuple[int, int]]]:
    """(models to evaluate, ordered pairs as indices into them) for the configured mode. random_baseline's
    random student is appended later."""
    mode = str(cfg.mode)
    if mode not in MODES:
        raise UserError(f"mode={mode} is unknown{closest(mode, MODES)}: use one of {', '.join(MODES)}")
    if mode == "pair":
        if not cfg.teacher or not cfg.student:
            raise UserError(f"mode=pair needs teacher=<model> and student=<model> (got teacher={cfg.teacher}, "
                            f"student={cfg.student})")
        if str(cfg.teacher) == str(cfg.student):
            raise UserError(f"teacher and student are both '{cfg.teacher}': pick two different models")
        return [str(cfg.teacher), str(cfg.student)], [(0, 1)]
    if mode == "random_baseline":
        if not names:
            raise UserError("mode=random_baseline needs models (models=[...], models_csv or a zoo)")
        return names, [(i, len(names)) for i in range(len(names))]
    if len(names) < 2:
        raise UserError(f"mode={mode} needs at least 2 models, got {names}: add models")
    all_pairs = [(t, s) for t in range(len(names)) for s in range(len(names)) if t != s]
    if mode == "all_pairs":
        return names, all_pairs
    n = int(cfg.n_pairs)
    if n < 1 or n > len(all_pairs):
        raise UserError(f"n_pairs={n} must lie in [1, {len(all_pairs)}] for {len(names)} models "
                        f"(N*(N-1) ordered pairs): lower n_pairs or add models")
    chosen = random.Random(int(cfg.pair_seed)).sample(all_pairs, n)
    used = sorted({i for p in chosen for i in p})  # evaluate only the models that appear in a pair
    remap = {old: new for new, old in enumerate(used)}
    return [names[i] for i in used], [(remap[t], remap[s]) for t, s in chosen]


def random_student(ctx: Context, cfg: DictConfig) -> ModelRef:
    """A randomly initialised student (seeded with trainer.seed); never cached (it has no content key)."""
    spec = cfg.random_student
    info = ctx.info
    torch.manual_seed(int(cfg.trainer.seed))
    m = create_model(spec.arch, info, kwargs=as_dict(spec.get("kwargs")))
    return ModelRef(spec.get("name") or f"random_{spec.arch}", m, None, {"arch": spec.arch, "random_init": True})


# ---------------------------------------------------------------------------------------------- outputs


def _write_csv(path: Path, rows: List[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(rows[0]) if rows else ["teacher", "student"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def _write_matrices(folder: Path, names: List[str], mats: Dict[str, np.ndarray], acc: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "matrices.npz", names=np.array(names), acc=acc, **mats)
    for k, m in mats.items():
        with open(folder / f"{k}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["teacher \\ student", *names])
            for name, row in zip(names, m):
                w.writerow([name, *[f"{v:.6g}" for v in row]])
    return folder / "matrices.npz"


def _stats(values: List[float]) -> Dict[str, Optional[float]]:
    if not values:
        return {"min": None, "median": None, "max": None, "mean": None}
    a = np.asarray(values, dtype=float)
    return {"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max()), "mean": float(a.mean())}


# --------------------------------------------------------------------------------------------------- run
def check_options(cfg, names: List[str]) -> List[float]:
    """The family's own keys, before any evaluation; returns the concentration levels p (%)."""
    if cfg.plot_pair:  # names that are not paths are the models' names in this run
        pp = [str(v) for v in cfg.plot_pair]
        folders = any(model_spec(n, cfg).kind == "path" for n in names)  # their names are known after loading
        if len(pp) != 2 or any(v not in names for v in pp) and not folders:
            raise UserError(f"plot_pair={pp} names a model that is not in this run ({', '.join(names)}): pick two "
                            f"of them")
    ps = [float(p) for p in cfg.concentration]
    if any(not 0 < p <= 100 for p in ps):
        raise UserError(f"concentration={ps}: every p must lie in (0, 100]")
    if cfg.cka and int(cfg.cka_samples) < 2:
        raise UserError(f"cka_samples={cfg.cka_samples} must be >= 2 (CKA compares sample kernels)")
    if cfg.kl and not float(cfg.kl_max_gb) > 0:
        raise UserError(f"kl_max_gb={cfg.kl_max_gb} must be > 0 (GB for one streamed block of log-probabilities): "
                        f"use e.g. kl_max_gb=2")
    return ps


def kl_scratch_dir(cfg: DictConfig, n_models: int, n: int, k: int) -> Path:
    """Where the fp16 log-probabilities of kl=true go; one UserError when the disk cannot hold them."""
    kl_dir = Path(cfg.paths.cache) / "outputs" / "log_probs"
    need = n_models * n * k * 2
    kl_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(kl_dir).free
    if need > free:
        raise UserError(f"kl=true streams {n_models} x {n} x {k} fp16 log-probabilities from disk "
                        f"({need / 1e9:.1f} GB) but {kl_dir} has {free / 1e9:.1f} GB free: free space, "
                        f"point paths.cache elsewhere or set kl=false")
    return kl_dir


def collect(ctx: Context, cfg: DictConfig, refs: List[ModelRef], split) -> Dict[str, object]:
    """Pay once per model: its cached outputs -> predicted classes, and, when asked, its fp16 log-probabilities on
    disk (kl) and its features on a seeded sample subset (cka). Checks label space and sample ids agree."""
    n, K = len(split), ctx.info.num_classes
    kl_dir = kl_scratch_dir(cfg, len(refs), n, K) if cfg.kl else None
    got = {"labels": None, "preds": [], "log_probs": [], "scratch": [], "feats": []}
    cka_rows = None
    if cfg.cka:
        g = torch.Generator().manual_seed(int(cfg.pair_seed))
        cka_rows = torch.sort(torch.randperm(n, generator=g)[:min(n, int(cfg.cka_samples))]).values
    for ref in refs:
        out = ctx.outputs(ref, split, features=bool(cfg.cka))
        if out["logits"].shape[1] != K:
            raise UserError(f"model '{ref.name}' predicts {out['logits'].shape[1]} classes but dataset "
                            f"'{ctx.info.name}' has {K}: use models trained on this label space")
        if got["labels"] is None:
            got["labels"], ids = out["labels"], out["ids"]
        elif not torch.equal(out["ids"], ids):
            raise UserError(f"model '{ref.name}' was evaluated on other samples than '{refs[0].name}': clear "
                            f"the output cache ({cfg.paths.cache}) and rerun")
        got["preds"].append(pw.predictions(out["logits"]))
        if cfg.kl:  # next to the cached outputs; models without a cache key get a scratch file, deleted after
            cached = ctx.output_path(ref, split)
            p = cached if cached is not None else kl_dir / f"uncached-{ctx.run_dir.name}-{len(got['log_probs'])}" \
                                                          f".safetensors"
            lp = log_prob_path(p, float(cfg.temperature))
            got["log_probs"].append(log_prob_file(out["logits"], lp, float(cfg.temperature)))
            if cached is None:
                got["scratch"].append(lp)
        if cfg.cka:
            got["feats"].append(out["features"][cka_rows].float())
        del out
    return got


def pair_matrices(ctx: Context, cfg: DictConfig, got: Dict[str, object], ps: List[float]) -> Dict[str, object]:
    """Every pairwise statistic as an N x N matrix, with matrix operations on the stacked predictions (KL streamed
    from the log-probability files, CKA from the features)."""
    dev, K = ctx.device, ctx.info.num_classes
    P = torch.stack(got["preds"]).to(dev)
    N = P.shape[0]
    keep_pc = N * N * K <= 20_000_000
    st = pw.pairwise_stats(P, got["labels"].to(dev), K, ps=ps, keep_per_class=keep_pc)
    if cfg.kl:
        st["kl"] = pw.kl_matrix_stream(got["log_probs"], max_bytes=int(float(cfg.kl_max_gb) * 1e9), device=dev)
        for f in got["scratch"]:  # models without a cache key: their log-probabilities are not kept
            f.unlink(missing_ok=True)
    if cfg.cka:
        st["cka_linear"] = cka_matrix([f.to(dev) for f in got["feats"]], "linear")
        st["cka_rbf"] = cka_matrix([f.to(dev) for f in got["feats"]], "rbf")
    conc = [f"classes_for_{p:g}pct" for p in ps]
    keys = list(PAIR_STATS) + conc + ["agreement"] + (["kl"] if cfg.kl else []) + \
        (["cka_linear", "cka_rbf"] if cfg.cka else [])
    return {"P": P, "acc": st["acc"].cpu().numpy(), "mats": {k: st[k].cpu().double().numpy() for k in keys},
            "counts": ["pos_flips", "neg_flips", *conc], "pos_per_class": st.get("pos_per_class")}


def pair_rows(pairs, names: List[str], m: Dict[str, object], top1: Dict[str, float]) -> List[dict]:
    """One row per ordered (teacher, student) pair: accuracies and every pairwise statistic."""
    rows = []
    for t, s in pairs:
        r = {"teacher": names[t], "student": names[s], "teacher_acc": float(m["acc"][t]),
             "student_acc": float(m["acc"][s])}
        for k, mat in m["mats"].items():
            r[k] = int(mat[t, s]) if k in m["counts"] else float(mat[t, s])
        if top1:
            r["teacher_top1_published"] = top1.get(names[t])
            r["student_top1_published"] = top1.get(names[s])
        rows.append(r)
    return rows


def write_files(ctx: Context, rows: List[dict], names: List[str], m: Dict[str, object]) -> Path:
    """pairs.csv, matrices/ (npz + one CSV per statistic, per-class positive flips when small enough)."""
    _write_csv(ctx.run_dir / "pairs.csv", rows)
    npz = _write_matrices(ctx.run_dir / "matrices", names, m["mats"], m["acc"])
    if m["pos_per_class"] is not None and ctx.rank == 0:
        np.savez_compressed(ctx.run_dir / "matrices" / "pos_per_class.npz", names=np.array(names),
                            pos_per_class=m["pos_per_class"].cpu().numpy())
    return npz


def plot(ctx: Context, cfg: DictConfig, rows: List[dict], names: List[str], pairs, m: Dict[str, object],
         labels) -> Dict[str, Path]:
    """The positive-flips heatmap (self-pairs blank), flips vs accuracy difference (+ lower envelope), the per-class
    flips of one pair (plot_pair, else the pair with the most positive flips) and, with cka=true, the CKA heatmap;
    logged to the tracker with the pairs table."""
    from ..plots import cka_heatmap, flip_heatmap, flips_vs_acc_diff, per_class_flips_plot

    mats, plots = m["mats"], ctx.run_dir / "plots"
    figures = {"heatmap_positive_flips": flip_heatmap(mats["pos_flips_pct"], names,
                                                      plots / "heatmap_positive_flips.png")}
    if "cka_linear" in mats:
        figures["heatmap_cka"] = cka_heatmap({"linear": mats["cka_linear"], "RBF": mats["cka_rbf"]}, names,
                                             plots / "heatmap_cka.png", samples=int(cfg.cka_samples))
    xd, yd = [r["acc_diff"] for r in rows], [r["pos_flips_pct"] for r in rows]
    env = pw.lower_envelope(xd, yd, bins=min(20, max(1, len(rows) // 3)))
    figures["flips_vs_acc_diff"] = flips_vs_acc_diff(xd, yd, plots / "flips_vs_acc_diff.png",
                                                     envelope=(env[0].numpy(), env[1].numpy()))
    if cfg.plot_pair:
        pt, pst = (str(v) for v in cfg.plot_pair)
        if pt not in names or pst not in names:
            raise UserError(f"plot_pair={[pt, pst]} names a model that is not in this run ({', '.join(names)}): "
                            f"pick two of them")
        ti, si = names.index(pt), names.index(pst)
    else:
        ti, si = max(pairs, key=lambda p: mats["pos_flips"][p])
    P, K = m["P"], ctx.info.num_classes
    pc = per_class_flips(P[ti].long().cpu(), P[si].long().cpu(), labels, K)
    figures["per_class_flips"] = per_class_flips_plot(
        pc["pos_per_class"], pc["neg_per_class"], ctx.info.classes, plots / "per_class_flips.png",
        title=f"teacher {names[ti]} -> student {names[si]}: positive flips entropy {pc['pos_class_entropy']:.2f} "
              f"nats")
    for name, path in figures.items():
        ctx.tracker.log_figure(f"plots/{name}", path)
    ctx.tracker.log_table("pairs", rows)
    return figures


def run(cfg: DictConfig, run_dir=None) -> dict:
    t0 = time.time()
    names, top1 = model_list(cfg) if cfg.mode != "pair" else ([], {})
    if cfg.mode == "pair" and cfg.models_csv:
        _, top1 = read_models_csv(cfg.models_csv)
    names, pairs = select_pairs(cfg, names)
    ps = check_options(cfg, names)
    with run_context(cfg, run_dir, "prediction_flips", train_missing=train_zoo_entry) as ctx:
        split = ctx.ds.split(cfg.split or cfg.dataset.test_split)
        computed0, hits0 = ctx.cache.computed, ctx.cache.hits
        refs: List[ModelRef] = [resolve_model(m, ctx) for m in names]
        if cfg.mode == "random_baseline":
            refs.append(random_student(ctx, cfg))
        got = collect(ctx, cfg, refs, split)
        model_names = [r.name for r in refs]
        if len(set(model_names)) != len(model_names):
            raise UserError(f"two models resolve to the same name in {model_names}: give each model once")
        evaluations = ctx.cache.computed - computed0
        m = pair_matrices(ctx, cfg, got, ps)
        rows = pair_rows(pairs, model_names, m, top1)
        npz = write_files(ctx, rows, model_names, m)
        figures = plot(ctx, cfg, rows, model_names, pairs, m, got["labels"]) if ctx.rank == 0 else {}
        summary = {
            "task": "prediction_flips", "dataset": ctx.info.name, "split": split.name, "num_samples": len(split),
            "num_classes": ctx.info.num_classes, "mode": str(cfg.mode), "n_models": len(refs),
            "n_pairs": len(rows), "evaluations": evaluations, "cache_hits": ctx.cache.hits - hits0,
            "models": {n: {"acc": float(m["acc"][i]), "key": refs[i].key,
                           **({"top1_published": top1[n]} if n in top1 else {})} for i, n in enumerate(model_names)},
            **{k: _stats([r[k] for r in rows]) for k in ("pos_flips_pct", "neg_flips_pct", "agreement",
                                                         "pos_class_entropy")},
            **{k: _stats([r[k] for r in rows]) if k in m["mats"] else None for k in ("kl", "cka_linear", "cka_rbf")},
            "outputs": {"pairs_csv": str(ctx.run_dir / "pairs.csv"), "matrices": str(npz),
                        "plots": {k: str(v) for k, v in figures.items()}},
            "seconds": time.time() - t0,
        }
        ctx.tracker.log({**{f"pos_flips_pct/{k}": summary["pos_flips_pct"][k] for k in ("min", "median", "max")},
                         "agreement/mean": summary["agreement"]["mean"], "evaluations": evaluations}, step=0)
        cka = {k: m["mats"][k] for k in ("cka_linear", "cka_rbf") if k in m["mats"]}
        return ctx.report(summary, lambda s, run_dir: _print(rows, s, run_dir, model_names, cka))


def cka_lines(names: List[str], cka: Dict[str, np.ndarray], max_models: int = 12) -> List[str]:
    """The CKA matrices as text (rows in model order, columns numbered like the rows: `arch@file` names stay
    readable), or for more than `max_models` models the min / median / max over the pairs."""
    from ..tracking.console import columns

    out = []
    for kernel, mat in cka.items():
        off = mat[~np.eye(len(names), dtype=bool)]
        head = f"{kernel.replace('_', ' ')} of the penultimate features"
        if len(names) > max_models:
            out.append(f"{head}, over {off.size} pairs: min {off.min():.3f} median {np.median(off):.3f} "
                       f"max {off.max():.3f} (matrices/{kernel}.csv)")
            continue
        out.append(f"{head}:")
        out += columns(["model", *[f"[{i + 1}]" for i in range(len(names))]],
                       [[f"[{i + 1}] {n}", *[f"{v:.3f}" for v in row]] for i, (n, row) in enumerate(zip(names, mat))],
                       right=range(1, len(names) + 1))
    return out


def _print(rows: List[dict], summary: dict, run_dir: Path, names: Optional[List[str]] = None,
           cka: Optional[Dict[str, np.ndarray]] = None) -> None:
    from ..tracking.console import columns

    print("\n".join(columns(["teacher", "student", "pos %", "neg %", "acc diff", "agree %"],
                             [[r["teacher"], r["student"], f"{r['pos_flips_pct']:.2f}", f"{r['neg_flips_pct']:.2f}",
                               f"{r['acc_diff']:.2f}", f"{r['agreement']:.2f}"] for r in rows[:40]],
                             right=(2, 3, 4, 5))))
    if len(rows) > 40:
        print(f"... {len(rows) - 40} more pairs in pairs.csv")
    s = summary["pos_flips_pct"]
    print(f"{summary['n_models']} models, {summary['n_pairs']} pairs, {summary['evaluations']} model evaluations "
          f"({summary['cache_hits']} cache hits); positive flips % min/median/max "
          f"{s['min']:.2f}/{s['median']:.2f}/{s['max']:.2f}")
    for line in cka_lines(names or [], cka or {}):
        print(line)
    print(f"run dir: {run_dir}")
