"""The fidelity study's table and figure (gnosis, docs/REFERENCE.md §5.1) from finished transfer runs.

A run is a dict {"dir": path, "cfg": the resolved .hydra/config.yaml as a plain dict, "summary": summary.json}
(what scripts/aggregate.py loads). Runs are grouped by (teacher setting, data setting), read from the config:
- teacher: "ensemble of N" when `teacher` is a list; "self-distillation" when one teacher of the student's
  architecture (a zoo entry's `arch`, a checkpoint folder's meta.json, arch@weights, or the name itself); else
  "teacher <name>";
- data: "as is", "mixup a", "synthetic r" (or both), from method.mixup_alpha / method.synth_ratio.
Each group row holds the mean and std (sample std, 0 for one run) over its runs (seeds) of the metrics below."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from .stats import describe

# summary key -> column name
METRICS = {"agreement_after": "test_agreement", "kl_teacher_student": "test_kl",
           "train_agreement": "train_agreement", "train_kl": "train_kl", "student_acc_after": "test_acc",
           "teacher_acc": "teacher_acc", "train_student_acc": "train_acc"}


def _arch(spec, cfg: dict):
    if isinstance(spec, dict):
        return spec.get("arch")
    entry = ((cfg.get("zoo") or {}).get("models") or {}).get(spec)
    if isinstance(entry, dict):
        return entry.get("arch")
    meta = Path(str(spec)) / "meta.json"  # a checkpoint folder written by this suite
    if meta.is_file():
        try:
            return json.loads(meta.read_text()).get("arch")
        except (OSError, ValueError):
            pass
    return str(spec).split("@", 1)[0]  # arch@weights_file, or a timm name


def teacher_setting(cfg: dict) -> str:
    t = cfg.get("teacher")
    if isinstance(t, (list, tuple)):
        return f"ensemble of {len(t)}"
    if _arch(t, cfg) == _arch(cfg.get("student"), cfg):
        return "self-distillation"
    return f"teacher {t}"


def data_setting(cfg: dict, summary: Optional[dict] = None) -> str:
    m = (summary or {}).get("method_config") or cfg.get("method") or {}  # the summary's copy is resolved
    parts = []
    if float(m.get("mixup_alpha") or 0) > 0:
        parts.append(f"mixup {float(m['mixup_alpha']):g}")
    if float(m.get("synth_ratio") or 0) > 0:
        parts.append(f"synthetic {float(m['synth_ratio']):g}")
    return " + ".join(parts) or "as is"


def _resolved(cfg: dict) -> dict:
    """`cfg` with its interpolations resolved (a run's .hydra/config.yaml keeps them)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    except Exception:  # an interpolation that needs Hydra's resolvers (hydra:...): use the config as it is
        return cfg


def _mean_std(values: List[float]):
    d = describe(values)  # the aggregator's statistics: mean and sample std (0 for one value)
    return d["mean"], d["std"]


def fidelity_table(runs: List[dict]) -> List[dict]:
    """One row per (teacher setting, data setting), teachers in first-seen order, data as is < mixup < synthetic: {"teacher", "data", "runs", "seeds",
    "<metric>_mean", "<metric>_std"} for every metric the runs report. Runs without status ok are skipped."""
    groups: Dict[tuple, List[dict]] = {}
    for r in runs:
        s = r.get("summary") or {}
        if s.get("status", "ok") != "ok":
            continue
        cfg = _resolved(r["cfg"])
        groups.setdefault((teacher_setting(cfg), data_setting(cfg, s)), []).append({**r, "cfg": cfg})
    teachers = list(dict.fromkeys(t for t, _ in groups))
    rank = lambda d: 0 if d == "as is" else 1 if d.startswith("mixup") and "+" not in d else \
        2 if d.startswith("synthetic") else 3  # noqa: E731
    rows = []
    for (teacher, data), members in sorted(groups.items(), key=lambda kv: (teachers.index(kv[0][0]),
                                                                            rank(kv[0][1]), kv[0][1])):
        row = {"teacher": teacher, "data": data, "runs": len(members),
               "seeds": sorted({m["summary"].get("seed", (m["cfg"].get("trainer") or {}).get("seed"))
                                for m in members}, key=str)}
        for key, col in METRICS.items():
            vals = [float(m["summary"][key]) for m in members if m["summary"].get(key) is not None]
            if vals:
                row[f"{col}_mean"], row[f"{col}_std"] = _mean_std(vals)
        rows.append(row)
    return rows


def format_table(rows: List[dict]) -> str:
    """A markdown table of `fidelity_table` rows (mean +- std)."""
    cols = [c for c in METRICS.values() if any(f"{c}_mean" in r for r in rows)]
    out = ["| teacher | data | runs | " + " | ".join(cols) + " |", "|" + "---|" * (3 + len(cols))]
    for r in rows:
        cells = [f"{r[c + '_mean']:.2f} ± {r[c + '_std']:.2f}" if f"{c}_mean" in r else "-" for c in cols]
        out.append(f"| {r['teacher']} | {r['data']} | {r['runs']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot_fidelity(rows: List[dict], path) -> Path:
    """Test agreement (%) against test accuracy (%), mean +- std over seeds: one marker per data setting, one
    colour per teacher setting; a second panel shows the train-split agreement when the runs report it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = ["o", "s", "^", "D", "v", "P", "X"]
    datas = list(dict.fromkeys(r["data"] for r in rows))
    teachers = list(dict.fromkeys(r["teacher"] for r in rows))
    panels = [("test_agreement", "test agreement %")]
    if any("train_agreement_mean" in r for r in rows):
        panels.append(("train_agreement", "train-split agreement %"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (col, label) in zip(axes[0], panels):
        for r in rows:
            if f"{col}_mean" not in r or "test_acc_mean" not in r:
                continue
            ax.errorbar(r["test_acc_mean"], r[f"{col}_mean"], xerr=r["test_acc_std"], yerr=r[f"{col}_std"],
                        marker=markers[datas.index(r["data"]) % len(markers)], ms=8, capsize=3, ls="none",
                        color=f"C{teachers.index(r['teacher'])}", label=f"{r['teacher']}, {r['data']}")
        ax.set_xlabel("student test accuracy %")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("fidelity vs. generalisation (mean ± std over seeds)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load_runs(root) -> List[dict]:
    """Every run dir below `root` (a sweep dir) holding summary.json and .hydra/config.yaml, as the aggregator's
    dicts {"dir", "cfg", "summary"} (sorted by path)."""
    from omegaconf import OmegaConf

    runs = []
    for s in sorted(Path(root).rglob("summary.json")):
        c = s.parent / ".hydra" / "config.yaml"
        if c.is_file():
            runs.append({"dir": str(s.parent), "cfg": OmegaConf.to_container(OmegaConf.load(c)),
                         "summary": json.loads(s.read_text())})
    return runs


if __name__ == "__main__":  # python -m src.tracking.fidelity <sweep dir> [figure.png]
    import sys

    rows = fidelity_table(load_runs(sys.argv[1]))
    print(format_table(rows))
    print(plot_fidelity(rows, sys.argv[2] if len(sys.argv) > 2 else Path(sys.argv[1]) / "fidelity.png"))
