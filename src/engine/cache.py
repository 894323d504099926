"""Disk cache of a model's outputs (logits, optionally penultimate features) over a split.

Key: (model content key, dataset key incl. the eval transform, split name + ids digest). A model is evaluated
once per key; every later run, pair or epoch re-uses the file. Models without a stable key (random init) are
computed and not cached."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Dict, Optional

import torch

from ..io_utils import load_state_dict, save_safetensors
from .evaluate import predict

log = logging.getLogger(__name__)


def digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.cpu().numpy().tobytes())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()[:12]


class OutputCache:
    def __init__(self, root, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled
        self.computed = 0  # model evaluations actually run (tests count them)
        self.hits = 0

    def path(self, model_key: str, dataset_key: str, split) -> Path:
        sk = f"{split.name}-{len(split)}-{digest(split.ids)}"
        safe = model_key.replace("/", "_").replace(":", "_")
        return self.root / safe / f"{dataset_key}__{sk}.safetensors"

    def get(self, model, model_key: Optional[str], dataset_key: str, split, loader, features: bool = False,
            amp: str = "none", label: str = "") -> Dict[str, torch.Tensor]:
        p = self.path(model_key, dataset_key, split) if (model_key and self.enabled) else None
        if p is not None and p.is_file():
            out = load_state_dict(p)
            if (not features or "features" in out) and torch.equal(out["ids"], torch.sort(split.ids).values):
                self.hits += 1
                log.info("output cache hit: %s on %s/%s (%s)", label or model_key, dataset_key, split.name, p)
                return out
        out = predict(model, loader, features=features, amp=amp)
        self.computed += 1
        if p is not None:
            save_safetensors(out, p)
            log.info("output cache write: %s on %s/%s -> %s", label or model_key, dataset_key, split.name, p)
        return out


def rows_by_id(out: Dict[str, torch.Tensor], size: int, key: str = "logits") -> torch.Tensor:
    """Scatter cached rows into a (size, ...) table indexed by sample id (for in-training lookups)."""
    t = out[key]
    table = torch.zeros((size,) + tuple(t.shape[1:]), dtype=t.dtype)
    table[out["ids"]] = t
    return table
