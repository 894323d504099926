"""Scale and speed: output caches (hit/miss, cached == recomputed), precision / memory-format / compile flags
(one short training each on CPU), DDP with 2 gloo processes == 1 process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, compose, find_pids

from src.data import build_dataset, build_loader
from src.engine import OutputCache, Trainer, predict
from src.experiments.context import ModelRef, setup
from src.experiments.stage import train_caches
from src.io_utils import load_state_dict
from src.methods import KL, CrossEntropy
from src.models import create_model
from src.schema import OptimizerConfig, SchedulerConfig, TrainerConfig


@pytest.fixture(scope="module")
def digits():
    cfg = compose("pretrain/pretrain")
    return build_dataset(cfg.dataset, cfg.paths)


def _model(ds, seed=0, arch="mlp", **kw):
    torch.manual_seed(seed)
    i = ds.info
    return create_model(arch, i, kwargs=kw)


def _loader(ds, split="train", augment="none", batch_size=64, train=True, channels_last=False):
    lcfg = compose("pretrain/pretrain", [f"loader.batch_size={batch_size}", f"loader.augment={augment}"]).loader
    return build_loader(lcfg, ds.split(split), train=train, seed=0, device="cpu", channels_last=channels_last)


# ------------------------------------------------------------------------------------------------------ caches


def test_output_cache_hit_miss_and_equality(tmp_path, digits, caplog):
    caplog.set_level("DEBUG")  # cache hits/writes are DEBUG lines
    model = _model(digits, hidden=[16])
    split = digits.split("val")
    cache = OutputCache(tmp_path)
    first = cache.get(model, "mlp-abc", "digits-key", split, _loader(digits, "val", train=False), label="m")
    assert (cache.computed, cache.hits) == (1, 0)
    again = cache.get(model, "mlp-abc", "digits-key", split, _loader(digits, "val", train=False), label="m")
    assert (cache.computed, cache.hits) == (1, 1)
    assert any("output cache hit" in r.message for r in caplog.records)
    fresh = predict(model, _loader(digits, "val", train=False))
    for k in ("logits", "labels", "ids"):
        assert torch.equal(first[k], again[k]) and torch.allclose(again[k].float(), fresh[k].float(), atol=1e-6)
    # another model key, another dataset/transform key, another split, no key: each a miss
    cache.get(model, "mlp-other", "digits-key", split, _loader(digits, "val", train=False))
    cache.get(model, "mlp-abc", "digits-otherkey", split, _loader(digits, "val", train=False))
    cache.get(model, "mlp-abc", "digits-key", digits.split("test"), _loader(digits, "test", train=False))
    cache.get(model, None, "digits-key", split, _loader(digits, "val", train=False))
    cache.get(model, None, "digits-key", split, _loader(digits, "val", train=False))
    assert (cache.computed, cache.hits) == (6, 1)


def test_frozen_logits_from_the_training_cache_equal_recomputed(tmp_path, kt_paths, caplog):
    cfg = compose("transfer/transfer", [*kt_paths, "trainer.device=cpu", "loader.augment=none"])
    ctx = setup(cfg, run_dir=tmp_path, tracker=False)
    split = ctx.ds.split("transfer")
    teacher = ModelRef("t", _model(ctx.ds, 1, hidden=[24]), "mlp-test-teacher")
    caplog.set_level("INFO")
    loader = ctx.train_loader(split)
    (table,) = train_caches(ctx, [teacher], split, loader, features=False)
    assert table is not None and any("using cached outputs" in r.message for r in caplog.records)
    method = KL(_model(ctx.ds, 2, hidden=[32]), teacher.model, teacher_cache=table)
    n = 0
    for b in loader.iter_epoch(0):
        cached = method.teacher.logits(b.inputs, b.ids)
        recomputed = method.teacher.logits(b.inputs, b.ids, use_cache=False)
        assert torch.allclose(cached, recomputed, atol=1e-5), (cached - recomputed).abs().max()
        n += 1
    assert n == len(loader)
    # a second transfer run with the same model key reads the disk cache instead of evaluating again
    before = ctx.cache.computed
    train_caches(ctx, [teacher], split, ctx.train_loader(split), features=False)
    assert ctx.cache.computed == before and ctx.cache.hits >= 1
    # randomly augmented inputs: no cache, and the log says so
    caplog.clear()
    aug = ctx.train_loader(split, OmegaConf.merge(cfg.loader, {"augment": "crop_flip"}))
    assert train_caches(ctx, [teacher], split, aug, features=False) == [None]
    assert any("augmented" in r.message for r in caplog.records)


def test_output_cache_key_separates_backend_dtype_and_precision(tmp_path, kt_paths):
    """Outputs computed under one decoding / dtype / eval precision are never served to another; the same
    settings in another run hit the cache."""
    base = [*kt_paths, "trainer.device=cpu", f"paths.cache={tmp_path / 'cache'}"]

    def outputs(*extra):
        ctx = setup(compose("transfer/transfer", [*base, *extra]), run_dir=tmp_path / "run", tracker=False)
        ref = ModelRef("t", _model(ctx.ds, 1, hidden=[24]), "mlp-key-test")
        out = ctx.outputs(ref, ctx.ds.split("val"))
        return out["logits"], (ctx.cache.computed, ctx.cache.hits)

    ref_logits, counts = outputs()
    assert counts == (1, 0)
    assert outputs()[1] == (0, 1)
    for extra in (["trainer.amp=bf16"], ["loader.backend=torch"], ["loader.dtype=bfloat16"]):
        logits, counts = outputs(*extra)
        assert counts == (1, 0), f"{extra} was served another setting's outputs"
        assert torch.allclose(logits, ref_logits, atol=0.1)  # the same model, slightly different arithmetic
    assert outputs()[1] == (0, 1)


@pytest.mark.parametrize("backend", ["tensor", "torch"])
def test_loader_dtype_delivers_images_in_that_dtype(digits, backend):
    lcfg = compose("pretrain/pretrain", [f"loader.backend={backend}", "loader.batch_size=64", "loader.device=cpu"])
    ref = next(build_loader(lcfg.loader, digits.split("val"), train=False).iter_epoch(0))
    for name, dt in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        cfg = OmegaConf.merge(lcfg.loader, {"dtype": name})
        b = next(build_loader(cfg, digits.split("val"), train=False).iter_epoch(0))
        x = b.inputs
        assert x.dtype == dt and b.targets.dtype == torch.int64 and torch.equal(b.ids, ref.ids)
        assert torch.equal(x, ref.inputs.to(dt)) and 0 <= float(x.min()) and float(x.max()) <= 1
        # augmented batches too (the augmentation itself runs in fp32)
        xa = next(build_loader(cfg, digits.split("train"), train=True, seed=0).iter_epoch(0)).inputs
        assert xa.dtype == dt and xa.shape[0] == 64
    model = _model(digits, hidden=[16])  # normalisation promotes to fp32: a bf16 batch runs without autocast
    assert model(x.to(torch.bfloat16)).dtype == torch.float32


# ----------------------------------------------------------------------------------- precision / format / compile


def _fit(ds, run_dir, method, **tcfg):
    tcfg = {"seed": 0, "progress": "off", "device": "cpu", "max_steps": 3, **tcfg}
    loader = _loader(ds, augment="crop_flip", batch_size=32, channels_last=tcfg.get("channels_last", False))
    t = Trainer(method, loader,
                OmegaConf.merge(OmegaConf.structured(TrainerConfig), tcfg),
                OmegaConf.merge(OmegaConf.structured(OptimizerConfig), {"name": "sgd", "lr": 0.05}),
                OmegaConf.merge(OmegaConf.structured(SchedulerConfig), {"name": "none"}), run_dir, device="cpu")
    last = t.fit()
    return t, last


@pytest.mark.parametrize("amp,channels_last", [("bf16", False), ("fp16", False), ("none", True), ("bf16", True)])
def test_precision_and_memory_format_flags_train_on_cpu(tmp_path, digits, amp, channels_last):
    model = _model(digits, 0, arch="lenet")
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    t, last = _fit(digits, tmp_path, CrossEntropy(model), amp=amp, channels_last=channels_last)
    assert t.step == 3 and last["train/loss"] == last["train/loss"]  # finite, not NaN
    assert any(not torch.equal(w0[k], v) for k, v in model.state_dict().items())  # it trained
    if amp == "fp16":
        assert t.scaler.is_enabled()
    if channels_last:
        conv = next(p for p in model.parameters() if p.ndim == 4)
        assert conv.is_contiguous(memory_format=torch.channels_last)


def test_compile_student_and_frozen_models_on_cpu(tmp_path, digits):
    pytest.importorskip("torch._inductor")
    student, teacher = _model(digits, 0, hidden=[16]), _model(digits, 1, hidden=[8])
    t, last = _fit(digits, tmp_path, KL(student, teacher), compile=True, compile_frozen=True, max_steps=2)
    assert t.step == 2 and last["train/loss"] == last["train/loss"]
    assert student._compiled_call_impl is not None and teacher._compiled_call_impl is not None


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_amp_channels_last_compile(tmp_path, digits, amp):
    model = _model(digits, 0, arch="resnet8")
    lcfg = compose("pretrain/pretrain", ["loader.batch_size=64", "loader.augment=crop_flip"]).loader
    loader = build_loader(lcfg, digits.split("train"), train=True, seed=0, device="cuda", channels_last=True)
    assert loader.images.is_cuda and loader.images.dtype == torch.uint8  # the split is moved once
    t = Trainer(CrossEntropy(model), loader,
                OmegaConf.merge(OmegaConf.structured(TrainerConfig),
                                {"seed": 0, "progress": "off", "max_steps": 4, "amp": amp, "channels_last": True,
                                 "compile": True}),
                OmegaConf.merge(OmegaConf.structured(OptimizerConfig), {"name": "sgd", "lr": 0.05}),
                OmegaConf.merge(OmegaConf.structured(SchedulerConfig), {"name": "none"}), tmp_path, device="cuda")
    last = t.fit()
    assert t.step == 4 and last["train/loss"] == last["train/loss"]


# ---------------------------------------------------------------------------------------------------------- DDP


def _run(args, cwd, timeout=420):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_ddp_two_gloo_processes_equal_one_process(tmp_path, kt_paths):
    """MLP student (no BatchNorm), random-init MLP teacher, KL+DP, drop_last: 2 ranks x 16 == 1 rank x 32."""
    common = ["method=kl_dp", "teacher={arch:mlp,kwargs:{hidden:[16]},name:t}",
              "student={arch:mlp,kwargs:{hidden:[32]},name:s}", "trainer.device=cpu", "trainer.epochs=1",
              "trainer.max_steps=6", "trainer.eval_every_steps=3", "loader.drop_last=true", "optimizer.lr=0.1",
              "optimizer.name=sgd", "optimizer.momentum=0.9", *kt_paths]
    one = tmp_path / "one"
    r1 = _run([str(ROOT / "main_transfer.py"), "loader.batch_size=32", f"hydra.run.dir={one}", *common], ROOT)
    assert r1.returncode == 0, r1.stderr[-3000:]
    ddp_cwd = tmp_path / "ddp"
    ddp_cwd.mkdir()
    # no hydra.run.dir: each rank's default dir has its own pid; rank 0's is used by both (broadcast)
    r2 = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "main_transfer.py"),
               "loader.batch_size=16", *common], ddp_cwd)
    assert r2.returncode == 0, r2.stderr[-3000:]
    summaries = list(ddp_cwd.glob("outputs/**/summary.json"))
    assert len(summaries) == 1, summaries  # only rank 0 writes
    two = summaries[0].parent
    assert len(list(ddp_cwd.glob("outputs/**/student/model.safetensors"))) == 1
    assert len(list(ddp_cwd.glob("outputs/**/checkpoints/*/latest"))) == 1
    lines = [json.loads(l) for l in (two / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [0, 3, 6]  # logged once, not once per rank
    ref = [json.loads(l) for l in (one / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(ref[1:], lines[1:]):  # train loss averaged over ranks == the 1-process global batch mean
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4, abs=1e-6)
        assert a["eval/student_acc"] == pytest.approx(b["eval/student_acc"], abs=1e-6)
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    for k in ("student_acc_after", "agreement_after", "knowledge_gain", "steps"):
        assert s1[k] == pytest.approx(s2[k], abs=1e-6), k
    w1, w2 = (load_state_dict(d / "student" / "model.safetensors") for d in (one, two))
    assert set(w1) == set(w2)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["pretrain", "multi_teacher"])
def test_torchrun_other_training_families(family, tmp_path, kt_paths):
    """`torchrun --nproc_per_node=2 main_pretrain.py / main_multi_teacher.py`: one run dir, rank 0 alone writes
    the summary, the metrics (one line per logged step) and the checkpoints; every stage trains its full steps."""
    mlp = "{arch:mlp,kwargs:{hidden:[16]},name:%s}"
    args = {"pretrain": ["name=null", "model=mlp", "+model.kwargs.hidden=[16]", "trainer.max_steps=4",
                         "trainer.eval_every_steps=2"],
            "multi_teacher": ["mode=sequential", f"teachers=[{mlp % 't1'},{mlp % 't2'}]", f"student={mlp % 's'}",
                              "order=listed", "trainer.max_steps=4", "trainer.eval_every_steps=2"]}[family]
    r = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / f"main_{family}.py"),
              "trainer.device=cpu", "trainer.epochs=1", "loader.batch_size=16", "loader.drop_last=true",
              *args, *kt_paths], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summaries = list(tmp_path.glob("outputs/**/summary.json"))
    assert len(summaries) == 1, summaries  # only rank 0 writes
    run = summaries[0].parent
    summary = json.loads(summaries[0].read_text())
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(r.get("stage"), r["step"], tuple(sorted(r))) for r in rows]
    assert len(keys) == len(set(keys)), f"lines logged once per rank: {keys}"
    if family == "pretrain":
        assert 0.0 <= summary["models"]["mlp"]["test_acc"] <= 100.0
        assert max(r["step"] for r in rows) == 4
        assert len(list(run.glob("checkpoints/*/latest"))) == 1
    else:
        assert summary["status"] == "ok"
        assert [s["stage"] for s in summary["stages"]] == [1, 2]
        assert all(s["steps"] == 4 for s in summary["stages"]), summary["stages"]
        assert len(list(run.glob("checkpoints/stage*/latest"))) == 2


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank-1 worker through /proc")
def test_ddp_preemption_of_one_rank_stops_all_ranks_after_the_same_step(tmp_path, kt_paths):
    """SIGTERM to rank 1 only: the ranks agree to stop after the same step, rank 0 checkpoints it, both exit 124;
    the same torchrun command then resumes from that step and finishes."""
    import re
    import signal
    import time

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "main_transfer.py"), "method=kl_dp", "teacher={arch:mlp,kwargs:{hidden:[16]},name:t}",
           "student={arch:mlp,kwargs:{hidden:[32]},name:s}", "trainer.device=cpu", "trainer.epochs=1",
           "trainer.max_steps=1500", "trainer.eval_every_steps=10", "loader.batch_size=16", "loader.drop_last=true",
           "trainer.progress=off", f"hydra.run.dir={run}", *kt_paths]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    err_path = tmp_path / "first.err"
    with open(err_path, "w") as err:
        p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err,
                             start_new_session=True)  # its own process group: a hang is killed with the workers
        t0, sent = time.time(), False
        while p.poll() is None and time.time() - t0 < 150:
            rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()] \
                if (run / "metrics.jsonl").is_file() else []
            if not sent and any(r["step"] >= 10 for r in rows):
                pids = find_pids("main_transfer.py", str(run), env_entry="RANK=1")
                if pids:
                    os.kill(pids[0], signal.SIGTERM)
                    sent = True
            time.sleep(0.02)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    first = err_path.read_text()
    assert sent, first[-3000:]
    assert p.returncode != 0, "a preempted torchrun job must not report success"
    stops = re.findall(r"stopped at step (\d+)/1500", first)
    assert len(stops) == 2 and len(set(stops)) == 1, f"the ranks did not stop together: {stops}\n{first[-3000:]}"
    k = int(stops[0])
    assert 10 <= k < 1500
    latest = (run / "checkpoints" / "train" / "latest").read_text().strip()
    assert latest.endswith(f"step_{k:08d}") or latest.endswith(f"step_{k}"), (latest, k)
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step {k}/1500" in r.stderr + r.stdout
    assert json.loads((run / "summary.json").read_text())["steps"] == 1500


# ------------------------------------------------------------------------- all-pairs statistics at scale


def _preds_with_confusions(N=11, n=400, K=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (n,), generator=g)
    confusion = (labels + 1 + torch.randint(0, K - 1, (n,), generator=g)) % K
    right = torch.rand(N, n, generator=g) < 0.6
    shared = torch.rand(N, n, generator=g) < 0.7  # most mistakes go to the sample's confusion class
    other = torch.randint(0, K, (N, n), generator=g)
    preds = torch.where(right, labels, torch.where(shared, confusion, other)).to(torch.int16)
    return preds, labels


def test_agreement_layers_and_flip_histogram_equal_loops():
    from src.metrics import pairwise as pw

    preds, labels = _preds_with_confusions()
    N, n = preds.shape
    ref = torch.tensor([[int((preds[a] == preds[b]).sum()) for b in range(N)] for a in range(N)])
    correct = pw.correctness(preds, labels)
    pos = pw.flip_counts(correct)
    both_right = correct.sum(1)[:, None] - pos
    assert torch.equal(both_right, (correct.double() @ correct.double().T).long())
    for layers in (0, 1, 2, 3):
        assert torch.equal(pw.agreement_counts(preds, dense_layers=layers), ref), layers
        assert torch.equal(pw.agreement_counts(preds, labels=labels, right_gram=both_right, dense_layers=layers,
                                               small_group=2), ref), layers
    m = (torch.rand(13, 50, generator=torch.Generator().manual_seed(1)) < 0.4).float()
    assert torch.equal(pw.gram(m, blocks=3), m @ m.T)
    per_class = pw.per_class_flip_counts(correct, labels, 6)
    for chunk in (1, 4, 16):
        hist = pw.class_flip_histogram(correct, labels, 6, class_chunk=chunk)
        assert torch.equal(hist, pw.histogram_of_counts(per_class, hist.shape[0] - 1))
    assert torch.equal(pw.stats_from_histogram(hist, 6)["total"].long(), pos)


def test_kl_stream_from_fp16_memmaps_equals_in_memory_kl_for_any_block(tmp_path):
    from src.engine.cache import log_prob_file, log_prob_path
    from src.metrics import pairwise as pw

    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 90, 12, generator=g) * 3
    want = pw.kl_matrix(z, T=2.0)
    paths = [log_prob_path(tmp_path / f"m{m}" / "out.safetensors", 2.0) for m in range(7)]
    files = [log_prob_file(z[m], p, T=2.0, rows=25) for m, p in enumerate(paths)]
    assert paths[0].name == "out.logp-T2.f16.npy" and files[0].dtype == np.float16 and files[0].shape == (90, 12)
    per_sample = 7 * 12 * 6 + 3 * 12 * 4
    for max_bytes in (1 << 30, per_sample * 8, 1):  # one block, 8 samples a block, one sample a block
        kl = pw.kl_matrix_stream(files, max_bytes=max_bytes, model_block=3, progress=False)
        assert kl.dtype == torch.float64 and torch.all(kl.diagonal() == 0)
        assert torch.allclose(kl, want, atol=2e-3 * float(want.max())), (max_bytes, (kl - want).abs().max())
    lp16 = [torch.log_softmax(z[m] / 2.0, -1).half() for m in range(7)]  # tensors stream the same way
    assert torch.allclose(pw.kl_matrix_stream(lp16, progress=False), pw.kl_matrix_stream(files, progress=False),
                          atol=1e-9)
    # written once and re-used; a file of another shape is rewritten
    mtime = paths[0].stat().st_mtime_ns
    again = log_prob_file(z[0], paths[0], T=2.0)
    assert paths[0].stat().st_mtime_ns == mtime and np.array_equal(again, files[0])
    assert log_prob_file(z[0, :50], paths[0], T=2.0).shape == (50, 12)


@pytest.mark.gpu
def test_cuda_crops_pairwise_statistics_and_kl_stream_equal_cpu(tmp_path):
    from src.data.loaders import CropStore, TensorLoader, resized_crop_flip, rrc_parameters
    from src.engine.cache import log_prob_file
    from src.metrics import pairwise as pw

    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (40, 3, 10, 10), dtype=torch.uint8, generator=g)
    pos, oy, ox = torch.randperm(40, generator=g)[:16], torch.randint(0, 5, (16,)), torch.randint(0, 5, (16,))
    mirror = torch.rand(16, generator=g) < 0.5
    cpu = CropStore(imgs, 2, True).crops(pos, oy, ox, mirror)
    gpu = CropStore(imgs.cuda(), 2, True).crops(pos.cuda(), oy.cuda(), ox.cuda(), mirror.cuda())
    assert torch.equal(cpu, gpu.cpu())
    box = rrc_parameters(16, g, "cpu")
    assert torch.allclose(resized_crop_flip(imgs[:16], 8, *box, mirror),
                          resized_crop_flip(imgs[:16].cuda(), 8, *(b.cuda() for b in box), mirror.cuda()).cpu(),
                          atol=1e-4)
    from src.data.datasets import DatasetInfo, Split

    info = DatasetInfo("s", 4, list("abcd"), 3, 10, [0.5] * 3, [0.25] * 3)
    split = Split("train", torch.randint(0, 4, (40,), generator=g), torch.arange(40), images=imgs, info=info,
                  full_size=40)
    ld = TensorLoader(split, 8, True, True, augment="crop_flip", crop_padding=2, flip=True, device="cuda")
    x = next(ld.iter_epoch(0)).inputs
    assert x.is_cuda and x.shape == (8, 3, 10, 10) and 0 <= float(x.min()) and float(x.max()) <= 1
    preds, labels = _preds_with_confusions()
    a, b = pw.pairwise_stats(preds, labels, 6), pw.pairwise_stats(preds.cuda(), labels.cuda(), 6)
    for k in a:
        assert torch.allclose(a[k].double(), b[k].cpu().double()), k
    z = torch.randn(5, 60, 7, generator=g)
    files = [log_prob_file(z[m], tmp_path / f"{m}.npy") for m in range(5)]
    assert torch.allclose(pw.kl_matrix_stream(files, max_bytes=5000, progress=False),
                          pw.kl_matrix_stream(files, max_bytes=5000, device="cuda", progress=False).cpu(), atol=1e-5)


def test_a_teacher_file_with_nan_weights_is_refused_and_nonfinite_outputs_are_never_cached(tmp_path, digits):
    """A teacher file with NaN weights loaded unchecked, its outputs were cached and the error blamed the method's
    settings. The load names the file and key; outputs that are not finite are refused before any cache write."""
    from src.errors import UserError
    from src.io_utils import load_state_dict, save_safetensors
    from src.models import load_checkpoint, save_checkpoint

    model = _model(digits, hidden=[16])
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.ndim == 2)
    sd[key][0, 0] = float("nan")
    save_safetensors(sd, tmp_path / "nan.safetensors")
    with pytest.raises(UserError, match=rf"nan.safetensors holds non-finite weights \(1 tensor\(s\), first '{key}'"):
        load_state_dict(tmp_path / "nan.safetensors", "teacher weights")
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(UserError, match="nan.pt holds non-finite weights"):
        load_state_dict(tmp_path / "nan.pt")
    with torch.no_grad():  # the same through a zoo-style checkpoint folder
        dict(model.named_parameters())[key][0, 0] = float("nan")
    save_checkpoint(model, tmp_path / "folder", {"name": "t", "arch": "mlp", "num_classes": 10})
    with pytest.raises(UserError, match="holds non-finite weights"):
        load_checkpoint(tmp_path / "folder")
    # finite weights, infinite outputs (a zero std): one line, nothing written to the cache
    sane = _model(digits, hidden=[16])
    sane.std.zero_()
    cache = OutputCache(tmp_path / "cache")
    split = digits.split("val")
    with pytest.raises(UserError, match=r"model m gives non-finite logits on val \(179 of 179 samples, amp=none\): check its weights"):
        cache.get(sane, "mlp-inf", "digits-key", split, _loader(digits, "val", train=False), label="m")
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
