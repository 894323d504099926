"""Dense-task metrics, the numbers the papers report: mIoU (semantic segmentation: the standard confusion-matrix
mIoU of mmseg / the PSPNet and DeepLab evaluations, ignore index 255) and COCO box AP / AP50 (detection:
torchmetrics' MeanAveragePrecision with the pycocotools backend, i.e. COCOeval). Both accumulate batch by batch,
so an evaluation pass keeps no prediction tensors."""
from __future__ import annotations

from typing import Dict, List

import torch

IGNORE = 255


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore: int = IGNORE) -> torch.Tensor:
    """(K, K) int64 counts, rows = true class, columns = predicted, over pixels whose target is not `ignore`."""
    keep = target != ignore
    t, p = target[keep].long(), pred[keep].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).view(num_classes, num_classes).cpu()


def iou_from_confusion(conf: torch.Tensor) -> Dict[str, object]:
    """{'miou': mean IoU over the classes present in target or prediction (%), 'iou': per class (nan for
    absent classes), 'pixel_acc': %}: IoU_c = TP / (TP + FP + FN)."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    present = union > 0
    miou = 100 * iou[present].mean().item() if present.any() else float("nan")
    total = conf.sum().item()
    return {"miou": miou, "iou": iou.tolist(), "pixel_acc": 100 * tp.sum().item() / total if total else float("nan")}


class MeanIoU:
    """Accumulating mIoU: `update(logits (N, K, H, W) | predictions (N, H, W), targets (N, H, W))`,
    `compute()` -> iou_from_confusion's dict."""

    def __init__(self, num_classes: int, ignore: int = IGNORE):
        self.num_classes, self.ignore = int(num_classes), ignore
        self.conf = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.ndim == target.ndim + 1:
            pred = pred.argmax(1)
        self.conf += confusion(pred, target, self.num_classes, self.ignore)

    def compute(self) -> Dict[str, object]:
        return iou_from_confusion(self.conf)


class BoxMAP:
    """COCO box AP (AP@[.5:.95], %) and AP50 (%) via torchmetrics' MeanAveragePrecision (pycocotools backend):
    `update(predictions [{boxes, scores, labels}], targets [{boxes, labels}])` per batch, xyxy pixels."""

    def __init__(self):
        from torchmetrics.detection import MeanAveragePrecision

        self.metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")

    def update(self, preds: List[Dict[str, torch.Tensor]], targets: List[Dict[str, torch.Tensor]]) -> None:
        cpu = [{k: v.detach().float().cpu() if k != "labels" else v.detach().long().cpu() for k, v in d.items()
                if k in ("boxes", "scores", "labels")} for d in preds]
        self.metric.update(cpu, [{k: t[k].detach().cpu() for k in ("boxes", "labels")} for t in targets])

    def compute(self) -> Dict[str, float]:
        r = self.metric.compute()
        return {"map": 100 * float(r["map"]), "ap50": 100 * float(r["map_50"]), "ap75": 100 * float(r["map_75"])}
