"""Synthetic distillation data (method.synth_ratio, gnosis): exact share of generated rows, teacher labels, no
cached outputs for generated inputs, bit-exact resume; the generator's save/load round trip and its bad inputs;
one GAN training step; the fidelity table and figure over real (tiny) transfer run dirs."""
from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import compose, load_script

from src.batch import Batch
from src.data.loaders import mix_seed
from src.engine import Trainer
from src.errors import Preempted, UserError
from src.methods import KL, GANTraining
from src.methods.kd import kl_to_target
from src.models import ImageInputs, create_model, save_checkpoint
from src.models.gan import CondGenerator, GANSource, SNDiscriminator, ZeroShotSource, load_generator, \
    save_generator
from src.models.generator import Generator
from src.schema import OptimizerConfig, SchedulerConfig, TrainerConfig, typed
from src.tracking.fidelity import data_setting, fidelity_table, format_table, plot_fidelity, teacher_setting


def _net(seed, arch="mlp", classes=10):
    torch.manual_seed(seed)
    return create_model(arch, ImageInputs(classes, 1, [0.3], [0.38], 8),
                        kwargs={"hidden": [16]} if arch == "mlp" else {})


def _source(seed=0):
    torch.manual_seed(seed)
    return GANSource(CondGenerator(z_dim=8, img_size=8, channels=1, num_classes=10, width=8)).eval()


def _kl(ratio=0.25, cache=None, seed=5):
    return KL(_net(1), _net(2), temperature=2.0, synth_ratio=ratio, synth_generator=_source() if ratio else None,
              synth_seed=seed, teacher_cache=cache)


@pytest.mark.parametrize("batch,ratio,expect", [(8, 0.25, 2), (64, 0.2, 13), (5, 0.2, 1), (3, 0.1, 0)])
def test_exact_share_of_generated_rows(batch, ratio, expect):
    m = _kl(ratio).train()
    x = torch.rand(batch, 1, 8, 8)
    out, fresh = m.mix(Batch(x))
    assert out.shape == x.shape and m.synth_count(batch) == expect
    assert torch.equal(out[expect:], x[expect:])  # the real rows are untouched
    assert fresh == (expect > 0)
    if expect:
        # the generated rows are the source's draw seeded by (synth_seed, rank 0, draw 0)
        want = _source().sample(expect, torch.Generator().manual_seed(mix_seed(5, 0, 0)))
        assert torch.equal(out[:expect], want)
        assert not torch.equal(out[:expect], x[:expect])


def test_draws_differ_per_step_and_follow_the_seed_not_the_global_rng():
    a, b = _kl(), _kl()
    a.train(), b.train()
    x = torch.rand(8, 1, 8, 8)
    first = a.mix(Batch(x))[0][:2]
    torch.manual_seed(123)  # the global stream does not matter
    assert torch.equal(b.mix(Batch(x))[0][:2], first)
    assert not torch.equal(a.mix(Batch(x))[0][:2], first)  # the next step draws new images
    assert int(a.synth_draws.count) == 2 and "synth_draws.count" in a.state_dict()
    assert not any(k.startswith("synth_generator.") for k in a.state_dict())  # the frozen generator is not saved
    c = _kl(seed=6).train()
    assert not torch.equal(c.mix(Batch(x))[0][:2], first)


def test_eval_mode_and_ratio_zero_leave_the_batch_alone():
    x = torch.rand(8, 1, 8, 8)
    m = _kl().eval()
    out, fresh = m.mix(Batch(x))
    assert out is x and not fresh and int(m.synth_draws.count) == 0
    out, fresh = _kl(0.0).train().mix(Batch(x))
    assert out is x and not fresh


def test_generated_rows_are_labelled_by_the_teacher_and_never_served_from_the_cache():
    """A teacher cache of uniform logits: without synthetic rows the loss reads it; with them, the whole batch
    goes through the teacher (the cache would give a different loss) and the CE term is skipped."""
    x, y, idx = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,)), torch.arange(8)
    cache = {"logits": torch.zeros(8, 10)}
    plain = _kl(0.0, cache=cache).train()
    loss0, _ = plain.loss(Batch(x, y, idx))
    want0 = kl_to_target(plain.student(x), torch.full((8, 10), 0.1), 2.0).mean()
    assert torch.allclose(loss0, want0, atol=1e-6)

    m = _kl(0.25, cache=cache).train()
    loss, _ = m.loss(Batch(x, y, idx))
    xs = torch.cat([_source().sample(2, torch.Generator().manual_seed(mix_seed(5, 0, 0))), x[2:]])
    zt = m.teacher.model(xs)
    want = kl_to_target(m.student(xs), (zt / 2.0).softmax(1), 2.0).mean()
    assert torch.allclose(loss, want, atol=1e-6)
    cached = kl_to_target(m.student(xs), torch.full((8, 10), 0.1), 2.0).mean()
    assert not torch.allclose(loss, cached, atol=1e-3)


