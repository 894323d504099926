"""KDEP (main_kdep.py): pre-ReLU feature hooks, SVD alignment + PTS values by hand, the basis file, the dimension
check, the two-stage pipeline end to end, stage resume and the distillation's effect."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import compose
from src.batch import Batch
from src.errors import UserError
from src.experiments import kdep
from src.io_utils import load_state_dict
from src.methods.kdep import KDEP, check_dims, project, pts, svd_basis
from src.models import ImageInputs, create_model, save_checkpoint
from src.models.hooks import final_activation, pre_activation_features

DIGITS = {"name": "digits", "image_size": 8, "channels": 1}


def _model(arch, classes=10, chans=1, **kw):
    torch.manual_seed(0)
    inputs = ImageInputs(classes, chans, [0.3] * chans, [0.38] * chans, kw.pop("img_size", None))
    return create_model(arch, inputs, **kw)


def _check_pre_relu(m, x, expected_pre_map):
    f, z = pre_activation_features(m, x)
    want = expected_pre_map.mean((2, 3))
    assert f.shape == want.shape
    torch.testing.assert_close(f, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z, m(x), rtol=1e-4, atol=1e-5)
    assert (f < 0).any(), "pre-ReLU features must keep negative values"
    assert not torch.allclose(f, F.relu(want)), "returned relu(pooled) instead of the pre-ReLU features"
    # and the penultimate features are the pooled activation of that same map: we hooked the final activation
    torch.testing.assert_close(m.features(x), F.relu(expected_pre_map).mean((2, 3)), rtol=1e-4, atol=1e-5)


def test_pre_relu_features_of_our_resnet_and_wrn():
    x = torch.rand(4, 1, 8, 8)
    m = _model("resnet8").eval()
    net = m.net
    with torch.no_grad():
        h = net.stem(m.normalize(x))
        for s in net.stages[:-1]:
            h = s(h)
        for b in net.stages[-1][:-1]:
            h = b(h)
        b = net.stages[-1][-1]
        pre = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(h))))) + b.short(h)
    assert final_activation(m, x) == "stages.2.0.act"
    _check_pre_relu(m, x, pre)

    w = _model("wrn_16_2").eval()  # pre-activation net: its final BN precedes the final ReLU and the pooling
    with torch.no_grad():
        h = w.net.stem(w.normalize(x))
        for g in w.net.groups:
            h = g(h)
        pre = w.net.bn(h)
    _check_pre_relu(w, x, pre)
    assert pre_activation_features(w, x)[0].shape == (4, 128)


def test_pre_relu_features_of_timm_resnet18_and_gradients():
    m = _model("resnet18", chans=3, pretrained=False).eval()
    net, x = m.net, torch.rand(2, 3, 64, 64)
    with torch.no_grad():  # timm zero-initialises each block's last BN: give them weights, so pre != post ReLU
        for mod in net.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.normal_(1.0, 0.5), mod.bias.normal_(0.0, 0.5)
    with torch.no_grad():
        h = net.maxpool(net.act1(net.bn1(net.conv1(m.normalize(x)))))
        h = net.layer4[0](net.layer3(net.layer2(net.layer1(h))))
        b = net.layer4[1]
        pre = b.bn2(b.conv2(b.act1(b.bn1(b.conv1(h))))) + h
    assert final_activation(m, x) == "layer4.1.act2"
    _check_pre_relu(m, x, pre)
    m.train()  # the final ReLU is in-place: the pooled input must survive it and backpropagate
    f, _ = pre_activation_features(m, x)
    f.sum().backward()
    assert net.conv1.weight.grad is not None and net.conv1.weight.grad.abs().sum() > 0


class _FunctionalOnly(nn.Module):
    num_classes, num_features = 3, 4

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 3)

    def forward_features(self, x):
        return F.relu(self.conv(x))

    def forward_head(self, x, pre_logits=False):
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class _ActThenConv(_FunctionalOnly):
    def __init__(self):
        super().__init__()
        self.act, self.conv2 = nn.ReLU(), nn.Conv2d(4, 4, 1)

    def forward_features(self, x):
        return self.conv2(self.act(self.conv(x)))


@pytest.mark.parametrize("net, msg", [(_FunctionalOnly, "no activation module"), (_ActThenConv, "(act)")])
def test_pre_relu_refuses_architectures_without_a_final_activation(net, msg):
    with pytest.raises(UserError, match="cannot find the final activation") as e:
        pre_activation_features(net(), torch.rand(2, 1, 8, 8))
    assert msg in str(e.value)


@pytest.mark.parametrize("arch, final", [("resnet50", "layer4.2.act3"), ("resnet18", "layer4.1.act2")])
def test_final_activation_probe_runs_in_fp32_under_a_bf16_run(arch, final):
    """The preset's `trainer.amp: bf16` wraps the probe in autocast: at 224 px its two poolings rounded apart in
    bf16 and a timm ResNet was refused ("cannot find the final activation of 'resnet50'"). The probe is fp32."""
    m = _model(arch, 10, 3)
    x = torch.rand(2, 3, 224, 224)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert final_activation(m, x) == final
        f, z = pre_activation_features(m, x)  # the training forward itself stays in the run's precision
    assert f.shape == (2, m.num_features) and z.shape == (2, 10)


def test_pts_by_hand():
    x = torch.tensor([-0.8, 0.0, 0.0027, 0.1])
    torch.testing.assert_close(pts(x), torch.tensor([-2.0, 0.0, 0.3, 1.0]))  # sign(x) |x / 0.1|^(1/3)
    torch.testing.assert_close(pts(torch.tensor([0.8]), temperature=0.2, power=2), torch.tensor([2.0]))


def test_svd_target_and_loss_by_hand():
    rng = np.random.default_rng(0)
    f_t = rng.normal(size=(6, 4)) * np.array([3.0, 2.0, 1.0, 0.5]) + 1.0
    mu = f_t.mean(0)
    _, s, vh = np.linalg.svd(f_t - mu, full_matrices=False)
    b = svd_basis(torch.tensor(f_t, dtype=torch.float32))
    np.testing.assert_allclose(b["mu"].numpy(), mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b["S"].numpy(), s, rtol=1e-4)
    v = b["V"].numpy()
    signs = np.sign((v * vh.T).sum(0))  # singular vectors are defined up to their sign
    np.testing.assert_allclose(v * signs, vh.T, atol=1e-5)
    d = 2
    proj = (f_t - mu) @ vh.T[:, :d] * signs[:d]
    got = project(torch.tensor(f_t, dtype=torch.float32), b["mu"], b["V"][:, :d])
    np.testing.assert_allclose(got.numpy(), proj, rtol=1e-4, atol=1e-5)
    target = np.sign(proj) * np.abs(proj / 0.1) ** (1 / 3)
    # the method's loss on cached teacher features and a resnet8 student = 3 * MSE(f_s, target)
    student = _model("resnet8")
    m = KDEP(student, _model("resnet8"), teacher_cache={"prerelu": torch.tensor(f_t, dtype=torch.float32)})
    m.set_basis(b["mu"], b["V"][:, :d])
    f_s = rng.normal(size=(6, d))
    loss = m.feature_loss(torch.tensor(f_s, dtype=torch.float32), torch.tensor(f_t, dtype=torch.float32))
    assert loss.item() == pytest.approx(3.0 * np.mean((f_s - target) ** 2), rel=1e-4)


def test_method_loss_uses_the_student_pre_relu_features():
    torch.manual_seed(0)
    xb = torch.rand(100, 1, 8, 8)  # basis data: >= 64 samples, so the basis has the student's 64 directions
    x, y, idx = xb[:5], torch.randint(0, 10, (5,)), torch.arange(5)
    teacher = _model("wrn_16_2").eval()
    with torch.no_grad():
        f_t = pre_activation_features(teacher, xb)[0]
    b = svd_basis(f_t)
    v = b["V"][:, :64]
    m = KDEP(_model("resnet8"), teacher, loss_w=2.0).set_basis(b["mu"], v)
    m.student.eval()
    with torch.no_grad():
        loss, logs = m.loss(Batch(x, y, idx))
        f_s = pre_activation_features(m.student, x)[0]
    want = 2.0 * F.mse_loss(f_s, pts(project(f_t[:5], b["mu"], v)))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert set(logs) == {"feat_loss"}  # kl_w = ce_w = 0: no logit or label term
    m.kl_w, m.ce_w = 1.0, 1.0
    with torch.no_grad():
        assert set(m.loss(Batch(x, y, idx))[1]) == {"feat_loss", "kl", "ce"}
    with pytest.raises(UserError, match="64-d student features but the basis projects to 4"):
        KDEP(_model("resnet8"), teacher).set_basis(b["mu"], b["V"][:, :4]).loss(Batch(x, y, idx))
    bad = KDEP(_model("resnet8"), teacher).set_basis(b["mu"], v)
    bad.student.net.stages[-1][-1].act = nn.Identity()  # the final activation is gone: refused, not mis-hooked
    with pytest.raises(UserError, match="cannot find the final activation"):
        bad.loss(Batch(x, y, idx))


def test_dimension_mismatch_is_refused():
    with pytest.raises(UserError, match="d_student <= d_teacher"):
        check_dims(512, 256, 256, "t", "s")
    with pytest.raises(UserError, match="SVD basis has only 30 directions"):
        check_dims(64, 128, 30)
    check_dims(64, 128, 128)


# ------------------------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A wrn_16_2 checkpoint (random weights: enough for the mechanics) so no zoo model has to be trained."""
    d = tmp_path_factory.mktemp("kdep_teacher") / "wrn"
    save_checkpoint(_model("wrn_16_2"), d, {"name": "wrn_rand", "kwargs": {}, "dataset": DIGITS})
    return d


