"""Reliability of every entry script (the mechanisms live in the shared engine / entry / tracking layers):

- preemption: a real SIGTERM to `python main_*.py` -> the step finishes, a checkpoint is saved, exit code 124;
  rerunning the same command in the same run dir resumes and ends bit-identical to an uninterrupted run (weights,
  summary numbers, every metrics.jsonl line), with the same wandb run id (pretrain, transfer with KL+DP / MCL's EMA
  weights / CRD's memory banks, multi-teacher killed in stage 2);
- a signal outside a training step stops at once (124); non-finite losses / weights keep the last good checkpoint;
- a malicious or corrupt trainer checkpoint in the run dir is refused, never executed;
- determinism: the same command twice gives identical summaries, which carry the seed and library versions;
- sweeps: one failing job keeps the others' results, writes error.json, and every wandb run is finished.

The uninterrupted reference runs in-process with one intra-op thread; the subprocesses get OMP_NUM_THREADS=1."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose, find_pids

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------------- helpers


@contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def train_small_zoo(base: Path, names, epochs: int, extra=()) -> list:
    """Digits zoo entries `names` (`epochs` each, one thread) in checkpoints/cache folders under `base`; returns
    the path overrides that point at them."""
    from src.experiments import pretrain

    paths = [f"paths.checkpoints={base / 'ck'}", f"paths.cache={base / 'cache'}", f"paths.data={base / 'data'}"]
    with one_thread():
        for n in names:
            ep = f"zoo.models.{n}.epochs={epochs}" if n == "mlp_small" else f"+zoo.models.{n}.epochs={epochs}"
            pretrain.run(compose("pretrain/pretrain", [f"name={n}", ep, *paths, *extra]), run_dir=base / f"zoo_{n}")
    return paths


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A small digits zoo (mlp_small, resnet8, lenet; 3 epochs each) in its own checkpoints/cache folders."""
    return train_small_zoo(tmp_path_factory.mktemp("rel_zoo"), ("mlp_small", "resnet8", "lenet"), 3)


def _env(tmp: Path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_SILENT="true",
               WANDB_CONFIG_DIR=str(tmp / "wandb_config"), WANDB_CACHE_DIR=str(tmp / "wandb_cache"),
               WANDB_DATA_DIR=str(tmp / "wandb_data"))
    for k in ("KT_DATA", "KT_CHECKPOINTS", "KT_CACHE", "KT_DEBUG", "WANDB_MODE", "HYDRA_FULL_ERROR"):
        env.pop(k, None)
    return env


def _run(script, args, tmp: Path, timeout=300):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=_env(tmp), capture_output=True,
                          text=True, timeout=timeout)


def _rows(path: Path):
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return out


def _run_and_sigterm(script, args, run_dir: Path, tmp: Path, ready, timeout=300):
    """Start `script`, send SIGTERM once `ready(metrics rows)` holds; returns (exit code, stderr)."""
    log = open(tmp / f"{run_dir.name}_killed.log", "w")
    p = subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=_env(tmp), stdout=log,
                         stderr=subprocess.PIPE, text=True)
    t0, sent = time.time(), False
    try:
        while p.poll() is None and time.time() - t0 < timeout:
            if not sent and ready(_rows(run_dir / "metrics.jsonl")):
                p.send_signal(signal.SIGTERM)
                sent = True
            time.sleep(0.02)
        if p.poll() is None:
            p.kill()
        _, err = p.communicate(timeout=60)
    finally:
        log.close()
    assert sent, f"the run finished before it could be signalled (exit {p.returncode}): {err[-2000:]}"
    return p.returncode, err


