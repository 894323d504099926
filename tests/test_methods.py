"""Loss regression tests: each method's loss on fixed logits/features equals a value computed by hand here."""
import math

import pytest
import torch
import torch.nn as nn

from src.batch import Batch
from src.errors import UserError
import src.methods as methods_pkg
from src.methods import (CD, CRD, KDAT, KDEP, KL, KLDP, MCL, NEEDS, BTuning, CrossEntropy, FeatureKD, GANTraining,
                         Method, MultiKLDP, ZeroShot, build_method, dp_route, kl_to_target, method_class,
                         method_needs, similarity_kl)
from src.methods.aft import AFT, FeatureTable, kernel_distance
from src.methods.feature import NegativeSampler
from src.metrics.flips import top_classes, transfer_metrics
from src.metrics.transition import agreeing, transition_batch
from src.methods import dp_route
from src.metrics import routing_shares


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
    return Batch(x, torch.as_tensor(labels), torch.arange(n))


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
    stats = routing_shares(dp_route(z, z, y, "most-conf"), z, z, y)  # identical models: no flips at all
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


def test_cd_is_ce_plus_summed_similarity_kl_with_the_diagonal():
    # issue 11 item 1 (public SimpleContrastLoss + cd_dist.yaml): 0.1 * CE + 10 * sum_i KL(P_t[i] || P_s[i]),
    # P[i] = softmax_j cos(f_i, f_j) over all j (diagonal kept), no temperature, summed over anchors.
    fs = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # cosine similarities [[1, 0], [0, 1]]
    ft = torch.tensor([[1.0, 0.0], [4.0, 0.0]])  # cosine similarities [[1, 1], [1, 1]]: P_t rows (1/2, 1/2)
    # P_s rows: (e, 1)/(e + 1) and (1, e)/(e + 1); each row's KL = log((e + 1)/2) - 1/2; two anchors, summed
    cd = 2 * math.log((math.e + 1) / 2) - 1  # 0.2402
    assert similarity_kl(fs, ft).item() == pytest.approx(cd, abs=1e-6)
    assert similarity_kl(ft, ft).item() == pytest.approx(0.0, abs=1e-6)
    st = Table(torch.zeros(2, 2), fs)  # zero logits: CE = log 2 per sample
    te = Table(torch.zeros(2, 2), ft, trainable=False)
    loss, logs = CD(st, te)(batch(2, [0, 1]))
    assert loss.item() == pytest.approx(10 * cd + 0.1 * math.log(2), abs=1e-5)  # 2.4716
    assert logs["ce"].item() == pytest.approx(math.log(2), abs=1e-6) and "kl" not in logs
    loss.backward()
    assert torch.isfinite(st.f.grad).all() and st.f.grad.abs().sum() > 0
    # with the diagonal masked (our old variant) every row would hold one sample and the loss would be 0


