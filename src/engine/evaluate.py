"""Inference over a loader: logits (and optionally penultimate features) for every sample, in sample-id order."""
from __future__ import annotations

from typing import Dict, Optional

import torch


@torch.no_grad()
def predict(model, loader, features: bool = False, amp: str = "none", num_samples: Optional[int] = None
            ) -> Dict[str, torch.Tensor]:
    """{'logits': (N, K) float32 on CPU, 'labels': (N,), 'ids': (N,)[, 'features': (N, D)]} ordered by id."""
    was = model.training
    model.eval()
    dev = next(iter(model.buffers()), next(model.parameters())).device
    outs = {"logits": [], "labels": [], "ids": []}
    if features:
        outs["features"] = []
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    for x, y, idx in loader.iter_epoch(0):
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            if features:
                f, z = model.features_and_logits(x)
                outs["features"].append(f.float().cpu())
            else:
                z = model(x)
        outs["logits"].append(z.float().cpu())
        outs["labels"].append(y.cpu())
        outs["ids"].append(idx.cpu())
    model.train(was)
    res = {k: torch.cat(v) for k, v in outs.items()}
    order = torch.argsort(res["ids"])
    return {k: v[order] for k, v in res.items()}
