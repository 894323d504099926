"""Trainer: the loss falls on digits; a run interrupted after k steps (stop request, signal, or crash) and resumed in
the same run dir ends with exactly the weights of an uninterrupted run; atomic checkpoints survive a failing
write; schedules."""
from __future__ import annotations

import os
import signal

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose

from src.data import build_dataset, build_loader
from src.engine import CheckpointDir, Trainer, lr_lambda, predict
from src.errors import Preempted, UserError
from src.io_utils import load_state_dict, save_safetensors
from src.methods import CrossEntropy
from src.models import create_model
from src.schema import OptimizerConfig, SchedulerConfig, TrainerConfig
from src.tracking import Tracker


@pytest.fixture(scope="module")
def digits():
    cfg = compose("pretrain/pretrain")
    return build_dataset(cfg.dataset, cfg.paths)


def _loader(ds, batch_size=128, augment="crop_flip", seed=0):
    lcfg = compose("pretrain/pretrain", [f"loader.batch_size={batch_size}", f"loader.augment={augment}",
                                         "loader.crop_padding=1", "loader.flip=true", "loader.shuffle=true"]).loader
    return build_loader(lcfg, ds.split("train"), train=True, seed=seed, device="cpu")


def _typed(schema, **kw):
    return OmegaConf.merge(OmegaConf.structured(schema), kw)


def _model(arch, ds, seed, **kwargs):
    torch.manual_seed(seed)
    i = ds.info
    return create_model(arch, i, kwargs=kwargs)


def _trainer(ds, run_dir, arch="mlp", init_seed=0, optim=None, sched=None, tracker=None, evaluate=None,
             model_kwargs=None, batch_size=128, augment="crop_flip", **tcfg):
    tcfg = {"seed": 0, "progress": "off", **tcfg}
    method = CrossEntropy(_model(arch, ds, init_seed, **(model_kwargs or {})))
    return Trainer(method, _loader(ds, batch_size, augment), _typed(TrainerConfig, **tcfg),
                   _typed(OptimizerConfig, **(optim or {"name": "sgd", "lr": 0.05})),
                   _typed(SchedulerConfig, **(sched or {"name": "cosine", "warmup_epochs": 1})),
                   run_dir, tracker=tracker, evaluate=evaluate, device="cpu")


def _assert_same_state(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def _optimizer_tensors(opt):
    out = {}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                out[f"{pid}.{k}"] = v
    return out


def test_loss_falls_and_the_model_learns_digits(tmp_path, digits):
    val = build_loader(compose("pretrain/pretrain").loader, digits.split("val"), train=False, device="cpu")

    def evaluate(m):
        out = predict(m, val)
        return {"val/acc": float((out["logits"].argmax(1) == out["labels"]).float().mean())}

    t = _trainer(digits, tmp_path, epochs=3, optim={"name": "adam", "lr": 0.01, "weight_decay": 0.0},
                 sched={"name": "none"}, evaluate=evaluate, model_kwargs={"hidden": [64]}, batch_size=32,
                 augment="none")
    before = evaluate(t.method.student)["val/acc"]
    last = t.fit()
    losses = [h["train/loss"] for h in t.history]
    assert [h["step"] for h in t.history] == [23, 46, 69]  # 719 images / 32 -> 23 steps per epoch
    assert losses[-1] < 0.5 * losses[0], losses
    assert last["val/acc"] > 0.85 and before < 0.3, (before, last)
    assert t.step == t.total_steps == 69
    assert CheckpointDir(tmp_path / "checkpoints" / "train").latest().name == "step_00000069"


CASES = {
    # model with dropout (global torch RNG), AdamW state, cosine with warmup, stop request mid-epoch 0
    "mlp-dropout-adamw-cosine-stop": dict(arch="mlp", model_kwargs={"hidden": [32], "drop_rate": 0.3},
                                          optim={"name": "adamw", "lr": 0.005, "weight_decay": 0.01},
                                          sched={"name": "cosine", "warmup_epochs": 0.5}, stop_at=5,
                                          how="request_stop"),
    # BatchNorm buffers, SGD momentum, step schedule; SIGUSR1 in epoch 1 (preemption signal)
    "resnet8-sgd-step-sigusr1": dict(arch="resnet8", model_kwargs={}, batch_size=32,
                                     optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
                                     sched={"name": "step", "step_size": 0.25, "gamma": 0.5}, stop_at=8,
                                     how="signal"),
}
TOTAL = 12  # mlp: 2 epochs of 6 steps (batch 128); resnet8: within epoch 0 (batch 32, 23 steps per epoch)


@pytest.mark.parametrize("case", list(CASES))
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, digits, case):
    c = CASES[case]
    common = dict(arch=c["arch"], model_kwargs=c["model_kwargs"], optim=c["optim"], sched=c["sched"],
                  max_steps=TOTAL, eval_every_steps=4, batch_size=c.get("batch_size", 128))

    ref = _trainer(digits, tmp_path / "ref", init_seed=0, **common)
    ref.fit()
    assert ref.step == TOTAL

    run = tmp_path / "run"
    first = _trainer(digits, run, init_seed=0, **common)
    k = c["stop_at"]

    def after_step(step):
        if step == k:
            if c["how"] == "signal":
                os.kill(os.getpid(), signal.SIGUSR1)
            else:
                first.request_stop()

    first.method.after_step = after_step
    with pytest.raises(Preempted, match=f"step {k}/{TOTAL}"):
        first.fit()
    assert first.step == k
    ckpt = CheckpointDir(run / "checkpoints" / "train")
    assert ckpt.latest().name == f"step_{k:08d}"
    assert len(list((run / "checkpoints" / "train").glob("step_*"))) == 1  # keep_checkpoints=1
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is restored

    # a fresh process would start with other weights and another RNG state: the checkpoint must restore both
    torch.manual_seed(1234)
    resumed = _trainer(digits, run, init_seed=99, **common)
    resumed.fit()
    assert resumed.step == TOTAL
    assert [h["step"] for h in resumed.history] == [s for s in (4, 8, 12) if s > k]
    _assert_same_state(resumed.method.state_dict(), ref.method.state_dict())
    _assert_same_state(_optimizer_tensors(resumed.optimizer), _optimizer_tensors(ref.optimizer))
    assert resumed.scheduler.get_last_lr() == ref.scheduler.get_last_lr()
    # and the interruption really changed something: a run that restarted from scratch would not match
    assert not torch.equal(_model(c["arch"], digits, 99, **c["model_kwargs"]).classifier.weight,
                           ref.method.student.classifier.weight)