def test_crd_is_ce_plus_crd_and_negatives_come_from_other_classes():
    # issue 11 item 2 (public crd_dist.yaml + get_contrast_idx): loss = 1 * CE + 0.8 * CRD, no KL term;
    # negatives uniform (with replacement) over the training samples of the other classes.
    labels = torch.tensor([0, 0, 1, 1, 1, 2, -1])  # id 6 is not in the training split
    sampler = NegativeSampler(labels)
    torch.manual_seed(0)
    neg = sampler(torch.tensor([0, 2, 5]), 12000)  # anchors of class 0, 1, 2
    allowed = {0: {2, 3, 4, 5}, 1: {0, 1, 5}, 2: {0, 1, 2, 3, 4}}
    for row, c in zip(neg, (0, 1, 2)):
        assert set(row.tolist()) == allowed[c]  # never the anchor's class (so never the positive), never id 6
        counts = torch.bincount(row, minlength=7).float() / row.numel()
        for i in allowed[c]:  # uniform over samples (class 1 holds 3 of class 0's 4 candidates)
            assert counts[i].item() == pytest.approx(1 / len(allowed[c]), abs=0.02)

    torch.manual_seed(0)
    zs = [[1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    st = Table(zs, torch.randn(4, 6))
    te = Table(torch.randn(4, 3), torch.randn(4, 5), trainable=False)
    m = CRD(st, te, sample_labels=torch.tensor([0, 1, 2, 0]), feat_dim=4, num_negatives=7)
    mem_before = m.memory_s.clone()
    y = [0, 1, 2]
    loss, logs = m(Batch(torch.arange(3.0).view(3, 1, 1, 1), torch.tensor(y), torch.arange(3)))
    ce = sum(-math.log(softmax(z)[c]) for z, c in zip(zs, y)) / 3
    assert logs["ce"].item() == pytest.approx(ce, abs=1e-5) and "kl" not in logs
    assert loss.item() == pytest.approx(ce + 0.8 * logs["crd"].item(), abs=1e-4)
    assert m.n == 4  # NCE constants use the number of training samples
    loss.backward()
    assert m.embed_s.fc.weight.grad.shape == (4, 6) and m.embed_t.fc.weight.grad.shape == (4, 5)
    assert st.f.grad[:3].abs().sum() > 0 and st.f.grad[3:].abs().sum() == 0
    changed = (m.memory_s != mem_before).any(1)
    assert changed[:3].all() and not changed[3:].any()
    assert torch.allclose(m.memory_s[:3].norm(dim=1), torch.ones(3), atol=1e-5)
    assert m.z_s.item() > 0 and m.z_t.item() > 0
    with pytest.raises(UserError, match="two classes"):
        NegativeSampler(torch.tensor([1, 1, -1]))


def test_mcl_ce_on_all_samples_and_negative_flips_of_the_current_student():
    # issue 11 item 3 (public xekl_mcl): 0.68 * KL over non-negative-flip samples + 0.32 * CE over ALL samples;
    # negative flips = current student right & teacher wrong.
    zs = [[1.0, 0.0], [0.0, 1.0]]  # current student: sample 0 right, sample 1 wrong
    zt = [[0.0, 2.0], [2.0, 0.0]]  # teacher: sample 0 wrong (a negative flip of the current student), 1 right
    zf = [[0.0, 1.0], [1.0, 0.0]]  # frozen student: sample 0 wrong (no negative flip by it), 1 right
    y = [0, 0]
    kl = [kl_hand(softmax(t), softmax(s)) for s, t in zip(zs, zt)]
    ce = (math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2  # 0.8133, both samples
    m = MCL(Table(zs), Table(zt, trainable=False), Table(zf, trainable=False), topk=0)
    loss, logs = m(batch(2, y))
    assert loss.item() == pytest.approx(0.68 * kl[1] + 0.32 * ce, abs=1e-5)  # 0.8239
    assert logs["mcl_kept"].item() == pytest.approx(0.5) and logs["ce"].item() == pytest.approx(ce, abs=1e-5)
    m2 = MCL(Table(zs), Table(zt, trainable=False), Table(zf, trainable=False), topk=0, flip_source="frozen")
    loss2, logs2 = m2(batch(2, y))
    assert loss2.item() == pytest.approx(0.68 * (kl[0] + kl[1]) / 2 + 0.32 * ce, abs=1e-5)
    assert logs2["mcl_kept"].item() == pytest.approx(1.0)
    with pytest.raises(UserError, match="flip_source"):
        MCL(Table(zs), Table(zt, trainable=False), None, flip_source="nope")


def test_partition_ablations_use_the_current_student_and_a_detached_logit_average():
    # issue 11 item 4 (public flip-st / flip-t / flip-avg). Label 0 everywhere; 2 classes.
    # s0: teacher right, current wrong, frozen right -> current: positive flip; frozen: neutral
    # s1: teacher wrong, current right, frozen wrong -> current: negative flip; frozen: neutral
    # s2: all right -> neutral
    zt = [[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]]
    zs = [[0.0, 1.0], [1.0, 0.0], [3.0, 0.0]]
    zf = [[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]
    y = [0, 0, 0]

    def run(**kw):
        st = Table(zs)
        m = KLDP(st, Table(zt, trainable=False), Table(zf, trainable=False), **kw)
        loss, logs = m(batch(3, y))
        return st, loss, logs

    def mean_kl(targets):
        return sum(kl_hand(t, softmax(s)) for t, s in zip(targets, zs)) / 3

    pt, pf = [softmax(z) for z in zt], [softmax(z) for z in zf]
    # neutral_avg (defaults: current flips, logit average): s0 teacher, s1 frozen, s2 softmax((1 + 3)/2, 0)
    st, loss, _ = run(partition="neutral_avg")
    avg2 = softmax([2.0, 0.0])
    assert loss.item() == pytest.approx(mean_kl([pt[0], pf[1], avg2]), abs=1e-5)
    loss.backward()  # the target is detached: d loss / d z_s = (softmax(z_s) - target) / 3
    want = [(a - b) / 3 for a, b in zip(softmax(zs[2]), avg2)]
    assert st.w.grad[2].tolist() == pytest.approx(want, abs=1e-6)
    # pos_flips: teacher only on the current student's positive flips (s0); frozen flips: none
    assert run(partition="pos_flips")[1].item() == pytest.approx(mean_kl([pt[0], pf[1], pf[2]]), abs=1e-5)
    _, loss_f, logs_f = run(partition="pos_flips", flip_source="frozen")
    assert loss_f.item() == pytest.approx(mean_kl(pf), abs=1e-5) and logs_f["dp_share_teacher"].item() == 0.0
    # neg_flips: frozen student only on the current student's negative flips (s1)
    _, loss_n, logs_n = run(partition="neg_flips")
    assert loss_n.item() == pytest.approx(mean_kl([pt[0], pf[1], pt[2]]), abs=1e-5)
    assert logs_n["dp_share_teacher"].item() == pytest.approx(2 / 3)
    # the earlier variant, as named options: frozen flips (all neutral here) and the probability average
    _, loss_p, _ = run(partition="neutral_avg", flip_source="frozen", neutral_target="prob_avg_frozen")
    mix = [[(a + b) / 2 for a, b in zip(t, f)] for t, f in zip(pt, pf)]
    assert loss_p.item() == pytest.approx(mean_kl(mix), abs=1e-5)
    with pytest.raises(UserError, match="neutral_target"):
        run(partition="neutral_avg", neutral_target="avg")


def test_gain_share_in_the_classes_holding_top_p_pct_of_positive_flips():
    # issue 11 item 5 (public get_dist_improvement): the top-p% classes are the fewest classes, most positive
    # flips first, that hold p% of the positive flips (not the top ceil(p% x #classes) classes).
    pos = torch.tensor([5, 1, 3, 0, 1])  # 10 positive flips
    assert top_classes(pos, 20).tolist() == [0]  # class 0 alone holds 50% >= 20%
    assert top_classes(pos, 60).tolist() == [0, 2]  # 50% < 60% <= 80%
    assert top_classes(pos, 85).tolist() == [0, 2, 1]  # 90%; tie between classes 1 and 4: lower index
    assert top_classes(pos, 20, public_extra_class=True).tolist() == [0, 2]  # the public loop's extra class
    assert top_classes(torch.zeros(5, dtype=torch.long), 20).tolist() == []
    # 4 classes: class 0 holds 3 of the 4 positive flips, class 1 the 4th; the gain is one sample each in
    # classes 0, 1, 2. top 50%: class 0 only -> 1 of 3 gained samples (the old top-ceil(50% x 4) = 2 classes: 2/3)
    onehot = lambda p: torch.nn.functional.one_hot(torch.tensor(p), 4).float() * 3  # noqa: E731
    y = torch.tensor([0, 0, 0, 1, 2, 3, 3])
    before, teacher = onehot([1, 1, 1, 2, 3, 3, 3]), onehot([0, 0, 0, 1, 3, 3, 3])
    now = onehot([0, 1, 1, 1, 2, 3, 3])
    m = transfer_metrics(now, before, teacher, y, top_p=50)
    assert m["gain_in_top50pct_classes"] == pytest.approx(100 / 3)
    assert m["knowledge_gain"] == pytest.approx(300 / 7)


def test_aft_rbf_bandwidth_and_random_dense_scales():
    # issue 11 item 6 (public prior.py): RBF exp(-||x_i - x_j||^2) on centred unit rows; dense scales randn/sqrt(d)
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])  # centred; unit rows (1,0), (0,1), -(1,1)/sqrt2
    phi = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])  # centred; rows (1,0), (-1,0), 0
    # squared distances: f: d01 = 2, d02 = d12 = 2 + sqrt2; phi: d01 = 4, d02 = d12 = 1; diagonals equal (1)
    a, b = math.exp(-2) - math.exp(-4), math.exp(-2 - math.sqrt(2)) - math.exp(-1)
    want = math.sqrt((2 * a * a + 4 * b * b) / 9 + 1e-8)
    assert kernel_distance(f, phi, "rbf").item() == pytest.approx(want, rel=1e-5)
    d = 6
    table = FeatureTable(phi=torch.randn(4, d), dims=[d], names=["m"], ids=torch.arange(4),
                         labels=torch.zeros(4, dtype=torch.long))
    student = Table(torch.zeros(4, 2), torch.zeros(4, 3))
    torch.manual_seed(3)
    dense = AFT(student, table, scales="dense")
    torch.manual_seed(3)
    assert torch.equal(dense.s.detach(), torch.randn(d, d) / math.sqrt(d))
    assert torch.equal(AFT(student, table).s.detach(), torch.zeros(d))  # diag: sigmoid(0) = 0.5, as prior.py


