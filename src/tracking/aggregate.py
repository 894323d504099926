"""Results over many runs: read any mix of run dirs and multirun dirs of any family (`summary.json`, plus
`.hydra/config.yaml` when Hydra wrote one), group them, and reduce them to tables of mean, std and a 95%
confidence interval over seeds (a seed = one draw of the zoo `zoo.seed` with one `trainer.seed`). Failed and
incomplete runs are returned as such, never dropped. `scripts/aggregate.py` is the command line."""
from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from .stats import describe  # noqa: F401 (part of this module's API: the report and the tests use it)

FAMILIES = ("pretrain", "prediction_flips", "transfer", "multi_teacher", "aft", "kdep", "zeroshot")
_JOB_FAMILY = {f"main_{f}": f for f in ("pretrain", "transfer", "multi_teacher", "aft", "kdep", "zeroshot")}
_JOB_FAMILY["main_flips"] = "prediction_flips"

Row = Dict[str, Any]
# what each family's tables read from a summary; a summary without them is listed as incomplete, not used
REQUIRED = {
    "pretrain": ("models",),
    "prediction_flips": ("agreement",),
    "transfer": ("teacher", "student", "teacher_acc", "student_acc_before", "student_acc_after", "transfer_delta",
                 "knowledge_gain", "knowledge_loss"),
    "multi_teacher": ("mode", "student", "teachers", "student_acc_after", "transfer_delta"),
    "aft": ("method", "student", "student_acc_after", "transfer_delta"),
    "kdep": ("teacher", "student", "inits", "downstream"),
    "zeroshot": ("teacher", "student", "zeroshot_acc"),
}


# ------------------------------------------------------------------------------------------ reading runs


def _is_run_dir(d: Path) -> bool:
    return (d / "summary.json").is_file() or (d / ".hydra" / "config.yaml").is_file() or (d / "error.json").is_file()


def _read_json(p: Path) -> Tuple[Optional[dict], Optional[str]]:
    try:
        v = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{p.name} unreadable ({type(e).__name__})"
    return (v, None) if isinstance(v, dict) else (None, f"{p.name} is not a JSON object")


def _read_cfg(d: Path) -> dict:
    p = d / ".hydra" / "config.yaml"
    if not p.is_file():
        return {}
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(p), resolve=False) or {}
    except Exception:  # a torn or hand-edited config: the summary still counts
        return {}


def _hydra(d: Path) -> dict:
    """The job name and config-group choices Hydra recorded for a run ({} without .hydra/hydra.yaml)."""
    p = d / ".hydra" / "hydra.yaml"
    if not p.is_file():
        return {}
    try:
        from omegaconf import OmegaConf

        h = OmegaConf.load(p).hydra
        return {"job": str(h.job.name), "choices": OmegaConf.to_container(h.runtime.choices)}
    except Exception:
        return {}


def _family(summary: dict, hydra: dict) -> Optional[str]:
    fam = summary.get("family") or {"prediction_flips": "prediction_flips", "pretrain": "pretrain"}.get(
        summary.get("task"))
    return fam or _JOB_FAMILY.get(hydra.get("job", ""))


def find_run_dirs(paths: Iterable) -> List[Path]:
    """Run dirs under each path (a run dir itself, a multirun dir, or any folder of them); a run's own
    sub-folders (stages, zoo runs) are part of it, not runs of their own."""
    out: List[Path] = []

    def walk(d: Path):
        if _is_run_dir(d):
            out.append(d)
            return
        for c in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            walk(c)

    for p in paths:
        p = Path(p)
        if not p.is_dir():
            raise FileNotFoundError(f"{p} is not a directory: give run dirs or multirun dirs")
        walk(p)
    return out


QUIET = ("skipped", "refused")  # problems counted, not listed: skipped by design, refused by validation