def test_crash_resumes_from_last_checkpoint_and_metrics_are_not_duplicated(tmp_path, digits):
    common = dict(arch="mlp", model_kwargs={"hidden": [32], "drop_rate": 0.2}, max_steps=TOTAL,
                  eval_every_steps=2, ckpt_every_steps=3)
    ref = _trainer(digits, tmp_path / "ref", tracker=Tracker(tmp_path / "ref"), **common)
    ref.fit()

    run = tmp_path / "run"
    first = _trainer(digits, run, tracker=Tracker(run), **common)

    def crash(step):
        if step == 5:
            raise RuntimeError("node died")

    first.method.after_step = crash
    with pytest.raises(RuntimeError, match="node died"):
        first.fit()
    tr = Tracker(run)
    assert [r["step"] for r in tr.read_metrics()] == [2, 4]
    assert CheckpointDir(run / "checkpoints" / "train").latest().name == "step_00000003"

    resumed = _trainer(digits, run, init_seed=7, tracker=tr, **common)
    resumed.fit()
    _assert_same_state(resumed.method.state_dict(), ref.method.state_dict())
    steps = [r["step"] for r in Tracker(run).read_metrics()]
    assert steps == [2, 4, 6, 8, 10, 12]  # line 4 (after the step-3 checkpoint) was dropped and re-logged
    assert [r["step"] for r in Tracker(tmp_path / "ref").read_metrics()] == steps


def test_resume_false_starts_over(tmp_path, digits):
    t = _trainer(digits, tmp_path, max_steps=3)
    t.fit()
    t2 = _trainer(digits, tmp_path, max_steps=3, resume=False)
    assert t2.try_resume() is False and t2.step == 0


def test_resume_into_another_model_is_a_user_error(tmp_path, digits):
    _trainer(digits, tmp_path, arch="mlp", max_steps=2).fit()
    with pytest.raises(UserError, match="does not match"):
        _trainer(digits, tmp_path, arch="lenet", max_steps=2).fit()


def test_non_finite_loss_is_a_user_error(tmp_path, digits):
    t = _trainer(digits, tmp_path, max_steps=3, optim={"name": "sgd", "lr": 1e30, "momentum": 0.0})
    with pytest.raises(UserError, match="non-finite loss") as e:
        t.fit()
    # a classifier built without a method config node: named by its class; the optimiser node has no parent
    assert "(method CrossEntropy; optimizer.lr=1e+30)" in str(e.value) and "lower optimizer.lr" in str(e.value)


