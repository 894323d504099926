"""Small networks for digits/CIFAR, registered in timm's registry so `timm.create_model(name)` serves them like any
timm model. All follow timm's feature API: `forward_features` -> `forward_head(pre_logits=True)` gives the
penultimate features, `get_classifier()` the head, `num_features` its width; the CIFAR ResNets and WRNs also
implement `forward_intermediates` returning each stage's output (attention transfer, KDEP)."""
from __future__ import annotations

from typing import List, Sequence

import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model


def _cfg(**kw):
    # no pretrained weights: mean/std of the dataset are used (see models.create_model)
    return dict(url="", num_classes=kw.get("num_classes", 10), mean=None, std=None, first_conv="", classifier="fc")


class _Base(nn.Module):
    num_features: int
    fc: nn.Module

    def forward_head(self, x, pre_logits: bool = False):
        if x.ndim == 4:
            x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self):
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool=None):
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


class MLP(_Base):
    def __init__(self, num_classes=10, in_chans=1, img_size=8, hidden: Sequence[int] = (128,), drop_rate=0.0,
                 **_):
        super().__init__()
        layers: List[nn.Module] = [nn.Flatten()]
        d = in_chans * img_size * img_size
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU(inplace=True)]
            if drop_rate:
                layers.append(nn.Dropout(drop_rate))
            d = h
        self.body, self.num_features, self.num_classes = nn.Sequential(*layers), d, num_classes
        self.fc = nn.Linear(d, num_classes) if num_classes > 0 else nn.Identity()
        self.img_size = img_size

    def forward_features(self, x):
        if x.shape[-1] != self.img_size:
            x = F.adaptive_avg_pool2d(x, self.img_size)
        return self.body(x)


class LeNet(_Base):
    """LeNet-5 with padded convolutions and adaptive pooling so it runs on 8x8 digits as on 32x32 CIFAR."""

    def __init__(self, num_classes=10, in_chans=1, width: int = 1, **_):
        super().__init__()
        c1, c2 = 6 * width, 16 * width
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, c1, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(inplace=True), nn.AdaptiveMaxPool2d(2), nn.Flatten(),
            nn.Linear(c2 * 4, 120 * width), nn.ReLU(inplace=True), nn.Linear(120 * width, 84 * width),
            nn.ReLU(inplace=True))
        self.num_features, self.num_classes = 84 * width, num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        return self.features(x)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.ReLU()  # the block's final activation as a module: KDEP hooks its input (models/hooks.py)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + self.short(x))


class CifarResNet(_Base):
    """ResNet-(6n+2) of He et al. for 32x32 inputs (stages of 16/32/64 x width channels)."""

    def __init__(self, depth=20, num_classes=10, in_chans=3, width: int = 1, **_):
        super().__init__()
        assert (depth - 2) % 6 == 0, "CIFAR ResNet depth must be 6n+2"
        n = (depth - 2) // 6
        w = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Sequential(nn.Conv2d(in_chans, w[0], 3, 1, 1, bias=False), nn.BatchNorm2d(w[0]),
                                  nn.ReLU(inplace=True))
        stages, cin = [], w[0]
        for i, c in enumerate(w):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, c, 2 if (i > 0 and j == 0) else 1))
                cin = c
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.num_features, self.num_classes = cin, num_classes
        self.fc = nn.Linear(cin, num_classes) if num_classes > 0 else nn.Identity()
        _init(self)

    def forward_intermediates(self, x, indices=None, intermediates_only: bool = False, **_):
        x = self.stem(x)
        inter = []
        for s in self.stages:
            x = s(x)
            inter.append(x)
        return inter if intermediates_only else (x, inter)

    def forward_features(self, x):
        return self.forward_intermediates(x)[0]


class WideBlock(nn.Module):
    """Pre-activation wide residual block."""

    def __init__(self, cin, cout, stride, drop_rate=0.0):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.short = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = F.relu(self.bn2(y))
        if self.drop_rate:
            y = F.dropout(y, self.drop_rate, self.training)
        y = self.conv2(y)
        return y + (x if self.short is None else self.short(o))


class WideResNet(_Base):
    """WRN-d-k (Zagoruyko & Komodakis) as used by the zero-shot KT paper; three groups whose outputs
    `forward_intermediates` returns (attention transfer)."""

    def __init__(self, depth=16, widen=1, num_classes=10, in_chans=3, drop_rate=0.0, **_):
        super().__init__()
        assert (depth - 4) % 6 == 0, "WRN depth must be 6n+4"
        n = (depth - 4) // 6
        w = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_chans, w[0], 3, 1, 1, bias=False)
        groups, cin = [], w[0]
        for i, c in enumerate(w[1:]):
            blocks = []
            for j in range(n):
                blocks.append(WideBlock(cin, c, 2 if (i > 0 and j == 0) else 1, drop_rate))
                cin = c
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.ModuleList(groups)
        self.bn = nn.BatchNorm2d(cin)
        self.act = nn.ReLU()  # the final BN+ReLU before pooling (pre-activation net); KDEP hooks its input
        self.num_features, self.num_classes = cin, num_classes
        self.fc = nn.Linear(cin, num_classes) if num_classes > 0 else nn.Identity()
        _init(self)

    def forward_intermediates(self, x, indices=None, intermediates_only: bool = False, **_):
        x = self.stem(x)
        inter = []
        for g in self.groups:
            x = g(x)
            inter.append(x)
        return inter if intermediates_only else (self.act(self.bn(x)), inter)

    def forward_features(self, x):
        return self.forward_intermediates(x)[0]


def _init(m: nn.Module):
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.Linear):
            nn.init.zeros_(mod.bias)


def _make(cls, pretrained: bool, name: str, **kwargs):
    if pretrained:
        raise ValueError(f"'{name}' has no hub weights; give a checkpoint file instead")
    kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("checkpoint_path", None)
    m = cls(**kwargs)
    m.pretrained_cfg = m.default_cfg = _cfg(num_classes=kwargs.get("num_classes", 10))
    return m


@register_model
def mlp(pretrained=False, **kw):
    return _make(MLP, pretrained, "mlp", **kw)


@register_model
def lenet(pretrained=False, **kw):
    return _make(LeNet, pretrained, "lenet", **kw)


@register_model
def resnet8(pretrained=False, **kw):
    return _make(CifarResNet, pretrained, "resnet8", depth=8, **kw)


@register_model
def resnet20(pretrained=False, **kw):
    return _make(CifarResNet, pretrained, "resnet20", depth=20, **kw)


@register_model
def resnet56(pretrained=False, **kw):
    return _make(CifarResNet, pretrained, "resnet56", depth=56, **kw)


@register_model
def wrn_16_1(pretrained=False, **kw):
    return _make(WideResNet, pretrained, "wrn_16_1", depth=16, widen=1, **kw)


@register_model
def wrn_16_2(pretrained=False, **kw):
    return _make(WideResNet, pretrained, "wrn_16_2", depth=16, widen=2, **kw)


@register_model
def wrn_40_2(pretrained=False, **kw):
    return _make(WideResNet, pretrained, "wrn_40_2", depth=40, widen=2, **kw)


OUR_MODELS = ["mlp", "lenet", "resnet8", "resnet20", "resnet56", "wrn_16_1", "wrn_16_2", "wrn_40_2"]