def load_runs(paths: Iterable) -> Tuple[List[dict], List[dict]]:
    """(runs, problems). A run: {dir, family, cfg, summary, seed, zoo_seed}, status ok. A problem: {dir, family,
    status (failed | incomplete | skipped), reason}: a run with error.json, without summary.json (still running
    or killed), with an unreadable summary, or one its family skipped (e.g. teacher == student)."""
    runs, problems = [], []
    for d in find_run_dirs(paths):
        cfg = _read_cfg(d)
        summary, why = _read_json(d / "summary.json") if (d / "summary.json").is_file() else (None, None)
        hydra = _hydra(d)
        fam = _family(summary or {}, hydra)
        if summary is None:
            err, _ = _read_json(d / "error.json") if (d / "error.json").is_file() else (None, None)
            if err is not None:
                problems.append({"dir": str(d), "family": fam, "status": "refused" if err.get("refused") else "failed",
                                 "reason": str(err.get("message") or err.get("error") or err)[:200]})
            else:
                problems.append({"dir": str(d), "family": fam, "status": "incomplete",
                                 "reason": why or "no summary.json (still running, killed or failed early)"})
            continue
        status = summary.get("status", "ok")
        if status != "ok":
            problems.append({"dir": str(d), "family": fam, "status": "skipped" if status == "skipped" else "failed",
                             "reason": str(summary.get("reason", status))})
            continue
        zs = summary.get("zoo_seed", (cfg.get("zoo") or {}).get("seed", 0) if isinstance(cfg.get("zoo"), dict) else 0)
        missing = [k for k in REQUIRED.get(fam, ()) if k not in summary]
        if missing:
            problems.append({"dir": str(d), "family": fam, "status": "incomplete",
                             "reason": f"summary.json lacks {', '.join(missing)}"})
            continue
        bad = nonfinite(summary, REQUIRED.get(fam, ()))
        if bad:
            problems.append({"dir": str(d), "family": fam, "status": "invalid",
                             "reason": f"non-finite values in summary.json ({', '.join(bad[:4])}): not averaged"})
            continue
        if fam == "transfer" and not summary.get("method_name") and (hydra.get("choices") or {}).get("method"):
            summary = {**summary, "method_name": hydra["choices"]["method"]}  # the config's name: kl, xekl, kl_dp_u
        runs.append({"dir": str(d), "family": fam, "cfg": cfg, "summary": summary,
                     "seed": summary.get("seed", (cfg.get("trainer") or {}).get("seed", 0)), "zoo_seed": zs or 0,
                     "identity": identity(d, fam, cfg, summary)})
    return drop_duplicates(runs, problems)


def nonfinite(summary: dict, required=()) -> List[str]:
    """Keys of a summary whose numbers are NaN or infinite (the tracker writes them as null / +-1e308), a required
    key that is null included; library versions are not looked at."""
    out = [k for k in required if summary.get(k, 0) is None]

    def walk(v, key):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{key}.{k}" if key else str(k))
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, f"{key}[{i}]")
        elif isinstance(v, float) and (not math.isfinite(v) or abs(v) >= 1e308):
            out.append(key)

    walk({k: v for k, v in summary.items() if k != "versions"}, "")
    return out


_NOT_IDENTITY = ("paths", "wandb", "hydra")  # where a copy of a run may differ without being another run


def identity(d: Path, fam: str, cfg: dict, summary: dict) -> str:
    """What a run is: its family, the configuration it ran with (seeds included; from the run's own record
    `run_config.json`, written under the run-dir lock, else Hydra's config) and the labels its summary gives it
    (teacher, student, method, mode, seeds: a partial config alone must not merge two different runs); without
    any config, the whole summary."""
    own, _ = _read_json(d / "run_config.json") if (d / "run_config.json").is_file() else (None, None)
    if own:
        body = {k: v for k, v in own.items() if k.split(".", 1)[0] not in _NOT_IDENTITY}
    elif cfg:
        body = {k: v for k, v in cfg.items() if k not in _NOT_IDENTITY}
    else:
        body = {k: v for k, v in summary.items() if k != "versions"}
    labels = {k: v for k, v in summary.items()
              if k in ("seed", "zoo_seed") or (isinstance(v, (str, list)) and k != "versions")}
    return f"{fam}:{json.dumps([body, labels], sort_keys=True, default=str)}"


def drop_duplicates(runs: List[dict], problems: List[dict]) -> Tuple[List[dict], List[dict]]:
    """The same configuration and seeds found in two dirs (a copied or re-aggregated sweep) is one sample: the first
    dir (in path order) counts, each other is listed as a duplicate naming it."""
    kept: Dict[str, dict] = {}
    out = []
    for r in runs:
        first = kept.setdefault(r["identity"], r)
        if first is r:
            out.append(r)
        else:
            problems.append({"dir": r["dir"], "family": r["family"], "status": "duplicate",
                             "reason": f"same configuration and seeds as {first['dir']}: counted once"})
    return out, problems