def test_transition_images_are_a_seeded_shuffle_of_the_agreeing_ones_and_targets_skip_the_true_label():
    # issue 11 item 7 (public transition_curves.py): a shuffled loader picks the first N agreeing images; the
    # targets are every class but the TRUE label (the two models may agree on a wrong class).
    onehot = lambda p: torch.nn.functional.one_hot(torch.as_tensor(p), 10).float()  # noqa: E731
    preds = torch.arange(100) // 10  # a split sorted by class: 10 images per class, all agreeing but image 0
    s, t = onehot(preds), onehot(preds)
    t[0] = onehot(9)
    pos = agreeing(s, t, 10, seed=0)
    assert len(pos) == len(set(pos.tolist())) == 10 and 0 not in pos.tolist()
    assert len(set(preds[pos].tolist())) > 1  # not the first 10 in split order (all of class 0)
    assert torch.equal(pos, agreeing(s, t, 10, seed=0)) and not torch.equal(pos, agreeing(s, t, 10, seed=1))
    assert len(agreeing(s, t, 500, seed=0)) == 99  # fewer agree than asked: all of them
    # image of true class 3 on which both models predict 5: targets are all classes but 3 (5 included)
    _, targets, _ = transition_batch(torch.zeros(1, 1, 2, 2), torch.tensor([3]), 10)
    assert targets.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]


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


