"""Disk cache of a model's outputs (logits, optionally penultimate features) over a split.

Key: (model content key, dataset key incl. the eval transform, split name + ids digest). A model is evaluated
once per key; every later run, pair or epoch re-uses the file. Models without a stable key (random init) are
computed and not cached.

Nothing read back is trusted: an entry that cannot be loaded (garbage, truncated, a folder, unreadable) or that
does not fit the request (other sample ids or labels, wrong shapes, another class count or feature width,
non-finite values) is logged, deleted and recomputed; it is never served and never fatal. An entry that cannot be
stored (a full disk) is warned about once per cache folder and the outputs are used unstored."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch

from ..errors import UserError
from ..io_utils import disk_full, disk_full_error, free_bytes, load_state_dict, save_safetensors
from .evaluate import predict

log = logging.getLogger(__name__)
_WARNED: set = set()  # cache folders already warned about (cannot store): once per folder and process


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
        self.rejected = 0  # invalid entries deleted and recomputed
        self.unstored = 0  # entries computed but not stored (the cache folder could not take them)

    def summary(self) -> str:
        """One INFO line for the end of a run (each hit and write is a DEBUG line): what the cache saved."""
        extra = "".join(f", {n} {what}" for n, what in ((self.rejected, "invalid entries recomputed"),
                                                        (self.unstored, "not stored")) if n)
        return (f"output cache: {self.hits} read back, {self.computed} computed{extra} "
                f"({self.root if self.enabled else 'disabled'})")

    @staticmethod
    def _read(p: Path, model, split, features: bool):
        """(outputs, None) for a valid entry; (None, reason) for an invalid one; (None, '') for a valid entry
        that lacks the features asked for (recomputed and rewritten with them)."""
        if not p.is_file():
            return None, "not a regular file"
        try:
            out = load_state_dict(p, what="output cache entry")
        except UserError:
            return None, "it cannot be loaded"
        net = getattr(model, "net", None)  # a Normalized model: its pre-logits width (timm's head_hidden_size when
        # the head has a hidden layer, else num_features); other wrappers (pre-activation features) are not checked
        width = (getattr(net, "head_hidden_size", None) or getattr(net, "num_features", None)) if net is not None \
            else None
        why = validate_outputs(out, split, getattr(model, "num_classes", None), width)
        if why:
            return None, why
        if features and "features" not in out:
            return None, ""
        return out, None

    def path(self, model_key: str, dataset_key: str, split) -> Path:
        sk = f"{split.name}-{len(split)}-{digest(split.ids)}"
        safe = model_key.replace("/", "_").replace(":", "_")
        return self.root / safe / f"{dataset_key}__{sk}.safetensors"

    def get(self, model, model_key: Optional[str], dataset_key: str, split, loader, features: bool = False,
            amp: str = "none", label: str = "") -> Dict[str, torch.Tensor]:
        p = self.path(model_key, dataset_key, split) if (model_key and self.enabled) else None
        if p is not None and (p.exists() or p.is_symlink()):
            out, why = self._read(p, model, split, features)
            if out is not None:
                self.hits += 1
                log.debug("output cache hit: %s on %s/%s (%s)", label or model_key, dataset_key, split.name, p)
                return out
            if why:
                self.rejected += 1
                log.warning("output cache entry %s is invalid (%s): deleted, recomputing", p, why)
                _remove(p)
        out = predict(model, loader, features=features, amp=amp)
        self.computed += 1
        for k in ("logits", "features"):  # never cached, never used: a later loss would blame the method
            if k in out and not bool(torch.isfinite(out[k]).all()):
                n = int((~torch.isfinite(out[k])).any(dim=1).sum()) if out[k].ndim > 1 else -1
                fp32 = ", or evaluate in fp32 (trainer.amp=none)" if amp != "none" else ""
                raise UserError(f"model {label or model_key} gives non-finite {k} on {split.name} ({n} of "
                                f"{len(out[k])} samples, amp={amp}): check its weights file and its input "
                                f"statistics (mean/std){fp32}; nothing was cached")
        if p is not None and self.store(out, p):
            log.debug("output cache write: %s on %s/%s -> %s", label or model_key, dataset_key, split.name, p)
        return out

    def store(self, out: Dict[str, torch.Tensor], p: Path) -> bool:
        """Write one entry; a cache that cannot store (a full disk, a folder made read-only mid-run) is only a
        lost speed-up: the outputs are used all the same, and the reason is warned about once per cache folder."""
        try:
            save_safetensors(out, p)
            return True
        except (OSError, UserError) as e:
            e = e if isinstance(e, UserError) else (disk_full_error(p, e) if disk_full(e, p.parent) else e)
            self.unstored += 1
            if str(self.root) not in _WARNED:
                _WARNED.add(str(self.root))
                log.warning("output cache %s cannot store entries (%s): computing without storing", self.root, e)
            return False


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    except OSError as e:  # recomputing still works; the rewrite below replaces a file we could not delete
        log.warning("could not delete the invalid cache entry %s (%s)", p, e.strerror or e)


def validate_outputs(out: Dict[str, torch.Tensor], split, num_classes: Optional[int] = None,
                     num_features: Optional[int] = None) -> str:
    """'' when `out` is a valid cache entry of a model on `split`, else why not (for the log)."""
    for k in ("logits", "labels", "ids"):
        if k not in out:
            return f"no '{k}'"
    ids, logits, labels = out["ids"], out["logits"], out["labels"]
    n = len(split.ids)
    if ids.ndim != 1 or ids.shape[0] != n or ids.is_floating_point():
        return f"ids of shape {tuple(ids.shape)}, expected ({n},)"
    if not torch.equal(ids, torch.sort(split.ids).values):
        return "other sample ids than the split"
    if logits.ndim != 2 or logits.shape[0] != n or not logits.is_floating_point():
        return f"logits of shape {tuple(logits.shape)}, expected ({n}, K)"
    if num_classes and logits.shape[1] != num_classes:  # 0: a headless feature model (its logits are features)
        return f"{logits.shape[1]} classes, the model has {num_classes}"
    if tuple(labels.shape) != (n,):
        return f"labels of shape {tuple(labels.shape)}, expected ({n},)"
    if hasattr(split, "labels") and torch.is_tensor(split.labels) and split.labels.shape[0] == n:
        if not torch.equal(labels.long(), split.labels.long()[torch.argsort(split.ids)]):
            return "other labels than the split"
    if not torch.isfinite(logits).all():
        return "non-finite logits"
    if "features" in out:
        f = out["features"]
        if f.ndim != 2 or f.shape[0] != n or not f.is_floating_point():
            return f"features of shape {tuple(f.shape)}, expected ({n}, D)"
        if num_features is not None and f.shape[1] != num_features:
            return f"{f.shape[1]} feature columns, the model has {num_features}"
        if not torch.isfinite(f).all():
            return "non-finite features"
    return ""


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
    need = n * K * 2 + 4096
    if free_bytes(path.parent) < need:  # a memory map written past a full disk dies of SIGBUS, not an error
        raise disk_full_error(path, OSError(28, f"{need:,} bytes needed for the fp16 log-probabilities"))
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