# ------------------------------------------------------------------------------------------ statistics


def fmt(d: Dict[str, float], digits: int = 2, unit: str = "") -> str:
    """'mean ± std<unit>' (and the 95% CI half-width in brackets when n > 1)."""
    if not d or d.get("n", 0) == 0:
        return "-"
    if d["n"] == 1:  # one sample has no spread: say so instead of '± 0.00'
        return f"{d['mean']:.{digits}f}{unit} (n=1)"
    s = f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}{unit}"
    return s + (f" [±{d['ci95']:.{digits}f}]" if d["n"] > 1 else "")


def replicate(run: dict) -> str:
    """The seed a run belongs to: zoo draw and trainer seed ('z0s1')."""
    return f"z{run.get('zoo_seed', 0)}s{run.get('seed', 0)}"


def _over_seeds(runs: List[dict], stats: Dict[str, Callable[[List[dict]], float]]) -> Row:
    """Per seed, each statistic over that seed's runs (e.g. a success rate over pairs); then described over seeds."""
    by = defaultdict(list)
    for r in runs:
        by[replicate(r)].append(r)
    out: Row = {"seeds": len(by), "runs": len(runs)}
    for name, f in stats.items():
        out[name] = describe(f(rs) for rs in by.values())
    return out


def _mean(key: str) -> Callable[[List[dict]], float]:
    return lambda rs: statistics.fmean(float(r["summary"][key]) for r in rs)


# ------------------------------------------------------------------------------------------ family tables


def method_label(s: dict) -> str:
    """How a transfer / multi-teacher method is named in tables: method_name if set (else the method config group
    Hydra recorded: kl, xekl, kl_dp_u, ...), else the class and the DP route when it is not the method's default."""
    if s.get("method_name"):
        return str(s["method_name"])
    if s.get("method_choice"):  # the config the user chose (kl_dp_u), recorded by the run itself
        return str(s["method_choice"])
    mc = s.get("method_config") or {}
    label = str(s.get("method", "?"))
    if label == "KL" and float(mc.get("alpha", 1.0)) < 1.0:
        label = "XE-KL"
    route = mc.get("partition") or mc.get("dp_route")
    return f"{label}({route})" if route and route not in ("most-conf",) else label


def balance(runs: List[dict]) -> str:
    """'ok' when every seed of a method row has the same teacher/student pairs, else what differs: a row that
    pools seeds over different pair sets is flagged, never averaged without a word."""
    by = defaultdict(set)
    for r in runs:
        by[replicate(r)].add((r["summary"]["teacher"], r["summary"]["student"]))
    if len({frozenset(v) for v in by.values()}) <= 1:
        return "ok"
    return "unbalanced: " + ", ".join(f"{k} {len(v)} pair{'s' * (len(v) != 1)}" for k, v in sorted(by.items()))


def transfer_tables(runs: List[dict]) -> Dict[str, List[Row]]:
    """Per method over the grid: success rate (% of pairs with transfer delta > 0), mean / median / worst delta,
    knowledge gain and loss, each computed per seed and described over seeds; per (method, pair): delta over seeds."""
    by = defaultdict(list)
    for r in runs:
        by[method_label(r["summary"])].append(r)
    methods, pairs = [], []
    for m, rs in sorted(by.items()):
        d = lambda xs: [float(x["summary"]["transfer_delta"]) for x in xs]
        row = {"method": m, "pairs": len({(x["summary"]["teacher"], x["summary"]["student"]) for x in rs}),
               **_over_seeds(rs, {"success_rate": lambda xs: 100.0 * sum(v > 0 for v in d(xs)) / len(xs),
                                  "mean_delta": lambda xs: statistics.fmean(d(xs)),
                                  "median_delta": lambda xs: statistics.median(d(xs)),
                                  "worst_delta": lambda xs: min(d(xs)),
                                  "knowledge_gain": _mean("knowledge_gain"),
                                  "knowledge_loss": _mean("knowledge_loss")})}
        row["balance"] = balance(rs)
        methods.append(row)
        per_pair = defaultdict(list)
        for x in rs:
            per_pair[(x["summary"]["teacher"], x["summary"]["student"])].append(x)
        for (t, s), xs in sorted(per_pair.items()):
            pairs.append({"method": m, "teacher": t, "student": s,
                          "gap": describe(x["summary"]["teacher_acc"] - x["summary"]["student_acc_before"]
                                          for x in xs),
                          "student_acc_before": describe(x["summary"]["student_acc_before"] for x in xs),
                          "student_acc_after": describe(x["summary"]["student_acc_after"] for x in xs),
                          "delta": describe(d(xs)),
                          "knowledge_loss": describe(x["summary"]["knowledge_loss"] for x in xs)})
    return {"transfer_methods": methods, "transfer_pairs": pairs}