# ------------------------------------------------------------------------------------------------ one builder
def test_every_method_declares_its_needs():
    want = {CrossEntropy: set(), KL: {"teacher"}, KDAT: {"teacher"}, KDEP: {"teacher"},
            KLDP: {"teacher", "frozen_student"}, MCL: {"teacher"},
            CD: {"teacher", "features"}, CRD: {"teacher", "sample_labels", "features"},
            MultiKLDP: {"teachers", "frozen_student"}, ZeroShot: {"teacher", "generator"},
            AFT: {"feature_table"}, FeatureKD: {"feature_table"}, BTuning: {"feature_table", "student_features"},
            GANTraining: set()}
    for cls, needs in want.items():
        assert cls.needs == frozenset(needs), cls.__name__
        assert cls.needs <= NEEDS
        assert cls.needs_for({}) == cls.needs


def test_mcl_needs_the_frozen_student_only_for_frozen_flips():
    assert MCL.needs_for({}) == {"teacher"}  # default flip_source: the current student
    assert MCL.needs_for({"flip_source": "current", "alpha": 0.5}) == {"teacher"}
    assert MCL.needs_for({"flip_source": "frozen"}) == {"teacher", "frozen_student"}
    assert method_needs({"_target_": "src.methods.MCL", "flip_source": "frozen"}) == {"teacher", "frozen_student"}
    assert method_needs({"_target_": "src.methods.CRD"}) == {"teacher", "sample_labels", "features"}


def test_every_method_class_is_exported_from_src_methods():
    def subclasses(c):
        for s in c.__subclasses__():
            yield s
            yield from subclasses(s)

    public = {c for c in subclasses(Method) if not c.__name__.startswith("_") and c.__module__.startswith("src.")}
    assert {"AFT", "FeatureKD", "BTuning", "KDEP", "ZeroShot", "KDAT", "MultiKLDP", "GANTraining"} <= \
        {c.__name__ for c in public}
    for c in public:
        assert getattr(methods_pkg, c.__name__) is c
        assert method_class({"_target_": f"src.methods.{c.__name__}"}) is c


