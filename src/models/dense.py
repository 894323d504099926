"""Segmentation and detection models on a backbone built from a student (a TransferModel): torchvision's own
heads and detectors, nothing hand-written.

- `StudentBackbone`: the student itself (its weights, its input normalisation: images stay in [0, 1]) returning
  its stage outputs (`intermediates`) as the OrderedDict torchvision's heads read; `carries_weights` checks, tensor
  by tensor, that the built model holds the student's weights (no silently re-initialised backbone).
- segmentation: torchvision.models.segmentation `FCN` (FCNHead) or `DeepLabV3` (DeepLabHead, ASPP) on the last
  stage (the PSPNet-style single-map head of the KDEP paper's setting), logits upsampled to the input size.
- detection: torchvision.models.detection `FasterRCNN` (with RPN) / `RetinaNet` / `FCOS` on the student's last
  stages + torchvision's `FeaturePyramidNetwork` (what `BackboneWithFPN` builds), anchors sized to each level's
  stride (8x / 4x / 1x stride: torchvision's defaults for the ResNet-FPN detectors), the detectors' own
  normalisation disabled (mean 0, std 1: the student normalises) and their resizing fixed to the crop size.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..errors import UserError, check, closest

HEADS = ("fcn", "deeplabv3")
DETECTORS = ("faster_rcnn", "retinanet", "fcos")
MIN_STAGES = {"faster_rcnn": 2, "retinanet": 2, "fcos": 2}  # an FPN needs at least two levels


def stage_shapes(student: nn.Module, channels: int, size: int) -> List[tuple]:
    """(channels, stride) of each stage output of `student` on a (1, channels, size, size) probe; one line when the
    student has no stages."""
    check(getattr(student, "has_intermediates", False),
          f"model '{getattr(student, 'arch', type(student).__name__)}' exposes no intermediate stages: a "
          f"segmentation / detection backbone needs them (use a timm CNN or one of ours: resnet8, wrn_16_2, ...)")
    was = student.training
    student.eval()
    with torch.no_grad():
        p = next(student.parameters())
        outs = student.intermediates(torch.zeros(1, channels, size, size, device=p.device, dtype=p.dtype))
    student.train(was)
    return [(int(o.shape[1]), max(1, size // int(o.shape[-1]))) for o in outs]


class StudentBackbone(nn.Module):
    """The student's stage outputs `stages` (indices into its intermediates) as OrderedDict {name: map}; names are
    '0', '1', ... or ['out'] for one segmentation map. `out_channels`: the last selected stage's width."""

    def __init__(self, student: nn.Module, stages: List[int], names: Optional[List[str]] = None):
        super().__init__()
        self.student = student
        self.stages = list(stages)
        self.names = names or [str(i) for i in range(len(self.stages))]

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        outs = self.student.intermediates(x)
        return OrderedDict((n, outs[i]) for n, i in zip(self.names, self.stages))


def carries_weights(model: nn.Module, student: nn.Module, prefix: str) -> None:
    """Every tensor of the student but its classifier is, under `prefix`, bit-identical in `model`; one line
    naming the first that is missing or differs."""
    own = model.state_dict()
    head = {f"net.{k}" for k in _classifier_names(student)}
    for k, v in student.state_dict().items():
        if any(k.startswith(h) for h in head):
            continue
        got = own.get(prefix + k)
        if got is None or got.shape != v.shape or not torch.equal(got.cpu(), v.cpu()):
            raise UserError(f"the dense model's backbone does not hold the student's weight {k} "
                            f"({'missing' if got is None else 'different'}): the student was not loaded into it")


def _classifier_names(student: nn.Module) -> List[str]:
    net = getattr(student, "net", student)
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    return [n for n, m in net.named_modules() if head is not None and m is head and n]