def _flips_pairs(run: dict) -> List[dict]:
    p = Path(run["dir"]) / "pairs.csv"
    if not p.is_file():
        p = Path(str((run["summary"].get("outputs") or {}).get("pairs_csv", "")))
    if not p.is_file():
        return []
    with open(p) as f:
        return list(csv.DictReader(f))


def flips_tables(runs: List[dict]) -> Dict[str, List[Row]]:
    """Per zoo draw: pairs with positive flips, also from weaker teachers, and the spread of positive flips."""
    def share(rows, weaker_only=False):
        rows = [r for r in rows if not weaker_only or float(r["acc_diff"]) < 0]
        return 100.0 * sum(float(r["pos_flips"]) > 0 for r in rows) / len(rows) if rows else math.nan

    rows = []
    by = defaultdict(list)
    for r in runs:
        by[(r["summary"].get("dataset"), r["summary"].get("split"))].append(r)
    for (ds, split), rs in sorted(by.items(), key=str):
        pr = {replicate(r): _flips_pairs(r) for r in rs}
        pr = {k: v for k, v in pr.items() if v}
        if not pr:
            continue
        rows.append({"dataset": ds, "split": split, "zoo_draws": len(pr),
                     "pairs": statistics.fmean(len(v) for v in pr.values()),
                     "pairs_with_pos_flips_pct": describe(share(v) for v in pr.values()),
                     "weaker_teacher_pairs_with_pos_flips_pct": describe(share(v, True) for v in pr.values()),
                     "pos_flips_pct_median": describe(statistics.median(float(x["pos_flips_pct"]) for x in v)
                                                      for v in pr.values()),
                     "pos_flips_pct_min": describe(min(float(x["pos_flips_pct"]) for x in v) for v in pr.values()),
                     "pos_flips_pct_max": describe(max(float(x["pos_flips_pct"]) for x in v) for v in pr.values()),
                     "agreement_mean": describe(r["summary"]["agreement"]["mean"] for r in rs)})
    return {"flips": rows}


def _grouped(runs: List[dict], key: Callable[[dict], tuple], names: Tuple[str, ...],
             metrics: Dict[str, Callable[[dict], Optional[float]]]) -> List[Row]:
    by = defaultdict(list)
    for r in runs:
        by[key(r)].append(r)
    out = []
    for k, rs in sorted(by.items(), key=lambda kv: str(kv[0])):
        row = dict(zip(names, k))
        row.update(seeds=len({replicate(r) for r in rs}), runs=len(rs))
        for m, f in metrics.items():
            row[m] = describe(f(r) for r in rs)
        out.append(row)
    return out


def multi_teacher_tables(runs: List[dict]) -> Dict[str, List[Row]]:
    s = lambda r: r["summary"]
    return {"multi_teacher": _grouped(
        runs, lambda r: (s(r)["mode"], method_label(s(r)), s(r)["student"], "+".join(s(r)["teachers"])),
        ("mode", "method", "student", "teachers"),
        {"student_acc_after": lambda r: s(r)["student_acc_after"], "transfer_delta": lambda r: s(r)["transfer_delta"],
         "knowledge_loss": lambda r: s(r).get("knowledge_loss")})}


def aft_tables(runs: List[dict]) -> Dict[str, List[Row]]:
    s = lambda r: r["summary"]
    return {"aft": _grouped(runs, lambda r: (s(r).get("method_choice") or s(r)["method"], s(r)["student"],
                                             "+".join(s(r).get("features", []))),
                            ("method", "student", "features"),
                            {"student_acc_after": lambda r: s(r)["student_acc_after"],
                             "transfer_delta": lambda r: s(r)["transfer_delta"]})}


KDEP_METRICS = {"acc": "acc", "miou": "mIoU", "pixel_acc": "pixel acc", "map": "mAP", "ap50": "AP50"}  # key -> label


