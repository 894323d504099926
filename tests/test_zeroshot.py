"""Zero-shot KT (docs/REFERENCE.md §4): generator, losses by hand, the adversarial step protocol inside the Trainer,
resume equivalence, transition curves / MTE, and a tiny end-to-end run."""
import json
import math

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from conftest import compose
from src.batch import Batch
from src.engine import Trainer
from src.errors import Preempted, UserError
from src.io_utils import save_safetensors
from src.data import NoiseBatches
from src.methods.zeroshot import (KDAT, ZeroShot, attention_loss, attention_map, kl_mean,
                                  logits_and_stages)
from src.metrics.transition import mean_transition_error, transition_batch, transition_curves
from src.models import ImageInputs, create_model
from src.models.generator import Generator
from src.schema import OptimizerConfig, SchedulerConfig, TrainerConfig


def wrn(arch="wrn_16_1", seed=0, channels=1):
    torch.manual_seed(seed)
    return create_model(arch, ImageInputs(10, channels, [0.3] * channels, [0.38] * channels, 8))


# ------------------------------------------------------------------------------------------------ generator
@pytest.mark.parametrize("size,channels", [(8, 1), (32, 3)])
def test_generator_output_shape_and_architecture(size, channels):
    g = Generator(100, size, channels)
    x = g(torch.randn(5, 100))
    assert x.shape == (5, channels, size, size)
    assert g.linear.in_features == 100 and g.linear.out_features == 128 * (size // 4) ** 2
    kinds = [type(m).__name__ for m in g.modules() if not isinstance(m, (nn.Sequential, Generator))]
    assert kinds == ["Linear", "BatchNorm2d", "Upsample", "Conv2d", "BatchNorm2d", "LeakyReLU", "Upsample", "Conv2d",
                     "BatchNorm2d", "LeakyReLU", "Conv2d", "BatchNorm2d"]  # no tanh
    convs = [m for m in g.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == \
        [(128, 128, (3, 3)), (128, 64, (3, 3)), (64, channels, (3, 3))]
    assert all(m.negative_slope == 0.2 for m in g.modules() if isinstance(m, nn.LeakyReLU))
    assert g.bn_out.affine and g.bn_out.num_features == channels
    # batch statistics only: the output is normalised per channel (affine starts at identity), no buffers
    assert x.mean((0, 2, 3)).abs().max() < 1e-4 and (x.var((0, 2, 3), unbiased=False) - 1).abs().max() < 1e-2
    assert len(list(g.buffers())) == 0


def test_generator_rejects_sizes_it_cannot_make():
    with pytest.raises(UserError, match="image_size=10"):
        Generator(100, 10, 1)


def test_teacher_sees_the_generator_output_as_its_normalised_input():
    teacher, student = wrn("wrn_16_2", 1), wrn("wrn_16_1", 2)
    teacher.mean.fill_(0.7), teacher.std.fill_(0.2)  # statistics of its own, unlike the student's
    m = ZeroShot(student, teacher, Generator(100, 8, 1), beta=0)
    z = torch.randn(6, 100)
    x_raw = m.images(z)
    g = m.generator(z)
    assert torch.allclose(teacher(x_raw), teacher.forward_normalized(g), atol=1e-5)  # = what the paper's teacher sees
    assert torch.allclose(teacher.normalize(x_raw), g, atol=1e-5)


# ------------------------------------------------------------------------------------------------ losses by hand
def test_kl_is_teacher_to_student_with_mean_over_all_elements():
    zt = torch.tensor([[0.0, math.log(3.0)]])  # p_t = (1/4, 3/4)
    zs = torch.zeros(1, 2)  # p_s = (1/2, 1/2)
    forward = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # KL(t || s) = 0.130812
    assert kl_mean(zs, zt).item() == pytest.approx(forward / 2, abs=1e-6)  # / (B * K) = 2 elements
    reverse = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_mean(zt, zs).item() == pytest.approx(reverse / 2, abs=1e-6)  # the other direction differs
    two = torch.cat([zt, zt]), torch.cat([zs, zt])  # a second sample with KL 0 halves the mean again
    assert kl_mean(two[1], two[0]).item() == pytest.approx(forward / 4, abs=1e-6)


def test_attention_by_hand():
    s = torch.zeros(1, 2, 1, 2)
    s[0, :, 0, 0] = torch.tensor([1.0, 1.0])  # channel mean of x^2: (1, 0) -> normalised (1, 0)
    t = torch.zeros(1, 2, 1, 2)
    t[0, 0, 0, :] = torch.tensor([2.0, 2.0])  # channel mean of x^2: (2, 2) -> normalised (1/sqrt2, 1/sqrt2)
    assert torch.allclose(attention_map(s), torch.tensor([[1.0, 0.0]]))
    r = 1 / math.sqrt(2)
    diff = ((1 - r) ** 2 + r ** 2) / 2
    assert attention_loss([s], [t], 250.0).item() == pytest.approx(250 * diff, rel=1e-6)
    assert attention_loss([s, s], [t, s], 250.0).item() == pytest.approx(250 * diff, rel=1e-6)  # sum of stages


def test_kd_at_loss_is_kd_plus_ce_plus_attention():
    torch.manual_seed(0)
    teacher, student = wrn("wrn_16_2", 1), wrn("wrn_16_1", 2)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    m = KDAT(student, teacher)  # alpha 0.9, T 4, beta 1000
    student.eval()
    loss, logs = m.loss(Batch(x, y, None))
    zt, at_t = logits_and_stages(teacher, x, True)
    zs, at_s = logits_and_stages(student, x, True)
    pt, log_ps = (zt / 4).softmax(1), (zs / 4).log_softmax(1)
    kd = 16 * (pt * (pt.log() - log_ps)).sum(1).mean()
    ce = nn.functional.cross_entropy(zs, y)
    at = 1000 * sum(((attention_map(a) - attention_map(b)) ** 2).mean() for a, b in zip(at_s, at_t))
    assert loss.item() == pytest.approx((0.9 * kd + 0.1 * ce + at).item(), rel=1e-5)
    assert logs["attention"].item() == pytest.approx(at.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------ the loop
def trainer_cfgs(epochs, **trainer):
    t = OmegaConf.merge(OmegaConf.structured(TrainerConfig),
                        {"epochs": epochs, "grad_clip": 5.0, "device": "cpu", "progress": "off", **trainer})
    o = OmegaConf.merge(OmegaConf.structured(OptimizerConfig), {"name": "adam", "lr": 2e-3, "weight_decay": 0.0})
    s = OmegaConf.merge(OmegaConf.structured(SchedulerConfig), {"name": "cosine"})
    return t, o, s


def make_method(n_g=1, n_s=3, beta=250.0, seed=0):
    teacher, student = wrn("wrn_16_2", 1), wrn("wrn_16_1", 2)
    torch.manual_seed(seed)
    return ZeroShot(student, teacher, Generator(100, 8, 1), n_g=n_g, n_s=n_s, beta=beta)


def test_one_iteration_is_n_g_generator_steps_then_n_s_student_steps(tmp_path):
    m = make_method(n_g=1, n_s=3)
    calls = {"teacher": 0, "gen_grads": 0, "student_grads": 0}
    m.teacher.model.net.stem.register_forward_hook(lambda *a: calls.__setitem__("teacher", calls["teacher"] + 1))
    m.generator.out.weight.register_hook(lambda g: calls.__setitem__("gen_grads", calls["gen_grads"] + 1))
    m.student.net.stem.weight.register_hook(lambda g: calls.__setitem__("student_grads", calls["student_grads"] + 1))
    trainer = Trainer(m, NoiseBatches(16, 100, m.steps_per_batch), *trainer_cfgs(1), tmp_path)
    trainer.fit()
    assert trainer.total_steps == 4
    opt = trainer.optimizer
    gen_steps = {int(opt.state[p]["step"]) for p in m.generator.parameters()}
    student_steps = {int(opt.state[p]["step"]) for p in m.student.parameters()}
    assert gen_steps == {1} and student_steps == {3}  # Adam steps taken per parameter
    assert calls == {"teacher": 2, "gen_grads": 1, "student_grads": 3}  # teacher: generator step + once for n_s
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]  # cosine to 0 over the pseudo-batches
    assert [g["initial_lr"] for g in opt.param_groups] == [2e-3, 1e-3]


@pytest.mark.trained
def test_generator_steps_increase_the_disagreement_on_a_fixed_z():
    m = make_method(beta=0.0)
    m.train()
    z = torch.randn(32, 100)
    opt = torch.optim.Adam(m.generator.parameters(), lr=1e-2)

    def kl():
        with torch.no_grad():
            x = m.images(z)
            return kl_mean(m.student(x), m.teacher.model(x)).item()

    kls = [kl()]
    for _ in range(5):
        loss, logs = m.loss(Batch(z, extra={"phase": 0, "pseudo_batch": 0}))
        assert loss.item() == pytest.approx(-logs["generator_kl"].item() / m.steps_per_batch, rel=1e-5)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in m.student.parameters())  # only the generator learns here
        opt.step()
        kls.append(kl())
    assert kls[-1] > 1.2 * kls[0], kls


def test_resume_after_a_kill_mid_pseudo_batch_is_bit_exact(tmp_path):
    def run(run_dir, stop_at=None):
        m = make_method(n_g=1, n_s=3)
        trainer = Trainer(m, NoiseBatches(16, 100, m.steps_per_batch, seed=3), *trainer_cfgs(3, eval_every=10),
                          run_dir)
        if stop_at:
            m.after_step = lambda step: trainer.request_stop() if step == stop_at else None
        trainer.fit()
        return m

    full = run(tmp_path / "full")
    with pytest.raises(Preempted):
        run(tmp_path / "killed", stop_at=6)  # inside pseudo-batch 2: after its generator step and one student step
    resumed = run(tmp_path / "killed")
    for name in ("student", "generator"):
        a, b = getattr(full, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_noise_batches_repeat_z_within_a_pseudo_batch_and_reproduce_it():
    nb = NoiseBatches(4, 10, 3, seed=1)
    batches = list(nb.iter_epoch(5))
    assert [(b.extra["phase"], b.extra["pseudo_batch"]) for b in batches] == [(0, 5), (1, 5), (2, 5)]
    assert all(torch.equal(batches[0].inputs, b.inputs) for b in batches)
    assert torch.equal(next(nb.iter_epoch(5, 2)).inputs, batches[0].inputs) and not torch.equal(nb.z(6), nb.z(5))


# ------------------------------------------------------------------------------------------------ transition
def test_transition_batch_is_every_image_with_every_other_class():
    x = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 1, 8, 8)
    xs, targets, image = transition_batch(x, torch.tensor([0, 4, 9]), 10)
    assert xs.shape == (27, 1, 8, 8)
    assert image.tolist() == [0] * 9 + [1] * 9 + [2] * 9
    assert targets[:9].tolist() == list(range(1, 10)) and 4 not in targets[9:18].tolist()
    assert targets[18:].tolist() == list(range(9))
    assert torch.equal(xs[:, 0, 0, 0], image.float())


@pytest.mark.trained
def test_transition_curves_and_mte():
    s, t = wrn("wrn_16_1", 0).eval(), wrn("wrn_16_1", 5).eval()
    x = torch.rand(4, 1, 8, 8)
    labels = s(x).argmax(1)
    same = transition_curves(s, s, x, labels, 10, steps=6)
    assert same["student"].shape == (6, 36) and same["teacher"].shape == (6, 36)
    assert mean_transition_error(same["student"], same["teacher"], 6) == 0.0  # identical models: MTE 0
    other = transition_curves(s, t, x, labels, 10, steps=6, chunk=10)  # 4 chunks of at most 10 inputs
    assert torch.allclose(other["student"], same["student"], atol=1e-5)  # chunking changes nothing
    mte = mean_transition_error(other["student"], other["teacher"], 3)
    assert mte == pytest.approx((other["student"][:3] - other["teacher"][:3]).abs().mean().item())
    assert mte > 0
    ps = same["student"].mean(1)
    assert ps[-1] > ps[0]  # the steps move the student towards class j


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.trained
def test_end_to_end_tiny_run(kt_paths, tmp_path):
    from src.experiments import zeroshot

    teacher = wrn("wrn_16_2", 7)
    save_safetensors(teacher.state_dict(), tmp_path / "teacher.safetensors")
    spec = f"wrn_16_2@{tmp_path / 'teacher.safetensors'}"  # students start as the teacher: they agree (MTE defined)
    cfg = compose("zeroshot/zeroshot", [*kt_paths, f"teacher={spec}", f"student={spec}",
                                        "pseudo_batches=2", "method.n_s=2", "trainer.eval_every=1",
                                        "loader.batch_size=16", "few_shot.trainer.epochs=1", "shots_per_class=2",
                                        "transition.n_images=3", "transition.steps=4", "transition.mte_steps=2"])
    run_dir = tmp_path / "run"
    s = zeroshot.run(cfg, run_dir=run_dir)
    saved = json.loads((run_dir / "summary.json").read_text())
    for k in ("teacher_acc", "zeroshot_acc", "kd_at_acc", "scratch_acc", "mte_zeroshot", "mte_kd_at",
              "mte_scratch", "pseudo_batches"):
        assert k in saved and saved[k] == s[k], k
    assert s["zeroshot_steps"] == 2 * 3 and s["pseudo_batches"] == 2
    for name in ("zeroshot", "kd_at", "scratch"):
        assert (run_dir / "plots" / f"transition_{name}.png").stat().st_size > 1000
        assert 0 <= s[f"mte_{name}"] <= 1
    for name in ("transition_grid", "pseudo_images"):  # one panel per student; the generator's images, labelled
        assert (run_dir / "plots" / f"{name}.png").stat().st_size > 5000
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(l["step"], l["stage"]) for l in lines] == [(3, 0), (6, 0), (8, 1), (10, 2)]  # baselines: 20 images, 2 steps
    assert lines[1]["eval/zeroshot_acc"] == pytest.approx(s["zeroshot_acc"])
    assert (run_dir / "student" / "model.safetensors").is_file()
    again = zeroshot.run(cfg, run_dir=run_dir)  # everything finished: resumes, retrains nothing, same numbers
    assert again["zeroshot_acc"] == s["zeroshot_acc"] and again["mte_zeroshot"] == s["mte_zeroshot"]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4