def build_segmenter(student: nn.Module, num_classes: int, head: str = "fcn", channels: int = 3,
                    size: int = 32) -> nn.Module:
    """torchvision FCN / DeepLabV3 with `num_classes` outputs on the student's last stage; model(x)['out'] are
    logits (N, K, H, W) at the input size."""
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
    from torchvision.models.segmentation.fcn import FCN, FCNHead

    check(head in HEADS, f"head={head} is unknown{closest(head, HEADS)}: use one of {list(HEADS)}")
    shapes = stage_shapes(student, channels, size)
    c = shapes[-1][0]
    backbone = StudentBackbone(student, [len(shapes) - 1], ["out"])
    if head == "fcn":
        model = FCN(backbone, FCNHead(c, num_classes))
    else:
        model = DeepLabV3(backbone, DeepLabHead(c, num_classes))
    carries_weights(model, student, "backbone.student.")
    return model


class FPNBackbone(nn.Module):
    """Student stages -> torchvision FeaturePyramidNetwork (as BackboneWithFPN, on intermediates instead of named
    children); `out_channels` is the pyramid's width, as torchvision's detectors read it."""

    def __init__(self, body: StudentBackbone, in_channels: List[int], out_channels: int, extra):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def _fpn(student: nn.Module, detector: str, stages: int, width: int, channels: int, size: int) -> tuple:
    """(FPNBackbone, strides of its levels) on the student's last `stages` stages."""
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    shapes = stage_shapes(student, channels, size)
    need = max(MIN_STAGES[detector], stages)
    check(len(shapes) >= need, f"detector={detector} with stages={stages} needs {need} stage outputs but model "
                               f"'{getattr(student, 'arch', '')}' has {len(shapes)}: lower the downstream's "
                               f"stages or use a deeper backbone")
    idx = list(range(len(shapes) - stages, len(shapes)))
    strides = [shapes[i][1] for i in idx]
    extra = LastLevelMaxPool() if detector == "faster_rcnn" else LastLevelP6P7(width, width)
    strides += [strides[-1] * 2] if detector == "faster_rcnn" else [strides[-1] * 2, strides[-1] * 4]
    body = StudentBackbone(student, idx)
    return FPNBackbone(body, [shapes[i][0] for i in idx], width, extra), strides


def build_detector(student: nn.Module, num_classes: int, detector: str = "faster_rcnn", stages: int = 3,
                   channels: int = 3, size: int = 32, fpn_width: int = 256, **kwargs) -> nn.Module:
    """torchvision FasterRCNN / RetinaNet / FCOS for `num_classes` object classes (labels 1..num_classes; 0 is
    the background) on the student + FPN. `kwargs` go to the torchvision constructor (e.g. rpn_pre_nms_top_n_train,
    box_detections_per_img, min_size)."""
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    check(detector in DETECTORS, f"detector={detector} is unknown{closest(detector, DETECTORS)}: use one of "
                                 f"{list(DETECTORS)}")
    backbone, strides = _fpn(student, detector, int(stages), int(fpn_width), channels, size)
    common = dict(min_size=size, max_size=size, image_mean=[0.0] * channels, image_std=[1.0] * channels)
    common.update(kwargs)
    if detector == "faster_rcnn":
        anchors = AnchorGenerator(tuple((8 * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))
        from torchvision.ops import MultiScaleRoIAlign

        roi = MultiScaleRoIAlign([str(i) for i in range(len(strides) - 1)], output_size=7, sampling_ratio=2)
        model = FasterRCNN(backbone, num_classes + 1, rpn_anchor_generator=anchors, box_roi_pool=roi, **common)
    elif detector == "retinanet":
        anchors = AnchorGenerator(tuple(tuple(4 * s * 2 ** (k / 3) for k in range(3)) for s in strides),
                                  ((0.5, 1.0, 2.0),) * len(strides))
        model = RetinaNet(backbone, num_classes + 1, anchor_generator=anchors, **common)
    else:
        anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
        model = FCOS(backbone, num_classes + 1, anchor_generator=anchors, **common)
    carries_weights(model, student, "backbone.body.student.")
    return model