def _numbers(d, prefix=""):
    """Flattened numeric/str leaves of a summary, without paths (the run dirs differ) and timestamps."""
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            if k in ("path", "created", "reused_from") or "dir" in k:
                continue
            out.update(_numbers(v, f"{prefix}{k}."))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out.update(_numbers(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = d
    return out


def _assert_same_weights(a: Path, b: Path):
    from src.io_utils import load_state_dict

    wa, wb = load_state_dict(a), load_state_dict(b)
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs between {a} and {b}"


def _wandb_ids(run_dir: Path):
    return {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}


def _check_resumed(run: Path, ref: Path, wandb_id: str, weights: str):
    """Resumed run == uninterrupted run: weights, summary numbers, metrics.jsonl line for line, one wandb id."""
    _assert_same_weights(run / weights, ref / weights)
    s_run, s_ref = (json.loads((d / "summary.json").read_text()) for d in (run, ref))
    assert _numbers(s_run) == _numbers(s_ref)
    assert s_run["seed"] == 0 and s_run["versions"]["torch"] == torch.__version__
    rows = _rows(run / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    keys = [(r["step"], tuple(sorted(r))) for r in rows]  # several kinds of line may share a step (stage rows)
    assert steps == sorted(steps) and len(keys) == len(set(keys)), f"duplicated / unordered lines: {steps}"
    assert _rows(run / "metrics.jsonl") == _rows(ref / "metrics.jsonl")
    assert json.loads((run / ".tracker.json").read_text())["wandb_id"] == wandb_id
    assert _wandb_ids(run) == {wandb_id}, "the resumed run opened another wandb run"
    assert not (run / "error.json").exists() and not (run / "preempted.json").exists()  # stale markers gone


def _preempt_and_resume(script, args, run: Path, tmp: Path, ready, stop_below: int, ckpt_glob: str):
    """SIGTERM -> 124 + checkpoint + preempted.json; then the same command again -> 0. Returns the wandb id."""
    cmd = [*args, "wandb=offline", f"hydra.run.dir={run}"]
    rc, err = _run_and_sigterm(script, cmd, run, tmp, ready)
    assert rc == 124, f"exit {rc} after SIGTERM: {err[-3000:]}"
    assert "preempted:" in err and json.loads((run / "preempted.json").read_text())["status"] == "preempted"
    ckpts = sorted(run.glob(ckpt_glob))
    assert ckpts, f"no checkpoint after the preemption ({ckpt_glob})"
    step = int(ckpts[-1].name.split("_")[-1])
    assert 0 < step < stop_below, f"checkpoint at step {step}: the run was not interrupted mid-way"
    wandb_id = json.loads((run / ".tracker.json").read_text())["wandb_id"]
    import shlex

    advice = shlex.split(err.split("resume with: ", 1)[1].splitlines()[0])  # the exact command, run dir pinned
    assert advice[:2] == ["python", script] and advice[-1] == f"hydra.run.dir={run}", advice
    res = _run(script, advice[2:], tmp)
    assert res.returncode == 0, f"resume failed ({res.returncode}): {res.stderr[-3000:]}"
    assert "resumed from" in res.stdout + res.stderr
    return wandb_id


# ------------------------------------------------------------------------------------------- preemption


PRETRAIN = ["name=null", "model=mlp", "+model.kwargs.hidden=[256,256]", "+model.kwargs.drop_rate=0.2",
            "loader.batch_size=32", "trainer.epochs=12", "trainer.eval_every_steps=10", "trainer.progress=off"]


@pytest.fixture(scope="module")
def pretrain_ref(tmp_path_factory):
    """The uninterrupted PRETRAIN run (in-process, one thread) and the paths it used."""
    from src.experiments import pretrain

    base = tmp_path_factory.mktemp("pretrain_ref")
    paths = [f"paths.checkpoints={base / 'ck'}", f"paths.cache={base / 'cache'}"]
    with one_thread():
        pretrain.run(compose("pretrain/pretrain", [*PRETRAIN, *paths]), run_dir=base / "ref")
    return base / "ref", paths


def test_pretrain_sigterm_resume_is_bit_identical(pretrain_ref, tmp_path):
    """mlp with dropout and crop augmentation: data order, augmentation and dropout RNG, cosine schedule."""
    ref, paths = pretrain_ref
    total = json.loads((ref / "summary.json").read_text())["models"]["mlp"]
    run = tmp_path / "run"
    wid = _preempt_and_resume("main_pretrain.py", [*PRETRAIN, *paths], run, tmp_path,
                              ready=lambda rows: any(r["step"] >= 10 for r in rows), stop_below=12 * 23,
                              ckpt_glob="checkpoints/mlp/step_*")
    _check_resumed(run, ref, wid, "model/model.safetensors")
    assert json.loads((run / "summary.json").read_text())["models"]["mlp"]["test_acc"] == total["test_acc"]


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the submitit job through /proc")
def test_submitit_preemption_signal_checkpoints_then_requeues_into_the_same_sweep_dir(pretrain_ref, tmp_path):
    """A `-m hydra/launcher=local` sweep (submitit, as on SLURM) gets submitit's USR2 mid-training: the step
    finishes, a checkpoint is saved, submitit requeues the job, and the requeued job resumes in the same sweep
    sub-dir (default-style sweep dir with ${now:} and ${kt_pid:}) and ends bit-identical to an uninterrupted run."""
    ref, paths = pretrain_ref
    sweep_root = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=local", f"hydra.sweep.dir={sweep_root}/${{now:%H-%M-%S}}_${{kt_pid:}}",
            "wandb=offline", *PRETRAIN, *paths]
    log = open(tmp_path / "sweep.log", "w")
    p = subprocess.Popen([sys.executable, "main_pretrain.py", *args], cwd=ROOT, env=_env(tmp_path), stdout=log,
                         stderr=subprocess.STDOUT, text=True)
    t0, signalled = time.time(), []
    try:
        while p.poll() is None and time.time() - t0 < 300:
            if not signalled and any(any(r["step"] >= 10 for r in _rows(m))
                                     for m in sweep_root.glob("*/0/metrics.jsonl")):
                signalled = find_pids("submitit.core._submit", str(sweep_root))  # the job process
                for pid in signalled:
                    os.kill(pid, signal.SIGUSR2)
            time.sleep(0.02)
        if p.poll() is None:
            p.kill()
        p.wait(timeout=60)
    finally:
        log.close()
    out = (tmp_path / "sweep.log").read_text()
    assert len(signalled) == 1, f"expected one submitit job process to signal, found {signalled}: {out[-3000:]}"
    assert p.returncode == 0, f"sweep exit {p.returncode}: {out[-3000:]}"
    sweeps = list(sweep_root.iterdir())
    assert len(sweeps) == 1, f"the requeued job used another sweep dir: {sweeps}"
    job = sweeps[0] / "0"
    logs = "".join(f.read_text(errors="replace") for f in sweeps[0].rglob("*") if f.suffix in (".log", ".out", ".err"))
    assert "handing signal" in logs and "Requeued job" in logs, logs[-3000:]
    assert "resumed from" in logs, logs[-3000:]
    resumed = re.findall(r"resumed from \S+ at step (\d+)/(\d+)", logs)
    resumed = set(resumed)  # the same line in the job log and in submitit's stdout/stderr files
    assert len(resumed) == 1 and 0 < int(min(resumed)[0]) < int(min(resumed)[1]), resumed
    wid = json.loads((job / ".tracker.json").read_text())["wandb_id"]
    _check_resumed(job, ref, wid, "model/model.safetensors")


TRANSFER = ["teacher=mlp_small", "student=resnet8", "loader.batch_size=16", "trainer.epochs=6",
            "trainer.eval_every_steps=10", "trainer.progress=off"]
METHODS = {"kl_dp": [], "mcl": ["method.ema_tau=0.9"], "crd": ["method.num_negatives=64", "method.feat_dim=16"]}


@pytest.mark.parametrize("method", list(METHODS))
def test_transfer_sigterm_resume_is_bit_identical(method, zoo, tmp_path):
    """KL+DP; MCL (the evaluated EMA weights); CRD (memory banks, embedding heads, sampled negatives)."""
    from src.experiments import transfer

    args = [*TRANSFER, f"method={method}", *METHODS[method], *zoo]
    ref = tmp_path / "ref"
    with one_thread():
        transfer.run(compose("transfer/transfer", args), run_dir=ref)
    run = tmp_path / "run"
    wid = _preempt_and_resume("main_transfer.py", args, run, tmp_path,
                              ready=lambda rows: any(r["step"] >= 10 for r in rows), stop_below=6 * 34,
                              ckpt_glob="checkpoints/train/step_*")
    _check_resumed(run, ref, wid, "student/model.safetensors")


def test_sigterm_stops_a_local_sweep_and_the_same_command_finishes_it(zoo, tmp_path):
    """Hydra's basic launcher runs every job in one process: SIGTERM during job 0 ends the sweep with 124 (job 1
    never starts), not only job 0; the same command then resumes job 0 and runs job 1."""
    sweep = tmp_path / "sweep"
    args = ["-m", "method=kl,kl_dp", *TRANSFER, *zoo, "wandb=disabled", f"hydra.sweep.dir={sweep}"]
    log = open(tmp_path / "sweep_killed.log", "w")
    p = subprocess.Popen([sys.executable, "main_transfer.py", *args], cwd=ROOT, env=_env(tmp_path), stdout=log,
                         stderr=subprocess.PIPE, text=True)
    t0, sent = time.time(), False
    while p.poll() is None and time.time() - t0 < 300:
        if not sent and any(r["step"] >= 10 for r in _rows(sweep / "0" / "metrics.jsonl")):
            p.send_signal(signal.SIGTERM)
            sent = True
        time.sleep(0.02)
    _, err = p.communicate(timeout=60)
    log.close()
    assert sent and p.returncode == 124, f"exit {p.returncode}: {err[-2000:]}"
    assert "the sweep stops here" in err
    assert (sweep / "0" / "preempted.json").is_file() and not (sweep / "1").exists()
    # the advice is the exact command, the sweep dir pinned: run what it printed
    import shlex

    cmd = shlex.split(err.split("resume it with: ", 1)[1].splitlines()[0])
    assert cmd[:3] == ["python", "main_transfer.py", "-m"] and cmd[-1] == f"hydra.sweep.dir={sweep}", cmd
    res = _run(cmd[1], cmd[2:], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads((sweep / k / "summary.json").read_text()) for k in ("0", "1")]
    assert [r["method"] for r in rows] == ["KL", "KLDP"] and all(r["status"] == "ok" for r in rows)
    assert not (sweep / "0" / "preempted.json").exists()


MULTI = ["mode=sequential", "teachers=[mlp_small,lenet]", "student=resnet8", "loader.batch_size=16",
         "trainer.epochs=3", "trainer.eval_every_steps=10", "trainer.progress=off"]


def test_multi_teacher_sequential_sigterm_in_stage_2_resumes_in_stage_2(zoo, tmp_path):
    from src.experiments import multi_teacher

    args = [*MULTI, *zoo]
    ref = tmp_path / "ref"
    with one_thread():
        multi_teacher.run(compose("multi_teacher/multi_teacher", args), run_dir=ref)
    run = tmp_path / "run"
    in_stage_2 = lambda rows: any(r.get("stage") == 2 and "train/loss" in r for r in rows)  # noqa: E731
    wid = _preempt_and_resume("main_multi_teacher.py", args, run, tmp_path, ready=in_stage_2,
                              stop_below=3 * 34, ckpt_glob="checkpoints/stage2_*/step_*")
    _check_resumed(run, ref, wid, "student/model.safetensors")
    assert [s["stage"] for s in json.loads((run / "summary.json").read_text())["stages"]] == [1, 2]


class _FakeSubmititHandler:
    """Stands in for submitit's SignalHandler (recognised by its module), recording the signals handed to it."""
    __module__ = "submitit.core.job_environment"

    def __init__(self):
        self.calls = []

    def checkpoint_and_try_requeue(self, signum, frame=None):
        self.calls.append(signum)


@pytest.mark.parametrize("sig_name", ["USR2", "USR1"])
def test_preemption_takes_over_submitits_signal_and_hands_it_back(sig_name, monkeypatch):
    """The signal submitit requeues on (USR2, or SUBMITIT_PREEMPT_SIGNAL) is held by our handlers, also nested
    ones, restored afterwards, and handed back to submitit after a preemption by it (not by SIGTERM)."""
    from src.engine import preemption

    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", sig_name)
    sig = getattr(signal, f"SIG{sig_name}")
    fake = _FakeSubmititHandler()
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    signal.signal(sig, fake.checkpoint_and_try_requeue)
    try:
        assert preemption.signals() == ((signal.SIGTERM, signal.SIGUSR1) if sig == signal.SIGUSR1 else
                                        (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2))
        outer, inner = (lambda *a: None), (lambda *a: None)
        with preemption.handling(outer) as previous:
            assert previous[sig] == fake.checkpoint_and_try_requeue and signal.getsignal(sig) is outer
            with preemption.handling(inner):  # a Trainer inside the entry point
                assert signal.getsignal(sig) is inner
            assert signal.getsignal(sig) is outer
        assert signal.getsignal(sig) == fake.checkpoint_and_try_requeue
        preemption.reset()
        preemption.record(signal.SIGTERM)
        preemption.hand_over(previous)
        assert fake.calls == []  # SIGTERM: our exit code, no requeue
        preemption.record(sig)
        preemption.hand_over(previous)
        assert fake.calls == [sig]
    finally:
        preemption.reset()
        for s, h in before.items():
            signal.signal(s, h)


def test_signal_outside_a_training_step_stops_at_once(tmp_path, capsys):
    """Between trainers (stages, evaluation, on-the-fly zoo models) there is no step to finish: exit 124 now."""
    from src.entry import entry

    def run(cfg):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("the signal did not stop the run")

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as ei:
        entry(run, None)
    assert ei.value.code == 124
    assert "preempted:" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before  # the entry's handler is removed again


# ---------------------------------------------------------------------------- non-finite / unsafe checkpoints


def _digits_trainer(run_dir, **tcfg):
    from omegaconf import OmegaConf

    from src.data import build_dataset, build_loader
    from src.engine import Trainer
    from src.methods import CrossEntropy
    from src.models import create_model
    from src.schema import OptimizerConfig, SchedulerConfig, TrainerConfig

    cfg = compose("pretrain/pretrain", ["loader.batch_size=64"])
    ds = build_dataset(cfg.dataset, cfg.paths)
    torch.manual_seed(0)
    i = ds.info
    model = create_model("mlp", i)
    t = OmegaConf.merge(OmegaConf.structured(TrainerConfig), {"progress": "off", "max_steps": 10, **tcfg})
    return Trainer(CrossEntropy(model), build_loader(cfg.loader, ds.split("train"), train=True, device="cpu"), t,
                   OmegaConf.structured(OptimizerConfig), OmegaConf.structured(SchedulerConfig), run_dir,
                   device="cpu")


@pytest.mark.parametrize("where", ["loss", "weights"])
def test_non_finite_training_stops_and_keeps_the_last_good_checkpoint(tmp_path, where):
    from src.engine import CheckpointDir
    from src.errors import UserError
    from src.io_utils import load_state_dict

    t = _digits_trainer(tmp_path, ckpt_every_steps=2)
    if where == "loss":
        real = t.method.loss

        def loss(batch):
            value, logs = real(batch)
            return (value * float("nan") if t.step == 4 else value), logs  # the 5th step's loss is NaN

        t.method.loss = loss
    else:
        def poison(step):  # the weights blow up after step 4, before its checkpoint
            if step == 4:
                with torch.no_grad():
                    t.method.student.classifier.weight.fill_(float("inf"))

        t.method.after_step = poison
    with pytest.raises(UserError, match="non-finite") as ei:
        t.fit()
    good = "step_00000004" if where == "loss" else "step_00000002"
    assert good in str(ei.value)
    latest = CheckpointDir(tmp_path / "checkpoints" / "train").latest()
    assert latest.name == good
    assert all(torch.isfinite(v).all() for v in load_state_dict(latest / "model.safetensors").values())


@pytest.mark.parametrize("damage", ["malicious", "truncated"])
def test_unsafe_or_corrupt_trainer_checkpoint_in_the_run_dir_is_refused(tmp_path, damage):
    """Resuming reads the run dir's state.pt with weights_only=True: a pickle that would run code is refused
    (and not run), a truncated one is a clear error -- never a traceback from deep inside torch."""
    import pickle

    from src.errors import UserError

    t = _digits_trainer(tmp_path, ckpt_every_steps=5)
    t.fit()
    d = t.ckpt.latest()
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    if damage == "malicious":
        (d / "state.pt").write_bytes(pickle.dumps({"step": 5, "x": Evil()}))
        match = "refusing to load"
    else:
        (d / "state.pt").write_bytes((d / "state.pt").read_bytes()[:200])
        match = "corrupt or truncated"
    with pytest.raises(UserError, match=match):
        _digits_trainer(tmp_path, ckpt_every_steps=5).fit()
    assert not marker.exists(), "the checkpoint's pickle was executed"


# ---------------------------------------------------------------------------------------------- determinism


def test_same_command_twice_gives_identical_summaries(tmp_path):
    from src.experiments import pretrain

    args = ["name=null", "model=mlp", "+model.kwargs.drop_rate=0.2", "trainer.epochs=2", "trainer.seed=3",
            f"paths.checkpoints={tmp_path / 'ck'}", f"paths.cache={tmp_path / 'cache'}"]
    with one_thread():
        a = pretrain.run(compose("pretrain/pretrain", args), run_dir=tmp_path / "a")
        b = pretrain.run(compose("pretrain/pretrain", args), run_dir=tmp_path / "b")
    assert _numbers(a) == _numbers(b)
    assert a["seed"] == 3 and set(a["versions"]) >= {"python", "torch", "numpy", "timm", "hydra"}
    _assert_same_weights(tmp_path / "a" / "model" / "model.safetensors", tmp_path / "b" / "model" / "model.safetensors")


# --------------------------------------------------------------------------------------------------- sweeps


def test_multirun_with_a_failing_job_keeps_the_others_and_finishes_every_wandb_run(zoo, tmp_path):
    from src.io_utils import save_safetensors
    from src.models import ImageInputs, create_model

    weights = tmp_path / "resnet8.safetensors"
    save_safetensors(create_model("resnet8", ImageInputs(10, 1, [0.3], [0.38])).state_dict(), weights)
    sweep = tmp_path / "sweep"
    # job 0 is fine; job 1 fails after its tracker started (a checkpoint of another architecture)
    res = _run("main_transfer.py", ["-m", "teacher=mlp_small", f"student=resnet8,'resnet20@{weights}'",
                                    "trainer.epochs=1", "trainer.progress=off", "wandb=offline",
                                    f"hydra.sweep.dir={sweep}", *zoo], tmp_path)
    assert res.returncode != 0, "the failing job must make the sweep fail"
    ok = json.loads((sweep / "0" / "summary.json").read_text())
    assert ok["status"] == "ok" and ok["seed"] == 0 and "versions" in ok
    assert (sweep / "0" / "student" / "model.safetensors").is_file()
    assert not (sweep / "1" / "summary.json").exists()
    err = json.loads((sweep / "1" / "error.json").read_text())
    assert err["status"] == "failed" and "does not fit this architecture" in err["error"]
    assert "refused" not in err  # it had started (its wandb run): the aggregator lists it as failed
    assert "does not fit this architecture" in (sweep / "1" / "main_transfer.log").read_text()
    for job, code in (("0", 0), ("1", 1)):  # both wandb runs were finished, the failed one with its exit code
        runs = list((sweep / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        debug = (runs[0] / "logs" / "debug.log").read_text()
        assert "finishing run" in debug and f"got exitcode: {code}" in debug, debug[-2000:]


# ------------------------------------------------------------------- issue 17: trust nothing on disk


def _ckpt(folder: Path, bump: float = 0.0):
    """An untrained 10-class digits mlp saved as a checkpoint folder (bump: other weights, same architecture)."""
    from src.models import ImageInputs, create_model, save_checkpoint

    torch.manual_seed(0)
    m = create_model("mlp", ImageInputs(10, 1, [0.3], [0.38], 8), kwargs={"hidden": [8]})
    with torch.no_grad():
        m.classifier.weight.add_(bump)
    return save_checkpoint(m, folder, {"name": folder.name, "kwargs": {"hidden": [8]},
                                       "dataset": {"name": "digits", "image_size": 8, "channels": 1}})


def _ctx(tmp: Path, *overrides):
    from src.experiments.context import setup

    cfg = compose("transfer/transfer", [f"paths.checkpoints={tmp / 'ck'}", f"paths.cache={tmp / 'cache'}",
                                        f"paths.data={tmp / 'data'}", *overrides])
    return setup(cfg, tmp / "run", tracker=False)


def _release(ctx):
    from src.tracking import unlock_run_dir

    unlock_run_dir(ctx.run_dir)


def test_meta_hash_lie_and_swapped_weights_are_refused_not_served(tmp_path):
    """Cache keys come from the weights' bytes: a meta.json claiming another model's hash, or weights replaced by
    hand under the old meta.json, is one clear line -- never the other model's cached outputs."""
    from src.errors import UserError
    from src.experiments.resolve import resolve_model

    a, b = tmp_path / "a", tmp_path / "b"
    _ckpt(a)
    meta_b = _ckpt(b, bump=1.0)
    ctx = _ctx(tmp_path)
    try:
        split = ctx.ds.split("test")
        out_b = ctx.outputs(resolve_model(str(b), ctx), split)  # b's outputs are now in the cache
        meta = json.loads((a / "meta.json").read_text())
        (a / "meta.json").write_text(json.dumps(dict(meta, hash=meta_b["hash"])))  # the lie
        with pytest.raises(UserError, match="does not match its meta.json"):
            resolve_model(str(a), ctx)
        (a / "meta.json").write_text(json.dumps(meta))  # honest again: a's own outputs, not b's
        out_a = ctx.outputs(resolve_model(str(a), ctx), split)
        assert not torch.equal(out_a["logits"], out_b["logits"])
        (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())  # swapped by hand
        with pytest.raises(UserError, match="does not match its meta.json"):
            resolve_model(str(a), ctx)
    finally:
        _release(ctx)


@pytest.mark.parametrize("poison", ["garbage", "zero_bytes", "directory", "classes", "features", "nan", "ids"])
def test_poisoned_cache_entries_are_deleted_and_recomputed(tmp_path, poison, caplog):
    from src.engine import predict
    from src.experiments.resolve import resolve_model
    from src.io_utils import load_state_dict, save_safetensors

    _ckpt(tmp_path / "t")
    ctx = _ctx(tmp_path)
    try:
        ref = resolve_model(str(tmp_path / "t"), ctx)
        split = ctx.ds.split("test")
        good = ctx.outputs(ref, split, features=True)
        path = ctx.output_path(ref, split)
        bad = {k: v.clone() for k, v in good.items()}
        if poison == "garbage":
            path.write_bytes(os.urandom(300))
        elif poison == "zero_bytes":
            path.write_bytes(b"")
        elif poison == "directory":
            path.unlink()
            path.mkdir()
        else:
            if poison == "classes":
                bad["logits"] = bad["logits"][:, :7]
            elif poison == "features":
                bad["features"] = bad["features"][:, :7]  # 7 of 8 columns
            elif poison == "nan":
                bad["logits"][3, 2] = float("nan")
            elif poison == "ids":
                bad["ids"] = bad["ids"] + 1
            save_safetensors(bad, path)
        computed = ctx.cache.computed
        with caplog.at_level("WARNING"):
            out = ctx.outputs(ref, split, features=True)
        assert ctx.cache.computed == computed + 1 and ctx.cache.rejected == 1
        assert "invalid" in caplog.text and str(path) in caplog.text
        fresh = predict(ref.model, ctx.eval_loader(split), features=True)
        for k in ("logits", "features", "ids", "labels"):
            assert torch.equal(out[k], fresh[k]), k
        assert path.is_file() and torch.equal(load_state_dict(path)["logits"], fresh["logits"])  # rewritten
        ctx.outputs(ref, split, features=True)
        assert ctx.cache.hits >= 1 and ctx.cache.computed == computed + 1  # and served again from then on
    finally:
        _release(ctx)


def _pretrain(run_dir: Path, tmp: Path, *overrides):
    from src.experiments import pretrain

    cfg = compose("pretrain/pretrain", ["name=null", "model=mlp", "trainer.progress=off", "loader.batch_size=64",
                                        f"paths.checkpoints={tmp / 'ck'}", f"paths.cache={tmp / 'cache'}",
                                        *overrides])
    with one_thread():
        return pretrain.run(cfg, run_dir=run_dir)


def test_resume_with_changed_training_settings_is_refused(tmp_path):
    from src.errors import UserError

    run = tmp_path / "run"
    _pretrain(run, tmp_path, "trainer.max_steps=4", "optimizer.lr=0.01")
    with pytest.raises(UserError) as ei:
        _pretrain(run, tmp_path, "trainer.max_steps=8", "optimizer.lr=1e6")
    msg = str(ei.value)
    assert "optimizer.lr: 0.01 -> 1000000.0" in msg and "trainer.max_steps: 4 -> 8" in msg
    assert "+resume.allow_changes=[optimizer.lr,trainer.max_steps]" in msg
    assert json.loads((run / "run_config.json").read_text())["optimizer.lr"] == 0.01  # the record is kept
    # a setting that does not change what is computed is no difference; an allowed change resumes
    s = _pretrain(run, tmp_path, "trainer.max_steps=8", "optimizer.lr=0.01", "+resume.allow_changes=[trainer]",
                  "trainer.progress=on")
    assert s["models"]["mlp"]["test_acc"] is not None
    assert [r["step"] for r in _rows(run / "metrics.jsonl")][-1] == 8


def test_second_run_in_the_same_run_dir_exits_with_one_line(tmp_path, capsys):
    from src.experiments import pretrain
    from src.entry import entry

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "val/acc": 0.5}\n')
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(run / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('held', flush=True)\n"
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = compose("pretrain/pretrain", ["name=null", "model=mlp", "trainer.max_steps=2",
                                            f"paths.checkpoints={tmp_path / 'ck'}", f"paths.cache={tmp_path / 'c'}"])
        capsys.readouterr()
        with pytest.raises(SystemExit) as ei:
            entry(lambda c: pretrain.run(c, run_dir=run), cfg)
        assert ei.value.code == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "in use by another run (pid 4242)" in err[0]
        assert (run / "metrics.jsonl").read_text() == '{"step": 1, "val/acc": 0.5}\n'  # untouched
        assert not (run / "error.json").exists() and not (run / "summary.json").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    _pretrain(run, tmp_path, "trainer.max_steps=2")  # the holder is gone: the dir is free again
    assert (run / "summary.json").is_file()


@contextmanager
def _held(folder: Path, pid: bytes = b"4242"):
    """Another process holding `folder`'s run-dir lock."""
    folder.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys\n"
                               f"fd = os.open({str(folder / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
                               f"fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, {pid!r}); print('held', flush=True)\n"
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


@pytest.mark.parametrize("mode", ["run", "sweep"])
def test_a_refused_busy_run_leaves_the_running_ones_hydra_files_alone(tmp_path, mode):
    """A run refused because its run dir was busy still let Hydra rewrite that dir's .hydra/config.yaml,
    overrides.yaml and job log first (the aggregator then filed the running KL+DP run under the refused one's
    method). The lock is taken before Hydra writes anything; a sweep dir is held by the process launching it."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    record = {".hydra/config.yaml": "method: {_target_: src.methods.KLDP}\n", ".hydra/overrides.yaml": "- method=kl_dp\n",
              ".hydra/hydra.yaml": "hydra: {}\n", "main_pretrain.log": "the running job's log\n"}
    for name, text in record.items():
        (run / name).write_text(text)
    args = [f"hydra.run.dir={run}"] if mode == "run" else ["-m", f"hydra.sweep.dir={run}", "trainer.seed=0,1"]
    with _held(run):
        r = _run("main_pretrain.py", [*args[:1 if mode == "sweep" else 0], "name=null", "model=mlp",
                                      "trainer.max_steps=2", *args[1 if mode == "sweep" else 0:],
                                      f"paths.checkpoints={tmp_path / 'ck'}", f"paths.cache={tmp_path / 'c'}"],
                 tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "in use by another run (pid 4242)" in err[0], err
    for name, text in record.items():
        assert (run / name).read_text() == text, name
    assert sorted(p.name for p in run.iterdir()) == [".hydra", ".lock", "main_pretrain.log"]


def test_torn_last_metrics_line_is_dropped_before_appending(tmp_path):
    from src.tracking import Tracker

    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval/acc": 0.1}\n{"step": 5, "eval/ac')
    t = Tracker(tmp_path)
    t.log({"eval/acc": 0.2}, 5)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 0, "eval/acc": 0.1}, {"step": 5, "eval/acc": 0.2}]
    t.finish()


def test_invalid_amp_is_refused_before_any_cache_write(tmp_path):
    from src.errors import UserError
    from src.experiments import transfer

    _ckpt(tmp_path / "t")
    cfg = compose("transfer/transfer", [f"teacher={tmp_path / 't'}", "trainer.amp=fp8",
                                        f"paths.checkpoints={tmp_path / 'ck'}", f"paths.cache={tmp_path / 'cache'}"])
    with pytest.raises(UserError, match="trainer.amp='fp8'"):
        transfer.run(cfg, run_dir=tmp_path / "run")
    assert not [p for p in (tmp_path / "cache").rglob("*.safetensors")]


def test_written_files_get_the_umask_mode_and_unreadable_files_are_named_so(tmp_path):
    from src.io_utils import content_hash, save_safetensors, write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    for f in ("a.json", "w.safetensors"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o644, f
    h = content_hash(tmp_path / "w.safetensors", tmp_path / "index.json")
    assert json.loads((tmp_path / "index.json").read_text())[str((tmp_path / "w.safetensors").resolve())][3] == h
    save_safetensors({"w": torch.ones(3)}, tmp_path / "w.safetensors")  # replaced: size/mtime change, new hash
    assert content_hash(tmp_path / "w.safetensors", tmp_path / "index.json") != h


def test_non_finite_loss_before_any_update_does_not_blame_the_learning_rate(tmp_path):
    from src.errors import UserError

    t = _digits_trainer(tmp_path)
    real = t.method.loss
    t.method.loss = lambda batch: (real(batch)[0] * float("nan"), {})
    with pytest.raises(UserError) as ei:
        t.fit()
    assert "at step 0" in str(ei.value) and "not the learning rate" in str(ei.value)
    assert "method." in str(ei.value) and "dataset.mean/std" in str(ei.value)


def test_a_sweep_with_one_bad_value_prints_one_line_per_failed_job_and_a_summary(tmp_path):
    """The good jobs finished (right), then the sweep ended in a 54-68-line traceback of the suite's own error."""
    sweep = tmp_path / "sweep"
    r = _run("main_pretrain.py", ["-m", "name=null", "model=mlp", "trainer.max_steps=2",
                                  "optimizer.lr=0.01,-1,0.02", f"hydra.sweep.dir={sweep}",
                                  f"paths.checkpoints={tmp_path / 'ck'}", f"paths.cache={tmp_path / 'c'}"], tmp_path)
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 2 and "Traceback" not in r.stderr, err
    assert err[0].startswith("error: job 1 (") and "optimizer.lr=-1" in err[0] and "must be > 0" in err[0]
    assert err[1].startswith("error: 1 of 3 jobs failed (job 1;")
    for job in ("0", "2"):
        assert "models" in json.loads((sweep / job / "summary.json").read_text())
    err = json.loads((sweep / "1" / "error.json").read_text())
    assert err["status"] == "failed" and err["refused"] is True  # validation: nothing computed