@pytest.mark.parametrize("nan_at", [0, 3])
def test_non_finite_loss_names_the_method_by_its_config_key(tmp_path, digits, nan_at):
    """A distillation run whose loss turns NaN: the one line names the method as the config chose it
    (method=kl) with its class, its non-zero method.* settings and the learning rate by full key, and the fix;
    before any update it says the learning rate is not the cause. The last good checkpoint stays on disk."""
    from src.experiments.naming import run_labels
    from src.methods import KL

    cfg = compose("transfer/transfer", ["method=kl", "method.temperature=4", "optimizer.lr=0.05",
                                        "trainer.max_steps=6", "trainer.ckpt_every_steps=2", "trainer.progress=off"])
    method = KL(_model("mlp", digits, 0), _model("mlp", digits, 1), temperature=cfg.method.temperature,
                alpha=cfg.method.alpha)
    # the engine knows no configs: its caller (Context.trainer) words the labels from the run's config
    t = Trainer(method, _loader(digits), cfg.trainer, cfg.optimizer, cfg.scheduler, tmp_path, device="cpu",
                labels=run_labels(method, cfg.optimizer, cfg.trainer))
    real = method.loss

    def loss(batch):
        value, logs = real(batch)
        return (value * float("nan") if t.step == nan_at else value), logs

    method.loss = loss
    with pytest.raises(UserError) as e:
        t.fit()
    msg = str(e.value)
    assert "\n" not in msg and f"non-finite loss at step {nan_at} (method=kl (KL): method.temperature=4, " \
                                 f"method.alpha=1.0" in msg, msg
    if nan_at == 0:
        assert "before any update, so not the learning rate" in msg and msg.endswith("last good checkpoint: none")
        return
    assert "; optimizer.lr=0.05): lower optimizer.lr (e.g. by 10x)" in msg and "trainer.grad_clip=1.0" in msg
    good = tmp_path / "checkpoints" / "train" / "step_00000002"
    assert msg.endswith(f"last good checkpoint: {good} (kept)")
    assert CheckpointDir(tmp_path / "checkpoints" / "train").latest() == good
    assert all(torch.isfinite(v).all() for v in load_state_dict(good / "model.safetensors").values())


class NaNAt(torch.nn.Module):
    """A tiny method: cross-entropy of a linear classifier, NaN from its call `at` on (call k = trainer step k)."""

    def __init__(self, in_dim: int, classes: int, temperature: float = 4.0, at: int = 2):
        super().__init__()
        self.net, self.temperature, self.at, self.calls = torch.nn.Linear(in_dim, classes), temperature, at, 0

    def forward(self, batch):
        x, y = batch.inputs, batch.targets
        loss = torch.nn.functional.cross_entropy(self.net(x.flatten(1)), y)
        self.calls += 1
        return (loss * float("nan") if self.calls > self.at else loss), {}


@pytest.mark.parametrize("at,labelled", [(2, True), (0, True), (2, False)])
def test_a_trainer_of_plain_typed_settings_words_its_callers_labels(tmp_path, at, labelled):
    """The engine knows no configs: a Trainer built from the schema dataclasses themselves (plain Python: no Hydra,
    no OmegaConf) and a real loader of src.data; its one-line non-finite-loss message names what the caller's
    labels name (a method and keys of its choosing), and without labels the method's class and settings."""
    from src.data import Split
    from src.data.loaders import TensorLoader
    from src.engine import RunLabels

    g = torch.Generator().manual_seed(0)
    split = Split(name="train", labels=torch.randint(0, 5, (40,), generator=g), ids=torch.arange(40),
                  images=torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8, generator=g), full_size=40)
    loader = TensorLoader(split, batch_size=8, shuffle=True, drop_last=False, seed=0, device="cpu")
    settings = (TrainerConfig(max_steps=4, progress="off"), OptimizerConfig(lr=0.05), SchedulerConfig(name="none"))
    assert [type(c) for c in settings] == [TrainerConfig, OptimizerConfig, SchedulerConfig]  # no config nodes
    labels = RunLabels(method="method=kl_dp (KLDP)", params=["method.temperature=4.0"],
                       optimizer="finetune.optimizer", trainer="finetune.trainer") if labelled else None
    t = Trainer(NaNAt(3 * 4 * 4, 5, at=at), loader, *settings, tmp_path, device="cpu", labels=labels)
    with pytest.raises(UserError) as e:
        t.fit()
    fix = ("lower {o}.lr (e.g. by 10x) or the method's loss weights / raise its temperatures (method.*, shown above), "
           "or set {t}.grad_clip=1.0, and rerun in a new run dir; last good checkpoint: none (none was written before "
           "this step)")
    if not labelled:
        assert str(e.value) == ("non-finite loss at step 2 (method NaNAt: temperature=4.0, at=2; optimizer.lr=0.05): "
                                + fix.format(o="optimizer", t="trainer"))
    elif at == 0:
        assert str(e.value) == (
            "non-finite loss at step 0 (method=kl_dp (KLDP): method.temperature=4.0): before any update, so not the "
            "learning rate: check the method's settings (method.*: weights, temperatures, precisions), the inputs "
            "(dataset.mean/std) and any basis or cached outputs it reads; last good checkpoint: none")
    else:
        assert str(e.value) == ("non-finite loss at step 2 (method=kl_dp (KLDP): method.temperature=4.0; "
                                "finetune.optimizer.lr=0.05): "
                                + fix.format(o="finetune.optimizer", t="finetune.trainer"))


