"""Checkpoints of zoo models: `<paths.checkpoints>/<dataset>/<name>/model.safetensors` + `meta.json` (architecture,
kwargs, dataset, accuracies, training config, content hash). Loading never unpickles anything."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..io_utils import file_hash, save_safetensors, write_json
from .factory import Normalized, create_model


def zoo_dir(checkpoints: str, dataset: str, name: str) -> Path:
    return Path(checkpoints) / dataset / name


def save_checkpoint(model: Normalized, folder, meta: dict) -> dict:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), folder / "model.safetensors")
    meta = dict(meta)
    meta.update(arch=model.arch, num_classes=model.num_classes, hash=file_hash(folder / "model.safetensors"),
                created=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_json(folder / "meta.json", meta)
    return meta


def read_meta(folder) -> Optional[dict]:
    p = Path(folder) / "meta.json"
    if not p.is_file() or not (Path(folder) / "model.safetensors").is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p} is corrupt ({e}); delete the folder {folder} to retrain the model") from e


def load_checkpoint(folder, expect_classes: Optional[int] = None, expect_channels: Optional[int] = None
                    ) -> tuple[Normalized, dict]:
    """A model saved by `save_checkpoint` (a folder, or its model.safetensors file)."""
    folder = Path(folder)
    if folder.suffix == ".safetensors":
        folder = folder.parent
    meta = read_meta(folder)
    if meta is None:
        raise UserError(f"{folder} holds no model.safetensors + meta.json: give a zoo name, a timm name or a folder "
                        f"written by main_pretrain.py")
    ds = meta.get("dataset", {})
    if expect_classes is not None and meta["num_classes"] != expect_classes:
        raise UserError(f"checkpoint {folder} predicts {meta['num_classes']} classes but the dataset has "
                        f"{expect_classes}: teacher and student must share the label space (use a checkpoint "
                        f"trained on this dataset)")
    channels = ds.get("channels", expect_channels or 3)
    if expect_channels is not None and channels != expect_channels:
        raise UserError(f"checkpoint {folder} takes {channels}-channel input but dataset.channels={expect_channels}: "
                        f"set dataset.channels={channels}")
    model = create_model(meta["arch"], meta["num_classes"], channels, [0.0] * channels, [1.0] * channels,
                         checkpoint=str(folder / "model.safetensors"), kwargs=meta.get("kwargs") or {},
                         img_size=ds.get("image_size"))
    return model, meta
