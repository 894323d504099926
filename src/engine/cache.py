"""Disk cache of a model's outputs (logits, optionally penultimate features) over a split.

Key: (model content key, dataset key incl. the eval transform, split name + ids digest). A model is evaluated
once per key; every later run, pair or epoch re-uses the file. Models without a stable key (random init) are
computed and not cached."""
from __future__ import annotations

import hashlib
import logging
import os
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


# ------------------------------------------------------------------ log-probabilities as fp16 memory maps (KL)


def log_prob_path(output_path: Path, T: float) -> Path:
    """The fp16 log-probability file kept next to an output cache file, per temperature."""
    return output_path.with_name(f"{output_path.stem}.logp-T{T:g}.f16.npy")


def log_prob_file(logits: torch.Tensor, path: Path, T: float = 1.0, rows: int = 4096):
    """fp16 log_softmax(logits / T) of one model, (n, K), as a read-only memory-mapped .npy at `path`: written
    once (chunk by chunk, to a temporary file then renamed) and re-used while its shape matches; the streamed KL
    (`metrics.pairwise.kl_matrix_stream`) reads it a block of samples at a time, so the N x n x K set of a run
    never has to fit in memory."""
    import numpy as np

    path = Path(path)
    n, K = logits.shape
    if path.is_file():
        try:
            mm = np.load(path, mmap_mode="r")
            if mm.shape == (n, K) and mm.dtype == np.float16:
                return mm
        except (ValueError, OSError):
            pass
        log.info("log-prob file %s does not match (%d, %d) fp16: rewriting it", path, n, K)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, K))
    lo = float(torch.finfo(torch.float16).min)
    for i in range(0, n, rows):
        lp = torch.log_softmax(logits[i:i + rows].float() / T, dim=-1).clamp_min(lo)
        out[i:i + rows] = lp.to(torch.float16).cpu().numpy()
    out.flush()
    del out
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")
