"""Multiple teachers (main_multi_teacher.py): parallel routing, sequential order and the reset between stages,
soups, ensemble teachers, each mode end to end on digits, and resume in the middle of a sequence."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import ROOT, compose

from src.batch import Batch
from src.engine import Trainer
from src.errors import UserError
from src.experiments import multi_teacher as mtx
from src.methods import (KL, EnsembleTeacher, MultiKLDP, kl_to_target, mean_softmax_logits, multi_route,
                         recompute_bn_stats, route_shares, uniform_soup)


class Fixed(nn.Module):
    """A 'model' that returns fixed logits for the samples of a batch (x holds their row numbers)."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("z", logits.clone().float())
        self.w = nn.Parameter(torch.zeros(()))  # something trainable, for the student role

    def forward(self, x):
        return self.z[x.long().view(-1)] + 0 * self.w


# rows: samples; true label 0 everywhere. Winner by true-label probability: frozen, t1, t2, tie -> frozen, t1
P_FROZEN = [[.8, .1, .1], [.5, .25, .25], [.4, .3, .3], [.6, .2, .2], [.5, .25, .25]]
P_T1 = [[.6, .2, .2], [.9, .05, .05], [.5, .25, .25], [.6, .2, .2], [.7, .15, .15]]
P_T2 = [[.2, .4, .4], [.3, .35, .35], [.7, .15, .15], [.3, .35, .35], [.05, .9, .05]]


def _logits(p):
    return torch.tensor(p).log()


def test_parallel_routing_picks_the_most_confident_source_per_sample():
    zf, zt = _logits(P_FROZEN), torch.stack([_logits(P_T1), _logits(P_T2)])
    y = torch.zeros(5, dtype=torch.long)
    assert multi_route(zt, zf, y, "most-conf").tolist() == [0, 1, 2, 0, 1]
    # unsupervised: max probability; sample 4's t2 is confident and wrong, so it wins without labels
    assert multi_route(zt, zf, None, "most-conf_u").tolist() == [0, 1, 2, 0, 2]
    assert multi_route([_logits(P_T1), _logits(P_T2)], zf, y).tolist() == [0, 1, 2, 0, 1]  # a list works too
    # the true label matters: with label 1 on sample 0, t2 (0.4) beats frozen and t1
    assert multi_route(zt, zf, torch.tensor([1, 0, 0, 0, 0]), "most-conf")[0].item() == 2
    assert route_shares(torch.tensor([0, 1, 2, 0, 1]), 2).tolist() == pytest.approx([0.4, 0.4, 0.2])
    with pytest.raises(UserError):
        multi_route(zt, zf, None, "most-conf")
    with pytest.raises(UserError):
        multi_route(zt, zf, y, "pos_flips")


def test_multi_kldp_loss_distils_each_sample_from_its_routed_source():
    zf, t1, t2 = _logits(P_FROZEN), _logits(P_T1), _logits(P_T2)
    zs = torch.randn(5, 3)
    m = MultiKLDP(Fixed(zs), [Fixed(t1), Fixed(t2)], Fixed(zf), partition="most-conf", temperature=2.0,
                  names=["a", "b"])
    x, y = torch.arange(5).float(), torch.zeros(5, dtype=torch.long)
    loss, logs = m.loss(Batch(x, y, torch.arange(5)))
    chosen = torch.stack([[zf, t1, t2][s][i] for i, s in enumerate([0, 1, 2, 0, 1])])
    expect = kl_to_target(zs, (chosen / 2.0).softmax(1), 2.0).mean()
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    assert logs["route_student"].item() == pytest.approx(0.4) and logs["route_b"].item() == pytest.approx(0.2)
    # a student that already predicts each routed target has zero loss
    m2 = MultiKLDP(Fixed(chosen), [Fixed(t1), Fixed(t2)], Fixed(zf))
    assert m2.loss(Batch(x, y, torch.arange(5)))[0].item() == pytest.approx(0.0, abs=1e-6)
    # cached outputs (per sample id) are used instead of running the frozen models
    m3 = MultiKLDP(Fixed(zs), [Fixed(torch.zeros(5, 3)), Fixed(torch.zeros(5, 3))], Fixed(torch.zeros(5, 3)),
                   teacher_caches=[{"logits": t1}, {"logits": t2}], frozen_student_cache={"logits": zf},
                   temperature=2.0)
    assert m3.loss(Batch(x, y, torch.arange(5)))[0].item() == pytest.approx(expect.item(), rel=1e-5)
    # frozen models stay out of checkpoints; only the student is saved
    assert all(k.startswith("student.") for k in m.state_dict())
    assert len(m.frozen_modules()) == 3
    with pytest.raises(UserError):
        MultiKLDP(Fixed(zs), [Fixed(t1)], Fixed(zf), partition="neutral_avg")