class _Batches:
    """A tiny fixed loader for the Trainer: 4 batches of 8 digits-shaped images per epoch."""

    augmented = False

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.rand(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
        self.batch_size, self.num_samples = 8, 32

    def __len__(self):
        return 4

    def iter_epoch(self, epoch, start=0):
        for b in range(start, 4):
            s = slice(8 * b, 8 * b + 8)
            yield Batch(self.x[s], self.y[s], torch.arange(32)[s])


def _synth_trainer(run_dir, init_seed=0):
    m = KL(_net(init_seed), _net(2), temperature=2.0, synth_ratio=0.25, synth_generator=_source(), synth_seed=3,
           mixup_alpha=0.5)
    return Trainer(m, _Batches(), typed(TrainerConfig, {"max_steps": 10, "eval_every_steps": 5, "progress": "off"}),
                   typed(OptimizerConfig, {"name": "sgd", "lr": 0.05}), typed(SchedulerConfig, {"name": "none"}),
                   run_dir, device="cpu")


def test_resume_is_bit_exact(tmp_path):
    ref = _synth_trainer(tmp_path / "ref")
    ref.fit()
    first = _synth_trainer(tmp_path / "run")
    first.method.after_step = lambda step: first.request_stop() if step == 3 else None
    with pytest.raises(Preempted):
        first.fit()
    torch.manual_seed(999)
    resumed = _synth_trainer(tmp_path / "run", init_seed=7)
    resumed.fit()
    a, b = resumed.method.state_dict(), ref.method.state_dict()
    assert set(a) == set(b) and int(a["synth_draws.count"]) == 10
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_generator_round_trip(tmp_path):
    src = _source(3)
    meta = save_generator(src.generator, tmp_path / "gan", {"name": "g"})
    assert meta["kind"] == "generator" and meta["image_shape"] == [1, 8, 8]
    loaded, m2 = load_generator(tmp_path / "gan", 8, 1)
    assert isinstance(loaded, GANSource) and m2["hash"] == meta["hash"]
    rng = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    x = loaded.sample(6, rng())
    assert torch.equal(x, src.sample(6, rng())) and x.min() >= 0 and x.max() <= 1
    assert not any(p.requires_grad for p in loaded.parameters())
    # the zero-shot generator (main_zeroshot.py writes <run dir>/generator/) de-normalised with its teacher's stats
    torch.manual_seed(0)
    zg = Generator(z_dim=10, img_size=8, channels=1)
    save_generator(zg, tmp_path / "zs_run" / "generator", {"mean": [0.3], "std": [0.38]})
    zs, zmeta = load_generator(tmp_path / "zs_run", 8, 1)  # the run dir is enough
    assert isinstance(zs, ZeroShotSource) and zmeta["generator"] == "zeroshot"
    z = torch.randn(4, 10, generator=rng())
    assert torch.allclose(zs.sample(4, rng()), zg(z) * 0.38 + 0.3)


def test_bad_generators_and_ratios(tmp_path):
    save_generator(CondGenerator(img_size=32, channels=3, width=8), tmp_path / "cifar_gan", {})
    with pytest.raises(UserError, match=r"makes 3x32x32 images but the dataset has 1x8x8"):
        load_generator(tmp_path / "cifar_gan", 8, 1)
    save_checkpoint(_net(0), tmp_path / "clf", {"name": "clf"})
    with pytest.raises(UserError, match=r"is not a generator \(a mlp classifier\)"):
        load_generator(tmp_path / "clf", 8, 1)
    with pytest.raises(UserError, match="holds no generator"):
        load_generator(tmp_path / "nothing", 8, 1)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(UserError, match=rf"method.synth_ratio={bad} must be in \[0, 1\)"):
            _kl(bad)
    with pytest.raises(UserError, match="needs a generator"):
        KL(_net(1), _net(2), synth_ratio=0.2)


def test_gan_step_updates_each_net_with_its_own_loss():
    import copy

    torch.manual_seed(0)
    g, d = CondGenerator(8, 8, 1, 10, 8), SNDiscriminator(8, 1, 10, 8)
    g0, d0 = copy.deepcopy(g), copy.deepcopy(d)  # the state before the step (spectral-norm vectors included)
    m = GANTraining(g, d, seed=0).train()
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    loss, logs = m.loss(Batch(x, y, None))
    loss.backward()
    assert torch.allclose(loss, logs["d_loss"] + logs["g_loss"])
    # replay the step by hand: D's gradient is that of the hinge loss alone, G's that of -D(G(z)) alone
    g0.train(), d0.train()
    z, yf = g0.inputs(6, GANTraining(g0, d0, seed=0).draws.next())
    fake = g0(z, yf)
    (torch.relu(1 - d0(x, y)).mean() + torch.relu(1 + d0(fake.detach(), yf)).mean()).backward()
    for p in d0.parameters():
        p.requires_grad_(False)
    (-d0(fake, yf).mean()).backward()
    for (n, p), p0 in zip(d.named_parameters(), d0.parameters()):
        assert torch.allclose(p.grad, p0.grad, atol=1e-6), n
    for (n, p), p0 in zip(g.named_parameters(), g0.parameters()):
        assert p.grad.abs().sum() > 0 and torch.allclose(p.grad, p0.grad, atol=1e-6), n


# ------------------------------------------------------------------------------------------- the fidelity study
def _runs(tmp_path):
    """Real transfer runs on digits without any zoo training: two checkpoint teachers (one, and an ensemble of
    three), a fresh student, plain / mixup / synthetic data (a saved random generator), 2 seeds, 4 steps each."""
    from src.experiments import transfer

    for i in range(3):
        save_checkpoint(_net(10 + i, "lenet"), tmp_path / f"t{i}", {"name": f"t{i}", "dataset": {"channels": 1,
                                                                                              "image_size": 8}})
    save_generator(_source().generator, tmp_path / "gen", {})
    teachers = {"one": f"{tmp_path}/t0", "three": f"[{tmp_path}/t0,{tmp_path}/t1,{tmp_path}/t2]"}
    runs = []
    for tname, t in teachers.items():
        for data in ("plain", "mixup", "synth"):
            for seed in (0, 1):
                d = tmp_path / "runs" / f"{tname}_{data}_{seed}"
                cfg = compose("transfer/fidelity", [f"teacher={t}", f"distill_data={data}", f"trainer.seed={seed}",
                                                    f"method.synth_source={tmp_path}/gen", "trainer.max_steps=4",
                                                    "trainer.progress=off", f"paths.checkpoints={tmp_path}/ck",
                                                    f"paths.cache={tmp_path}/cache"])
                (d / ".hydra").mkdir(parents=True)
                OmegaConf.save(cfg, d / ".hydra" / "config.yaml")  # as Hydra writes it (interpolations kept)
                transfer.run(cfg, run_dir=d)
                runs.append({"dir": str(d), "cfg": OmegaConf.to_container(OmegaConf.load(d / ".hydra" /
                                                                                         "config.yaml")),
                             "summary": json.loads((d / "summary.json").read_text())})
    return runs


@pytest.mark.slow
def test_fidelity_table_and_figure_on_real_runs(tmp_path):
    runs = _runs(tmp_path)
    s = runs[0]["summary"]
    for k in ("agreement_after", "kl_teacher_student", "train_agreement", "train_kl", "train_student_acc"):
        assert k in s and math.isfinite(s[k])
    assert 0 <= s["train_agreement"] <= 100 and s["train_kl"] >= 0
    rows = fidelity_table(runs)
    assert [(r["teacher"], r["data"]) for r in rows] == [
        ("self-distillation", "as is"), ("self-distillation", "mixup 1"), ("self-distillation", "synthetic 0.2"),
        ("ensemble of 3", "as is"), ("ensemble of 3", "mixup 1"), ("ensemble of 3", "synthetic 0.2")]
    for r, pair in zip(rows, [runs[i:i + 2] for i in range(0, 12, 2)]):
        vals = [p["summary"]["agreement_after"] for p in pair]
        assert r["runs"] == 2 and r["seeds"] == [0, 1]
        assert r["test_agreement_mean"] == pytest.approx(sum(vals) / 2)
        assert r["test_agreement_std"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
        assert r["train_kl_mean"] >= 0
    table = format_table(rows)
    assert table.count("\n") == 7 and "ensemble of 3 | synthetic 0.2 | 2 |" in table
    path = plot_fidelity(rows, tmp_path / "plots" / "fidelity.png")
    assert path.is_file() and path.stat().st_size > 5000
    # the results aggregator finds the study in the run dirs and writes the same table and the figure
    tables, _ = load_script("aggregate").main([str(tmp_path / "runs"), "--out", str(tmp_path / "agg")])
    assert [(r["teacher"], r["data"], r["runs"]) for r in tables["fidelity"]] == [
        (r["teacher"], r["data"], r["runs"]) for r in rows]
    md = (tmp_path / "agg" / "results.md").read_text()
    assert (tmp_path / "agg" / "figures" / "fidelity.png").is_file() and "## fidelity" in md
    assert "transfer_methods" not in md and "transfer_pairs" not in md  # no method comparison in a fidelity sweep


def test_settings_are_read_from_the_config():
    zoo = {"models": {"lenet": {"arch": "lenet"}, "mlp_small": {"arch": "mlp"}}}
    fresh = {"arch": "lenet", "name": "lenet"}
    assert teacher_setting({"teacher": "lenet", "student": fresh, "zoo": zoo}) == "self-distillation"
    assert teacher_setting({"teacher": "mlp_small", "student": fresh, "zoo": zoo}) == "teacher mlp_small"
    assert teacher_setting({"teacher": ["a", "b", "c"], "student": fresh}) == "ensemble of 3"
    assert data_setting({"method": {"mixup_alpha": 0.0, "synth_ratio": 0.0}}) == "as is"
    assert data_setting({"method": {"mixup_alpha": 1.0, "synth_ratio": 0.2}}) == "mixup 1 + synthetic 0.2"
    rows = fidelity_table([{"cfg": {"teacher": "a", "student": "b", "method": {}},
                            "summary": {"agreement_after": 90.0, "seed": 0}},
                           {"cfg": {"teacher": "a", "student": "b"}, "summary": {"status": "skipped"}}])
    assert len(rows) == 1 and rows[0]["test_agreement_mean"] == 90.0 and rows[0]["test_agreement_std"] == 0.0


def test_frechet_distance_by_hand():
    from src.metrics.generative import frechet_distance

    a, b = torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [3.0]])  # means 1, 2; unbiased variances 2, 2
    assert frechet_distance(a, b) == pytest.approx(1.0 + 2 + 2 - 2 * 2.0, abs=1e-9)
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(x, x + 1) == pytest.approx(4.0, abs=1e-6)  # a shift only moves the means


