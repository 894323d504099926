#!/usr/bin/env python
"""`make reproduce`: every family's digits-scale claim over 3 seeds, aggregated into outputs/reproduce/digits/REPORT.md
(the committed report, results/digits/REPORT.md, is refreshed with `--out results/digits`).

A seed k is one draw of the digits zoo (`zoo.seed=k`, every zoo model retrained with its seed + 1000 k) together with
`trainer.seed=k` for the experiment itself, so the spread covers what another machine changes: the zoo's weights and
the transfer's data order. The jobs are the README's own commands (Hydra multiruns of the main_*.py scripts), run in
two lanes of one thread each; each lane's log is under <out>/logs/.

    python scripts/reproduce.py                     # 26.5 minutes on 2 quiet cores (REPORT.md states the measured time)
    python scripts/reproduce.py --seeds 0 1 --lanes 1 --out /tmp/rep     # smaller
    python scripts/reproduce.py --report-only       # rebuild REPORT.md from the runs already there
    python scripts/reproduce.py --suite text        # the text rows: outputs/reproduce/rotten_tomatoes/REPORT.md
    python scripts/reproduce.py --suite dense --lanes 1   # KDEP's dense downstreams: .../digits_dense/REPORT.md
    python scripts/reproduce.py --out results/digits      # refresh the committed report
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.cli import ArgumentParser, check_out_path, non_negative_int, run_script  # noqa: E402
from src.errors import UserError  # noqa: E402

ZOO = ["mlp_small", "mlp_wide", "lenet", "resnet8", "resnet20", "wrn_16_2"]
GRID_METHODS = ["kl", "kl_dp", "kl_dp_u"]  # over every pair of the zoo
BASELINES = ["xekl", "mcl", "cd", "crd"]  # over the two weaker-teacher pairs below (the grid would add ~40 minutes)
BASELINE_PAIRS = ("mlp_small", ["resnet20", "resnet8"])
MT_TEACHERS, MT_STUDENT = ["mlp_small", "lenet", "resnet8"], "mlp_wide"  # a student with room to gain


class Job(NamedTuple):
    """One Hydra multirun: `python <script> [--config-name <config>] -m <overrides>`."""
    name: str
    script: str
    overrides: List[str]
    config: Optional[str] = None  # a preset under config/ (e.g. kdep/dense.yaml); None: the script's default


# the text suite (`--suite text`, results/rotten_tomatoes/): the text zoo, KL / KL+DP from the weaker LSTM into a
# small BERT, and AFT with a larger BERT's features into the LSTM against STL / KD / B-Tuning
TEXT = {"dataset": "rotten_tomatoes", "teacher": "lstm", "student": "bert_tiny", "aft_student": "lstm",
        "features": "bert_mini"}
# the dense suite (`--suite dense`, results/digits_dense/): KDEP's classification, segmentation and detection
# downstreams of config/kdep/dense.yaml, whose teacher (wrn_16_2) and supervised init (resnet8) come from the zoo
DENSE = {"config": "kdep/dense.yaml", "zoo": ["wrn_16_2", "resnet8"]}


def digits_jobs(seeds, grid_methods, baselines):
    """The digits suite's jobs: one zoo draw per seed, then every family's multiruns."""
    zoo = [Job(f"zoo_s{k}", "main_pretrain.py", [f"zoo.seed={k}", "skip_existing=true"]) for k in seeds]
    rest = []
    for k in seeds:
        s = [f"zoo.seed={k}", f"trainer.seed={k}"]
        rest.append(Job(f"transfer_grid_s{k}", "main_transfer.py",
                        [f"teacher={','.join(ZOO)}", f"student={','.join(ZOO)}", f"method={','.join(grid_methods)}",
                         *s]))
        if baselines:
            rest.append(Job(f"transfer_baselines_s{k}", "main_transfer.py",
                            [f"teacher={BASELINE_PAIRS[0]}", f"student={','.join(BASELINE_PAIRS[1])}",
                             f"method={','.join(baselines + [m for m in ('kl', 'kl_dp') if m not in grid_methods])}",
                             *s]))
        rest.append(Job(f"flips_s{k}", "main_flips.py", s))
        rest.append(Job(f"multi_teacher_s{k}", "main_multi_teacher.py",
                        ["mode=sequential,parallel", f"teachers=[{','.join(MT_TEACHERS)}]", f"student={MT_STUDENT}",
                         *s]))
        rest.append(Job(f"aft_s{k}", "main_aft.py", ["method=aft,aft_init,aft_kd,aft_btune", *s]))
        rest.append(Job(f"kdep_s{k}", "main_kdep.py", s))
        rest.append(Job(f"zeroshot_s{k}", "main_zeroshot.py", s))
    return zoo, rest


def text_jobs(seeds, grid_methods=None, baselines=None):
    """The text suite's jobs: one zoo draw per seed, then transfer and AFT multiruns."""
    d = f"dataset={TEXT['dataset']}"
    zoo = [Job(f"zoo_text_s{k}", "main_pretrain.py", [d, f"zoo.seed={k}", "skip_existing=true"]) for k in seeds]
    rest = []
    for k in seeds:
        s = [d, f"zoo.seed={k}", f"trainer.seed={k}"]
        rest.append(Job(f"transfer_text_s{k}", "main_transfer.py",
                        [f"teacher={TEXT['teacher']}", f"student={TEXT['student']}", "method=kl,kl_dp,kl_dp_u", *s]))
        rest.append(Job(f"aft_text_s{k}", "main_aft.py", [f"student={TEXT['aft_student']}",
                                                          f"features=[{TEXT['features']}]",
                                                          "method=aft,aft_init,aft_kd,aft_btune", *s]))
    return zoo, rest


