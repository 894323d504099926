#!/usr/bin/env python
"""Aggregate a main_transfer.py sweep into per-method tables: success rate (% of teacher/student pairs with
transfer_delta > 0), mean/median transfer delta, knowledge gain and loss.

    python scripts/aggregate_sweep.py multirun/transfer/2026-11-23/10-00-00_1234 [--csv out.csv]
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def load_rows(sweep_dir: Path):
    rows = []
    from src.errors import UserError
    from src.io_utils import read_json_safe

    need = ("transfer_delta", "knowledge_gain", "knowledge_loss")
    for p in sorted(sweep_dir.glob("**/summary.json")):
        try:
            s = read_json_safe(p, "summary", "rerun that job (same command) to rewrite it")
        except UserError as e:  # one torn job (killed while writing) must not cost the others' table
            print(f"warning: skipped: {e}", file=sys.stderr)
            continue
        if not isinstance(s, dict) or s.get("status") != "ok":
            continue
        if not all(isinstance(s.get(k), (int, float)) for k in need):
            print(f"warning: skipped {p}: status ok but no numbers for {', '.join(need)} (an incomplete run)",
                  file=sys.stderr)
            continue
        s["_dir"] = str(p.parent)
        rows.append(s)
    return rows


def aggregate(rows):
    by = defaultdict(list)
    for r in rows:
        label = r.get("method_name") or r["method"]
        part = (r.get("method_config") or {}).get("partition")
        by[f"{label}({part})" if part else label].append(r)
    table = []
    for m, rs in sorted(by.items()):
        d = [r["transfer_delta"] for r in rs]
        table.append({"method": m, "pairs": len(rs), "success_rate": 100.0 * sum(x > 0 for x in d) / len(d),
                      "mean_delta": statistics.fmean(d), "median_delta": statistics.median(d),
                      "mean_gain": statistics.fmean(r["knowledge_gain"] for r in rs),
                      "mean_loss": statistics.fmean(r["knowledge_loss"] for r in rs)})
    return table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--csv", type=Path, help="also write the per-method table as CSV")
    a = ap.parse_args(argv)
    if not a.sweep_dir.is_dir():
        sys.exit(f"error: {a.sweep_dir} is not a directory: give the sweep dir printed by `python main_transfer.py -m`")
    rows = load_rows(a.sweep_dir)
    if not rows:
        sys.exit(f"error: no finished transfer summaries under {a.sweep_dir}")
    table = aggregate(rows)
    print(f"{'method':<28}{'pairs':>6}{'success %':>11}{'mean delta':>12}{'median':>9}{'gain %':>8}{'loss %':>8}")
    for t in table:
        print(f"{t['method']:<28}{t['pairs']:>6}{t['success_rate']:>11.1f}{t['mean_delta']:>12.2f}"
              f"{t['median_delta']:>9.2f}{t['mean_gain']:>8.2f}{t['mean_loss']:>8.2f}")
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
    return table


if __name__ == "__main__":
    main()