def test_multi_kldp_value_by_hand():
    """Regression value: one sample, uniform student, frozen [.6,.4], t1 [.7,.3], t2 [.2,.8]."""
    import math

    zf, t1, t2 = _logits([[.6, .4]]), _logits([[.7, .3]]), _logits([[.2, .8]])
    m = MultiKLDP(Fixed(torch.zeros(1, 2)), [Fixed(t1), Fixed(t2)], Fixed(zf))
    x, idx = torch.zeros(1), torch.arange(1)
    kl = lambda p: sum(pi * math.log(pi / 0.5) for pi in p)  # noqa: E731
    assert m.loss(Batch(x, torch.tensor([0]), idx))[0].item() == pytest.approx(kl([.7, .3]), abs=1e-6)  # t1 wins
    assert m.loss(Batch(x, torch.tensor([1]), idx))[0].item() == pytest.approx(kl([.2, .8]), abs=1e-6)  # t2 wins
    mu = MultiKLDP(Fixed(torch.zeros(1, 2)), [Fixed(t1), Fixed(t2)], Fixed(zf), partition="most-conf_u")
    assert mu.loss(Batch(x, torch.tensor([0]), idx))[0].item() == pytest.approx(kl([.2, .8]), abs=1e-6)  # max prob


def test_sequential_order_by_accuracy():
    accs = [93.0, 92.5, 97.8, 93.0]
    assert mtx.order_teachers(accs, "ascending") == [1, 0, 3, 2]
    assert mtx.order_teachers(accs, "descending") == [2, 0, 3, 1]  # equal accuracies keep the listed order
    assert mtx.order_teachers(accs, "listed") == [0, 1, 2, 3]
    with pytest.raises(UserError):
        mtx.order_teachers(accs, "random")


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_soup_of_identical_students_is_that_student():
    a = _bn_net()
    a.train()
    a(torch.randn(32, 4))  # non-trivial BN statistics
    b = _bn_net()
    b.load_state_dict(a.state_dict())
    soup = uniform_soup([a, b])
    for k, v in a.state_dict().items():
        assert torch.equal(soup[k], v), k
    c = _bn_net()
    c.load_state_dict(soup)
    a.eval(), c.eval()
    x = torch.randn(10, 4)
    assert torch.equal(a(x), c(x))
    # different members: the uniform mean of the weights
    d = _bn_net()
    with torch.no_grad():
        d[0].weight.add_(1.0)
    assert torch.allclose(uniform_soup([a, d])["0.weight"], (a[0].weight + d[0].weight) / 2)
    with pytest.raises(UserError):
        uniform_soup([a, nn.Sequential(nn.Linear(4, 3))])


def test_bn_statistics_are_recomputed_on_data():
    net = _bn_net()
    data = [torch.randn(16, 4) * 3 + 1 for _ in range(4)]
    n = recompute_bn_stats(net, [Batch(x, None, torch.arange(len(x))) for x in data])
    assert n == 64
    with torch.no_grad():
        h = [net[0](x) for x in data]
    # exact averages over the batches (momentum None), not an exponential moving average
    assert torch.allclose(net[1].running_mean, torch.stack([b.mean(0) for b in h]).mean(0), atol=1e-5)
    assert torch.allclose(net[1].running_var, torch.stack([b.var(0) for b in h]).mean(0), atol=1e-4)
    assert net[1].momentum == 0.1  # restored


def test_ensemble_teacher_is_the_mean_softmax():
    torch.manual_seed(0)
    z1, z2, z3 = torch.randn(6, 5) * 3, torch.randn(6, 5), torch.randn(6, 5) * 0.1
    ens = EnsembleTeacher([Fixed(z1), Fixed(z2), Fixed(z3)])
    x = torch.arange(6).float()
    mean_p = (z1.softmax(1) + z2.softmax(1) + z3.softmax(1)) / 3
    out = ens(x)
    assert torch.allclose(out, mean_p.log(), atol=1e-6)  # log of the mean softmax as the logits
    assert torch.allclose(out.softmax(1), mean_p, atol=1e-6)
    assert torch.allclose(mean_softmax_logits(torch.stack([z1, z2, z3])), mean_p.log(), atol=1e-6)
    # the single-teacher KL distils the ensemble unchanged: a student predicting the mean softmax has zero loss
    kl = KL(Fixed(mean_p.log()), ens)
    assert kl.loss(Batch(x, torch.zeros(6, dtype=torch.long), None))[0].item() == pytest.approx(0.0, abs=1e-6)
    assert all(k.startswith("student.") for k in kl.state_dict())


