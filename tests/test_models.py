"""Models: the factory for a timm name and each of our nets, the features/logits API, WRN intermediates, local
checkpoints with and without a head mismatch, zoo checkpoints, refusal of unsafe pickles, and the normalisation
wrapper."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from src.errors import UserError
from src.io_utils import file_hash, load_state_dict, save_safetensors
from src.models import (OUR_MODELS, ImageInputs, Normalized, TransferModel, create_model, freeze, load_checkpoint,
                        load_weights, read_meta, save_checkpoint)

GREY = dict(in_chans=1, mean=[0.3], std=[0.38])
RGB = dict(in_chans=3, mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26])


def _make(arch, num_classes=10, rgb=False, seed=0, **kw):
    torch.manual_seed(seed)
    stats = RGB if rgb else GREY
    inputs = ImageInputs(num_classes, stats["in_chans"], stats["mean"], stats["std"], kw.pop("img_size", None))
    return create_model(arch, inputs, **kw)


def test_our_models_are_the_advertised_ones():
    assert set(OUR_MODELS) == {"mlp", "lenet", "resnet8", "resnet20", "resnet56", "wrn_16_1", "wrn_16_2",
                               "wrn_40_2"}
    import timm

    assert all(timm.is_model(n) for n in OUR_MODELS)


def test_timm_model_by_name_without_hub_weights():
    m = _make("resnet18", num_classes=7, rgb=True)
    assert isinstance(m, Normalized) and m.arch == "resnet18" and m.num_classes == 7
    assert m.mean.flatten().tolist() == pytest.approx(RGB["mean"]) and m.std.flatten().tolist() == pytest.approx(
        RGB["std"])
    m.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        z = m(x)
        f, z2 = m.features_and_logits(x)
    assert z.shape == (2, 7) and f.shape == (2, m.num_features) and m.num_features == 512
    torch.testing.assert_close(z, z2)


@pytest.mark.parametrize("arch", OUR_MODELS)
def test_each_of_our_nets_on_digits_and_cifar_shapes(arch):
    for rgb, shape in ((False, (2, 1, 8, 8)), (True, (2, 3, 32, 32))):
        m = _make(arch, num_classes=10, rgb=rgb, img_size=shape[-1])
        m.eval()
        x = torch.rand(*shape)
        with torch.no_grad():
            z = m(x)
            f, z2 = m.features_and_logits(x)
        assert z.shape == (2, 10) and torch.isfinite(z).all()
        assert f.shape == (2, m.num_features)
        torch.testing.assert_close(z, z2)
        assert m.classifier.in_features == m.num_features


@pytest.mark.parametrize("arch,widths", [("wrn_16_1", (16, 32, 64)), ("wrn_16_2", (32, 64, 128)),
                                         ("resnet8", (16, 32, 64))])
def test_intermediates_give_three_stages(arch, widths):
    m = _make(arch, rgb=True).eval()
    with torch.no_grad():
        inter = m.intermediates(torch.rand(2, 3, 32, 32))
    assert len(inter) == 3
    assert [t.shape for t in inter] == [(2, widths[0], 32, 32), (2, widths[1], 16, 16), (2, widths[2], 8, 8)]


def test_intermediates_unavailable_is_a_user_error():
    with pytest.raises(UserError, match="intermediate"):
        _make("mlp").intermediates(torch.rand(1, 1, 8, 8))


def test_kwargs_are_passed_and_bad_names_are_user_errors():
    m = _make("mlp", kwargs={"hidden": [7, 5]}, img_size=8)
    assert m.num_features == 5 and m.net.body[1].out_features == 7
    assert _make("lenet", kwargs={"width": 2}).num_features == 168
    with pytest.raises(UserError, match="unknown model 'resnet21'.*closest"):
        _make("resnet21")


def test_normalized_applies_mean_and_std():
    class Capture(nn.Module):
        def forward(self, x):
            self.seen = x
            return x.flatten(1)[:, :3]

    net = Capture()
    m = Normalized(net, mean=[0.5, 0.2, 0.1], std=[0.25, 0.5, 2.0])
    x = torch.rand(4, 3, 5, 5)
    out = m(x)
    mean = torch.tensor([0.5, 0.2, 0.1]).view(1, 3, 1, 1)
    std = torch.tensor([0.25, 0.5, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(net.seen, (x - mean) / std)
    torch.testing.assert_close(m.normalize(x), (x - mean) / std)
    assert out.shape == (4, 3)
    # the statistics are buffers: saved with the weights, moved with .to()
    assert set(m.state_dict()) == {"mean", "std"}
    assert m.double().mean.dtype == torch.float64


def test_normalized_follows_the_input_dtype():
    m = _make("mlp", img_size=8).eval()
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(m.to(torch.float64)(x.double()).float(), m.float()(x), rtol=1e-4, atol=1e-5)


def _outputs(m, x):
    m.eval()
    with torch.no_grad():
        return m(x)


def test_local_checkpoint_same_classes_loads_everything(tmp_path):
    a = _make("resnet8", seed=1)
    b_init = _make("resnet8", seed=2)
    path = tmp_path / "net.safetensors"
    save_safetensors(a.net.state_dict(), path)  # a plain timm-style state dict of the network
    b = _make("resnet8", seed=2, checkpoint=str(path))
    for k, v in a.net.state_dict().items():
        assert torch.equal(b.net.state_dict()[k], v), k
    assert not torch.equal(b_init.net.fc.weight, a.net.fc.weight)
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(_outputs(a, x), _outputs(b, x))


def test_local_checkpoint_with_other_class_count_reinitialises_only_the_head(tmp_path, caplog):
    src = _make("resnet8", num_classes=10, seed=1)
    path = tmp_path / "net.pt"
    # a torch file with the usual wrappers: {'state_dict': {'module.<key>': ...}}
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.net.state_dict().items()}, "epoch": 3}, path)
    torch.manual_seed(5)
    fresh = _make("resnet8", num_classes=4, seed=5)
    with caplog.at_level(logging.WARNING):
        m = _make("resnet8", num_classes=4, seed=5, checkpoint=str(path))
    assert "re-initialised the classifier" in caplog.text
    assert m.num_classes == 4 and m.net.fc.weight.shape == (4, m.num_features)
    sd, ref = m.net.state_dict(), src.net.state_dict()
    body = [k for k in sd if not k.startswith("fc.")]
    assert len(body) > 10
    for k in body:
        assert torch.equal(sd[k], ref[k]), k
    # the head is the fresh model's initialisation, not the checkpoint's
    assert torch.equal(m.net.fc.weight, fresh.net.fc.weight)
    assert m(torch.rand(2, 1, 8, 8)).shape == (2, 4)


def test_load_weights_returns_a_message_only_on_head_mismatch():
    a, b = _make("mlp", 10, img_size=8), _make("mlp", 3, img_size=8)
    assert load_weights(b.net, a.net.state_dict(), "a") != ""
    assert load_weights(a.net, _make("mlp", 10, seed=3, img_size=8).net.state_dict(), "c") == ""


def test_checkpoint_of_another_architecture_is_a_user_error(tmp_path):
    path = tmp_path / "lenet.safetensors"
    save_safetensors(_make("lenet").net.state_dict(), path)
    with pytest.raises(UserError, match="does not fit this architecture"):
        _make("resnet8", checkpoint=str(path))
    # same family, other depth: mis-shaped / missing keys are not mistaken for a head mismatch
    save_safetensors(_make("resnet8").net.state_dict(), path)
    with pytest.raises(UserError, match="does not fit"):
        _make("resnet20", checkpoint=str(path))


def test_missing_and_corrupt_checkpoints_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_state_dict(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_safetensors({"w": torch.ones(100)}, bad)
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_state_dict(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(UserError):
        load_state_dict(junk)
    notensors = tmp_path / "list.pt"
    torch.save([1, 2, 3], notensors)
    with pytest.raises(UserError, match="no state dict"):
        load_state_dict(notensors)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch_save", "raw_pickle"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, how):
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {"fc.weight": torch.zeros(2, 2)}, "hook": _Evil(marker)}
    if how == "torch_save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    assert not marker.exists()
    with pytest.raises(UserError, match="refusing to load"):
        load_state_dict(path)
    assert not marker.exists(), "the pickle's command was executed"
    with pytest.raises(UserError):
        _make("mlp", checkpoint=str(path))
    assert not marker.exists()


def test_zoo_checkpoint_round_trip(tmp_path):
    m = create_model("wrn_16_1", ImageInputs(10, 3, [0.1, 0.2, 0.3], [0.9, 0.8, 0.7]), kwargs={"drop_rate": 0.1})
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    folder = tmp_path / "digits" / "w"
    meta = save_checkpoint(m, folder, {"name": "w", "kwargs": {"drop_rate": 0.1},
                                       "dataset": {"channels": 3, "image_size": 32}, "test_acc": 0.5})
    assert meta["arch"] == "wrn_16_1" and meta["num_classes"] == 10
    assert meta["hash"] == file_hash(folder / "model.safetensors")
    assert json.loads((folder / "meta.json").read_text())["hash"] == meta["hash"]
    assert read_meta(folder)["test_acc"] == 50.0  # written without acc_unit (before percent): read as percent
    save_checkpoint(m, folder, {"name": "w", "kwargs": {"drop_rate": 0.1}, "acc_unit": "percent",
                                "dataset": {"channels": 3, "image_size": 32}, "test_acc": 0.5})
    assert read_meta(folder)["test_acc"] == 0.5  # percent already: as written
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.safetensors"]  # no temp files left
    for target in (folder, folder / "model.safetensors"):
        loaded, lmeta = load_checkpoint(target, expect_classes=10, expect_channels=3)
        assert lmeta["name"] == "w"
        sd = m.state_dict()
        assert set(loaded.state_dict()) == set(sd)
        for k, v in sd.items():
            assert torch.equal(loaded.state_dict()[k], v), k  # includes the normalisation statistics
        x = torch.rand(2, 3, 32, 32)
        torch.testing.assert_close(_outputs(loaded, x), _outputs(m, x))
    with pytest.raises(UserError, match="classes"):
        load_checkpoint(folder, expect_classes=100)
    with pytest.raises(UserError, match="channel"):
        load_checkpoint(folder, expect_channels=1)
    with pytest.raises(UserError, match="holds no model"):
        load_checkpoint(tmp_path / "empty")


def test_normalized_checkpoint_loads_through_create_model(tmp_path):
    m = create_model("lenet", ImageInputs(10, 1, [0.25], [0.5]))
    path = tmp_path / "m.safetensors"
    save_safetensors(m.state_dict(), path)  # keys net.* + mean/std
    m2 = create_model("lenet", ImageInputs(10, 1, [0.0], [1.0]), checkpoint=str(path))
    assert m2.mean.item() == 0.25 and m2.std.item() == 0.5
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(_outputs(m2, x), _outputs(m, x))


def test_freeze():
    m = freeze(_make("mlp", img_size=8).train())
    assert not m.training and not any(p.requires_grad for p in m.parameters())


# ------------------------------------------------------------------------------------------- the protocol
def _protocol_model(kind, tmp_path):
    """A zoo net (one of ours, saved and loaded as a zoo checkpoint) or a timm net, 3-channel 32x32."""
    if kind == "timm":
        return _make("resnet18", num_classes=7, rgb=True)
    save_checkpoint(_make("wrn_16_1", num_classes=7, rgb=True), tmp_path / "w",
                    {"name": "w", "dataset": {"channels": 3, "image_size": 32}})
    return load_checkpoint(tmp_path / "w", expect_classes=7, expect_channels=3)[0]


@pytest.mark.parametrize("kind", ["zoo", "timm"])
def test_every_model_implements_the_protocol(kind, tmp_path):
    m = _protocol_model(kind, tmp_path).eval()
    assert isinstance(m, TransferModel) and m.arch == ("resnet18" if kind == "timm" else "wrn_16_1")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        z, f = m(x), m.features(x)
        f2, z2 = m.features_and_logits(x)
        inter = m.intermediates(x)
        z3, inter3 = m.logits_and_intermediates(x)
        z4 = m.forward_normalized(m.normalize(x))
        head = m.classifier(f)
    assert m.num_classes == 7 and z.shape == (2, 7) and f.shape == (2, m.num_features)
    for other in (z2, z3, z4, head):
        torch.testing.assert_close(other, z)
    torch.testing.assert_close(f2, f)
    assert m.has_intermediates and len(inter) == len(inter3) >= 3
    for a, b in zip(inter, inter3):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(m.denormalize(m.normalize(x)), x)
    assert m.pretrained_tag == (getattr(m.net, "pretrained_cfg", {}).get("tag") or "")


@pytest.mark.parametrize("kind", ["zoo", "timm"])
def test_protocol_head_reset_and_linear_probe(kind, tmp_path):
    m = _protocol_model(kind, tmp_path)
    m.reset_classifier(4)
    assert m.num_classes == 4 and m.classifier.weight.shape == (4, m.num_features)
    assert m.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    m.train()
    assert m.freeze_backbone() is m and not m.net.training
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in m.classifier.parameters()} and len(trainable) == 2  # weight and bias
    assert len(list(m.parameters())) > 2


def test_protocol_without_stages_and_other_modalities():
    m = _make("mlp", img_size=8)
    assert isinstance(m, TransferModel) and not m.has_intermediates
    with pytest.raises(UserError, match="intermediate"):
        m.logits_and_intermediates(torch.rand(1, 1, 8, 8))
    assert _make("mlp", img_size=4).net.img_size == 4  # info.image_size reaches the mlp (only it takes one)
    with pytest.raises(UserError, match="modality 'audio' has no model class yet"):
        create_model("mlp", ImageInputs(10, 1, [0.3], [0.38], 8, modality="audio"))
    with pytest.raises(UserError, match="'mlp' is not a text model"):  # text has its class: src/models/text.py
        create_model("mlp", ImageInputs(10, 1, [0.3], [0.38], 8, modality="text"))


# ------------------------------------------------------------------------------------------- model specs
ZOO = {"mlp_small": {"arch": "mlp", "kwargs": {"hidden": [24]}}, "resnet20": {"arch": "wrn_16_1"}}


def test_model_spec_every_kind(tmp_path):
    from omegaconf import OmegaConf

    from src.models import ModelSpec

    s = ModelSpec.parse("mlp_small", ZOO)
    assert (s.kind, s.text, s.arch, s.path, s.node, s.name) == ("zoo", "mlp_small", "mlp", None, None, "mlp_small")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    s = ModelSpec.parse(str(folder), ZOO)
    assert (s.kind, s.arch, s.path, s.node, s.name) == ("path", None, str(folder), None, str(folder))
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"")
    s = ModelSpec.parse(f, ZOO)  # a Path is read as its text
    assert (s.kind, s.text, s.path) == ("path", str(f), str(f))
    s = ModelSpec.parse("resnet8@/no/such/dir/w@2.safetensors", ZOO)  # split on the first @
    assert (s.kind, s.arch, s.path, s.name) == ("arch_file", "resnet8", "/no/such/dir/w@2.safetensors",
                                                "resnet8@/no/such/dir/w@2.safetensors")
    s = ModelSpec.parse("vit_tiny_patch16_224", ZOO)
    assert (s.kind, s.arch, s.path, s.node, s.name) == ("timm", "vit_tiny_patch16_224", None, None,
                                                         "vit_tiny_patch16_224")
    assert s.is_fresh_arch and not ModelSpec.parse("mlp_small", ZOO).is_fresh_arch
    node = OmegaConf.create({"arch": "mlp", "kwargs": {"hidden": [8]}, "name": "tiny", "extra": 1})
    s = ModelSpec.parse(node, ZOO)
    assert (s.kind, s.arch, s.path, s.name) == ("node", "mlp", None, "tiny")
    assert s.node == {"arch": "mlp", "pretrained": False, "checkpoint": None, "kwargs": {"hidden": [8]},
                      "name": "tiny"}
    assert isinstance(s.node["kwargs"], dict) and isinstance(s.node["kwargs"]["hidden"], list)  # plain containers
    s = ModelSpec.parse({"arch": "resnet18", "pretrained": True, "checkpoint": str(f)})
    assert (s.kind, s.name, s.node["pretrained"], s.node["checkpoint"]) == ("node", "resnet18", True, str(f))
    # parsing is stable and specs compare by value (nodes too); a parsed spec parses to itself
    assert ModelSpec.parse("mlp_small", ZOO) == ModelSpec.parse("mlp_small", ZOO)
    assert len({ModelSpec.parse(node), ModelSpec.parse(node)}) == 1
    assert ModelSpec.parse(s) is s


def test_model_spec_precedence(tmp_path, monkeypatch):
    from src.models import ModelSpec

    # a zoo name that is also a timm name is the zoo entry (its arch, not the timm name)
    s = ModelSpec.parse("resnet20", ZOO)
    assert (s.kind, s.arch) == ("zoo", "wrn_16_1")
    assert ModelSpec.parse("resnet20").kind == "timm" and ModelSpec.parse("resnet20", {}).kind == "timm"
    # a zoo name wins over an existing folder of that name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlp_small").mkdir()
    assert ModelSpec.parse("mlp_small", ZOO).kind == "zoo" and ModelSpec.parse("mlp_small").kind == "path"
    # an existing folder whose name holds @ is a path, not arch@file; the same text without the folder is arch@file
    d = tmp_path / "runs" / "mlp@lr0.1"
    assert ModelSpec.parse(str(d)).kind == "arch_file"
    d.mkdir(parents=True)
    s = ModelSpec.parse(str(d), ZOO)
    assert (s.kind, s.arch, s.path) == ("path", None, str(d))
    # a mapping is a node even when it would name a zoo entry
    assert ModelSpec.parse({"arch": "mlp_small"}, ZOO).kind == "node"
    # '' is not the working directory
    assert ModelSpec.parse("").kind == "timm"


def test_model_spec_zoo_entry_as_config_node():
    from omegaconf import OmegaConf

    from src.models import ModelSpec

    zoo = OmegaConf.load("config/zoo/digits.yaml").models
    name = next(iter(zoo))
    s = ModelSpec.parse(name, zoo)
    assert s.kind == "zoo" and s.arch == str(zoo[name].arch)
    assert s.zoo_names == tuple(zoo.keys())


def test_model_spec_parse_is_pure(tmp_path, monkeypatch):
    """No timm import, no file reads other than Path.exists (the weights file is only looked at by check())."""
    import builtins
    import subprocess
    import sys

    from src.models import ModelSpec

    # the module alone (src.models itself registers our nets in timm): parsing every kind imports no timm
    src = Path(__file__).resolve().parents[1] / "src" / "models" / "spec.py"
    code = (f"import importlib.util as u, sys; s = u.spec_from_file_location('spec', {str(src)!r}); "
            "m = sys.modules['spec'] = u.module_from_spec(s); s.loader.exec_module(m); "
            "[m.ModelSpec.parse(x, {'a': {'arch': 'mlp'}}) "
            "for x in ('a', 'mlp@x.pt', 'resnet18', '.', {'arch': 'b'})]; "
            "print('timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

    def no_open(*a, **k):
        raise AssertionError(f"parse opened {a}")

    monkeypatch.setattr(builtins, "open", no_open)
    monkeypatch.setattr(type(tmp_path), "read_text", no_open)
    monkeypatch.setattr(type(tmp_path), "read_bytes", no_open)
    for s in ("mlp@" + str(tmp_path / "w.pt"), str(tmp_path), "resnet18"):
        ModelSpec.parse(s)


def test_model_spec_check_accepts_valid_specs(tmp_path, monkeypatch):
    import src.models.hub as hub
    from src.models import ModelSpec

    monkeypatch.setattr(hub, "offline", lambda: False)  # `resnet18` is valid where the hub is reachable

    f = tmp_path / "w.safetensors"
    f.write_bytes(b"")
    for spec in ("mlp_small", str(tmp_path), f"resnet8@{f}", "resnet18", "wrn_16_1",
                 {"arch": "mlp", "kwargs": {"hidden": [4]}}, {"checkpoint": "x"}):
        ModelSpec.parse(spec, ZOO).check("teacher")


def test_model_spec_check_messages(tmp_path):
    from src.models import ModelSpec

    f = tmp_path / "w.safetensors"
    f.write_bytes(b"")
    # an unknown architecture in arch@file, with the closest names
    with pytest.raises(UserError) as e:
        ModelSpec.parse(f"resnet2O@{f}", ZOO).check("teacher")
    msg = str(e.value)
    assert msg.startswith(f"unknown architecture 'resnet2O' in teacher=resnet2O@{f} (closest: ")
    assert "resnet20" in msg and msg.endswith(": use arch@weights_file with a timm name or one of ours")
    # a missing weights file
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(UserError) as e:
        ModelSpec.parse(f"resnet8@{missing}", ZOO).check("features[1]")
    assert str(e.value) == (f"weights file {missing} (from features[1]=resnet8@{missing}) does not exist: check "
                            f"the path")
    # a folder is not a weights file
    with pytest.raises(UserError, match="does not exist: check the path"):
        ModelSpec.parse(f"resnet8@{tmp_path}").check()
    # an unknown name: the closest zoo / timm names and the zoo's names (from parse, or given to check)
    with pytest.raises(UserError) as e:
        ModelSpec.parse("mlp_smal", ZOO).check("student")
    msg = str(e.value)
    assert msg.startswith("unknown student 'mlp_smal' (closest: mlp_small")
    assert msg.endswith(": use a zoo name (mlp_small, resnet20), a timm model name, a checkpoint folder or "
                        "arch@weights_file")
    with pytest.raises(UserError) as e:
        ModelSpec.parse("mlp_smal").check("student", zoo_names=["mlp_small"])
    assert "(closest: mlp_small" in str(e.value) and "use a zoo name (mlp_small)," in str(e.value)
    with pytest.raises(UserError) as e:
        ModelSpec.parse("qqqqqqqqqqqq").check()
    assert str(e.value) == ("unknown model 'qqqqqqqqqqqq': use a zoo name (none configured), a timm model name, a "
                            "checkpoint folder or arch@weights_file")
    # a node's kwargs are checked against its arch (the key named in full)
    with pytest.raises(UserError) as e:
        ModelSpec.parse({"arch": "mlp", "kwargs": {"hiden": [4]}}).check("teacher")
    assert str(e.value).startswith("model 'mlp' has no argument hiden (closest: hidden) (teacher.kwargs.hiden)")


def test_model_spec_check_matches_check_model_spec(tmp_path, monkeypatch):
    """ModelSpec.check raises today's check_model_spec messages word for word."""
    from omegaconf import OmegaConf

    import src.models.hub as hub

    monkeypatch.setattr(hub, "offline", lambda: False)  # `resnet18` below: where the hub is reachable
    from src.experiments.preflight import check_model_spec
    from src.models import ModelSpec

    cfg = OmegaConf.create({"zoo": {"models": ZOO}})
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"")
    for spec in (f"resnet2O@{f}", f"resnet8@{tmp_path / 'nope'}", "mlp_smal", "resnet2", "zzzz"):
        with pytest.raises(UserError) as old:
            check_model_spec(spec, cfg, "teacher")
        with pytest.raises(UserError) as new:
            ModelSpec.parse(spec, cfg.zoo.models).check("teacher")
        assert str(new.value) == str(old.value)
    for spec in ("mlp_small", str(tmp_path), f"resnet8@{f}", "resnet18"):  # both accept these
        check_model_spec(spec, cfg, "teacher")
        ModelSpec.parse(spec, cfg.zoo.models).check("teacher")


