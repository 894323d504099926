"""What the multi-stage families share: stage folders (a finished stage's student + row, read back on a rerun)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch

from ..io_utils import load_state_dict, read_json_safe, write_json
from ..models import Normalized, read_meta, save_checkpoint
from ..models.zoo import verified_hash

# ------------------------------------------------------------------------------------------- stages
# Multi-stage families (multi-teacher, KDEP) keep each finished stage in a folder: the stage's student under
# `student/` (written first) and `row.json` (written last: its presence marks the stage finished).
def read_stage(d: Path, like: Optional[torch.nn.Module] = None, device="cpu"):
    """(model, row, checkpoint meta) of the stage finished earlier in folder `d`, else None. `model` is a copy of
    `like` holding the stage's student weights (model and meta are None when `like` is None)."""
    if not (d / "row.json").is_file():
        return None
    row = read_json_safe(d / "row.json", "stage result", f"delete the folder {d} to rerun the stage")
    if like is None:
        return None, row, None
    meta = read_meta(d / "student")
    if meta is None:
        return None
    meta = dict(meta, hash=verified_hash(d / "student", meta))
    model = copy.deepcopy(like)
    model.load_state_dict(load_state_dict(d / "student" / "model.safetensors"))
    return model.to(device), row, meta


def write_stage(d: Path, row: dict, model: Optional[Normalized] = None, meta: Optional[dict] = None,
                rank: int = 0) -> Optional[dict]:
    """Mark stage `d` finished: the student's weights first (if any), the row last. Only rank 0 writes (the other
    ranks hold the same weights); returns the saved checkpoint's meta (with its content hash), else None."""
    if rank != 0:
        return None
    saved = save_checkpoint(model, d / "student", meta or {}) if model is not None else None
    write_json(d / "row.json", row)
    return saved