def kdep_values(res: dict, init: str) -> Dict[str, float]:
    """One downstream entry of a KDEP summary -> {metric: value} for `init`: a classification entry holds its
    accuracy under the init's name; a dense one (with `task`) every metric as `<init>/<metric>`."""
    if "task" not in res:
        return {"acc": res[init]} if init in res else {}
    return {k.split("/", 1)[1]: v for k, v in res.items() if k.startswith(f"{init}/")}


def kdep_tables(runs: List[dict]) -> Dict[str, List[Row]]:
    """Per downstream, metric (classification: acc; segmentation: mIoU, pixel acc; detection: mAP, AP50) and
    initialisation: the last-epoch value over seeds."""
    rows = []
    for r in runs:
        for ds, res in (r["summary"].get("downstream") or {}).items():
            for init in r["summary"].get("inits", []):
                for m, v in kdep_values(res, init).items():
                    rows.append({"dir": r["dir"], "seed": r["seed"], "zoo_seed": r["zoo_seed"],
                                 "summary": {"downstream": ds, "task": res.get("task", "classification"),
                                             "metric": KDEP_METRICS.get(m, m), "init": init, "value": v,
                                             "teacher": r["summary"]["teacher"], "student": r["summary"]["student"]}})
    s = lambda r: r["summary"]
    return {"kdep": _grouped(rows, lambda r: (s(r)["downstream"], s(r)["task"], s(r)["metric"], s(r)["init"],
                                              s(r)["teacher"], s(r)["student"]),
                             ("downstream", "task", "metric", "init", "teacher", "student"),
                             {"value": lambda r: s(r)["value"]})}


def zeroshot_tables(runs: List[dict]) -> Dict[str, List[Row]]:
    rows = []
    for r in runs:
        s = r["summary"]
        for name in ["zeroshot", *s.get("baselines", [])]:
            if f"{name}_acc" in s:
                rows.append({"dir": r["dir"], "seed": r["seed"], "zoo_seed": r["zoo_seed"],
                             "summary": {"student_kind": name, "acc": s[f"{name}_acc"], "mte": s.get(f"mte_{name}"),
                                         "teacher": s["teacher"], "student": s["student"],
                                         "teacher_acc": s.get("teacher_acc")}})
    g = lambda r: r["summary"]
    return {"zeroshot": _grouped(rows, lambda r: (g(r)["student_kind"], g(r)["teacher"], g(r)["student"]),
                                 ("student_kind", "teacher", "student"),
                                 {"acc": lambda r: g(r)["acc"], "mte": lambda r: g(r)["mte"],
                                  "teacher_acc": lambda r: g(r)["teacher_acc"]})}


def pretrain_tables(runs: List[dict]) -> Dict[str, List[Row]]:
    rows = []
    for r in runs:
        percent = r["summary"].get("acc_unit") == "percent"  # summaries written before it hold fractions
        for name, m in (r["summary"].get("models") or {}).items():
            acc = m.get("test_acc")
            if acc is not None:
                rows.append({"dir": r["dir"], "seed": r["seed"], "zoo_seed": r["zoo_seed"],
                             "summary": {"model": name, "test_acc": acc if percent else 100 * acc}})
    # one value per (model, zoo draw): a model trained once and listed by several runs counts once
    seen, uniq = set(), []
    for x in rows:
        k = (x["summary"]["model"], x["zoo_seed"])
        if k not in seen:
            seen.add(k)
            uniq.append(x)
    g = lambda r: r["summary"]
    return {"zoo": _grouped(uniq, lambda r: (g(r)["model"],), ("model",), {"test_acc": lambda r: g(r)["test_acc"]})}


TABLES: Dict[str, Callable[[List[dict]], Dict[str, List[Row]]]] = {
    "pretrain": pretrain_tables, "prediction_flips": flips_tables, "transfer": transfer_tables,
    "multi_teacher": multi_teacher_tables, "aft": aft_tables, "kdep": kdep_tables, "zeroshot": zeroshot_tables,
}


