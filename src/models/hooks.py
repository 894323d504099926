"""Pre-activation features (KDEP): the global-average-pooled input of a network's FINAL activation, i.e. the
pooled last-stage output before its last ReLU.

Generic mechanism: one probe forward (eval mode, no grad) records the activation modules in execution order; the
last one that ran must be the one whose output the network pools into its penultimate features (checked
numerically), otherwise the architecture is refused with a UserError. Afterwards a forward pre-hook on that
module pools its input before the (possibly in-place) activation overwrites it. Works for timm ResNets (the last
block's `act2`/`act3`), our CIFAR ResNets (`stages[-1][-1].act`), WRNs (`act` after the final BN: they are
pre-activation nets) and MLP/LeNet; a network whose final activation is functional (`F.relu`) or is followed by
more layers before pooling (ViTs: GELU inside the last MLP, then a norm) is refused.
"""
from __future__ import annotations

import weakref
from typing import Tuple

import torch
import torch.nn as nn

from ..errors import UserError

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish)

_FOUND: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def _net(model: nn.Module) -> nn.Module:
    return model.net if hasattr(model, "net") and hasattr(model, "normalize") else model


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "features") and hasattr(model, "normalize"):  # our Normalized wrapper
        return model.features(x)
    return model.forward_head(model.forward_features(x), pre_logits=True)


def pool(t: torch.Tensor) -> torch.Tensor:
    """Global average pooling of a (N, C, H, W) map to (N, C); (N, D) vectors pass through."""
    if t.ndim == 4:
        return t.mean(dim=(2, 3))
    if t.ndim == 2:
        return t
    raise UserError(f"final activation input of shape {tuple(t.shape)} is neither a feature map nor a vector: "
                    f"KDEP's pre-ReLU features need a CNN/MLP student and teacher (e.g. resnet18, resnet8)")


def final_activation(model: nn.Module, x: torch.Tensor) -> str:
    """Name (within the bare network) of the activation module whose pooled output is the model's penultimate
    feature vector; found once per model with a probe forward on (a slice of) `x`."""
    if model in _FOUND:
        return _FOUND[model]
    net = _net(model)
    arch = getattr(model, "arch", "") or type(net).__name__
    acts = [(n, m) for n, m in net.named_modules() if isinstance(m, ACTIVATIONS)]
    if not acts:
        raise UserError(f"cannot find the final activation of '{arch}': it has no activation module (only "
                        f"functional ones): KDEP needs e.g. a timm ResNet or one of resnet8/20/56, wrn_*")
    calls = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: calls.append((n, o))) for n, m in acts]
    was = model.training
    try:
        model.eval()
        # the probe compares two poolings with an fp32 tolerance: it runs in fp32 whatever the run's autocast (in
        # bf16 they round apart, on CPU and CUDA alike, and a timm ResNet would be refused for its precision)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            feats = _features(model, x[:2].float()).float()
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    ok, why = False, "no activation module ran"
    if calls:
        name, out = calls[-1]
        pooled = out.float()
        why = f"its output has shape {tuple(pooled.shape)}"
        if pooled.ndim in (2, 4):
            pooled = pool(pooled)
            ok = pooled.shape == feats.shape and torch.allclose(pooled, feats, rtol=1e-3, atol=1e-4)
            why = (f"its pooled output {tuple(pooled.shape)} differs from the {tuple(feats.shape)} features"
                   + (f" by up to {float((pooled - feats).abs().max()):.3g} (fp32)" if pooled.shape == feats.shape
                      else ""))
    if not ok:
        raise UserError(f"cannot find the final activation of '{arch}': its last activation module "
                        f"({calls[-1][0] if calls else 'none ran'}) is not what it pools into its features ({why}): "
                        f"KDEP needs a CNN whose last stage ends in an activation module (timm ResNets, "
                        f"resnet8/20/56, wrn_*)")
    _FOUND[model] = name
    return name


def pre_activation_features(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(pooled last-stage output before the final activation (N, D) float32, logits) in one forward pass."""
    mod = _net(model).get_submodule(final_activation(model, x))
    box = []
    # pool in the pre-hook: an in-place ReLU overwrites its input right after (the mean keeps no reference to it)
    h = mod.register_forward_pre_hook(lambda m, inp: box.append(pool(inp[0])))
    try:
        logits = model(x)
    finally:
        h.remove()
    return box[-1].float(), logits


def pre_activation_dim(model: nn.Module, x: torch.Tensor) -> int:
    """Width of the pre-activation features (one probe forward on two samples, no grad)."""
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            return int(pre_activation_features(model, x[:2])[0].shape[1])
    finally:
        model.train(was)


class PreActivation(nn.Module):
    """`model` seen through its pre-activation features: `features_and_logits(x)` returns the pooled input of the
    final activation instead of the penultimate features, so `engine.predict` / `OutputCache` compute and cache
    them like any features."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def features_and_logits(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return pre_activation_features(self.model, x)
