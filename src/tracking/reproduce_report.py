"""The digits reproduction report (`make reproduce`, scripts/reproduce.py): each family's claim, the paper's number
(from the papers, as summarised for this project) and what the digits runs give over seeds, with whether the
direction reproduces. Every number is computed from the run dirs by `aggregate`; nothing here is typed in but the
papers' figures and the criteria."""
from __future__ import annotations

import math
import statistics
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional

from . import aggregate as agg

WEAK_GAP = -3.0  # a teacher "clearly weaker" than its student: at least 3 points (>10 test images) below it


def _by_seed(runs: List[dict], f: Callable[[List[dict]], Optional[float]]) -> Dict[str, float]:
    """f over each seed's runs (seeds where f gives None are left out)."""
    by = defaultdict(list)
    for r in runs:
        by[agg.replicate(r)].append(r)
    out = {}
    for k, rs in sorted(by.items()):
        v = f(rs)
        if v is not None:
            out[k] = v
    return out


def _d(values) -> dict:
    return agg.describe(list(values))


def _f(d: dict, unit: str = "") -> str:
    return agg.fmt(d, unit=unit) if d.get("n") else "no runs"


def _yes(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def _beyond_noise(gap: float, noise: float, noise_name: str = "combined std") -> str:
    """'yes' when gap > 0 and above the noise, 'yes, within noise (...)' when only its sign is, else '**no**'."""
    if gap <= 0:
        return _yes(False)
    return "yes" if gap > noise else f"yes, within noise (gap {gap:.2f} < {noise_name} {noise:.2f})"


def _lower_beyond_noise(a: dict, b: dict) -> str:
    """Whether mean a < mean b, and whether the gap exceeds the seeds' noise (sqrt(std_a^2 + std_b^2)): a
    direction inside the noise is said so, since a single run can then order the two the other way."""
    return _beyond_noise(b["mean"] - a["mean"], math.sqrt((a.get("std") or 0.0) ** 2 + (b.get("std") or 0.0) ** 2))


def _higher_paired(diffs: dict) -> str:
    """Whether the per-seed paired differences (a - b on the same seed) are above 0 on average, and beyond their
    own spread (the std of the differences): the seed's shared noise (zoo draw, data order) cancels in a pair."""
    return _beyond_noise(diffs["mean"], diffs.get("std") or 0.0, "std of the paired differences")


def transfer_claims(runs: List[dict]) -> List[dict]:
    by = defaultdict(list)
    for r in runs:
        by[agg.method_label(r["summary"])].append(r)
    delta = lambda r: float(r["summary"]["transfer_delta"])
    gap = lambda r: float(r["summary"]["teacher_acc"]) - float(r["summary"]["student_acc_before"])
    succ = {m: _d(_by_seed(rs, lambda xs: 100.0 * sum(delta(x) > 0 for x in xs) / len(xs)).values())
            for m, rs in by.items()}
    mean = {m: _d(_by_seed(rs, lambda xs: statistics.fmean(delta(x) for x in xs)).values()) for m, rs in by.items()}
    weak = {m: _d(_by_seed(rs, lambda xs: statistics.fmean([delta(x) for x in xs if gap(x) <= WEAK_GAP])
                           if any(gap(x) <= WEAK_GAP for x in xs) else None).values()) for m, rs in by.items()}
    n_weak = {m: len({(r["summary"]["teacher"], r["summary"]["student"]) for r in rs if gap(r) <= WEAK_GAP})
              for m, rs in by.items()}
    claims = []
    if "kl" in by and "kl_dp" in by:
        ok = None
        if weak["kl"]["n"] and weak["kl_dp"]["n"]:
            ok = weak["kl"]["mean"] < 0 <= weak["kl_dp"]["mean"]
        claims.append({"claim": f"KL from a clearly weaker teacher (>= {-WEAK_GAP:.0f} points below the student) "
                                f"lowers the student; KL+DP does not",
                       "paper": "KL mean delta -0.30, KL+DP +0.20 (leaderboard over 20 teachers per student)",
                       "here": f"mean delta over the {n_weak['kl']} weaker-teacher pairs: KL {_f(weak['kl'])}, "
                               f"KL+DP {_f(weak['kl_dp'])}",
                       "reproduces": _yes(ok)})
        ok = succ["kl_dp"]["mean"] > succ["kl"]["mean"]
        claims.append({"claim": "KL+DP's success rate over the zoo grid is above KL's",
                       "paper": "KL+DP 71.3% / +0.20, KL 32.5% / -0.30 (success rate / mean delta)",
                       "here": f"KL+DP {_f(succ['kl_dp'], '%')} / {_f(mean['kl_dp'])}; KL {_f(succ['kl'], '%')} / "
                               f"{_f(mean['kl'])}",
                       "reproduces": _yes(ok)})
    if "kl_dp" in by and "kl_dp_u" in by:
        diff = succ["kl_dp_u"]["mean"] - succ["kl_dp"]["mean"]
        claims.append({"claim": "unsupervised KL+DP (max probability) is close to supervised (true-label probability)",
                       "paper": "69.0% vs 71.3% success (-2.3 points)",
                       "here": f"{_f(succ['kl_dp_u'], '%')} vs {_f(succ['kl_dp'], '%')} ({diff:+.1f} points); mean "
                               f"delta {_f(mean['kl_dp_u'])} vs {_f(mean['kl_dp'])}",
                       "reproduces": _yes(abs(diff) <= 10.0) + " (criterion: within 10 points)"})
    paper = {"xekl": "42.3% / -0.02", "mcl": "60.8% / n.a.", "cd": "16.3% / -1.90", "crd": "16.8% / -0.82"}
    pair = lambda r: (r["summary"]["teacher"], r["summary"]["student"])
    for m, p in paper.items():
        if m in by and "kl_dp" in by:
            pairs = {pair(r) for r in by[m]}
            ref = [r for r in by["kl_dp"] if pair(r) in pairs]  # KL+DP on the same pairs and seeds
            dm = _d(_by_seed(by[m], lambda xs: statistics.fmean(delta(x) for x in xs)).values())
            dr = _d(_by_seed(ref, lambda xs: statistics.fmean(delta(x) for x in xs)).values())
            where = ", ".join(f"{t} -> {s}" for t, s in sorted(pairs)) if len(pairs) <= 3 else f"{len(pairs)} pairs"
            claims.append({"claim": f"{m.upper().replace('XEKL', 'XE-KL')} transfers less well than KL+DP",
                           "paper": f"{p} (success / mean delta over the grid; KL+DP 71.3% / +0.20)",
                           "here": f"mean delta on {where}: {_f(dm)} vs KL+DP {_f(dr)}",
                           "reproduces": _yes(dm["mean"] < dr["mean"]) if dr["n"] else "n/a"})
    return claims


def flips_claims(runs: List[dict]) -> List[dict]:
    t = agg.flips_tables(runs)["flips"]
    if not t:
        return []
    r = t[0]
    ok = r["pairs_with_pos_flips_pct"]["mean"] > 50 and r["weaker_teacher_pairs_with_pos_flips_pct"]["mean"] > 50
    return [{"claim": "complementary knowledge: most zoo pairs have positive flips, also from weaker teachers",
             "paper": "every pair of hundreds of timm models; even much weaker teachers hold 2-25% of ImageNet val "
                      "(Fig. 1)",
             "here": f"pairs with positive flips {_f(r['pairs_with_pos_flips_pct'], '%')} of {r['pairs']:.0f}; "
                     f"weaker-teacher pairs {_f(r['weaker_teacher_pairs_with_pos_flips_pct'], '%')}; median "
                     f"positive flips {_f(r['pos_flips_pct_median'], '%')} of the test split",
             "reproduces": _yes(ok)}]


def multi_teacher_claims(runs: List[dict], transfer_runs: List[dict]) -> List[dict]:
    seq = [r for r in runs if r["summary"].get("mode") == "sequential"]
    if not seq:
        return []
    out = []
    for mode in ("sequential", "parallel"):
        rs = [r for r in runs if r["summary"].get("mode") == mode]
        diffs = []
        for r in rs:
            s = r["summary"]
            singles = [float(x["summary"]["transfer_delta"]) for x in transfer_runs
                       if agg.method_label(x["summary"]) == "kl_dp" and x["summary"]["student"] == s["student"]
                       and x["summary"]["teacher"] in s["teachers"] and agg.replicate(x) == agg.replicate(r)]
            if len(singles) == len(s["teachers"]):
                diffs.append((float(s["transfer_delta"]), max(singles)))
        if not diffs:
            continue
        d = _d(a - b for a, b in diffs)
        out.append({"claim": f"{mode} multi-teacher KL+DP is at least as good as the best single teacher",
                    "paper": "sequential and parallel transfer from several teachers improve over single-teacher "
                             "transfer (qualitative)",
                    "here": f"{mode} delta {_f(_d(a for a, _ in diffs))} vs best single teacher "
                            f"{_f(_d(b for _, b in diffs))} (difference {_f(d)}; student {rs[0]['summary']['student']}"
                            f", teachers {', '.join(rs[0]['summary']['teachers'])})",
                    "reproduces": _yes(d["mean"] >= 0)})
    return out


def aft_claims(runs: List[dict]) -> List[dict]:
    by = defaultdict(list)
    for r in runs:
        by[r["summary"]["method"]].append(float(r["summary"]["student_acc_after"]))
    names = {"aft": "AFT", "init": "STL", "kd": "KD", "btune": "B-Tuning"}
    got = {k: _d(v) for k, v in by.items()}
    aft = next((k for k in got if k.lower() == "aft"), None)
    if aft is None:
        return []
    others = [k for k in got if k != aft]
    ok = all(got[aft]["mean"] > got[k]["mean"] for k in others)
    return [{"claim": "AFT is more accurate than STL, KD and B-Tuning",
             "paper": "CIFAR-100 (ViT-S, DINOv2 ViT-B features): STL 87.81, KD 85.91, AFT 88.62",
             "here": "; ".join(f"{names.get(k.lower(), k)} {_f(got[k], '%')}" for k in [aft, *sorted(others)]),
             "reproduces": _yes(ok)}]


KDEP_CLAIM_METRICS = {"classification": ("acc",), "segmentation": ("miou",), "detection": ("map", "ap50")}
KDEP_PAPER = {"classification": "R18 distilled on 10% of ImageNet: CIFAR-100 82.9, DTD 74.3, Caltech-256 79.1, CUB "
                                "77.3, comparable to supervised pre-training",
              "segmentation": "the distilled R18 as a segmentation backbone (PSPNet; VOC2012, Cityscapes, ADE20K), "
                              "compared with supervised pre-training (no figures in this project's summary: "
                              "docs/REFERENCE.md §3.9)",
              "detection": "the distilled R18 as a detection backbone (Faster R-CNN + FPN; COCO, VOC), compared "
                           "with supervised pre-training (no figures in this project's summary: docs/REFERENCE.md "
                           "§3.9)"}


def _kdep_paired(runs: List[dict], ds: str, metric: str, base: str = "scratch") -> Dict[str, float]:
    """Per seed: KDEP's value minus `base`'s on downstream `ds`, `metric` (the same seed's runs, averaged)."""
    def diff(xs):
        d = [v["kdep"][metric] - v[base][metric] for v in
             ({i: agg.kdep_values(x["summary"]["downstream"].get(ds, {}), i) for i in ("kdep", base)} for x in xs)
             if metric in v["kdep"] and metric in v[base]]
        return statistics.fmean(d) if d else None

    return _by_seed(runs, diff)


def kdep_claims(runs: List[dict]) -> List[dict]:
    """Per downstream and its task's metrics (classification: acc; segmentation: mIoU; detection: mAP, AP50): KDEP
    vs scratch, judged on the per-seed paired differences."""
    rows = agg.kdep_tables(runs)["kdep"]
    got = {(r["downstream"], r["metric"], r["init"]): r["value"] for r in rows}
    tasks = {r["downstream"]: r["task"] for r in rows}
    out = []
    for ds, task in sorted(tasks.items()):
        for m in KDEP_CLAIM_METRICS.get(task, ()):
            label = agg.KDEP_METRICS[m]
            v = {i: got.get((ds, label, i)) for i in ("kdep", "scratch", "supervised")}
            if v["kdep"] is None or v["scratch"] is None:
                continue
            paired = _kdep_paired(runs, ds, m)
            d = _d(paired.values())
            sup = f", supervised {_f(v['supervised'], '%')}" if v["supervised"] else ""
            per_seed = ", ".join(f"{k} {x:+.2f}" for k, x in paired.items())
            out.append({"claim": f"KDEP-distilled init fine-tunes better than scratch ({ds}: {task}, {label})",
                        "paper": KDEP_PAPER.get(task, ""),
                        "here": f"{label}: KDEP {_f(v['kdep'], '%')}, scratch {_f(v['scratch'], '%')}{sup}; KDEP - "
                                f"scratch per seed {per_seed} (mean {_f(d)}; above 0 in "
                                f"{sum(x > 0 for x in paired.values())} of {len(paired)} seeds)",
                        "reproduces": _higher_paired(d) if d["n"] else "n/a"})
    return out


def zeroshot_claims(runs: List[dict]) -> List[dict]:
    rows = {r["student_kind"]: r for r in agg.zeroshot_tables(runs)["zeroshot"]}
    if "zeroshot" not in rows:
        return []
    zs = rows["zeroshot"]
    chance = 100.0 / 10
    out = [{"claim": "the zero-shot student (no real images) is far above chance",
            "paper": "CIFAR-10 83.69% (teacher 95.13%), SVHN 94.37%",
            "here": f"{_f(zs['acc'], '%')} (teacher {_f(zs['teacher_acc'], '%')}, chance {chance:.0f}%)",
            "reproduces": _yes(zs["acc"]["mean"] > 2 * chance) + " (criterion: > 2x chance)"}]
    if "kd_at" in rows:
        kd = rows["kd_at"]
        out.append({"claim": "the zero-shot student's MTE is lower than the few-shot KD+AT student's",
                    "paper": "MTE 0.218 (zero-shot) vs 0.718 (KD+AT), CIFAR-10",
                    "here": f"{_f(zs['mte'])} vs {_f(kd['mte'])} (KD+AT accuracy {_f(kd['acc'], '%')})",
                    "reproduces": _lower_beyond_noise(zs["mte"], kd["mte"])})
    return out


def commit() -> str:
    """The short git commit of this checkout ('unknown' outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[2]).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def build(out_dir, timing: Optional[dict] = None, dataset: str = "digits", title: Optional[str] = None) -> Path:
    """Write <out>/REPORT.md (claims, then every family's table), <out>/tables/*.csv and <out>/figures/; `dataset`
    names the suite's data (digits, rotten_tomatoes), `title` the report (default: the dataset)."""
    out = Path(out_dir)
    runs, problems = agg.load_runs([out / "runs"])
    fam = defaultdict(list)
    for r in runs:
        fam[r["family"]].append(r)
    claims = (flips_claims(fam["prediction_flips"]) + transfer_claims(fam["transfer"])
              + multi_teacher_claims(fam["multi_teacher"], fam["transfer"]) + aft_claims(fam["aft"])
              + kdep_claims(fam["kdep"]) + zeroshot_claims(fam["zeroshot"]))
    tables = agg.aggregate(runs)
    title = title or dataset[:1].upper() + dataset[1:]
    agg.write(tables, problems, out / "tables", runs, title=f"{title} reproduction: all tables")
    seeds = sorted({agg.replicate(r) for r in runs if r["family"] != "pretrain"})
    md = [f"# {title} reproduction report\n\n",
          f"Written by `make reproduce` (scripts/reproduce.py): runs of commit {(timing or {}).get('commit', '?')} "
          f"started {(timing or {}).get('started', '?')}, report built at commit {commit()} on "
          f"{time.strftime('%Y-%m-%d')}. Machine: {(timing or {}).get('machine', 'not recorded')}. "
          f"Wall time: {(timing or {}).get('seconds', float('nan')) / 60:.1f} min with "
          f"{(timing or {}).get('lanes', '?')} lanes. {len(runs)} runs over {len(seeds)} seeds ({', '.join(seeds)}: "
          "zoo draw z, trainer seed s); values are mean ± std over seeds [95% CI half-width]. "
          + ("One test image of digits is 0.28 points.\n\n" if dataset == "digits" else "\n\n"),
          "## Claims\n\n", agg.markdown(claims), "\n",
          "Paper numbers: Fantastic Gains (ICLR'24; its public leaderboard for the method comparison), AFT (Qiu et "
          "al.), KDEP (CVPR'22), Zero-shot KT (NeurIPS'19), with the papers' models and data. "
          f"{'Digits is' if dataset == 'digits' else 'This scale is'} a toy: "
          "a direction that does not reproduce here is a finding about this scale, not a test failure.\n"]
    for name, rows in tables.items():
        md += [f"\n## {name}\n\n", agg.table_markdown(name, rows)]
    figs = sorted((out / "tables" / "figures").glob("*.png")) if (out / "tables" / "figures").is_dir() else []
    for p in figs:
        md.append(f"\n![{p.stem}](tables/figures/{p.name})\n")
    bad = [p for p in problems if p["status"] != "skipped"]
    md.append(f"\n## Failed or incomplete runs ({len(bad)}; {len(problems) - len(bad)} skipped by design, e.g. "
              "teacher == student)\n\n")
    md += [f"- {p['status']}: {p['dir']}: {p['reason']}\n" for p in bad] or ["none\n"]
    if timing:
        md.append("\n## Jobs\n\n" + agg.markdown([{"job": j["job"], "exit": j["rc"], "minutes": j["seconds"] / 60}
                                                  for j in timing.get("jobs", [])]))
    path = out / "REPORT.md"
    path.write_text("".join(md))
    return path
