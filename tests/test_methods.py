"""Loss regression tests: each method's loss on fixed logits/features equals a value computed by hand here."""
import math

import pytest
import torch
import torch.nn as nn

from src.errors import UserError
from src.methods import CD, CRD, KL, KLDP, MCL, dp_route, kl_to_target, similarity_kl
from src.experiments.transfer import routing_stats


class Table(nn.Module):
    """A 'model' whose logits/features for sample i are rows of fixed tables; the input x carries i."""

    def __init__(self, logits, feats=None, trainable=True):
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(logits, dtype=torch.float32).clone(), requires_grad=trainable)
        f = feats if feats is not None else torch.zeros(len(logits), 4)
        self.f = nn.Parameter(torch.as_tensor(f, dtype=torch.float32).clone(), requires_grad=trainable)
        self.num_features = self.f.shape[1]
        self.calls = 0

    def _i(self, x):
        return x.view(x.shape[0], -1)[:, 0].round().long()

    def forward(self, x):
        self.calls += 1
        return self.w[self._i(x)]

    def features_and_logits(self, x):
        self.calls += 1
        i = self._i(x)
        return self.f[i], self.w[i]


def batch(n, labels):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    return x, torch.as_tensor(labels), torch.arange(n)


def kl_hand(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def softmax(z, T=1.0):
    e = [math.exp(v / T) for v in z]
    return [v / sum(e) for v in e]


def test_kl_to_target_by_hand():
    zs = torch.tensor([[0.0, 0.0]])
    pt = torch.tensor([[0.75, 0.25]])
    want = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl_to_target(zs, pt, 1.0).item() == pytest.approx(want, abs=1e-6)
    # temperature 2: T^2 * KL(softmax(zt/2) || softmax(zs/2))
    zs2, zt2 = [1.0, -1.0, 0.5], [2.0, 0.0, -1.0]
    want2 = 4 * kl_hand(softmax(zt2, 2), softmax(zs2, 2))
    got2 = kl_to_target(torch.tensor([zs2]), torch.tensor([softmax(zt2, 2)]), 2.0).item()
    assert got2 == pytest.approx(want2, abs=1e-6)


def test_kl_method_value_topk_and_xekl():
    zs = [[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]]
    zt = [[0.0, 1.0, 3.0], [1.0, 1.0, -2.0]]
    y = [2, 1]
    st, te = Table(zs), Table(zt, trainable=False)
    loss, _ = KL(st, te, temperature=1.0, alpha=1.0)(batch(2, y))
    want = sum(kl_hand(softmax(t), softmax(s)) for s, t in zip(zs, zt)) / 2
    assert loss.item() == pytest.approx(want, abs=1e-5)
    # top-2 of the teacher's logits: sample 0 keeps classes (2, 1); sample 1 keeps (0, 1)
    loss_k, _ = KL(st, te, topk=2)(batch(2, y))
    want_k = (kl_hand(softmax([3.0, 1.0]), softmax([-1.0, 0.0])) + kl_hand(softmax([1.0, 1.0]),
                                                                           softmax([0.0, 2.0]))) / 2
    assert loss_k.item() == pytest.approx(want_k, abs=1e-5)
    # XE-KL: 0.5 KL + 0.5 CE on logits (not on probabilities)
    loss_x, logs = KL(st, te, alpha=0.5)(batch(2, y))
    ce = (-math.log(softmax(zs[0])[2]) - math.log(softmax(zs[1])[1])) / 2
    assert loss_x.item() == pytest.approx(0.5 * want + 0.5 * ce, abs=1e-5)
    assert logs["ce"].item() == pytest.approx(ce, abs=1e-5)


def test_dp_route_supervised_vs_unsupervised():
    # sample 0: teacher gives the true label 0.9 vs frozen 0.6 -> teacher (both)
    # sample 1: teacher is very confident in a WRONG class; frozen gives the true label 0.6
    #           -> supervised: frozen student; unsupervised (max prob): teacher
    # sample 2: teacher 0.3 on the true label, frozen 0.7, frozen also more confident -> frozen (both)
    lg = lambda p: torch.tensor(p).log()  # noqa: E731
    zt = torch.stack([lg([0.9, 0.05, 0.05]), lg([0.02, 0.96, 0.02]), lg([0.3, 0.35, 0.35])])
    zf = torch.stack([lg([0.6, 0.2, 0.2]), lg([0.6, 0.2, 0.2]), lg([0.7, 0.15, 0.15])])
    y = torch.tensor([0, 0, 0])
    assert dp_route(zt, zf, y, "most-conf").tolist() == [1.0, 0.0, 0.0]
    assert dp_route(zt, zf, None, "most-conf_u").tolist() == [1.0, 1.0, 0.0]
    assert dp_route(zt, zf, y, "self").tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(UserError):
        dp_route(zt, zf, None, "most-conf")
    with pytest.raises(UserError, match="unknown"):
        dp_route(zt, zf, y, "nope")


def test_dp_ablation_partitions():
    # predictions: teacher / frozen student per sample, label 0 everywhere
    # s0: pos flip (t right, s wrong); s1: neg flip; s2: both right; s3: both wrong
    onehot = lambda c: torch.nn.functional.one_hot(torch.tensor(c), 3).float() * 5  # noqa: E731
    zt = torch.stack([onehot(0), onehot(1), onehot(0), onehot(2)])
    zf = torch.stack([onehot(1), onehot(0), onehot(0), onehot(1)])
    y = torch.zeros(4, dtype=torch.long)
    assert dp_route(zt, zf, y, "pos_flips").tolist() == [1.0, 0.0, 0.0, 0.0]
    assert dp_route(zt, zf, y, "neg_flips").tolist() == [1.0, 0.0, 1.0, 1.0]
    assert dp_route(zt, zf, y, "neutral_avg").tolist() == [1.0, 0.0, 0.5, 0.5]


def test_kldp_loss_uses_the_chosen_target():
    zs = [[0.0, 0.0], [1.0, -1.0]]
    zt = [[3.0, 0.0], [0.0, 2.0]]   # sample 0: teacher confident on the label; sample 1: teacher wrong
    zf = [[0.5, 0.0], [2.0, 0.0]]
    y = [0, 0]
    m = KLDP(Table(zs), Table(zt, trainable=False), Table(zf, trainable=False), partition="most-conf")
    loss, logs = m(batch(2, y))
    want = (kl_hand(softmax(zt[0]), softmax(zs[0])) + kl_hand(softmax(zf[1]), softmax(zs[1]))) / 2
    assert loss.item() == pytest.approx(want, abs=1e-5)
    assert logs["dp_share_teacher"].item() == pytest.approx(0.5)
    loss.backward()
    assert m.student.w.grad.shape == (2, 2)


def test_kldp_and_routing_stats_without_flips_are_finite():
    z = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 1])
    stats = routing_stats(z, z, y, "most-conf")  # identical models: no flips at all
    assert stats == {"dp_share_teacher": 0.0, "dp_pos_flips_to_teacher": 0.0, "dp_neg_flips_to_teacher": 0.0}


