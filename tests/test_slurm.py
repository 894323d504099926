"""`hydra/launcher=slurm` against a real one-node SLURM (scripts/slurm_local.sh; marker `slurm`):

- a two-job `-m` sweep of main_transfer.py lands two summaries, and `scancel --signal=USR2` to one of its running
  jobs makes it checkpoint, requeue (submitit), resume in the same sweep sub-dir and end bit-identical to an
  uninterrupted run;
- a job stopped more often than `hydra.launcher.max_num_timeout` allows fails with one clear error.json, the
  sweep's other job is untouched;
- a `high` partition job preempts a multi-teacher run of the `low` partition in its second stage (SLURM sends the
  job's USR2, submitit requeues it): the run resumes in stage 2 and ends bit-identical;
- a job with `tasks_per_node=2` trains through our DDP path (gloo) from submitit's SLURM variables, with the
  same weights as `torchrun --nproc_per_node=2`.

The session fixture uses a local SLURM already up (`scripts/slurm_local.sh status`), else starts one (installing
Slurm with apt as root) and stops it at the end; without root/apt/Slurm the tests are skipped with one line
(KT_SLURM_REQUIRED=1, set by .ci/run, turns that into a failure). Every wait is bounded. Before a job is signalled
it is paused (SIGSTOP, then SIGCONT; SLURM itself sends SIGCONT with a preemption), so that a short run cannot
finish while the signal is on its way."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import ROOT, compose, find_pids
from test_reliability import _assert_same_weights, _env, _numbers, _rows, one_thread, train_small_zoo

pytestmark = pytest.mark.slurm

SCRIPT = ROOT / "scripts" / "slurm_local.sh"
CPU = ["trainer.device=cpu", "trainer.progress=off"]
TRANSFER = ["teacher=mlp_small", "student=mlp_wide", "loader.batch_size=16", "trainer.epochs=6",
            "trainer.eval_every_steps=10", *CPU]
MULTI = ["mode=sequential", "teachers=[mlp_small,lenet]", "student=mlp_wide", "loader.batch_size=16",
         "trainer.epochs=3", "trainer.eval_every_steps=10", *CPU]


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def slurm():
    """SLURM_CONF of a running local SLURM: the one already up, else one started here (stopped at the end)."""
    def unavailable(why: str):
        if os.environ.get("KT_SLURM_REQUIRED") == "1":
            pytest.fail(f"KT_SLURM_REQUIRED=1 but {why}")
        pytest.skip(why)

    if not shutil.which("sinfo") and (os.geteuid() != 0 or not shutil.which("apt-get")):
        unavailable("no Slurm here, and installing it needs root and apt-get (see scripts/slurm_local.sh)")
    status = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    started = status.returncode != 0
    out = status.stdout
    if started:
        r = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
        if r.returncode != 0 or not shutil.which("sinfo"):
            unavailable(f"scripts/slurm_local.sh start failed: {(r.stderr or r.stdout).strip()[-300:]}")
        out = r.stdout
    conf = re.search(r"export SLURM_CONF=(\S+)", out).group(1)
    yield conf
    if started:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """mlp_small, mlp_wide and lenet of the digits zoo (2 epochs each) in their own checkpoints/cache folders."""
    return train_small_zoo(tmp_path_factory.mktemp("slurm_zoo"), ("mlp_small", "mlp_wide", "lenet"), 2, CPU)


# ------------------------------------------------------------------------------------------------- helpers


def _slurm_env(tmp: Path, conf: str) -> dict:
    """The subprocesses' environment: the local SLURM's config, one thread, nothing of an outer job or torchrun."""
    env = {k: v for k, v in _env(tmp).items() if not k.startswith(("SLURM_", "SUBMITIT_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return dict(env, SLURM_CONF=conf, CUDA_VISIBLE_DEVICES="")


def _launcher(sweep: Path, **kw) -> list:
    """A `-m` sweep through hydra/launcher=slurm on the local node (CPU jobs on the preemptible `low` partition)."""
    la = {"partition": "low", "gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 60, **kw}
    return ["-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}", *(f"hydra.launcher.{k}={v}" for k, v in
                                                                        la.items())]


def _start(script: str, args, tmp: Path, conf: str, name: str):
    log = open(tmp / f"{name}.log", "w")
    p = subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=_slurm_env(tmp, conf), stdout=log,
                         stderr=subprocess.STDOUT, text=True)
    log.close()
    return p


def _until(cond, timeout: float, what: str, proc=None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            value = cond()
            if value:
                return value
            raise AssertionError(f"the sweep exited ({proc.returncode}) before {what}")
        time.sleep(0.02)
    raise AssertionError(f"no {what} after {timeout} s")


def _finish(p, timeout: float, log: Path) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=60)
        raise AssertionError(f"the sweep did not end within {timeout} s: {log.read_text()[-3000:]}")


def _job_ids(sweep: Path) -> list:
    """SLURM ids of the sweep's jobs: `A_T` for the tasks of an array, `N` for a sweep of one job (no array)."""
    return sorted(d.name for d in (sweep / ".submitit").glob("*")
                  if re.fullmatch(r"\d+(_\d+)?", d.name) and (d / f"{d.name}_submitted.pkl").is_file())