def test_attention_transfer_needs_stages(kt_paths, tmp_path):
    from src.experiments import zeroshot

    cfg = compose("zeroshot/zeroshot", [*kt_paths, "teacher=mlp_small"])
    with pytest.raises(UserError, match="set method.beta=0"):
        zeroshot.run(cfg, run_dir=tmp_path)
    assert not (tmp_path / "summary.json").exists()


def test_a_run_killed_in_a_baseline_resumes_to_the_same_results(kt_paths, tmp_path, monkeypatch):
    from src.engine import preemption
    from src.experiments import zeroshot

    save_safetensors(wrn("wrn_16_2", 7).state_dict(), tmp_path / "teacher.safetensors")
    spec = f"wrn_16_2@{tmp_path / 'teacher.safetensors'}"
    cfg = compose("zeroshot/zeroshot", [*kt_paths, f"teacher={spec}", f"student={spec}", "pseudo_batches=2",
                                        "method.n_s=2", "loader.batch_size=16", "few_shot.trainer.epochs=2",
                                        "few_shot.trainer.eval_every=1", "shots_per_class=2",
                                        "transition.n_images=3", "transition.steps=3", "transition.mte_steps=2"])
    full = zeroshot.run(cfg, run_dir=tmp_path / "full")
    with monkeypatch.context() as m:  # a SIGTERM-like stop request after the first kd_at step
        m.setattr(KDAT, "after_step", lambda self, step: preemption.STOP_REQUESTED.set() if step == 1 else None)
        with pytest.raises(Preempted):
            zeroshot.run(cfg, run_dir=tmp_path / "killed")
    preemption.STOP_REQUESTED.clear()
    assert not (tmp_path / "killed" / "summary.json").exists()
    resumed = zeroshot.run(cfg, run_dir=tmp_path / "killed")
    for k in ("zeroshot_acc", "kd_at_acc", "scratch_acc", "mte_zeroshot", "mte_kd_at", "mte_scratch"):
        assert resumed[k] == full[k], k
    lines = [[json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
             for d in ("killed", "full")]
    assert lines[0] == lines[1] and len(lines[0]) == 1 + 2 + 2  # every evaluation logged once, same numbers