def test_bad_trainer_settings_are_user_errors(tmp_path, digits):
    with pytest.raises(UserError, match="amp"):
        _trainer(digits, tmp_path, amp="fp8")
    with pytest.raises(UserError, match="optimizer.name"):
        _trainer(digits, tmp_path, optim={"name": "lion"})
    with pytest.raises(UserError, match="scheduler.name"):
        _trainer(digits, tmp_path, sched={"name": "poly"})


def test_schedules():
    cos = lr_lambda(_typed(SchedulerConfig, name="cosine", warmup_epochs=1, min_lr_ratio=0.1), 100, 10)
    assert [cos(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warmup over one epoch
    assert cos(10) == pytest.approx(1.0) and cos(55) == pytest.approx(0.55) and cos(100) == pytest.approx(0.1)
    step = lr_lambda(_typed(SchedulerConfig, name="step", step_size=2, gamma=0.1), 100, 10)
    assert [step(s) for s in (0, 19, 20, 45)] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    none = lr_lambda(_typed(SchedulerConfig, name="none"), 100, 10)
    assert none(0) == none(99) == 1.0


# ------------------------------------------------------------------------------------------ atomic saves


def _weights(v):
    return {"w": torch.full((4, 4), float(v)), "b": torch.arange(3.0) + v}


@pytest.mark.parametrize("fail_in", ["safetensors", "torch_save"])
def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fail_in):
    ck = CheckpointDir(tmp_path / "ck")
    ck.save(1, _weights(1), {"step": 1})
    assert ck.latest().name == "step_00000001"

    if fail_in == "safetensors":
        import safetensors.torch

        real = safetensors.torch.save_file

        def broken(tensors, filename, metadata=None):
            real({"w": tensors["w"]}, filename)  # half a file on disk, then the disk is full
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(safetensors.torch, "save_file", broken)
    else:
        real = torch.save

        def broken(obj, f, *a, **kw):
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04 truncated")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="No space"):
        ck.save(2, _weights(2), {"step": 2})
    monkeypatch.undo()

    d = ck.latest()
    assert d.name == "step_00000001"
    weights, state = CheckpointDir.load(d)
    _assert_same_state(weights, _weights(1))
    assert state["step"] == 1
    assert not (tmp_path / "ck" / "step_00000002").exists()
    # the next save succeeds and moves the pointer
    ck.save(3, _weights(3), {"step": 3})
    assert ck.latest().name == "step_00000003"
    _assert_same_state(CheckpointDir.load(ck.latest())[0], _weights(3))
    assert [p.name for p in (tmp_path / "ck").glob("step_*")] == ["step_00000003"]


def test_failed_file_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "model.safetensors"
    save_safetensors(_weights(1), path)

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        save_safetensors(_weights(2), path)
    monkeypatch.undo()
    _assert_same_state(load_state_dict(path), _weights(1))
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_keep_checkpoints(tmp_path):
    ck = CheckpointDir(tmp_path, keep=2)
    for s in (1, 2, 3):
        ck.save(s, _weights(s), {"step": s})
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert ck.latest().name == "step_00000003"


@pytest.mark.parametrize("pointer", ["../../other/checkpoints/train/step_00000005", "/abs/step_00000005",
                                     "step_00000005/../../../other/checkpoints/train/step_00000005", "link",
                                     "step_00000009"])
def test_a_latest_pointer_out_of_the_run_is_refused(tmp_path, digits, pointer):
    """A `latest` pointer that leads out of the run's own checkpoint folder was followed: the run ended on another
    run's weights and exited 0. Only a step_<N> folder directly inside the run's folder is taken."""
    other = _trainer(digits, tmp_path / "other", max_steps=5, augment="none")
    other.fit()
    mine = CheckpointDir(tmp_path / "mine" / "checkpoints" / "train")
    mine.save(2, _weights(2), {"step": 2})
    if pointer == "step_00000009":  # a step folder that is a link to the other run's checkpoint
        (mine.root / pointer).symlink_to(tmp_path / "other" / "checkpoints" / "train" / "step_00000005")
    if pointer == "link":
        pointer = "step_00000007"
        (mine.root / pointer).symlink_to(tmp_path / "other" / "checkpoints" / "train" / "step_00000005")
    (mine.root / "latest").write_text(pointer)
    with pytest.raises(UserError, match=r"checkpoint pointer .*latest names .*not a step_<N> folder of this run"):
        mine.latest()
    t = _trainer(digits, tmp_path / "mine", max_steps=5, augment="none")
    with pytest.raises(UserError, match="delete .*latest"):
        t.fit()
    (mine.root / "latest").write_text("step_00000002")  # its own pointer still works
    assert mine.latest().name == "step_00000002"


# ------------------------------------------------------------------------------------ batches and inference


def test_trainer_hands_each_batch_to_the_method_untouched(tmp_path, digits):
    """The engine never opens a batch: the method receives the very Batch objects the loader yielded (no
    unpacking, no channels_last conversion even with trainer.channels_last: that is the loader's job)."""
    from src.batch import Batch

    loader = _loader(digits, batch_size=64, augment="none")
    yielded, seen = [], []
    real_iter = loader.iter_epoch

    def iter_epoch(epoch=0, start_batch=0):
        for b in real_iter(epoch, start_batch):
            yielded.append((b, b.inputs))
            yield b

    loader.iter_epoch = iter_epoch
    method = CrossEntropy(_model("lenet", digits, 0))
    real_loss = method.loss

    def loss(batch):
        seen.append(batch)
        return real_loss(batch)

    method.loss = loss
    t = Trainer(method, loader, _typed(TrainerConfig, seed=0, progress="off", max_steps=3, channels_last=True),
                _typed(OptimizerConfig, name="sgd", lr=0.05), _typed(SchedulerConfig, name="none"), tmp_path,
                device="cpu")
    t.fit()
    assert len(seen) == 3 and all(isinstance(b, Batch) for b in seen)
    assert all(s is y and s.inputs is x for s, (y, x) in zip(seen, yielded[:3]))
    assert all(b.inputs.is_contiguous() for b in seen)  # the loader was not asked for channels_last


def test_collect_orders_by_id_from_a_shuffled_loader_and_takes_an_accumulator(digits):
    from src.engine import collect

    loader = _loader(digits, batch_size=50, augment="none", seed=3)  # shuffled, not augmented
    order = torch.cat([b.ids for b in loader.iter_epoch(0)])
    assert not torch.equal(order, order.sort().values)  # the batches come in a shuffled order
    split = digits.split("train")
    out = collect(lambda b: {"labels": b.targets, "mean": b.inputs.flatten(1).mean(1)}, loader)
    assert list(out) == ["labels", "mean", "ids"] and torch.equal(out["ids"], split.ids.sort().values)
    rows = split.ids.sort().indices
    assert torch.equal(out["labels"], split.labels[rows])
    want = (split.images[rows].float() / 255).flatten(1).mean(1)
    assert torch.allclose(out["mean"], want, atol=1e-6)
    # a caller that accumulates itself: per_batch returns None, collect keeps nothing
    seen = {"n": 0, "sum": torch.zeros(())}

    def accumulate(b):
        seen["n"] += len(b)
        seen["sum"] += b.targets.sum()

    assert collect(accumulate, loader, amp="bf16") == {}
    assert seen["n"] == len(split) and int(seen["sum"]) == int(split.labels.sum())


def test_predict_is_id_ordered_logits_labels_and_features(digits):
    model = _model("mlp", digits, 0, hidden=[16]).eval()
    loader = _loader(digits, batch_size=40, augment="none", seed=1)
    out = predict(model, loader, features=True)
    assert list(out) == ["logits", "labels", "ids", "features"]
    split = digits.split("train")
    rows = split.ids.sort().indices
    x = split.images[rows].float() / 255
    with torch.no_grad():
        f, z = model.features_and_logits(x)
    assert torch.equal(out["ids"], split.ids[rows]) and torch.equal(out["labels"], split.labels[rows])
    assert torch.allclose(out["logits"], z, atol=1e-5) and torch.allclose(out["features"], f, atol=1e-5)
    assert list(predict(model, loader)) == ["logits", "labels", "ids"] and model.training is False