def test_check_rejects_unknown_keys_and_accepts_inherited_ones():
    with pytest.raises(UserError) as e:
        KL.check(temprature=2.0)
    assert str(e.value) == "method KL has no parameter temprature: remove method.temprature"
    KL.check(temperature=2.0, alpha=0.5, topk=3, mixup_alpha=0.2, synth_ratio=0.25, synth_source="gan")
    MCL.check(ema_tau=0.5, flip_source="frozen", temperature=2.0, mixup_alpha=0.1)  # MCL <- KL <- Method
    MultiKLDP.check(partition="most-conf_u", temperature=2.0, alpha=0.5, mixup_alpha=0.0)
    CrossEntropy.check(label_smoothing=0.1, mixup_alpha=0.0)
    KDEP.check(loss_w=2.0, mixup_alpha=0.0)
    # inputs are not hyper-parameters; ZeroShot takes no **kw, so Method's distillation inputs are not its keys
    for cls, key in ((KL, "teacher"), (KLDP, "frozen_student"), (CRD, "sample_labels"), (ZeroShot, "mixup_alpha"),
                     (CrossEntropy, "prec"), (KDEP, "synth_ratio"), (AFT, "features")):
        with pytest.raises(UserError) as e:
            cls.check(**{key: 1})
        assert str(e.value) == f"method {cls.__name__} has no parameter {key}: remove method.{key}"


def test_check_holds_the_range_rules_the_constructors_use():
    cases = [(KL, {"temperature": 0}, "method.temperature=0 must be > 0, finite and in [0.01, 1000]"),
             (KL, {"alpha": 2}, "method.alpha=2 must be in [0, 1]: use e.g. method.alpha=0.9"),
             (KLDP, {"partition": "bogus"}, "method.partition='bogus' is unknown"),
             (KLDP, {"partition": "most-conff"}, "method.partition='most-conff' is unknown (closest: most-conf, "
                                                 "most-conf_u): use one of most-conf, most-conf_u, pos_flips, "
                                                 "neg_flips, neutral_avg, self"),
             (MCL, {"ema_every": 0}, "method.ema_every=0 must be >= 1: use e.g. method.ema_every=1"),
             (CRD, {"mixup_alpha": 0.5}, "CRD contrasts per-sample memory entries: mixup_alpha must be 0"),
             (MultiKLDP, {"topk": 5}, "method.topk is not supported by multi-teacher KL+DP: remove it"),
             (MultiKLDP, {"partition": "self"}, "method.partition='self' is not available with several teachers"),
             (MultiKLDP, {"partition": "most-conff"}, "method.partition='most-conff' is unknown (closest: "
                                                      "most-conf, most-conf_u): use one of most-conf, most-conf_u"),
             (KDEP, {"pts_t": 0}, "method.pts_t=0 must be > 0, finite and in [0.01, 1000]"),
             (ZeroShot, {"n_s": 0}, "method.n_s=0 must be >= 1: use e.g. method.n_s=10"),
             (AFT, {"kernel": "poly"}, "method.kernel='poly' is unknown: use one of linear, rbf, none"),
             (BTuning, {"temperature": -1}, "method.temperature=-1 must be > 0, finite and in [0.01, 1000]"),
             (CD, {"sim_temperature": 0}, "method.sim_temperature=0 must be > 0"),  # CD's own key
             (KL, {"topk": "3"}, "method.topk='3' must be a number (must be >= 0"),
             (KL, {"mixup_alpha": math.inf}, "method.mixup_alpha=inf must be a finite number"),
             (KL, {"synth_ratio": 1.0}, "method.synth_ratio=1.0 must be in [0, 1)")]
    for cls, hp, msg in cases:
        with pytest.raises(UserError) as e:
            cls.check(**hp)
        assert str(e.value).startswith(msg), (cls.__name__, str(e.value))
    AFT.check(prec=None, kernel=None)  # None = not given (main_aft's early validation)
    with pytest.raises(UserError, match="ema_tau=1"):  # the constructor runs the same rule
        MCL(Table([[0.0, 0.0]]), Table([[0.0, 0.0]], trainable=False), ema_tau=1.0)


