"""Checkpoints of zoo models: `<paths.checkpoints>/<dataset>/<name>/model.safetensors` + `meta.json` (architecture,
kwargs, dataset, accuracies, training config, content hash). Loading never unpickles anything."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..io_utils import content_hash, file_hash, read_json_safe, save_safetensors, write_json
from .factory import Normalized, create_model
from .protocol import ImageInputs, TextInputs


def zoo_dir(checkpoints: str, dataset: str, name: str) -> Path:
    return Path(checkpoints) / dataset / name


def save_checkpoint(model: Normalized, folder, meta: dict) -> dict:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), folder / "model.safetensors")
    meta = dict(meta)
    modality = getattr(model, "modality", "image")
    if modality != "image":  # a text model's folder carries its tokenizer: it loads without its dataset
        model.save_extras(folder)
        meta.update(modality=modality, max_length=model.max_length)
    meta.update(arch=model.arch, num_classes=model.num_classes, hash=file_hash(folder / "model.safetensors"),
                created=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_json(folder / "meta.json", meta)
    return meta


def read_meta(folder) -> Optional[dict]:
    """The folder's meta.json (None when the folder holds no model.safetensors + meta.json); one UserError when it
    is torn, not a JSON object, lacks `arch` / `num_classes`, or either file is a folder."""
    folder = Path(folder)
    p, w = folder / "meta.json", folder / "model.safetensors"
    if folder.exists() and not folder.is_dir():
        raise UserError(f"checkpoint folder {folder} is a regular file: move it away (a zoo model is a folder with "
                        f"model.safetensors + meta.json)")
    for f in (p, w):
        if f.is_dir():
            raise UserError(f"{f} is a folder, not a file: delete the folder {folder} to retrain the model")
    if not p.is_file() or not w.is_file():
        return None
    fix = f"delete the folder {folder} to retrain the model"
    meta = read_json_safe(p, "checkpoint meta", fix)
    if not isinstance(meta, dict):
        raise UserError(f"checkpoint meta {p} holds a {type(meta).__name__}, not an object: {fix}")
    missing = [k for k in ("arch", "num_classes") if k not in meta]
    if missing:
        raise UserError(f"checkpoint meta {p} has no '{missing[0]}': {fix}")
    if not isinstance(meta.get("kwargs") or {}, dict) or not isinstance(meta.get("dataset") or {}, dict):
        raise UserError(f"checkpoint meta {p}: 'kwargs' and 'dataset' must be objects: {fix}")
    return percent_accuracies(meta)


ACC_KEYS = ("test_acc", "val_acc")


def percent_accuracies(meta: dict) -> dict:
    """Accuracies are percent everywhere (`acc_unit: percent`); a meta.json written before that holds fractions
    in [0, 1]: they are read as percent."""
    if meta.get("acc_unit") == "percent":
        return meta
    acc = {k: 100 * meta[k] for k in ACC_KEYS if isinstance(meta.get(k), (int, float)) and
           not isinstance(meta.get(k), bool)}
    return {**meta, **acc, "acc_unit": "percent"}


def verified_hash(folder, meta: dict, index=None) -> str:
    """The content hash of the folder's weights (what cache keys use), after checking it against meta.json's
    claim: a mismatch (weights replaced by hand, a meta.json copied from another model) is one UserError."""
    folder = Path(folder)
    h = content_hash(folder / "model.safetensors", index)
    claim = meta.get("hash")
    if claim is not None and str(claim) != h[:len(str(claim))]:
        raise UserError(f"{folder}/model.safetensors does not match its meta.json (hash {h}, meta.json says "
                        f"{claim}): the weights were replaced or meta.json copied; retrain it (delete the folder)"
                        f" or rewrite meta.json with save_checkpoint")
    return h


def load_checkpoint(folder, expect_classes: Optional[int] = None, expect_channels: Optional[int] = None,
                    hash_index=None, expect_modality: Optional[str] = None) -> tuple[Normalized, dict]:
    """A model saved by `save_checkpoint` (a folder, or its model.safetensors file). The returned meta's `hash` is
    the weights' content hash, verified against meta.json (see `verified_hash`). `expect_modality`: the dataset's
    (a text checkpoint for an image dataset, or the reverse, is one line)."""
    folder = Path(folder)
    if folder.suffix == ".safetensors":
        folder = folder.parent
    meta = read_meta(folder)
    if meta is None:
        raise UserError(f"{folder} holds no model.safetensors + meta.json: give a zoo name, a timm name or a folder "
                        f"written by main_pretrain.py")
    meta = dict(meta, hash=verified_hash(folder, meta, hash_index))
    modality = meta.get("modality", "image")
    if expect_modality is not None and modality != expect_modality:
        raise UserError(f"checkpoint {folder} is a {modality} model ({meta['arch']}) but the dataset is "
                        f"{expect_modality}: give a {expect_modality} model")
    ds = meta.get("dataset") or {}
    if expect_classes is not None and meta["num_classes"] != expect_classes:
        raise UserError(f"checkpoint {folder} predicts {meta['num_classes']} classes but the dataset has "
                        f"{expect_classes}: teacher and student must share the label space (use a checkpoint "
                        f"trained on this dataset)")
    if modality == "text":
        inputs = TextInputs(meta["num_classes"], str(folder / "tokenizer"))
        return create_model(meta["arch"], inputs, checkpoint=str(folder / "model.safetensors"),
                            kwargs=meta.get("kwargs") or {}), meta
    channels = ds.get("channels", expect_channels or 3)
    if expect_channels is not None and channels != expect_channels:
        raise UserError(f"checkpoint {folder} takes {channels}-channel input but dataset.channels={expect_channels}: "
                        f"set dataset.channels={channels}")
    inputs = ImageInputs(meta["num_classes"], channels, [0.0] * channels, [1.0] * channels, ds.get("image_size"))
    model = create_model(meta["arch"], inputs, checkpoint=str(folder / "model.safetensors"),
                         kwargs=meta.get("kwargs") or {})
    return model, meta