def dense_jobs(seeds, grid_methods=None, baselines=None):
    """The dense suite's jobs: the zoo models the preset uses, drawn per seed, then one kdep/dense.yaml run each."""
    zoo = [Job(f"zoo_dense_s{k}", "main_pretrain.py", [f"name={','.join(DENSE['zoo'])}", f"zoo.seed={k}",
                                                       "skip_existing=true"]) for k in seeds]
    rest = [Job(f"kdep_dense_s{k}", "main_kdep.py", [f"zoo.seed={k}", f"trainer.seed={k}"], DENSE["config"])
            for k in seeds]
    return zoo, rest


class Suite(NamedTuple):
    folder: str  # results/<folder>/
    dataset: str  # the data the report's titles name
    jobs: Callable  # (seeds, grid_methods, baselines) -> (zoo draws, the rest)
    title: str
    help: str


SUITES = {  # --suite -> its declaration; `make reproduce` runs them all
    "digits": Suite("digits", "digits", digits_jobs, "Digits", "every family's claims on digits"),
    "text": Suite(TEXT["dataset"], TEXT["dataset"], text_jobs, "Rotten_tomatoes",
                  "the text zoo, KL / KL+DP and AFT on rotten_tomatoes"),
    "dense": Suite("digits_dense", "digits", dense_jobs, "Digits dense downstreams",
                   "KDEP's classification, segmentation and detection downstreams (kdep/dense.yaml)"),
}


def jobs(seeds, grid_methods, baselines=BASELINES, suite: str = "digits"):
    """The suite's jobs; the zoo draws first (phase 0), everything else after (phase 1)."""
    return SUITES[suite].jobs(seeds, grid_methods, baselines)


def command(job: Job, out: Path, work: Path, python: str) -> List[str]:
    """The job's command line: --config-name (Hydra reads it before the overrides) then -m and the overrides."""
    preset = ["--config-name", job.config] if job.config else []
    return [python, job.script, *preset, "-m", *job.overrides, f"hydra.sweep.dir={out / 'runs' / job.name}",
            f"paths.checkpoints={work / 'checkpoints'}", f"paths.cache={work / 'cache'}"]


