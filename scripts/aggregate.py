#!/usr/bin/env python
"""Aggregate any mix of run dirs and multirun dirs, of any family, into tables with mean, std and a 95%
confidence interval over seeds (Markdown + CSV + figures), listing failed and incomplete runs:

    python scripts/aggregate.py multirun/transfer/2026-12-01/10-00-00_1234 [more dirs ...] [--out DIR]
    python scripts/aggregate.py outputs/ multirun/ --out results/mine --wandb offline

Transfer grids: per method the success rate (% of teacher/student pairs with transfer delta > 0), mean / median /
worst delta and knowledge gain / loss, each per seed, then over seeds; per pair the delta over seeds; a figure of
delta against the teacher - student gap. Flips: pairs with positive flips (also from weaker teachers) per zoo
draw. Multi-teacher per mode, AFT per method, KDEP per initialisation and downstream set, zero-shot accuracy and
MTE per student, the zoo's test accuracies per model. Repeat anything over seeds with `-m trainer.seed=0,1,2`
(and `zoo.seed=0,1,2` for another draw of the zoo).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.cli import ArgumentParser, check_out_path, run_script  # noqa: E402
from src.errors import UserError  # noqa: E402
from src.tracking import aggregate as agg  # noqa: E402


def parser() -> ArgumentParser:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path, help="run dirs, multirun dirs, or folders holding them")
    ap.add_argument("--out", type=Path, help="where results.md, <table>.csv and figures/ go "
                                             "(default: <first dir>/aggregate)")
    ap.add_argument("--title", default="Results")
    ap.add_argument("--print", nargs="+", metavar="TABLE", dest="show",
                    help="print only these tables (e.g. transfer_pairs); all are written to --out anyway")
    ap.add_argument("--wandb", choices=("disabled", "offline", "online"), default="disabled",
                    help="also log the tables and figures to one wandb run")
    ap.add_argument("--wandb-project", default="knowledge-transfer")
    return ap


@run_script
def main(argv=None):
    a = parser().parse_args(argv)
    for d in a.dirs:
        if not d.is_dir():
            raise UserError(f"{d} is not a directory: give the run or sweep dirs printed by the main_*.py scripts")
    out = check_out_path(a.out if a.out is not None else a.dirs[0] / "aggregate", "--out")
    runs, problems = agg.load_runs(a.dirs)
    if not runs:
        raise UserError(f"no finished runs under {', '.join(map(str, a.dirs))} ({len(problems)} failed, incomplete "
                        f"or skipped): point at dirs that hold summary.json files")
    tables = agg.aggregate(runs)
    unknown = [t for t in a.show or () if t not in tables]
    if unknown:  # before anything is written
        raise UserError(f"--print: no table {', '.join(unknown)} in these runs: use one of {', '.join(tables)}")
    md = agg.write(tables, problems, out, runs, title=a.title)
    if a.show:
        for t in a.show:
            print(agg.table_markdown(t, tables[t]))
    else:
        print(md.read_text())
    print(f"{len(runs)} runs, {len(problems)} failed / incomplete / skipped; tables: {out}")
    if a.wandb != "disabled":
        from types import SimpleNamespace

        agg.log_wandb(tables, out / "figures", SimpleNamespace(mode=a.wandb, project=a.wandb_project, entity=None,
                                                                 group="aggregate", tags=[], name=None, notes=None))
    return tables, problems


if __name__ == "__main__":
    main()