# ------------------------------------------------------------------------------------------------ end to end

TEACHERS = "teachers=[mlp_small,lenet]"


def _cfg(digits_zoo, mode, *extra):
    return compose("multi_teacher/multi_teacher", [*digits_zoo, f"mode={mode}", TEACHERS, "student=resnet8",
                                                   "trainer.epochs=1", "trainer.progress=off", *extra])


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class SpyTrainer(Trainer):
    """Records, for every stage, what the Trainer starts from: optimiser state, frozen student, student."""
    calls: list = []

    def fit(self):
        m = self.method
        rec = {"name": self.name, "optimizer": id(self.optimizer), "opt_state": len(self.optimizer.state),
               "student_start": _state(m.student),
               "frozen": _state(m.frozen_student.model) if m.frozen_student is not None else None}
        out = super().fit()
        rec.update(student_end=_state(m.student), resumed_at=None)
        SpyTrainer.calls.append(rec)
        return out


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sequential_end_to_end_resets_between_stages(digits_zoo, tmp_path, monkeypatch):
    import src.experiments.context as tr  # every family builds its Trainer through Context.trainer

    SpyTrainer.calls = []
    monkeypatch.setattr(tr, "Trainer", SpyTrainer)
    cfg = _cfg(digits_zoo, "sequential", "order=descending")
    s = mtx.run(cfg, run_dir=tmp_path)
    calls = SpyTrainer.calls
    assert s["status"] == "ok" and s["order"] == ["lenet", "mlp_small"]  # lenet is the more accurate one
    assert [c["name"] for c in calls] == ["stage1_lenet", "stage2_mlp_small"]
    # a fresh optimiser per stage, nothing resumed
    assert all(c["opt_state"] == 0 for c in calls) and calls[0]["optimizer"] != calls[1]["optimizer"]
    # stage 1's student-teacher is the initial student; stage 2's is the student after stage 1
    assert _same(calls[0]["frozen"], calls[0]["student_start"])
    assert _same(calls[1]["frozen"], calls[0]["student_end"])
    assert _same(calls[1]["student_start"], calls[0]["student_end"])
    assert not _same(calls[1]["frozen"], calls[0]["frozen"])
    # outputs: one row per stage, each with metrics against every teacher and the ensemble
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["teacher"] for r in summary["stages"]] == ["lenet", "mlp_small"]
    for r in summary["stages"]:
        for ref in ("mlp_small", "lenet", "ensemble"):
            assert f"vs_{ref}/agreement" in r and f"vs_{ref}/positive_flips" in r
        assert "dp_share_teacher" in r["stage_transfer"] and r["steps"] > 0
    assert summary["student_acc_after"] == pytest.approx(summary["stages"][-1]["student_acc_after"])
    assert summary["steps"] == sum(r["steps"] for r in summary["stages"])
    for k in (1, 2):
        assert (next((tmp_path / "stages").glob(f"{k}_*")) / "row.json").is_file()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == summary["steps"]  # stage steps are offset, not repeated


class Killed(Exception):
    pass


class KilledInStage2(Trainer):
    """Dies right after its first mid-run checkpoint in the second stage (sequential `stage2_*`, soup `soup2_*`)."""

    def save(self):
        d = super().save()
        if self.name.startswith(("stage2", "soup2")) and self.step < self.total_steps:
            raise Killed(f"killed at step {self.step}")
        return d


class ResumeSpy(Trainer):
    resumed: list = []

    def try_resume(self):
        ok = super().try_resume()
        ResumeSpy.resumed.append((self.name, ok, self.step))
        return ok


def test_sequential_resumes_in_the_stage_it_was_killed_in(digits_zoo, tmp_path, monkeypatch):
    import src.experiments.context as tr  # every family builds its Trainer through Context.trainer

    cfg = _cfg(digits_zoo, "sequential", "order=listed", "trainer.epochs=2")
    monkeypatch.setattr(tr, "Trainer", KilledInStage2)
    with pytest.raises(Killed):
        mtx.run(cfg, run_dir=tmp_path)
    assert (tmp_path / "stages" / "1_mlp_small" / "row.json").is_file()
    assert not (tmp_path / "stages" / "2_lenet").exists()
    row1 = json.loads((tmp_path / "stages" / "1_mlp_small" / "row.json").read_text())
    ResumeSpy.resumed = []
    monkeypatch.setattr(tr, "Trainer", ResumeSpy)
    s = mtx.run(cfg, run_dir=tmp_path)
    # stage 1 is skipped (no trainer), stage 2 continues from its own checkpoint after one epoch
    assert len(ResumeSpy.resumed) == 1
    name, ok, step = ResumeSpy.resumed[0]
    assert name == "stage2_lenet" and ok and 0 < step < s["stages"][1]["steps"]
    assert s["stages"][0] == row1 and [r["stage"] for r in s["stages"]] == [1, 2]