class Progress:
    """Jobs done / total and an ETA (the wall time so far per finished job, i.e. the lanes' throughput, x the jobs
    left), for the line each finished job prints."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.time()
        self.lock = threading.Lock()

    def tick(self) -> str:
        with self.lock:
            self.done += 1
            took = time.time() - self.t0
            left = took / self.done * (self.total - self.done) if self.done else 0.0
            m, sec = divmod(int(round(left)), 60)
            return f"[{self.done}/{self.total} done, ETA {m // 60}:{m % 60:02d}:{sec:02d}]"


def run_job(job: Job, out: Path, work: Path, python: str, progress: Progress = None) -> dict:
    name = job.name
    log = out / "logs" / f"{name}.log"
    cmd = command(job, out, work, python)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    took = time.time() - t0
    done = progress.tick() if progress is not None else ""
    print(f"[{time.strftime('%H:%M:%S')}] {name:<22} rc={rc} {took:7.1f} s  {done} ({log})", flush=True)
    return {"job": name, "rc": rc, "seconds": took, "log": str(log)}


def run_all(out: Path, seeds, lanes: int, grid_methods, baselines, suite: str = "digits") -> dict:
    work = out / "work"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    zoo, rest = jobs(seeds, grid_methods, baselines, suite)
    # the biggest jobs first, so the lanes end together
    rest.sort(key=lambda j: 0 if j[0].startswith("transfer_grid") else 1)
    t0, started = time.time(), time.strftime("%Y-%m-%d %H:%M")
    from src.tracking.reproduce_report import commit as git_commit

    commit = git_commit()
    done, progress = [], Progress(len(zoo) + len(rest))
    print(f"{len(zoo) + len(rest)} jobs in {lanes} lane(s); each prints a line when it ends", flush=True)
    with ThreadPoolExecutor(max_workers=lanes) as ex:
        for phase in (zoo, rest):
            done += list(ex.map(lambda j: run_job(j, out, work, sys.executable, progress), phase))
    return {"seconds": time.time() - t0, "jobs": done, "lanes": lanes, "seeds": list(seeds),
            "machine": machine(), "commit": commit, "started": started}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, ATEN_CPU_CAPABILITY="
            f"{os.environ.get('ATEN_CPU_CAPABILITY', 'auto')} ({torch.backends.cpu.get_cpu_capability()})")


def parser() -> ArgumentParser:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=list(SUITES), default="digits",
                    help="; ".join(f"{k}: {v.help} (committed: results/{v.folder}/)" for k, v in SUITES.items()))
    ap.add_argument("--out", type=Path, default=None,
                    help="default: outputs/reproduce/<the suite's folder> (untracked; the committed reports are "
                         "refreshed with --out results/<folder>)")
    ap.add_argument("--seeds", type=non_negative_int(0), nargs="+", default=[0, 1, 2])
    ap.add_argument("--lanes", type=int, default=2, help="jobs run at once (one thread each)")
    ap.add_argument("--methods", nargs="+", default=GRID_METHODS, help="transfer methods of the zoo grid")
    ap.add_argument("--baselines", nargs="*", default=BASELINES,
                    help=f"methods run on {BASELINE_PAIRS[0]} -> {', '.join(BASELINE_PAIRS[1])} only")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from the runs already there")
    ap.add_argument("--keep", action="store_true", help="keep earlier runs and the trained zoo (default: start over)")
    return ap


MADE = ("runs", "work", "logs")  # the folders this script makes under --out (and may delete to start over)
MARKER = ".made_by_reproduce"  # written into each of them: a folder without it is never deleted


def transfer_methods():
    """The `method=` choices main_transfer.py runs: config/method/*.yaml less the other families' methods."""
    return sorted(f.stem for f in (ROOT / "config" / "method").glob("*.yaml")
                  if not f.stem.startswith(("aft", "multi_", "kdep")))


def check_args(a) -> None:
    """Every argument, before anything is deleted or run (a typo must not wipe the last reproduction)."""
    from src.errors import closest

    if any(k < 0 for k in a.seeds) or len(set(a.seeds)) != len(a.seeds):
        raise UserError(f"--seeds {a.seeds} must be distinct integers >= 0: use e.g. --seeds 0 1 2")
    if a.lanes < 1:
        raise UserError(f"--lanes {a.lanes} must be >= 1: use e.g. --lanes 2")
    known = transfer_methods()
    for flag, names in (("--methods", a.methods), ("--baselines", a.baselines)):
        for m in names:
            if m not in known:
                raise UserError(f"{flag} {m} is not a transfer method{closest(m, known)}: use some of "
                                f"{', '.join(known)}")
    if not a.methods:
        raise UserError(f"--methods names no method: use e.g. --methods {' '.join(GRID_METHODS)}")
    for p in [a.out, *a.out.parents]:
        if p.exists() and not p.is_dir():
            raise UserError(f"--out {a.out}: {p} is a file, not a folder: pick another --out")
    check_out_path(a.out, "--out")  # writable
    if a.report_only or a.keep:
        return
    for d in MADE:
        if (a.out / d).exists() and not (a.out / d / MARKER).is_file():
            raise UserError(f"{a.out / d} was not made by scripts/reproduce.py (no {MARKER} in it), so it is "
                            f"not deleted: move it away, pick another --out or add --keep")


def start_over(out: Path, keep: bool) -> None:
    """Delete what an earlier reproduction made (only folders carrying the marker; nothing with `keep`), then make
    the missing folders, marked as this script's."""
    for d in MADE:
        if not keep and (out / d / MARKER).is_file():
            shutil.rmtree(out / d)
    for d in MADE:
        if not (out / d).exists():
            (out / d).mkdir(parents=True)
            (out / d / MARKER).touch()


def default_out(suite: str) -> Path:
    """Where a run writes without --out: an untracked folder (a plain `make reproduce` leaves the committed
    results/ as they are; the README quotes those)."""
    return ROOT / "outputs" / "reproduce" / SUITES[suite].folder


@run_script
def main(argv=None):
    a = parser().parse_args(argv)
    a.out = a.out if a.out is not None else default_out(a.suite)
    check_args(a)
    from src.tracking import reproduce_report as rr

    timing_path = a.out / "timing.json"
    if not a.report_only:
        start_over(a.out, a.keep)
        timing = run_all(a.out, a.seeds, a.lanes, a.methods, a.baselines, a.suite)
        a.out.mkdir(parents=True, exist_ok=True)
        timing_path.write_text(json.dumps(timing, indent=1))
    if not (a.out / "runs").is_dir():
        raise UserError(f"{a.out / 'runs'} holds no runs: run `python scripts/reproduce.py` first")
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else None
    report = rr.build(a.out, timing, SUITES[a.suite].dataset, SUITES[a.suite].title)
    print(report.read_text())
    print(f"report: {report}")
    failed = [j["job"] for j in (timing or {}).get("jobs", []) if j["rc"] != 0]
    if failed:
        print(f"warning: jobs with a non-zero exit: {', '.join(failed)} (their logs are under {a.out / 'logs'}; the "
              f"report lists the failed runs)", file=sys.stderr)


if __name__ == "__main__":
    main()