def test_main_pretrain_trains_the_zoo_generator(tmp_path):
    """`main_pretrain.py name=gan` (2 epochs, a judge trained on demand): zoo folder with a loadable generator and its
    sample quality in meta.json, the GAN's losses in metrics.jsonl, a sample grid PNG in the run dir."""
    from src.experiments import pretrain

    ck = tmp_path / "ck"
    cfg = compose("pretrain/pretrain", ["name=gan", "zoo.generators.gan.epochs=2", "zoo.generators.gan.eval_every=1",
                                        "+zoo.generators.gan.n_eval=200", "+zoo.models.lenet.epochs=2",
                                        f"paths.checkpoints={ck}", f"paths.cache={tmp_path}/cache",
                                        "trainer.progress=off"])
    summary = pretrain.run(cfg, run_dir=tmp_path / "run")
    row = summary["models"]["gan"]
    assert row["kind"] == "generator" and 0 <= row["judge_acc"] <= 100 and row["fid"] >= 0 <= row["fid_real"]
    source, meta = load_generator(ck / "digits" / "gan", 8, 1)
    assert meta["judge"] == "lenet" and meta["steps"] == 2 * (720 // 64)  # drop_last: 11 batches of 720 images
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/d_loss" in x] == [11, 22]
    assert all(math.isfinite(x["train/g_loss"]) and "quality/fid" in x for x in lines if "train/d_loss" in x)
    grid = tmp_path / "run" / "plots" / "gan_samples.png"
    assert grid.is_file() and grid.read_bytes()[:4] == b"\x89PNG"
    assert min(Image.open(grid).size) > 300  # 10 labelled rows of 8 samples
    x = source.sample(5, torch.Generator().manual_seed(0))
    assert x.shape == (5, 1, 8, 8)