def _job_id(sweep: Path, task: int, proc) -> str:
    return _until(lambda: next((j for j in _job_ids(sweep) if j.endswith(f"_{task}") or "_" not in j), None), 300,
                  f"submitit folder of job {task} in {sweep}", proc)


def _job_pids(sweep: Path, job: str) -> list:
    """The python processes of SLURM job `job` of the sweep (not srun, which has the same command line)."""
    entry = f"SLURM_ARRAY_TASK_ID={job.split('_')[1]}" if "_" in job else f"SLURM_JOB_ID={job}"
    pids = find_pids("submitit.core._submit", str(sweep / ".submitit"), env_entry=entry)
    return [p for p in pids if Path(f"/proc/{p}/comm").read_text().strip() != "srun"]


def _scontrol_job(conf: str, tmp: Path, job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job], env=_slurm_env(tmp, conf), capture_output=True,
                          text=True, timeout=30).stdout


def _cancel(conf: str, tmp: Path, sweep: Path) -> None:
    """Cancel whatever is left of the sweep's jobs (a failed test must not leave jobs on the node)."""
    jobs = _job_ids(sweep)
    if jobs:
        subprocess.run(["scancel", *jobs], env=_slurm_env(tmp, conf), capture_output=True, timeout=30)


def _signal_paused(pids, conf: str, tmp: Path, *scancel_args) -> None:
    """SIGSTOP the job's processes, send the SLURM signal, SIGCONT: the signal lands before the run can end."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        r = subprocess.run(["scancel", *scancel_args], env=_slurm_env(tmp, conf), capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
        time.sleep(0.5)  # slurmd delivers the signal asynchronously
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def _logs(sweep: Path) -> str:
    return "".join(f.read_text(errors="replace") for f in sorted(sweep.rglob("*"))
                   if f.suffix in (".log", ".out", ".err") and f.is_file())


def _requeue_delay(sweep: Path, job: str) -> float:
    """Seconds from submitit's `Requeued job` to the requeued job's start (its stdout file keeps both attempts)."""
    text = "".join(f.read_text() for f in (sweep / ".submitit" / job).glob("*_0_log.out"))
    stamp = r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\)"
    requeued = re.search(stamp + r" - Requeued job", text)
    assert requeued, text[-2000:]
    restarted = [m for m in re.finditer(stamp + r" - Starting with JobEnvironment", text)
                 if m.start() > requeued.start()]
    assert restarted, f"the requeued job's start is not in its log: {text[-2000:]}"
    t = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f") for m in (requeued, restarted[0])]
    return (t[1] - t[0]).total_seconds()


def _summaries(sweep: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}


def _check_resumed_once(logs: str, total_below: int) -> None:
    resumed = set(re.findall(r"resumed from \S+ at step (\d+)/(\d+)", logs))  # the job log + submitit's stdout
    assert len(resumed) == 1, resumed
    step, total = map(int, resumed.pop())
    assert 0 < step < total <= total_below, (step, total)


def _sweep_with_usr2_to_job_1(sweep: Path, launcher: dict, zoo, tmp: Path, conf: str):
    """The two-job transfer sweep (method=kl,kl_dp); `scancel --signal=USR2` to job 1 after its 10th step.
    Returns (the sweep's exit code, job 1's SLURM id)."""
    p = _start("main_transfer.py", [*_launcher(sweep, **launcher), "method=kl,kl_dp", *TRANSFER, *zoo], tmp, conf,
               "sweep")
    try:
        job = _job_id(sweep, 1, p)
        pids = _until(lambda: _job_pids(sweep, job), 300, "python process of job 1", p)
        _until(lambda: any(r["step"] >= 10 for r in _rows(sweep / "1" / "metrics.jsonl")), 300,
               "10 training steps of job 1", p)
        _signal_paused(pids, conf, tmp, "--signal=USR2", job)
        return _finish(p, 300, tmp / "sweep.log"), job
    finally:
        _cancel(conf, tmp, sweep)


# ------------------------------------------------------------------------------------------------- tests


def test_sweep_lands_two_summaries_and_usr2_requeues_a_job_that_resumes_bit_identical(slurm, zoo, tmp_path):
    from src.experiments import transfer

    ref = tmp_path / "ref"
    with one_thread():
        transfer.run(compose("transfer/transfer", [*TRANSFER, "method=kl_dp", *zoo]), run_dir=ref)
    sweep = tmp_path / "sweep_usr2"
    rc, job = _sweep_with_usr2_to_job_1(sweep, {}, zoo, tmp_path, slurm)
    assert rc == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    rows = _summaries(sweep)
    assert sorted(rows) == ["0", "1"] and {r["method"] for r in rows.values()} == {"KL", "KLDP"}
    assert all(r["status"] == "ok" for r in rows.values())
    logs = _logs(sweep)
    assert "this job is preempted" in logs and "handing signal 12" in logs and f"Requeued job {job}" in logs
    _check_resumed_once(_logs(sweep / "1") + _logs(sweep / ".submitit" / job), 6 * 34)
    assert "resumed from" not in _logs(sweep / "0")  # the other job was not touched
    assert "Restarts=1" in _scontrol_job(slurm, tmp_path, job)
    _assert_same_weights(sweep / "1" / "student" / "model.safetensors", ref / "student" / "model.safetensors")
    assert _numbers(rows["1"]) == _numbers(json.loads((ref / "summary.json").read_text()))
    assert [json.loads(s) for s in (sweep / "1" / "metrics.jsonl").read_text().splitlines()] == \
        [json.loads(s) for s in (ref / "metrics.jsonl").read_text().splitlines()]
    print(f"\nrequeue delay (scontrol requeue -> job restarted): {_requeue_delay(sweep, job):.1f} s")


def test_a_job_past_max_num_timeout_fails_with_a_clear_error_and_the_other_job_finishes(slurm, zoo, tmp_path):
    """timeout_min <= 10: submitit counts every USR2 as a timeout; max_num_timeout=0 allows none."""
    sweep = tmp_path / "sweep_timeout"
    rc, job = _sweep_with_usr2_to_job_1(sweep, {"timeout_min": 5, "max_num_timeout": 0}, zoo, tmp_path, slurm)
    log = (tmp_path / "sweep.log").read_text()
    assert rc != 0, "a job that was not requeued must make the sweep fail"
    err = json.loads((sweep / "1" / "error.json").read_text())
    assert err["status"] == "failed" and "not requeued" in err["error"], err
    assert "hydra.launcher.max_num_timeout=0" in err["error"] and str(sweep / "1") in err["error"], err
    assert not (sweep / "1" / "summary.json").exists() and not (sweep / "1" / "preempted.json").exists()
    assert list((sweep / "1" / "checkpoints" / "train").glob("step_*")), "the last checkpoint is kept for a rerun"
    assert "Requeued job" not in _logs(sweep) and "Restarts=0" in _scontrol_job(slurm, tmp_path, job)
    ok = _summaries(sweep)
    assert list(ok) == ["0"] and ok["0"]["status"] == "ok" and not (sweep / "0" / "error.json").exists(), log[-3000:]


def test_partition_preemption_of_a_multi_teacher_run_in_stage_2_resumes_bit_identical(slurm, zoo, tmp_path):
    from src.experiments import multi_teacher

    ref = tmp_path / "ref"
    with one_thread():
        multi_teacher.run(compose("multi_teacher/multi_teacher", [*MULTI, *zoo]), run_dir=ref)
    env = _slurm_env(tmp_path, slurm)
    cpus = int(subprocess.run(["sinfo", "-h", "-o", "%c"], env=env, capture_output=True, text=True,
                              timeout=30).stdout.split()[0])  # the victim and the preemptor each need every core
    sweep = tmp_path / "sweep_preempt"
    p = _start("main_multi_teacher.py", [*_launcher(sweep, cpus_per_task=cpus), *MULTI, *zoo], tmp_path, slurm,
               "sweep")
    try:
        job = _job_id(sweep, 0, p)
        pids = _until(lambda: _job_pids(sweep, job), 300, "python process of the job", p)
        _until(lambda: any(r.get("stage") == 2 and "train/loss" in r for r in _rows(sweep / "0" / "metrics.jsonl")),
               300, "training in stage 2", p)
        for pid in pids:  # SLURM's preemption sends SIGCONT and then the job's USR2
            os.kill(pid, signal.SIGSTOP)
        high = subprocess.run(["sbatch", "--parsable", "-p", "high", "-c", str(cpus), "--mem=100M", "-J", "kt-high",
                               "-o", str(tmp_path / "high.out"), "--wrap", "sleep 1"], env=env, capture_output=True,
                              text=True, timeout=30)
        assert high.returncode == 0, high.stderr
        high_id = high.stdout.strip().split(";")[0]

        def continued():
            return all(not Path(f"/proc/{pid}").exists() or
                       Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T" for pid in pids)
        try:
            _until(continued, 60, "SIGCONT from SLURM's preemption of the job")
        finally:
            for pid in pids:
                if Path(f"/proc/{pid}").exists():
                    os.kill(pid, signal.SIGCONT)
        rc = _finish(p, 400, tmp_path / "sweep.log")
    finally:
        _cancel(slurm, tmp_path, sweep)
    assert rc == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    assert "JobState=COMPLETED" in _scontrol_job(slurm, tmp_path, high_id)
    logs = _logs(sweep)
    assert "this job is preempted" in logs and "handing signal 12" in logs and f"Requeued job {job}" in logs
    assert re.search(r"resumed from \S+stage2\S* at step", logs), logs[-3000:]
    assert "Restarts=1" in _scontrol_job(slurm, tmp_path, job)
    run = sweep / "0"
    _assert_same_weights(run / "student" / "model.safetensors", ref / "student" / "model.safetensors")
    summary = json.loads((run / "summary.json").read_text())
    assert _numbers(summary) == _numbers(json.loads((ref / "summary.json").read_text()))
    assert [s["stage"] for s in summary["stages"]] == [1, 2]


def test_a_two_task_job_trains_through_ddp_like_torchrun(slurm, zoo, tmp_path):
    args = ["method=kl_dp", *TRANSFER, "trainer.epochs=2", "loader.drop_last=true", *zoo]
    sweep = tmp_path / "sweep_ddp"
    p = _start("main_transfer.py", [*_launcher(sweep, tasks_per_node=2), *args], tmp_path, slurm, "sweep")
    torchrun = tmp_path / "torchrun"
    t = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "main_transfer.py", *args, f"hydra.run.dir={torchrun}"], cwd=ROOT,
                         env=_slurm_env(tmp_path, slurm), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = t.communicate(timeout=300)
        rc = _finish(p, 300, tmp_path / "sweep.log")
    finally:
        if t.poll() is None:
            t.kill()
        _cancel(slurm, tmp_path, sweep)
    assert t.returncode == 0, err[-3000:]
    assert rc == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    run = sweep / "0"
    job = _job_ids(sweep)[0]
    outs = sorted(f.name for f in (sweep / ".submitit" / job).glob("*_log.out"))
    assert outs == [f"{job}_0_log.out", f"{job}_1_log.out"], outs  # two SLURM tasks ...
    assert "global_rank=1(2)" in (sweep / ".submitit" / job / outs[1]).read_text()
    assert sorted(p.parent.name for p in sweep.glob("*/summary.json")) == ["0"]  # ... one run, written by rank 0
    _assert_same_weights(run / "student" / "model.safetensors", torchrun / "student" / "model.safetensors")
    assert _numbers(json.loads((run / "summary.json").read_text())) == \
        _numbers(json.loads((torchrun / "summary.json").read_text()))


def test_submitit_task_variables_become_torchruns(monkeypatch):
    """No cluster needed: the SLURM variables of task 1 of a two-task submitit job give RANK/WORLD_SIZE/... and a
    rendezvous every task agrees on; a one-task job and a torchrun process (WORLD_SIZE set) are left alone."""
    from src.experiments.context import dist_info

    job = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "42", "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "node7"}
    exported = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    for k in exported:  # setenv first, so that monkeypatch records the original state (absent) and restores it
        monkeypatch.setenv(k, "")
    ports = []
    for rank in (1, 0):
        for k in exported:
            monkeypatch.delenv(k, raising=False)
        for k, v in {**job, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}.items():
            monkeypatch.setenv(k, v)
        assert dist_info() == (rank, 2, rank)
        assert os.environ["MASTER_ADDR"] == "127.0.0.1" and os.environ["LOCAL_WORLD_SIZE"] == "2"
        ports.append(int(os.environ["MASTER_PORT"]))
    assert ports[0] == ports[1] and 20000 <= ports[0] <= 60000
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun's own variables win
    monkeypatch.setenv("RANK", "3")
    assert dist_info()[:2] == (3, 4)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert dist_info() == (0, 1, 0) and "MASTER_PORT" not in os.environ
