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
from .common import Context, ModelRef, as_dict, resolve_model, setup, zoo_names

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


def random_student(ctx: Context) -> ModelRef:
    """A randomly initialised student (seeded with trainer.seed); never cached (it has no content key)."""
    spec = ctx.cfg.random_student
    info = ctx.info
    torch.manual_seed(int(ctx.cfg.trainer.seed))
    m = create_model(spec.arch, info.num_classes, info.channels, info.mean, info.std,
                     kwargs=as_dict(spec.get("kwargs")), img_size=info.image_size)
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


def run(cfg: DictConfig, run_dir=None) -> dict:
    t0 = time.time()
    names, top1 = model_list(cfg) if cfg.mode != "pair" else ([], {})
    if cfg.mode == "pair" and cfg.models_csv:
        _, top1 = read_models_csv(cfg.models_csv)
    names, pairs = select_pairs(cfg, names)
    if cfg.plot_pair:  # before any evaluation: names that are not paths are the models' names in this run
        pp = [str(v) for v in cfg.plot_pair]
        if len(pp) != 2 or any(v not in names for v in pp) and not any(Path(n).exists() for n in names):
            raise UserError(f"plot_pair={pp} names a model that is not in this run ({', '.join(names)}): pick two "
                            f"of them")
    ps = [float(p) for p in cfg.concentration]
    if any(not 0 < p <= 100 for p in ps):
        raise UserError(f"concentration={ps}: every p must lie in (0, 100]")
    if cfg.cka and int(cfg.cka_samples) < 2:
        raise UserError(f"cka_samples={cfg.cka_samples} must be >= 2 (CKA compares sample kernels)")
    ctx = setup(cfg, run_dir, job_type="prediction_flips")
    try:
        split = ctx.ds.split(cfg.split or cfg.dataset.test_split)
        n, K = len(split), ctx.info.num_classes
        n_models = len(names) + (cfg.mode == "random_baseline")
        if cfg.kl:
            if not float(cfg.kl_max_gb) > 0:
                raise UserError(f"kl_max_gb={cfg.kl_max_gb} must be > 0 (GB for one streamed block of "
                                f"log-probabilities): use e.g. kl_max_gb=2")
            kl_dir = Path(cfg.paths.cache) / "outputs" / "log_probs"
            need = n_models * n * K * 2  # fp16 log-probabilities on disk
            kl_dir.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(kl_dir).free
            if need > free:
                raise UserError(f"kl=true streams {n_models} x {n} x {K} fp16 log-probabilities from disk "
                                f"({need / 1e9:.1f} GB) but {kl_dir} has {free / 1e9:.1f} GB free: free space, "
                                f"point paths.cache elsewhere or set kl=false")
        computed0, hits0 = ctx.cache.computed, ctx.cache.hits

        # ---- pay once per model: cached outputs -> predicted classes (+ logits for KL, features for CKA)
        refs: List[ModelRef] = [resolve_model(m, ctx) for m in names]
        if cfg.mode == "random_baseline":
            refs.append(random_student(ctx))
        labels = None
        preds, log_probs, scratch, feats = [], [], [], []
        cka_rows = None
        for ref in refs:
            out = ctx.outputs(ref, split, features=bool(cfg.cka))
            if out["logits"].shape[1] != K:
                raise UserError(f"model '{ref.name}' predicts {out['logits'].shape[1]} classes but dataset "
                                f"'{ctx.info.name}' has {K}: use models trained on this label space")
            if labels is None:
                labels, ids = out["labels"], out["ids"]
            elif not torch.equal(out["ids"], ids):
                raise UserError(f"model '{ref.name}' was evaluated on other samples than '{refs[0].name}': clear "
                                f"the output cache ({ctx.cfg.paths.cache}) and rerun")
            preds.append(pw.predictions(out["logits"]))
            if cfg.kl:  # fp16 log-probabilities on disk (next to the cached outputs), streamed below
                p = ctx.output_path(ref, split)
                p = p if p is not None else kl_dir / f"uncached-{ctx.run_dir.name}-{len(log_probs)}.safetensors"
                log_probs.append(log_prob_file(out["logits"], log_prob_path(p, float(cfg.temperature)),
                                               float(cfg.temperature)))
                if ctx.output_path(ref, split) is None:
                    scratch.append(log_prob_path(p, float(cfg.temperature)))
            if cfg.cka:
                if cka_rows is None:
                    g = torch.Generator().manual_seed(int(cfg.pair_seed))
                    k = min(n, int(cfg.cka_samples))
                    cka_rows = torch.sort(torch.randperm(n, generator=g)[:k]).values
                feats.append(out["features"][cka_rows].float())
            del out
        model_names = [r.name for r in refs]
        if len(set(model_names)) != len(model_names):
            raise UserError(f"two models resolve to the same name in {model_names}: give each model once")
        evaluations = ctx.cache.computed - computed0

        # ---- all pairwise statistics with matrix operations
        dev = ctx.device
        P = torch.stack(preds).to(dev)
        y = labels.to(dev)
        N = len(refs)
        keep_pc = N * N * K <= 20_000_000
        st = pw.pairwise_stats(P, y, K, ps=ps, keep_per_class=keep_pc)
        if cfg.kl:
            st["kl"] = pw.kl_matrix_stream(log_probs, max_bytes=int(float(cfg.kl_max_gb) * 1e9), device=dev)
            del log_probs
            for f in scratch:  # models without a cache key: their log-probabilities are not kept
                f.unlink(missing_ok=True)
        if cfg.cka:
            st["cka_linear"] = cka_matrix([f.to(dev) for f in feats], "linear")
            st["cka_rbf"] = cka_matrix([f.to(dev) for f in feats], "rbf")
        acc = st["acc"].cpu().numpy()
        conc = [f"classes_for_{p:g}pct" for p in ps]
        extra = (["agreement"] + (["kl"] if cfg.kl else []) + (["cka_linear", "cka_rbf"] if cfg.cka else []))
        mat_keys = list(PAIR_STATS) + conc + extra
        mats = {k: st[k].cpu().double().numpy() for k in mat_keys}

        # ---- one row per ordered pair
        rows = []
        for t, s in pairs:
            r = {"teacher": model_names[t], "student": model_names[s], "teacher_acc": float(acc[t]),
                 "student_acc": float(acc[s])}
            for k in mat_keys:
                v = mats[k][t, s]
                r[k] = int(v) if k in ("pos_flips", "neg_flips") or k in conc else float(v)
            if top1:
                r["teacher_top1_published"] = top1.get(model_names[t])
                r["student_top1_published"] = top1.get(model_names[s])
            rows.append(r)

        out_dir = ctx.run_dir
        _write_csv(out_dir / "pairs.csv", rows)
        npz = _write_matrices(out_dir / "matrices", model_names, mats, acc)
        if keep_pc and ctx.rank == 0:
            np.savez_compressed(out_dir / "matrices" / "pos_per_class.npz", names=np.array(model_names),
                                pos_per_class=st["pos_per_class"].cpu().numpy())

        # ---- figures
        figures = {}
        if ctx.rank == 0:
            from ..plots import flip_heatmap, flips_vs_acc_diff, per_class_flips_plot

            plots = out_dir / "plots"
            figures["heatmap_positive_flips"] = flip_heatmap(mats["pos_flips_pct"], model_names,
                                                             plots / "heatmap_positive_flips.png")
            xd = [r["acc_diff"] for r in rows]
            yd = [r["pos_flips_pct"] for r in rows]
            env = pw.lower_envelope(xd, yd, bins=min(20, max(1, len(rows) // 3)))
            figures["flips_vs_acc_diff"] = flips_vs_acc_diff(xd, yd, plots / "flips_vs_acc_diff.png",
                                                             envelope=(env[0].numpy(), env[1].numpy()))
            if cfg.plot_pair:
                pt, ps_ = (str(v) for v in cfg.plot_pair)
                if pt not in model_names or ps_ not in model_names:
                    raise UserError(f"plot_pair={[pt, ps_]} names a model that is not in this run "
                                    f"({', '.join(model_names)}): pick two of them")
                ti, si = model_names.index(pt), model_names.index(ps_)
            else:
                ti, si = max(pairs, key=lambda p: mats["pos_flips"][p])
            pc = per_class_flips(P[ti].long().cpu(), P[si].long().cpu(), labels, K)
            figures["per_class_flips"] = per_class_flips_plot(
                pc["pos_per_class"], pc["neg_per_class"], ctx.info.classes, plots / "per_class_flips.png",
                title=f"teacher {model_names[ti]} -> student {model_names[si]}: positive flips entropy "
                      f"{pc['pos_class_entropy']:.2f} nats")
            for name, path in figures.items():
                ctx.tracker.log_figure(f"plots/{name}", path)
            ctx.tracker.log_table("pairs", rows)

        pos_pct = [r["pos_flips_pct"] for r in rows]
        summary = {
            "task": "prediction_flips", "dataset": ctx.info.name, "split": split.name, "num_samples": n,
            "num_classes": K, "mode": str(cfg.mode), "n_models": N, "n_pairs": len(rows),
            "evaluations": evaluations, "cache_hits": ctx.cache.hits - hits0,
            "models": {m: {"acc": float(acc[i]), "key": refs[i].key, **({"top1_published": top1[m]}
                                                                      if m in top1 else {})}
                       for i, m in enumerate(model_names)},
            "pos_flips_pct": _stats(pos_pct),
            "neg_flips_pct": _stats([r["neg_flips_pct"] for r in rows]),
            "agreement": _stats([r["agreement"] for r in rows]),
            "pos_class_entropy": _stats([r["pos_class_entropy"] for r in rows]),
            "kl": _stats([r["kl"] for r in rows]) if cfg.kl else None,
            "cka_linear": _stats([r["cka_linear"] for r in rows]) if cfg.cka else None,
            "cka_rbf": _stats([r["cka_rbf"] for r in rows]) if cfg.cka else None,
            "outputs": {"pairs_csv": str(out_dir / "pairs.csv"), "matrices": str(npz),
                        "plots": {k: str(v) for k, v in figures.items()}},
            "seconds": time.time() - t0,
        }
        ctx.tracker.log({"pos_flips_pct/min": summary["pos_flips_pct"]["min"],
                         "pos_flips_pct/median": summary["pos_flips_pct"]["median"],
                         "pos_flips_pct/max": summary["pos_flips_pct"]["max"],
                         "agreement/mean": summary["agreement"]["mean"], "evaluations": evaluations}, step=0)
        return ctx.report(summary, lambda s, run_dir: _print(rows, s, run_dir))
    finally:
        ctx.tracker.finish()


def _print(rows: List[dict], summary: dict, run_dir: Path) -> None:
    print(f"{'teacher':<18}{'student':<18}{'pos %':>8}{'neg %':>8}{'acc diff':>10}{'agree %':>9}")
    for r in rows[:40]:
        print(f"{r['teacher']:<18}{r['student']:<18}{r['pos_flips_pct']:>8.2f}{r['neg_flips_pct']:>8.2f}"
              f"{r['acc_diff']:>10.2f}{r['agreement']:>9.2f}")
    if len(rows) > 40:
        print(f"... {len(rows) - 40} more pairs in pairs.csv")
    s = summary["pos_flips_pct"]
    print(f"{summary['n_models']} models, {summary['n_pairs']} pairs, {summary['evaluations']} model evaluations "
          f"({summary['cache_hits']} cache hits); positive flips % min/median/max "
          f"{s['min']:.2f}/{s['median']:.2f}/{s['max']:.2f}")
    print(f"run dir: {run_dir}")