def test_mcl_masks_negative_flips_and_ema():
    zs = [[0.0, 0.0], [0.0, 0.0]]
    zt = [[2.0, 0.0], [0.0, 2.0]]  # sample 1: teacher wrong
    zf = [[0.0, 1.0], [1.0, 0.0]]  # sample 1: frozen right -> negative flip, masked out
    y = [0, 0]
    m = MCL(Table(zs), Table(zt, trainable=False), Table(zf, trainable=False), alpha=1.0, topk=0,
            ema_tau=0.9, ema_every=2)
    loss, logs = m(batch(2, y))
    assert loss.item() == pytest.approx(kl_hand(softmax(zt[0]), softmax(zs[0])), abs=1e-5)
    assert logs["mcl_kept"].item() == pytest.approx(0.5)
    slow0 = m.slow.w.detach().clone()
    with torch.no_grad():
        m.student.w.add_(1.0)
    m.after_step(1)  # not an update step (every 2)
    assert torch.equal(m.slow.w, slow0)
    m.after_step(2)
    assert torch.allclose(m.slow.w, 0.9 * slow0 + 0.1 * m.student.w.detach())
    assert m.eval_model() is m.slow
    assert not any(k.startswith(("teacher.", "frozen_student.")) for k in m.state_dict())
    assert any(k.startswith("slow.") for k in m.state_dict())