def test_soup_resumes_in_the_member_it_was_killed_in(digits_zoo, tmp_path, monkeypatch):
    import src.experiments.context as tr  # every family builds its Trainer through Context.trainer

    cfg = _cfg(digits_zoo, "soup", "trainer.epochs=2")
    monkeypatch.setattr(tr, "Trainer", KilledInStage2)
    with pytest.raises(Killed):
        mtx.run(cfg, run_dir=tmp_path)
    done = list((tmp_path / "stages").glob("1_*"))
    assert len(done) == 1 and (done[0] / "row.json").is_file() and not list((tmp_path / "stages").glob("2_*"))
    row1 = json.loads((done[0] / "row.json").read_text())
    ResumeSpy.resumed = []
    monkeypatch.setattr(tr, "Trainer", ResumeSpy)
    s = mtx.run(cfg, run_dir=tmp_path)
    # member 1 is not trained again; member 2 continues from its own checkpoint
    assert len(ResumeSpy.resumed) == 1
    name, ok, step = ResumeSpy.resumed[0]
    assert name.startswith("soup2_") and ok and 0 < step < s["stages"][1]["steps"]
    assert s["stages"][0] == row1 and s["soup_members"] == 2


@pytest.mark.parametrize("mode", ["parallel", "ensemble", "soup"])
def test_mode_end_to_end(digits_zoo, tmp_path, mode):
    s = mtx.run(_cfg(digits_zoo, mode), run_dir=tmp_path / "a")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["mode"] == mode
    assert len(summary["stages"]) == (2 if mode == "soup" else 1)
    for k in ("student_acc_before", "student_acc_after", "transfer_delta", "knowledge_gain", "knowledge_loss",
              "vs_mlp_small/teacher_acc", "vs_lenet/agreement", "vs_ensemble/positive_flips", "nll", "ece"):
        assert k in summary, k
    assert (tmp_path / "a" / "student" / "model.safetensors").is_file()
    assert (tmp_path / "a" / "plots" / "multi_teacher.png").stat().st_size > 1000
    assert "vs. single teachers: best teacher" in (tmp_path / "a" / "results.md").read_text()
    if mode == "parallel":
        shares = [summary[f"route/{n}"] for n in ("student", "mlp_small", "lenet")]
        assert sum(shares) == pytest.approx(100.0) and "train_route/student" in summary
        assert summary["method"] == "MultiKLDP"
    if mode == "ensemble":
        assert summary["stages"][0]["teacher"] == "ensemble(mlp_small+lenet)"
        # the ensemble's accuracy from the stage's own row equals the mean-softmax reference
        assert summary["stages"][0]["stage_transfer"]["teacher_acc"] == pytest.approx(
            summary["vs_ensemble/teacher_acc"])
    if mode == "soup":
        assert summary["soup_bn_samples"] > 0
        # finished single-teacher runs are re-used: nothing is trained again
        runs = {r["teacher"]: str(next((tmp_path / "a" / "stages").glob(f"{r['stage']}_*")))
                for r in summary["stages"]}
        reuse = f"soup_runs={{mlp_small:'{runs['mlp_small']}',lenet:'{runs['lenet']}'}}"
        again = mtx.run(_cfg(digits_zoo, mode, reuse), run_dir=tmp_path / "b")
        assert not (tmp_path / "b" / "checkpoints").exists()
        assert all("reused_from" in r for r in again["stages"])
        assert again["student_acc_after"] == pytest.approx(s["student_acc_after"])


def test_parallel_needs_a_multi_teacher_method(digits_zoo, tmp_path):
    with pytest.raises(UserError, match="multi_kl_dp"):
        mtx.run(_cfg(digits_zoo, "parallel", "method@parallel_method=kl_dp"), run_dir=tmp_path)


def test_seed_command_composes():
    r = subprocess.run([sys.executable, "main_multi_teacher.py", "--config-path", "config", "--config-name",
                        "multi_teacher/multi_teacher.yaml", "--cfg", "job"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "mode: sequential" in r.stdout and "MultiKLDP" in r.stdout
