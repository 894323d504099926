"""Inference over a loader. `collect` is the generic pass: every batch of the loader's epoch 0 under no_grad and
autocast, a caller's `per_batch(batch)` saying what to keep per sample (or accumulating itself and keeping
nothing: dense tasks' metric states), the kept rows concatenated on the CPU in sample-id order. `predict` is its
classification use: logits (and optionally penultimate features) for every sample."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from ..batch import Batch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def collect(per_batch: Callable[[Batch], Optional[Dict[str, torch.Tensor]]], loader, amp: str = "none",
            device=None) -> Dict[str, torch.Tensor]:
    """Run `per_batch(batch)` on every batch of `loader.iter_epoch(0)` under no_grad and autocast (`amp`: none,
    bf16, fp16, on `device`'s type; default the loader's device). `per_batch` returns a dict of per-sample tensors
    (first dim = len(batch)) to keep, or None to keep nothing (a caller that accumulates, e.g. a metric state).
    Returns the kept tensors, each concatenated on the CPU, plus 'ids' (of the batches that kept something), all
    ordered by id; {} when nothing was kept."""
    dev = torch.device(device if device is not None else getattr(loader, "device", "cpu"))
    dtype = AMP_DTYPES.get(amp)
    kept: Dict[str, list] = {}
    ids = []
    for batch in loader.iter_epoch(0):
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            out = per_batch(batch)
        if out is None:
            continue
        for k, v in out.items():
            kept.setdefault(k, []).append(v.cpu())
        ids.append(batch.ids.cpu())
    if not ids:
        return {}
    res = {k: torch.cat(v) for k, v in kept.items()}
    res["ids"] = torch.cat(ids)
    order = torch.argsort(res["ids"])
    return {k: v[order] for k, v in res.items()}


def predict(model, loader, features: bool = False, amp: str = "none", num_samples: Optional[int] = None
            ) -> Dict[str, torch.Tensor]:
    """{'logits': (N, K) float32 on CPU, 'labels': (N,), 'ids': (N,)[, 'features': (N, D)]} ordered by id."""
    was = model.training
    model.eval()
    dev = next(iter(model.buffers()), next(model.parameters())).device

    def per_batch(batch: Batch) -> Dict[str, torch.Tensor]:
        if features:
            f, z = model.features_and_logits(batch.inputs)
            return {"logits": z.float(), "labels": batch.targets, "features": f.float()}
        return {"logits": model(batch.inputs).float(), "labels": batch.targets}

    try:
        res = collect(per_batch, loader, amp=amp, device=dev)
    finally:
        model.train(was)
    return {k: res[k] for k in ("logits", "labels", "ids", "features") if k in res}
