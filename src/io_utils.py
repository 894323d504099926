"""Atomic writes and safe loading of weights (used by models, engine and experiments alike).

- Model weights are safetensors; anything else goes through `torch.load(weights_only=True)`, which refuses
  pickles that would construct arbitrary objects. A refused or truncated file becomes a UserError naming it.
- Writes go to a temporary file in the same directory and are moved in place with `os.replace`, so a crash
  during a save leaves the previous file intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict

import torch

from .errors import UserError


@contextmanager
def atomic_path(path, suffix: str = ".tmp"):
    """Yield a temporary path next to `path`; on success it replaces `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def save_safetensors(state: Dict[str, torch.Tensor], path, metadata: Dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    # safetensors refuses shared storage; clone to plain contiguous CPU tensors
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def torch_save(obj: Any, path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_state_dict(path) -> Dict[str, torch.Tensor]:
    """Weights from a .safetensors file, or a torch file loaded with weights_only=True (never executes code).
    Accepts the usual wrappers ({'state_dict': ...}, {'model': ...})."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise UserError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}); "
                            f"re-download or retrain it") from e
    obj = safe_torch_load(path)
    for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path} holds no state dict of tensors: save model.state_dict()")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}


def safe_torch_load(path, map_location="cpu"):
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses anyway
            warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0][:200]
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise UserError(f"refusing to load {path}: it is a pickle that would construct arbitrary objects "
                            f"({msg}); convert it to safetensors from a trusted environment") from e
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {msg}); "
                        f"re-download or retrain it") from e


def file_hash(path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]