def test_build_method_passes_exactly_the_inputs_the_class_needs():
    st, te, fr = Table([[0.0, 0.0]]), Table([[1.0, 0.0]], trainable=False), Table([[0.0, 1.0]], trainable=False)
    offered = dict(student=st, teacher=te, frozen_student=fr)
    kl = build_method({"_target_": "src.methods.KL", "temperature": 2.0}, **offered)
    assert type(kl) is KL and kl.T == 2.0 and kl.teacher.model is te and kl.frozen_student is None
    dp = build_method({"_target_": "src.methods.KLDP", "partition": "most-conf_u"}, **offered)
    assert dp.frozen_student.model is fr and dp.partition == "most-conf_u"
    mcl = build_method({"_target_": "src.methods.MCL"}, **offered)
    assert mcl.frozen_student is None  # current-student flips: no frozen model
    mcl_f = build_method({"_target_": "src.methods.MCL", "flip_source": "frozen"}, **offered)
    assert mcl_f.frozen_student.model is fr
    ce = build_method({"_target_": "src.methods.base.CrossEntropy", "label_smoothing": 0.1}, **offered)
    assert ce.teacher is None and ce.frozen_student is None and ce.label_smoothing == 0.1
    # optional inputs given and not None reach Method (the cache serves the teacher's logits)
    cache = {"logits": torch.tensor([[3.0, 0.0]])}
    cached = build_method({"_target_": "src.methods.KL"}, **offered, teacher_cache=cache, frozen_student_cache=None)
    assert cached.teacher.cache is cache and cached.frozen_student is None
    crd = build_method({"_target_": "src.methods.CRD", "feat_dim": 4, "num_negatives": 3}, student=st, teacher=te,
                       sample_labels=torch.tensor([0, 1]))
    assert crd.negatives.n == 2
    with pytest.raises(ValueError, match="'frozen_student'") as e:  # a needed input the caller did not give: a bug
        build_method({"_target_": "src.methods.KLDP"}, student=st, teacher=te)
    assert not isinstance(e.value, UserError)
    with pytest.raises(UserError) as e:
        build_method({"_target_": "src.methods.KL", "temprature": 2.0}, **offered)
    assert str(e.value) == "method KL has no parameter temprature: remove method.temprature"
    with pytest.raises(UserError) as e:  # under another key, the message names that key
        build_method({"_target_": "src.methods.KL", "temperature": 0}, "few_shot.kd_at", **offered)
    assert str(e.value).startswith("few_shot.kd_at.temperature=0 must be > 0, finite and in [0.01, 1000]")
    with pytest.raises(UserError) as e:  # a string where the table wants a number
        build_method({"_target_": "src.methods.KL", "topk": "3"}, **offered)
    assert str(e.value).startswith("method.topk='3' must be a number")
    with pytest.raises(UserError, match=r"^cannot build method CD: "):  # a TypeError of a class rule: the config's
        build_method({"_target_": "src.methods.CD", "sim_temperature": "1"}, **offered)


def test_method_class_names_the_key_of_a_bad_target():
    with pytest.raises(UserError) as e:
        method_class({"_target_": "src.methods.Nope"}, "parallel_method", choices="method@parallel_method=multi_kl_dp")
    msg = str(e.value)
    assert msg.startswith("parallel_method._target_=src.methods.Nope cannot be imported (")
    assert msg.endswith(": use method@parallel_method=multi_kl_dp") and "\n" not in msg
    with pytest.raises(UserError) as e:
        build_method({"_target_": "torch.nn.Linear"}, student=Table([[0.0, 0.0]]))
    assert str(e.value).startswith("method._target_=torch.nn.Linear is not a Method")
    with pytest.raises(UserError) as e:
        method_class({"_target_": "math.sqrt"})
    assert str(e.value).startswith("method._target_=math.sqrt is not a Method")
    with pytest.raises(UserError) as e:
        method_class({"temperature": 1.0}, choices="method=kl")
    assert str(e.value) == "method has no _target_: use method=kl"
    with pytest.raises(UserError) as e:  # not among the family's methods (`accept`)
        method_class({"_target_": "src.methods.KL"}, "parallel_method", accept=lambda c: "teachers" in c.needs,
                     choices="method@parallel_method=multi_kl_dp")
    assert str(e.value) == ("parallel_method._target_=src.methods.KL: KL is not a method of this family: use "
                            "method@parallel_method=multi_kl_dp")
    assert method_class({"_target_": "src.methods.MultiKLDP"}, accept=lambda c: "teachers" in c.needs) is MultiKLDP