def test_a_hub_shaped_dinov2_file_loads_headless_with_its_position_table_resampled(tmp_path):
    """AFT's DINOv2 features from a local file: the hub file has no head and a 518 px position table. A headless
    feature model needs no head, and the table is resampled to the built size as timm does for hub weights."""
    import timm
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    hub = timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=518)
    sd = hub.state_dict()
    assert sd["pos_embed"].shape == (1, 37 * 37 + 1, 384) and not any(k.startswith("head.") for k in sd)
    save_safetensors(sd, tmp_path / "dinov2.safetensors")
    info = ImageInputs(100, 3, [0.5] * 3, [0.25] * 3, 224)
    m = create_model("vit_small_patch14_dinov2", info, checkpoint=str(tmp_path / "dinov2.safetensors"),
                     kwargs={"img_size": 224}, headless=True)
    want = resample_abs_pos_embed(sd["pos_embed"], (16, 16), num_prefix_tokens=1)
    assert torch.equal(m.net.pos_embed.detach(), want)
    assert torch.equal(m.net.blocks[0].attn.qkv.weight.detach(), sd["blocks.0.attn.qkv.weight"])
    assert m.num_classes == 0 and m.features(torch.rand(2, 3, 224, 224)).shape == (2, 384)
    with pytest.raises(UserError, match="missing from the checkpoint"):  # a classifier role still needs its head
        create_model("vit_small_patch14_dinov2", info, checkpoint=str(tmp_path / "dinov2.safetensors"),
                     kwargs={"img_size": 224})


def test_arch_at_file_is_built_for_the_datas_resolution(tmp_path):
    """#27.4: `features=[vit_small_patch14_dinov2@file]` carries no kwargs, so the preset's img_size: 224 was lost and
    timm asserted inside the forward. A model that takes img_size is built for dataset.image_size; one that does not
    (a CNN) is built as it is."""
    import timm

    torch.manual_seed(0)
    sd = timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=518).state_dict()
    save_safetensors(sd, tmp_path / "dinov2.safetensors")
    info = ImageInputs(100, 3, [0.5] * 3, [0.25] * 3, 224)
    m = create_model("vit_small_patch14_dinov2", info, checkpoint=str(tmp_path / "dinov2.safetensors"), headless=True)
    assert m.features(torch.rand(2, 3, 224, 224)).shape == (2, 384)
    assert tuple(m.net.patch_embed.img_size) == (224, 224)
    cnn = create_model("resnet18", ImageInputs(10, 3, [0.5] * 3, [0.25] * 3, 64))
    assert cnn(torch.rand(2, 3, 64, 64)).shape == (2, 10)