def aggregate(runs: List[dict]) -> Dict[str, List[Row]]:
    """All tables for the families present in `runs`."""
    fid = fidelity_runs(runs)
    by = defaultdict(list)
    for r in without_fidelity(runs):  # a fidelity run's transfer numbers compare no methods: its own table only
        by[r["family"]].append(r)
    out: Dict[str, List[Row]] = {}
    for fam, rs in by.items():
        if fam in TABLES:
            out.update({k: v for k, v in TABLES[fam](rs).items() if v})
    if fid:  # the fidelity study (config/transfer/fidelity.yaml): per teacher and distillation-data setting
        from .fidelity import fidelity_table

        out["fidelity"] = fidelity_table(fid)
    return out


def fidelity_runs(runs: List[dict]) -> List[dict]:
    """Transfer runs of the fidelity preset (their config names a `distill_data` setting)."""
    return [r for r in runs if r["family"] == "transfer" and "distill_data" in (r.get("cfg") or {})]


def without_fidelity(runs: List[dict]) -> List[dict]:
    """`runs` less the fidelity preset's."""
    fid = {id(r) for r in fidelity_runs(runs)}
    return [r for r in runs if id(r) not in fid]


# ------------------------------------------------------------------------------------------ writing


def flat(row: Row) -> Row:
    """A CSV row: each described statistic becomes <name>_mean, _std, _ci95, _n."""
    out: Row = {}
    for k, v in row.items():
        if isinstance(v, dict) and "mean" in v:
            out.update({f"{k}_{s}": v[s] for s in ("mean", "std", "ci95", "n")})
        else:
            out[k] = v
    return out


def table_markdown(name: str, rows: List[Row]) -> str:
    """The markdown of the aggregate table `name` (results.md, `--print`, the reproduction report): the fidelity
    table as mean ± std per metric (src/tracking/fidelity.py), every other one by `markdown`."""
    if name == "fidelity":
        from .fidelity import format_table

        return format_table(rows)
    return markdown(rows)


def markdown(rows: List[Row], digits: int = 2) -> str:
    if not rows:
        return "(no runs)\n"
    cols = list(rows[0])
    cell = lambda v: fmt(v, digits) if isinstance(v, dict) and "mean" in v else (
        f"{v:.{digits}f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write(tables: Dict[str, List[Row]], problems: List[dict], out_dir, runs: List[dict] = (),
          title: str = "Results") -> Path:
    """<out>/<table>.csv for every table, <out>/results.md with all of them (mean ± std [95% CI] over seeds), the
    list of failed / incomplete runs, and figures under <out>/figures/."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        fr = [flat(r) for r in rows]
        cols = list(dict.fromkeys(k for r in fr for k in r))
        with open(out / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(fr)
    figures = figures_for(tables, runs, out / "figures")
    md = [f"# {title}\n", "Values are mean ± std over seeds [95% confidence interval half-width]; a seed is one draw "
          "of the zoo (`zoo.seed`) with one `trainer.seed`.\n"]
    for name, rows in tables.items():
        md += [f"\n## {name}\n", table_markdown(name, rows)]
        if name in figures:
            md.append(f"\n![{name}](figures/{figures[name].name})\n")
    bad = [p for p in problems if p["status"] not in QUIET]
    refused = sum(p["status"] == "refused" for p in problems)
    md.append(f"\n## Failed, incomplete, invalid or duplicate runs ({len(bad)}; "
              f"{len(problems) - len(bad) - refused} skipped by design; {refused} refused before computing anything, "
              f"not listed: their error.json says why)\n")
    md += [f"- {p['status']}: {p['dir']} ({p['family'] or 'unknown family'}): {p['reason']}\n" for p in bad] or \
        ["none\n"]
    (out / "results.md").write_text("".join(md))
    return out / "results.md"


def figures_for(tables: Dict[str, List[Row]], runs: List[dict], fig_dir: Path) -> Dict[str, Path]:
    """The figure each family's paper would show, from the tables (and runs) of this aggregate: table name ->
    PNG under `fig_dir`."""
    from ..plots import aft, kdep, zeroshot
    from ..plots.aggregate import delta_vs_gap
    from ..plots.multi_teacher import aggregate_figure

    figs: Dict[str, Path] = {}
    tr = [r for r in without_fidelity(runs) if r["family"] == "transfer"]
    if tr and "transfer_methods" in tables:
        series = defaultdict(list)
        for r in tr:
            s = r["summary"]
            series[method_label(s)].append((s["teacher_acc"] - s["student_acc_before"], s["transfer_delta"]))
        figs["transfer_methods"] = delta_vs_gap(dict(series), fig_dir / "transfer_delta_vs_gap.png")
    groups = multi_teacher_groups([r for r in runs if r["family"] == "multi_teacher"], tr)
    if tables.get("multi_teacher") and groups:
        figs["multi_teacher"] = aggregate_figure(groups, fig_dir / "multi_teacher.png")
    for name, module in (("aft", aft), ("kdep", kdep), ("zeroshot", zeroshot)):
        if tables.get(name):
            figs[name] = module.aggregate_figure(tables[name], fig_dir / f"{name}.png")
    if tables.get("fidelity"):
        from .fidelity import plot_fidelity

        figs["fidelity"] = plot_fidelity(tables["fidelity"], fig_dir / "fidelity.png")
    return figs


def best_single_teacher(run: dict, transfer_runs: List[dict], label: str) -> Optional[float]:
    """The best accuracy after a single-teacher transfer (method `label`) of the same student, from each of the
    run's teachers, in the same seed; None unless every teacher has such a run."""
    s = run["summary"]
    accs = {}
    for x in transfer_runs:
        xs = x["summary"]
        if method_label(xs) == label and xs["student"] == s["student"] and xs["teacher"] in s["teachers"] \
                and replicate(x) == replicate(run):
            accs[xs["teacher"]] = max(float(xs["student_acc_after"]), accs.get(xs["teacher"], -math.inf))
    return max(accs.values()) if len(accs) == len(set(s["teachers"])) else None