# ------------------------------------------------------------------------------------------------ one rule per key
# every HPARAM_RULES key: a primary config, the overrides that pick a method taking it, and that method's class
RULE_HOMES = {
    **{k: ("transfer/transfer", ["method=kl"], KL) for k in ("temperature", "alpha", "topk", "mixup_alpha",
                                                              "synth_ratio")},
    **{k: ("transfer/transfer", ["method=crd"], CRD) for k in ("nce_t", "feat_dim", "num_negatives", "momentum",
                                                                "crd_weight", "kd_weight", "ce_weight")},
    **{k: ("transfer/transfer", ["method=mcl"], MCL) for k in ("ema_tau", "ema_every")},
    **{k: ("kdep/kdep", [], KDEP) for k in ("pts_t", "pts_p", "kd_t", "loss_w", "kl_w", "ce_w")},
    **{k: ("zeroshot/zeroshot", [], ZeroShot) for k in ("n_g", "n_s", "generator_lr", "beta")},
    **{k: ("aft/aft", ["method=aft"], AFT) for k in ("prec", "prior_lr")},
    "label_smoothing": ("aft/aft", ["method=aft_init"], CrossEntropy),
}


def _message(fn) -> str:
    with pytest.raises(UserError) as e:
        fn()
    return str(e.value)


def test_each_hparam_rule_has_one_home_and_one_message():
    """A bad value of every HPARAM_RULES key gives the same one line through the class's check and through
    preflight on a composed config (the rule lives in one table, the message names the key as the user wrote it);
    a nested method node is named by its full key."""
    from conftest import compose
    from src.experiments.preflight import preflight
    from src.methods import HPARAM_RULES

    assert set(RULE_HOMES) == set(HPARAM_RULES), "a new rule needs a row in RULE_HOMES"
    for key, (config, overrides, cls) in RULE_HOMES.items():
        ok = HPARAM_RULES[key][0]
        bad = [v for v in (-1, 1, 2000) if not ok(v)]  # -1 breaks every rule; 1 / 2000 the upper bounds
        assert bad and bad[0] == -1, key
        for v in bad:
            direct = _message(lambda: cls.check(**{key: v}))
            assert direct == f"method.{key}={v} " + HPARAM_RULES[key][1].format(k=f"method.{key}"), direct
            cfg = compose(config, [*overrides, f"method.{key}={v}"])
            assert _message(lambda: preflight(cfg)) == direct, (key, v)
        inf = _message(lambda: cls.check(**{key: math.inf}))
        assert inf.startswith(f"method.{key}=inf must be a finite number ("), inf
    # nested nodes: the same class check, every `method.` of its message renamed to the node's full key
    cfg = compose("zeroshot/zeroshot", ["few_shot.kd_at.temperature=0"])
    direct = _message(lambda: KDAT.check(temperature=0))
    assert _message(lambda: preflight(cfg)) == direct.replace("method.", "few_shot.kd_at.")
    assert direct.replace("method.", "few_shot.kd_at.").startswith("few_shot.kd_at.temperature=0 must be > 0")
    cfg = compose("multi_teacher/multi_teacher", ["mode=parallel", "parallel_method.partition=most-conff"])
    msg = _message(lambda: preflight(cfg))
    assert msg == _message(lambda: MultiKLDP.check(partition="most-conff")).replace("method.", "parallel_method.")
    assert msg.startswith("parallel_method.partition='most-conff' is unknown (closest: most-conf, most-conf_u)")
    # a key the method does not take fails at preflight too, by its full key
    cfg = compose("zeroshot/zeroshot", ["+few_shot.kd_at.temprature=2"])
    assert _message(lambda: preflight(cfg)) == ("method KDAT has no parameter temprature: remove "
                                                "few_shot.kd_at.temprature")
    # a _target_ that is not a Method is left to the family (it names the family's choices)
    preflight(compose("transfer/transfer", ["method._target_=src.methods.Nope"]))
    preflight(compose("transfer/transfer", ["method._target_=torch.nn.Linear"]))


