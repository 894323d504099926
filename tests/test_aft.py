"""AFT (main_aft.py, docs/REFERENCE.md §2): LogME against the closed-form evidence, the AFT / KD / B-Tuning losses on
hand-made tensors, the scales' param group, save_features -> main_aft through the shared feature cache, and every
method end to end on the digits zoo with a few steps."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import compose, load_script
from src.batch import Batch
from src.engine import build_optimizer
from src.experiments import aft as aft_exp
from src.methods.aft import AFT, BTuning, FeatureKD, FeatureTable, kernel_distance
from src.metrics.logme import log_evidence, logme
from src.models import ImageInputs, create_model

SUMMARY_KEYS = ["status", "method", "student", "features", "feature_dims", "student_acc_before",
                "student_acc_after", "transfer_delta", "scales_mean", "scales_min", "scales_max", "steps"]


# ------------------------------------------------------------------------------------------------------ LogME


def _direct_evidence(f, y, alpha, beta):
    """log N(y_c; 0, I/beta + F F^T/alpha) / N per class: the evidence without any spectral shortcut."""
    n = f.shape[0]
    cov = torch.eye(n, dtype=torch.float64) / beta + f @ f.T / alpha
    mvn = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov)
    onehot = F.one_hot(y, int(y.max()) + 1).double()
    return torch.stack([mvn.log_prob(onehot[:, c]) for c in range(onehot.shape[1])]) / n


@pytest.mark.parametrize("n,d", [(60, 5), (8, 12), (20, 10)])  # Gram path (N > 2D), SVD path with D > N, SVD path
def test_logme_evidence_matches_the_closed_form(n, d):
    g = torch.Generator().manual_seed(n + d)
    f = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.arange(n) % 3
    for alpha, beta in ((0.7, 2.3), (5.0, 0.4)):
        assert torch.allclose(log_evidence(f, y, alpha, beta), _direct_evidence(f, y, alpha, beta), atol=1e-9)


def _informative(n=120, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    f = F.one_hot(y, 3).double() @ torch.randn(3, d, generator=g, dtype=torch.float64) \
        + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return f, y


def test_logme_fixed_point_maximises_the_evidence_and_returns_the_posterior_mean():
    f, y = _informative()
    r = logme(f, y, 3)
    assert r.weights.shape == (6, 3) and r.evidence.shape == (3,)
    assert r.score == pytest.approx(float(r.evidence.mean()))
    for c in range(3):  # a stationary point: moving alpha or beta by 5% either way lowers the direct evidence
        best = _direct_evidence(f, y, r.alpha[c], r.beta[c])[c]
        for da, db in ((1.05, 1), (0.95, 1), (1, 1.05), (1, 0.95)):
            assert _direct_evidence(f, y, r.alpha[c] * da, r.beta[c] * db)[c] < best
        a = r.alpha[c] * torch.eye(6, dtype=torch.float64) + r.beta[c] * f.T @ f
        m = r.beta[c] * torch.linalg.solve(a, f.T @ F.one_hot(y, 3).double()[:, c])
        assert torch.allclose(r.weights[:, c], m, atol=1e-8)
    assert torch.allclose(r.evidence, torch.stack([_direct_evidence(f, y, r.alpha[c], r.beta[c])[c]
                                                   for c in range(3)]), atol=1e-9)


def test_logme_ranks_informative_features_above_noise():
    f, y = _informative(seed=1)
    noise = torch.randn(f.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert logme(f, y).score > logme(noise, y).score + 0.1
    assert logme(f.float().numpy(), y.numpy()).score == pytest.approx(logme(f, y).score, abs=1e-5)  # numpy in


# ------------------------------------------------------------------------------------------------ the losses


def _student(hidden, classes=3, in_size=2):
    torch.manual_seed(0)
    return create_model("mlp", ImageInputs(classes, 1, [0.0], [1.0], in_size), kwargs={"hidden": [hidden]})


def _table(phi, labels=None, dims=None, student=None):
    n = phi.shape[0]
    labels = torch.arange(n) % 3 if labels is None else labels
    return FeatureTable(phi=phi, dims=dims or [phi.shape[1]], names=[f"m{i}" for i in range(len(dims or [1]))],
                        ids=torch.arange(n), labels=labels, student=student)


F3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])  # already centred
PHI3 = torch.tensor([[1.0], [1.0], [4.0]])  # centred: -1, -1, 2 -> unit rows -1, -1, 1


def test_kernel_distance_by_hand():
    # K_f = [[1, 0, -r], [0, 1, -r], [-r, -r, 1]] (r = 1/sqrt 2); K_phi = [[1, 1, -1], [1, 1, -1], [-1, -1, 1]]
    # squared differences: 2 x 1 (entries 01, 10) + 4 x (1 - r)^2 (entries 02, 20, 12, 21), mean over 9 entries
    expected = math.sqrt((2 + 4 * (1 - 1 / math.sqrt(2)) ** 2) / 9 + 1e-8)
    assert float(kernel_distance(F3, PHI3)) == pytest.approx(expected, rel=1e-6)
    assert float(kernel_distance(F3 + 5, 3 * PHI3 - 2)) == pytest.approx(expected, rel=1e-5)  # centred, normalised
    # two samples: any features centre to +-u, so both kernels are [[1, -1], [-1, 1]] and R = sqrt(1e-8)
    assert float(kernel_distance(torch.randn(2, 4), torch.randn(2, 7))) == pytest.approx(1e-4, rel=1e-3)
    # rbf (prior.py bandwidth): exp(-|a - b|^2) of unit rows = exp(2k - 2) elementwise
    r = 1 / math.sqrt(2)
    kf = torch.tensor([[1, 0, -r], [0, 1, -r], [-r, -r, 1]])
    kp = torch.tensor([[1.0, 1, -1], [1, 1, -1], [-1, -1, 1]])
    rbf = math.sqrt(float(((torch.exp(2 * kf - 2) - torch.exp(2 * kp - 2)) ** 2).mean()) + 1e-8)
    assert float(kernel_distance(F3, PHI3, "rbf")) == pytest.approx(rbf, rel=1e-5)


def test_aft_regulariser_scales_and_loss():
    student = _student(hidden=2)
    phi = torch.tensor([[1.0, 3.0], [1.0, 0.0], [4.0, 2.0]])
    m = AFT(student, _table(phi), prec=10.0)
    idx = torch.tensor([0, 1, 2])
    # scales start at sigmoid(0) = 0.5 on every dimension
    assert torch.equal(m.scaled_phi(phi), 0.5 * phi)
    hand = torch.sqrt(((F.normalize(F3 - F3.mean(0), dim=1) @ F.normalize(F3 - F3.mean(0), dim=1).T
                        - F.normalize(phi - phi.mean(0), dim=1) @ F.normalize(phi - phi.mean(0), dim=1).T) ** 2
                       ).mean() + 1e-8)
    assert float(m.regulariser(F3, idx).detach()) == pytest.approx(float(hand), rel=1e-6)
    with torch.no_grad():  # scales 0 on the second dimension: only the first counts -> the 1-D case by hand
        m.s[1] = -1e4
    assert float(m.regulariser(F3, idx).detach()) == pytest.approx(float(kernel_distance(F3, PHI3)), rel=1e-5)
    # loss = CE + prec * R on a real batch; prec = 0 is plain cross-entropy
    x = torch.rand(3, 1, 2, 2)
    y = torch.tensor([0, 1, 2])
    loss, logs = m.loss(Batch(x, y, idx))
    with torch.no_grad():
        z = student(x)
    assert float(logs["ce"]) == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-6)
    assert float(loss.detach()) == pytest.approx(float(logs["ce"] + 10.0 * logs["reg"]), rel=1e-6)
    m0 = AFT(student, _table(phi), prec=0.0)
    with torch.no_grad():
        assert float(m0.loss(Batch(x, y, idx))[0]) == pytest.approx(float(F.cross_entropy(student(x), y)), rel=1e-6)


def test_aft_scales_have_their_own_param_group():
    opt_cfg = compose("aft/aft").optimizer
    phi = torch.randn(6, 4)
    m = AFT(_student(hidden=3), _table(phi), prior_lr=0.01)
    opt = build_optimizer(opt_cfg, m.param_groups())
    assert len(opt.param_groups) == 2
    assert opt.param_groups[0]["lr"] == opt_cfg.lr and opt.param_groups[1]["lr"] == 0.01
    assert opt.param_groups[1]["params"] == [m.s] and m.s.shape == (4,)
    assert not any(p is m.s for p in opt.param_groups[0]["params"])
    fixed = AFT(_student(hidden=3), _table(phi), learn_scales=False)
    opt = build_optimizer(opt_cfg, fixed.param_groups())
    assert len(opt.param_groups) == 1 and not fixed.s.requires_grad
    dense = AFT(_student(hidden=3), _table(phi), scales="dense", kernel="none")  # init randn / 2 (prior.py)
    assert dense.s.shape == (4, 4) and torch.allclose(dense.scaled_phi(phi), phi @ dense.s)
    x, y, idx = torch.rand(6, 1, 2, 2), torch.arange(6) % 3, torch.arange(6)
    dense.loss(Batch(x, y, idx))[0].backward()
    assert dense.s.grad is not None and dense.map.weight.grad is not None
    want = dense.s.detach().norm(dim=1).mean().item()  # mean row norm of the matrix
    assert dense.scale_summary()["scales_mean"] == pytest.approx(want)


def test_feature_kd_loss_by_hand():
    phi = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 0.5]])
    m = FeatureKD(_student(hidden=2), _table(phi), prec=2.0)
    with torch.no_grad():  # the linear map predicts its bias for every sample
        m.map.weight.zero_()
        m.map.bias.copy_(torch.tensor([1.0, 1.0]))
    hand = ((0 ** 2 + 1 ** 2) + (2 ** 2 + 2 ** 2) + (1 ** 2 + 0.5 ** 2)) / 6
    assert float(m.regulariser(torch.randn(3, 2), torch.arange(3)).detach()) == pytest.approx(hand)
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 2])
    loss, logs = m.loss(Batch(x, y, torch.arange(3)))
    assert float(loss.detach()) == pytest.approx(float(logs["ce"]) + 2.0 * hand, rel=1e-6)


def test_btuning_target_and_loss_by_hand():
    f_good, y = _informative(n=60, d=4, seed=3)
    noise = torch.randn(60, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    stu_feats = torch.randn(60, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    phi = torch.cat([f_good, noise], 1).float()
    m = BTuning(_student(hidden=2), _table(phi, y, dims=[4, 5], student=stu_feats.float()), prec=3.0,
                temperature=0.1)
    r1, r2 = logme(phi[:, :4], y, 3), logme(phi[:, 4:], y, 3)
    assert m.scores.tolist() == pytest.approx([r1.score, r2.score])
    assert r1.score > r2.score and float(m.model_weights[0]) > 0.5  # the informative model dominates the target
    w = torch.softmax(torch.tensor([r1.score, r2.score]) / 0.1, 0)
    target = w[0] * phi[:, :4].double() @ r1.weights + w[1] * phi[:, 4:].double() @ r2.weights
    assert torch.allclose(m.target_table, target.float(), atol=1e-5)
    assert torch.allclose(m.m_down, logme(stu_feats.float(), y, 3).weights.float(), atol=1e-5)
    f, idx = torch.randn(5, 2), torch.tensor([0, 7, 9, 30, 59])
    hand = ((f @ m.m_down - target[idx].float()) ** 2).mean()
    assert float(m.regulariser(f, idx)) == pytest.approx(float(hand), rel=1e-5)
    x = torch.rand(5, 1, 2, 2)
    loss, logs = m.loss(Batch(x, y[idx], idx))
    loss.backward()  # no gradient into the target: only the student trains
    assert {n for n, p in m.named_parameters() if p.grad is not None} == {n for n, _ in m.named_parameters()}
    assert not m.target_table.requires_grad and not m.m_down.requires_grad


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def aft_base(kt_paths):
    """Cheap zoo members (trained on first use, about 5 s): mlp_small as the student, lenet + mlp_wide features."""
    return [*kt_paths, "student=mlp_small", "features=[lenet,mlp_wide]", "trainer.max_steps=6",
            "trainer.eval_every_steps=3"]


@pytest.mark.parametrize("method,extra", [("aft", []), ("aft_kd", []), ("aft_btune", []), ("aft_init", []),
                                          ("aft", ["method.kernel=none", "method.scales=dense"])],
                         ids=["aft", "kd", "btune", "init", "aft-none-dense"])
@pytest.mark.trained
def test_every_method_end_to_end(method, extra, aft_base, tmp_path):
    cfg = compose("aft/aft", [*aft_base, f"method={method}", *extra])
    s = aft_exp.run(cfg, run_dir=tmp_path)
    for k in SUMMARY_KEYS:
        assert k in s, k
    assert s["status"] == "ok" and s["student"] == "mlp_small" and s["steps"] == 6
    assert s["method"] == {"aft": "aft", "aft_kd": "kd", "aft_btune": "btune", "aft_init": "init"}[method]
    assert s["transfer_delta"] == pytest.approx(s["student_acc_after"] - s["student_acc_before"])
    if method == "aft_init":
        assert s["features"] == [] and s["feature_dims"] == [] and s["scales_mean"] is None
    else:
        assert s["features"] == ["lenet", "mlp_wide"] and s["feature_dims"] == [84, 256]
    if method == "aft" and not extra:
        assert 0 < s["scales_min"] <= s["scales_mean"] <= s["scales_max"] < 1
        assert s["scales_min"] < 0.5 < s["scales_max"]  # 6 steps at prior_lr moved the scales off 0.5
    if method == "aft_btune":
        assert sum(s["btune_weights"].values()) == pytest.approx(1.0)
    assert json.loads((tmp_path / "summary.json").read_text())["method"] == s["method"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 3, 6]
    assert (tmp_path / "student" / "model.safetensors").is_file()


def test_save_features_fills_the_cache_that_main_aft_reads(aft_base, tmp_path, caplog):
    overrides = [*aft_base, f"paths.cache={tmp_path / 'cache'}"]  # a fresh cache: nothing computed before
    cfg = compose("aft/aft", overrides)
    saved = load_script("save_features").save(cfg, run_dir=tmp_path / "sf")
    assert set(saved) == {"lenet", "mlp_wide"} and set(saved["lenet"]) == {"transfer", "test"}
    for per_split in saved.values():
        for path in per_split.values():
            assert path.startswith(str(tmp_path / "cache")) and path.endswith(".safetensors")
    assert json.loads((tmp_path / "sf" / "features.json").read_text()) == saved
    caplog.set_level("INFO", logger="kt")
    s = aft_exp.run(compose("aft/aft", overrides), run_dir=tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("features of")]
    assert len(lines) == 2 and all("read from the cache" in line for line in lines), lines
    assert s["feature_cache"] == [saved["lenet"]["transfer"], saved["mlp_wide"]["transfer"]]


@pytest.mark.trained
def test_aft_pulls_the_features_towards_the_pretrained_ones(aft_base, tmp_path):
    """The regulariser is what training lowers: over the last 10 of 30 steps, the kernel distance logged with
    prec=10 is well below the one of prec=0 (logged, not optimised); with learn_scales=false the scales stay 0.5."""
    reg = {}
    for prec in (0, 10):
        cfg = compose("aft/aft", [*aft_base, f"method.prec={prec}", "trainer.max_steps=30", "optimizer.lr=0.01",
                                  "trainer.eval_every_steps=10", "method.learn_scales=false"])
        s = aft_exp.run(cfg, run_dir=tmp_path / str(prec))
        assert s["scales_min"] == s["scales_max"] == pytest.approx(0.5)
        reg[prec] = json.loads((tmp_path / str(prec) / "metrics.jsonl").read_text().splitlines()[-1])["train/reg"]
    assert reg[10] < 0.85 * reg[0], reg  # measured: 0.176 vs 0.243


def test_feature_models_are_headless_and_hub_failures_of_a_node_are_one_line(tmp_path, monkeypatch):
    """AFT's feature models were built with the dataset's classes, so a hub-style file without a head failed as
    'missing'; a model node with `pretrained: true` reached timm unguarded (a LocalEntryNotFoundError traceback
    after ~45 s of retries offline)."""
    import timm

    from conftest import compose
    from src.errors import UserError
    from src.experiments.context import setup
    from src.experiments.resolve import resolve_model
    from src.io_utils import save_safetensors

    paths = [f"paths.checkpoints={tmp_path / 'ck'}", f"paths.cache={tmp_path / 'c'}", "trainer.device=cpu"]
    ctx = setup(compose("aft/aft", paths), run_dir=tmp_path / "run", tracker=False)
    headless = timm.create_model("resnet18", num_classes=0, in_chans=1)  # a backbone file: no fc.*
    save_safetensors(headless.state_dict(), tmp_path / "backbone.safetensors")
    node = {"arch": "resnet18", "checkpoint": str(tmp_path / "backbone.safetensors"), "name": "r18"}
    ref = resolve_model(node, ctx, "features[0]")
    assert ref.model.num_classes == 0 and ref.model.features(torch.rand(2, 1, 8, 8)).shape == (2, 512)
    out = ctx.outputs(ref, ctx.ds.split("test"), features=True)
    assert out["features"].shape[1] == 512 and ctx.outputs(ref, ctx.ds.split("test"), features=True) is not None
    assert ctx.cache.hits == 1 and ctx.cache.rejected == 0  # the headless entry is read back, not rejected
    with pytest.raises(UserError, match="missing from the checkpoint"):  # a classifier role still needs its head
        resolve_model(node, ctx, "student")
    import socket

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network in tests: the hub answers at once, from the cache only
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*a, **k):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(UserError, match=r"timm model 'resnet18' \(features\[1\]\): its hub weights "
                                        r"\(timm/resnet18.a1_in1k\) are not in the HF cache") as e:
        resolve_model({"arch": "resnet18", "pretrained": True, "name": "hub"}, ctx, "features[1]")
    assert "\n" not in str(e.value) and not isinstance(e.value.__cause__, AssertionError)  # offline: no connection