def test_cd_by_hand_and_gradients():
    fs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    ft = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    g = 0.5
    assert similarity_kl(ft, ft, g).item() == pytest.approx(0.0, abs=1e-6)

    def dist(f, i):
        n = [[x / math.hypot(*r) for x in r] for r in f.tolist()]  # L2-normalised rows
        sims = [sum(a * b for a, b in zip(n[i], n[j])) / g for j in range(3) if j != i]
        return softmax(sims)

    want = sum(kl_hand(dist(ft, i), dist(fs, i)) for i in range(3)) / 3
    assert similarity_kl(fs, ft, g).item() == pytest.approx(want, abs=1e-5)
    st = Table(torch.zeros(3, 2), fs)
    te = Table(torch.zeros(3, 2), ft, trainable=False)
    loss, logs = CD(st, te, beta=10.0, gamma=g)(batch(3, [0, 1, 0]))
    assert loss.item() == pytest.approx(10 * want, abs=1e-4)
    loss.backward()
    assert st.f.grad.shape == (3, 2) and torch.isfinite(st.f.grad).all() and st.f.grad.abs().sum() > 0


def test_crd_finite_gradients_and_memory_update():
    torch.manual_seed(0)
    n, k = 10, 3
    st = Table(torch.randn(n, k), torch.randn(n, 6))
    te = Table(torch.randn(n, k), torch.randn(n, 5), trainable=False)
    m = CRD(st, te, num_samples=n, feat_dim=4, num_negatives=7)
    mem_before = m.memory_s.clone()
    x, y, idx = batch(4, [0, 1, 2, 0])
    loss, logs = m((x, y, idx))
    assert torch.isfinite(loss) and logs["crd"].item() > 0
    loss.backward()
    assert m.embed_s.fc.weight.grad.shape == (4, 6) and m.embed_t.fc.weight.grad.shape == (4, 5)
    assert st.f.grad.shape == (n, 6) and st.f.grad[:4].abs().sum() > 0 and st.f.grad[4:].abs().sum() == 0
    changed = (m.memory_s != mem_before).any(1)
    assert changed[:4].all() and not changed[4:].any()
    assert torch.allclose(m.memory_s[:4].norm(dim=1), torch.ones(4), atol=1e-5)
    assert m.z_s.item() > 0 and m.z_t.item() > 0


def test_mixup_bypasses_the_teacher_cache():
    zs, zt = torch.zeros(4, 2), torch.randn(4, 2)
    te = Table(zt, trainable=False)
    cache = {"logits": torch.full((4, 2), 7.0)}
    m = KL(Table(zs), te, teacher_cache=cache)
    m.train()
    m(batch(4, [0, 1, 0, 1]))
    assert te.calls == 0  # served from the cache
    m2 = KL(Table(zs), te, teacher_cache=cache, mixup_alpha=1.0)
    m2.train()
    m2(batch(4, [0, 1, 0, 1]))
    assert te.calls == 1  # mixed inputs are relabelled by the teacher


def test_bad_hyper_parameters_are_refused():
    st, te = Table([[0.0, 0.0]]), Table([[0.0, 0.0]], trainable=False)
    with pytest.raises(UserError, match="temperature"):
        KL(st, te, temperature=0.0)
    with pytest.raises(UserError, match="partition"):
        KLDP(st, te, te, partition="bogus")