def test_check_method_node_names_the_nodes_key():
    from src.methods import check_method_node

    check_method_node({"_target_": "src.methods.KL", "temperature": 2.0}, "parallel_method")
    check_method_node({"_target_": "src.methods.Nope", "temperature": 0}, "method")  # the family reports it
    with pytest.raises(UserError) as e:
        check_method_node({"_target_": "src.methods.KLDP", "partition": "most-conff"}, "parallel_method")
    assert str(e.value) == ("parallel_method.partition='most-conff' is unknown (closest: most-conf, most-conf_u): "
                            "use one of most-conf, most-conf_u, pos_flips, neg_flips, neutral_avg, self")
    with pytest.raises(UserError, match=r"^cannot build method CD: "):
        check_method_node({"_target_": "src.methods.CD", "sim_temperature": "1"})


# ------------------------------------------------------------------------------------------------ modalities


def test_a_method_refuses_a_modality_it_cannot_handle_in_one_line():
    from src.methods import check_method_node, methods_for

    st, te = Table([[0.0, 0.0]]), Table([[1.0, 0.0]], trainable=False)
    text = methods_for("text")
    assert "kl" in text and "xekl" in text and "kl_dp" in text and "aft" in text and "kdep" not in text
    with pytest.raises(UserError) as e:
        build_method({"_target_": "src.methods.KDEP"}, modality="text", student=st, teacher=te)
    msg = str(e.value)
    assert msg == f"method=kdep (KDEP) does not handle text inputs: use one of {', '.join(text)}" and "\n" not in msg
    with pytest.raises(UserError) as e:  # a class without a config file is named by its _target_ and full key
        check_method_node({"_target_": "src.methods.KDAT"}, "few_shot.kd_at", modality="text")
    assert str(e.value).startswith("few_shot.kd_at._target_=src.methods.KDAT (KDAT) does not handle text inputs: ")
    with pytest.raises(UserError) as e:  # text inputs cannot be mixed
        build_method({"_target_": "src.methods.KL", "mixup_alpha": 0.2}, modality="text", student=st, teacher=te)
    assert str(e.value) == "method.mixup_alpha=0.2 mixes images, which text inputs are not: set method.mixup_alpha=0"
    assert type(build_method({"_target_": "src.methods.KL"}, modality="text", student=st, teacher=te)) is KL
    assert type(build_method({"_target_": "src.methods.KDEP"}, modality="image", student=st, teacher=te)) is KDEP
    build_method({"_target_": "src.methods.KDEP"}, student=st, teacher=te)  # no modality given: no check
    check_method_node({"_target_": "src.methods.KDEP"}, "method")  # preflight: no dataset, no check
    image_only = {KDEP, ZeroShot, KDAT, GANTraining}
    for cls in (CrossEntropy, KL, KLDP, MCL, MultiKLDP, CD, CRD, AFT, FeatureKD, BTuning, *image_only):
        assert cls.modalities == ({"image"} if cls in image_only else {"image", "text"}), cls.__name__
    assert Method.modalities == {"image"}


def test_mix_refuses_inputs_that_are_not_float_images():
    st, te = Table([[0.0, 1.0], [1.0, 0.0]]), Table([[1.0, 0.0], [0.0, 1.0]], trainable=False)
    y, ids = torch.tensor([0, 1]), torch.arange(2)
    tokens = {"input_ids": torch.tensor([[0, 3], [1, 4]]), "attention_mask": torch.ones(2, 2, dtype=torch.long)}
    mixing = KL(st, te, mixup_alpha=0.4).train()
    for inputs, what in ((tokens, "a dict of tensors (input_ids, attention_mask)"),
                         (torch.tensor([[0, 3], [1, 4]]), "a 2-D int64 tensor"),
                         (torch.arange(2.0).view(2, 1), "a 2-D float32 tensor")):
        with pytest.raises(UserError) as e:
            mixing.loss(Batch(inputs, y, ids))
        assert str(e.value) == (f"method.mixup_alpha=0.4 / method.synth_ratio=0.0 mix float images, but KL's batch "
                                f"holds {what}: set method.mixup_alpha=0 and method.synth_ratio=0")
    # the same non-image batch without mixing: KL only reads logits, by sample id
    loss, _ = KL(st, te).train().loss(Batch(torch.arange(2.0).view(2, 1), y, ids))
    assert loss.item() == pytest.approx(kl_hand(softmax([1.0, 0.0]), softmax([0.0, 1.0])), abs=1e-5)
    x, fresh = mixing.mix(batch(2, [0, 1]))  # float images mix
    assert fresh and x.shape == (2, 1, 1, 1)
