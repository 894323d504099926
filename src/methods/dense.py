"""Dense fine-tuning "methods" (like CrossEntropy for classification): the loss of a segmentation or detection
model built by src/models/dense.py from a student, and its per-batch evaluation into a metric state of
src/metrics/dense.py (the caller runs it through engine.evaluate.collect, which keeps nothing)."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..metrics.dense import IGNORE, BoxMAP, MeanIoU
from .base import Method


class Segmentation(Method):
    """Per-pixel cross-entropy of model(x)['out'] (N, K, H, W) against masks (N, H, W), 255 ignored (FCN /
    DeepLabV3 / PSPNet training; no auxiliary head)."""

    modalities = frozenset({"image"})

    def __init__(self, student: nn.Module, ignore_index: int = IGNORE, **kw):
        super().__init__(student, **kw)
        self.ignore_index = int(ignore_index)

    def loss(self, batch):
        out = self.student(batch.inputs)["out"]
        loss = F.cross_entropy(out.float(), batch.targets, ignore_index=self.ignore_index)
        return loss, {"ce": loss.detach()}

    @staticmethod
    def metric(num_classes: int) -> MeanIoU:
        return MeanIoU(num_classes)

    @staticmethod
    def update(model: nn.Module, batch, state: MeanIoU) -> None:
        """Add one eval batch to the mIoU state (model in eval mode, under no_grad)."""
        state.update(model(batch.inputs)["out"].argmax(1), batch.targets)


class Detection(Method):
    """The sum of a torchvision detector's training losses (RPN + box head for Faster R-CNN; focal + box for
    RetinaNet; focal + GIoU + centerness for FCOS) on images (N, C, H, W) and [{boxes, labels}]."""

    modalities = frozenset({"image"})

    def loss(self, batch):
        losses = self.student(list(batch.inputs), batch.targets)
        total = sum(losses.values())
        return total, {k: v.detach() for k, v in losses.items()}

    @staticmethod
    def metric(num_classes: int) -> BoxMAP:
        return BoxMAP()

    @staticmethod
    def update(model: nn.Module, batch, state: BoxMAP) -> None:
        state.update(model(list(batch.inputs)), batch.targets)