def multi_teacher_groups(runs: List[dict], transfer_runs: List[dict]) -> Dict[str, List[tuple]]:
    """Per (student, teachers): the bars of the aggregate multi-teacher figure, (label, mean, std, kind) described
    over seeds: the student before, each (mode, method)'s final accuracy (the `multi_teacher` table's values), the
    best single-teacher transfer of the same seed (the KL+DP runs of main_transfer when present, else the method
    of the multi-teacher runs), each teacher's accuracy and the teachers' ensemble."""
    by = defaultdict(list)
    for r in runs:
        by[(r["summary"]["student"], "+".join(r["summary"]["teachers"]))].append(r)

    def bar(label: str, per_seed: Dict[str, float], kind: str) -> tuple:
        d = describe(per_seed.values())
        return label, d["mean"], d["std"], kind

    def seeds(rs: List[dict], key: str) -> Dict[str, float]:  # one value per seed (the modes of a seed share it)
        return {replicate(r): float(r["summary"][key]) for r in rs if key in r["summary"]}

    out: Dict[str, List[tuple]] = {}
    for (student, teachers), rs in sorted(by.items()):
        rows = [bar("student before", seeds(rs, "student_acc_before"), "student")]
        for row in multi_teacher_tables(rs)["multi_teacher"]:
            rows.append((f"{row['mode']} ({row['method']})", row["student_acc_after"]["mean"],
                         row["student_acc_after"]["std"], "final"))
        for label in ["kl_dp", *sorted({method_label(r["summary"]) for r in rs})]:
            best = [best_single_teacher(r, transfer_runs, label) for r in rs]
            best = {replicate(r): b for r, b in zip(rs, best) if b is not None}
            if best:
                rows.append(bar(f"best single teacher ({label})", best, "single"))
                break
        for t in rs[0]["summary"]["teachers"] + ["ensemble"]:
            vals = seeds(rs, f"vs_{t}/teacher_acc")
            if vals:
                rows.append(bar("ensemble of teachers" if t == "ensemble" else f"teacher {t}", vals, "teacher"))
        out[f"{teachers.replace('+', ', ')} -> {student}"] = [r for r in rows if not math.isnan(r[1])]
    return out


def log_wandb(tables: Dict[str, List[Row]], figures_dir: Optional[Path], wandb_cfg) -> None:
    """The same tables (and figures) into one wandb run of job type 'aggregate' (online / offline)."""
    from . import Tracker

    trk = Tracker(Path(figures_dir).parent if figures_dir else Path("."), wandb_cfg, {}, job_type="aggregate")
    try:
        for name, rows in tables.items():
            trk.log_table(name, [flat(r) for r in rows])
        if figures_dir and Path(figures_dir).is_dir():
            for p in sorted(Path(figures_dir).glob("*.png")):
                trk.log_figure(f"aggregate/{p.stem}", p)
    finally:
        trk.finish()