def _cfg(kt_paths, teacher_dir, *extra):
    return compose("kdep/kdep", [*kt_paths, f"teacher={teacher_dir}", "baselines=[scratch]",
                                 "trainer.max_steps=24", "trainer.eval_every_steps=12", "finetune.trainer.max_steps=4",
                                 "downstream=[{name:d20,train_split:transfer,eval_split:test,fraction:0.2}]", *extra])


@pytest.fixture(scope="module")
def first_run(kt_paths, teacher_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("kdep_run")
    return kdep.run(_cfg(kt_paths, teacher_dir), run_dir=run_dir), run_dir


@pytest.mark.trained
def test_end_to_end_summary_and_files(first_run):
    s, run_dir = first_run
    assert s["status"] == "ok" and s["selection"] == "last epoch"
    assert (s["d_teacher"], s["d_student"]) == (128, 64)
    assert s["inits"] == ["kdep", "scratch"] and s["stages_trained"] == ["distill", "finetune_d20_kdep",
                                                                          "finetune_d20_scratch"]
    r = s["downstream"]["d20"]
    assert 0 <= r["kdep"] <= 100 and 0 <= r["scratch"] <= 100
    assert r["delta_vs_scratch"] == pytest.approx(r["kdep"] - r["scratch"])
    assert s["d20/kdep"] == r["kdep"] and abs(r["train_size"] - 0.2 * 539) < 5  # 20% of `transfer`, per class
    # the distillation learns: the student's features approach the teacher's projected targets
    assert s["distill_loss_end"] < 0.85 * s["distill_loss_start"]
    assert json.loads((run_dir / "summary.json").read_text())["downstream"] == s["downstream"]
    steps = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 24 + 4 + 4
    for p in ("kdep_basis.safetensors", "stages/distill/student/model.safetensors", "stages/distill/row.json",
              "stages/finetune_d20_kdep/row.json", "stages/finetune_d20_scratch/row.json", "checkpoints/distill/latest",
              "checkpoints/finetune_d20_kdep/latest"):
        assert (run_dir / p).is_file(), p
    assert s["basis"] == str(run_dir / "kdep_basis.safetensors") and not s["basis_reused"]


def test_basis_file_round_trip_and_reuse(first_run, kt_paths, teacher_dir, tmp_path, caplog):
    s, run_dir = first_run
    b = load_state_dict(run_dir / "kdep_basis.safetensors")
    assert b["mu"].shape == (128,) and b["V"].shape == (128, 128)
    torch.testing.assert_close(b["V"].T @ b["V"], torch.eye(128), atol=1e-4, rtol=0)
    caplog.set_level("INFO")
    s2 = kdep.run(_cfg(kt_paths, teacher_dir, f"basis={run_dir / 'kdep_basis.safetensors'}",
                       "dataset.subset.fraction=0.5"), run_dir=tmp_path)
    assert s2["basis_reused"] and s2["basis"] == str(run_dir / "kdep_basis.safetensors")
    assert not (tmp_path / "kdep_basis.safetensors").exists()
    assert s2["upstream_size"] < s["upstream_size"]
    # a basis of another teacher width is refused with the fix
    other = tmp_path / "other.safetensors"
    from src.io_utils import save_safetensors

    save_safetensors(svd_basis(torch.randn(80, 16)), other)
    with pytest.raises(UserError, match="16-d teacher features but teacher"):
        kdep.run(_cfg(kt_paths, teacher_dir, f"basis={other}"), run_dir=tmp_path / "x")


def test_teacher_features_are_cached_on_disk(first_run, kt_paths, teacher_dir, tmp_path, caplog):
    caplog.set_level("DEBUG")  # cache hits/writes are DEBUG lines
    kdep.run(_cfg(kt_paths, teacher_dir, "trainer.max_steps=2", "finetune.trainer.max_steps=1"),
             run_dir=tmp_path)
    assert any("output cache hit" in r.message and "pre-ReLU" in r.message for r in caplog.records)


def test_rerun_skips_finished_stages_and_resumes_the_unfinished(first_run, kt_paths, teacher_dir):
    s, run_dir = first_run
    again = kdep.run(_cfg(kt_paths, teacher_dir), run_dir=run_dir)
    assert again["stages_trained"] == []
    assert again["downstream"] == s["downstream"] and again["distill_loss_end"] == s["distill_loss_end"]
    (run_dir / "stages" / "finetune_d20_scratch" / "row.json").unlink()  # as if killed before the row was written
    third = kdep.run(_cfg(kt_paths, teacher_dir), run_dir=run_dir)
    assert third["stages_trained"] == ["finetune_d20_scratch"]  # its trainer resumed from its final checkpoint
    assert third["downstream"]["d20"]["scratch"] == pytest.approx(s["downstream"]["d20"]["scratch"])


def test_downstream_roots_resolve_in_place_and_are_checked_before_stage_1(tmp_path):
    """`${paths.data}/dtd` did not resolve (the node was merged out of the root config first): an
    InterpolationKeyError traceback at stage 5 of 13, after the distillation. It resolves in place now, and every
    ImageFolder downstream's folders and class count are checked before stage 1."""
    cfg = compose("kdep/imagenet_r50_r18", [f"paths.data={tmp_path}"])
    entries = {str(d.name): d for d in cfg.downstream}
    assert kdep.downstream_dataset_cfg(entries["dtd"]).root == f"{tmp_path}/dtd"
    with pytest.raises(UserError, match=rf"downstream dtd: folder {tmp_path}/dtd/train not found"):
        kdep.check_downstream_dataset(entries["dtd"])
    for name, k in (("dtd", 47), ("caltech256", 257), ("cub200", 200)):
        for sub in ("train", "val"):
            for c in range(k):
                (tmp_path / name / sub / f"c{c:03d}").mkdir(parents=True)
    (tmp_path / "cub200" / "val" / "c000").rmdir()
    for d in cfg.downstream:
        if str(d.name) == "cub200":
            with pytest.raises(UserError, match=r"downstream cub200: .*cub200/val has 199 class folders but its "
                                                 r"dataset.num_classes=200"):
                kdep.check_downstream_dataset(d)
        else:
            kdep.check_downstream_dataset(d)  # cifar100 (no root: its files are read when it is built), dtd, ...


def test_imagefolder_downstreams_get_their_own_betons_and_loader_ffcv_checks_them_first(tmp_path):
    """The three ImageFolder downstreams shared one beton name (imagefolder_<split>.beton), so FFCV fine-tuning on
    them could not work (found at stage 5). Betons are named by the folder they hold; all are checked up front."""
    from omegaconf import OmegaConf

    from src.data.datasets import data_source
    from src.data.ffcv_loader import beton_path

    cfg = compose("kdep/imagenet_r50_r18", [f"paths.data={tmp_path}"])
    for name, k in (("dtd", 47), ("caltech256", 257), ("cub200", 200)):
        for sub in ("train", "val"):
            for c in range(k):
                (tmp_path / name / sub / f"c{c:03d}").mkdir(parents=True)
    names = {str(d.name): beton_path(tmp_path / "ff", "imagefolder", "train",
                                     data_source(kdep.downstream_dataset_cfg(d)))
             for d in cfg.downstream if str(d.name) != "cifar100"}
    assert {n: p.name for n, p in names.items()} == {n: f"imagefolder-{n}_train.beton" for n in names}
    assert beton_path(tmp_path, "imagenet", "train", "") == tmp_path / "imagenet_train.beton"  # unchanged
    loader = OmegaConf.create({"backend": "ffcv", "ffcv_dir": str(tmp_path / "ff")})
    dtd = next(d for d in cfg.downstream if str(d.name) == "dtd")
    with pytest.raises(UserError, match=r"downstream dtd: loader=ffcv reads .*imagefolder-dtd_train.beton, which "
                                         r"does not exist: write it with `python scripts/write_ffcv.py"):
        kdep.check_downstream_dataset(dtd, loader)
    (tmp_path / "ff").mkdir()
    for split in ("train", "test"):
        (tmp_path / "ff" / f"imagefolder-dtd_{split}.beton").write_bytes(b"x")
    kdep.check_downstream_dataset(dtd, loader)
