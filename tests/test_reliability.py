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
    res = _run(script, cmd, tmp)
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
    from src.experiments.entry import entry

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
    model = create_model("mlp", i.num_classes, i.channels, i.mean, i.std, img_size=i.image_size)
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
                    t.method.student.net.fc.weight.fill_(float("inf"))

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
    from src.models import create_model

    weights = tmp_path / "resnet8.safetensors"
    save_safetensors(create_model("resnet8", 10, 1, [0.3], [0.38]).state_dict(), weights)
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
    assert "does not fit this architecture" in (sweep / "1" / "main_transfer.log").read_text()
    for job, code in (("0", 0), ("1", 1)):  # both wandb runs were finished, the failed one with its exit code
        runs = list((sweep / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        debug = (runs[0] / "logs" / "debug.log").read_text()
        assert "finishing run" in debug and f"got exitcode: {code}" in debug, debug[-2000:]
